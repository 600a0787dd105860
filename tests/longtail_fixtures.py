"""Miniature ImageNet-LT and Places-LT in the real schemas, five real classes each with the same graded
train counts. ImageNet-LT: laid out as ILSVRC2012 (``train/<wnid>/<wnid>_<n>.JPEG`` and the validation
images, as a folder tree or the official tars), its train list fetched by URL as the real one is
downloaded. Places-LT: laid out as Places365-Standard (``data_256/<letter>/<class>[/<sub>]/<n>.jpg`` and
``val_256/``), with Places-LT-style lists. Used by tests/test_benchmarks_longtail.py (the data stage)
and tests/test_longtail_rehearsal.py (the GPU profiles end to end)."""
import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.longtail.registry import SPLITS, ListFile, LongTailSpec, get_benchmark

# Five real ILSVRC2012 classes; train counts straddle both boundaries of classifier-balancing's rule
# (many > 100, few < 20): 101 many, 100 and 20 medium, 19 and 5 few.
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")
# Places-LT classes, two with a sub-category folder in data_256 (arena/hockey)
PLACES = ("airfield", "airplane_cabin", "apartment_building-outdoor", "arena-hockey", "alley")
TRAIN = (101, 100, 20, 19, 5)
VAL, TEST = 2, 3


def jpeg(label: int, i: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(1000 * label + i)
    base = np.array([40 + 50 * label, 200 - 40 * label, 120], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def fixture_lists():
    """ImageNet-LT-style lists: val from the ILSVRC train folder, test from the ILSVRC val images."""
    lists = {s: [] for s in SPLITS}
    val_no = 293
    for label, (wnid, n) in enumerate(zip(WNIDS, TRAIN)):
        for i in range(n + VAL):
            split = "train" if i < n else "val"
            lists[split].append((f"train/{wnid}/{wnid}_{10026 + 7 * i}.JPEG", label))
        for _ in range(TEST):
            lists["test"].append((f"val/{wnid}/ILSVRC2012_val_{val_no:08d}.JPEG", label))
            val_no += 1
    return lists


def list_text(entries) -> bytes:
    return "".join(f"{p} {label}\n" for p, label in entries).encode()


def write_tree(root, lists, as_tars: bool = False, unlisted: int = 0):
    """ILSVRC2012 layout: train/<wnid>/<file> and a flat val/, or the official tars; plus ``unlisted``
    training images per class that no list names (<wnid>_9000<i>.JPEG)."""
    files = {}
    for split in SPLITS:
        for k, (path, label) in enumerate(lists[split]):
            name = path.split("/")[-1]
            files[f"train/{path.split('/')[1]}/{name}" if path.startswith("train/") else f"val/{name}"] = jpeg(label, k)
    for label, wnid in enumerate(WNIDS):
        for i in range(unlisted):
            files[f"train/{wnid}/{wnid}_{90000 + i}.JPEG"] = jpeg(label, 5000 + i)
    if not as_tars:
        for rel, b in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b)
        return root
    root.mkdir(parents=True, exist_ok=True)

    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in WNIDS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for rel, b in files.items():
                    if rel.startswith(f"train/{wnid}/"):
                        add(t, rel.split("/")[-1], b)
            add(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
        for rel, b in files.items():
            if rel.startswith("val/"):
                add(t, rel.split("/")[-1], b)
    return root



def places_lists():
    """Places-LT-style lists: train and val from the Places365 train folders (numbered per class),
    test from its validation images."""
    lists = {s: [] for s in SPLITS}
    val_no = 3597
    for label, (c, n) in enumerate(zip(PLACES, TRAIN)):
        for i in range(n + VAL):
            lists["train" if i < n else "val"].append((f"train/{c}/{4851 + 13 * i:08d}.jpg", label))
        for _ in range(TEST):
            lists["test"].append((f"val/{c}/Places365_val_{val_no:08d}.jpg", label))
            val_no += 1
    return lists


def write_places_tree(root: Path, lists, unlisted: int = 0) -> Path:
    """Places365-Standard layout: data_256/<first letter>/<class, '-' as a sub-folder>/<file>, val_256/<file>;
    plus ``unlisted`` training images per class that no list names (0009000<i>.jpg)."""
    extra = [(f"train/{c}/{90000 + i:08d}.jpg", label) for label, c in enumerate(PLACES) for i in range(unlisted)]
    for split in (*SPLITS, "unlisted"):
        for k, (path, label) in enumerate(lists[split] if split != "unlisted" else extra):
            _, c, name = path.split("/")
            rel = f"data_256/{c[0]}/{c.replace('-', '/')}/{name}" if path.startswith("train/") else f"val_256/{name}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(jpeg(label, k))
    return root


def places_lt_fixture(folder: Path, name: str = "places-lt-fixture") -> tuple[LongTailSpec, dict, dict[str, Path]]:
    """``(spec, lists, list files)``: the real Places-LT spec with the fixture's classes and lists (by path)."""
    lists = places_lists()
    (folder / "lists").mkdir(parents=True)
    files = {s: folder / "lists" / f"Places_LT_{s}.txt" for s in SPLITS}
    for s in SPLITS:
        files[s].write_bytes(list_text(lists[s]))
    lf = {s: ListFile(hashlib.sha256(files[s].read_bytes()).hexdigest(), files[s].name, path=str(files[s])) for s in SPLITS}
    spec = dataclasses.replace(get_benchmark("places-lt"), name=name, classes=PLACES, lists=lf,
                               images_per_split={s: len(lists[s]) for s in SPLITS},
                               images_per_class={"val": VAL, "test": TEST}, image_size=12)
    return spec, lists, files


def imagenet_lt_fixture(folder: Path, name: str = "imagenet-lt-fixture") -> tuple[LongTailSpec, dict, dict[str, Path]]:
    """``(spec, lists, list files)``: the real ImageNet-LT spec with the fixture's classes and lists (val
    and test by path, train by a file:// URL, as downloaded)."""
    lists = fixture_lists()
    (folder / "lists").mkdir(parents=True)
    files = {}
    for s in SPLITS:
        files[s] = folder / "lists" / f"ImageNet_LT_{s}.txt"
        files[s].write_bytes(list_text(lists[s]))
    lf = {s: ListFile(hashlib.sha256(files[s].read_bytes()).hexdigest(), files[s].name, path=str(files[s]))
          for s in ("val", "test")}
    lf["train"] = ListFile(hashlib.sha256(files["train"].read_bytes()).hexdigest(), files["train"].name,
                           url=files["train"].as_uri(), size=files["train"].stat().st_size)
    spec = dataclasses.replace(get_benchmark("imagenet-lt"), name=name, classes=WNIDS, lists=lf,
                               images_per_split={s: len(lists[s]) for s in SPLITS},
                               images_per_class={"val": VAL, "test": TEST}, image_size=12)
    return spec, lists, files
