"""Local parquet stand-ins for the hub datasets the paper profile loads, in each one's hub schema:
the same split names, column names, column types and ClassLabel names (in the hub's label order),
so the code path from ``load_dataset`` to the prepared benchmark is the real one, plus a dataset card
declaring the split sizes. Only the images are tiny (8x8 PNG, one colour per class) and the counts
are arguments; by default they are the hub's:

* ``bentrevett/caltech-ucsd-birds-200-2011``: ``image``, ``label`` (ClassLabel, ``001.Black_footed_Albatross``
  ... ``200.Common_Yellowthroat``), ``bbox`` (4 floats); train 5,994 + test 5,794 = 11,788 rows;
* ``timm/mini-imagenet``: ``image``, ``label`` (ClassLabel, the 100 wnids sorted); every class in
  every split, train 500 + validation 100 + test 50 per class;
* ``uoft-cs/cifar100``: ``img``, ``fine_label`` (ClassLabel, the 100 names in CIFAR order, class 26
  spelt ``cra``), ``coarse_label`` (ClassLabel, 20 superclasses); train 500 + test 100 per class.
"""
from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from benchmarks.fewshot.registry import SPLITS, shipped_split

CUB_SPLIT_ROWS = {"train": 5994, "test": 5794}


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), tuple(int(v) for v in rgb)).save(buf, format="PNG")
    return buf.getvalue()


def _class_pngs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [_png(rng.integers(0, 256, 3)) for _ in range(n)]


def _write(root: Path, splits: dict[str, dict], features: datasets.Features) -> Path:
    """Parquet files as on the hub, and a dataset card (README.md) whose ``dataset_info`` declares the
    features and each split's size, as the hub's cards do (``datasets`` checks the sizes on load)."""
    import yaml

    (root / "data").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, columns in splits.items():
        ds = datasets.Dataset.from_dict(columns, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        sizes[split] = ds.num_rows
    info = datasets.DatasetInfo(features=features, splits=datasets.SplitDict(
        {s: datasets.SplitInfo(name=s, num_bytes=0, num_examples=n) for s, n in sizes.items()}))
    card = {"dataset_info": info._to_yaml_dict(),
            "configs": [{"config_name": "default",
                         "data_files": [{"split": s, "path": f"data/{s}-*"} for s in sizes]}]}
    (root / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n")
    return root


def cifar100_names() -> tuple[list[str], list[str], dict[str, str]]:
    """(fine names in CIFAR-100 label order as on the hub, coarse names, fine -> coarse)."""
    pairs = [tuple(p) for s in SPLITS for p in _cifar_pairs(s)]
    fine = sorted(f for _, f in pairs)   # CIFAR-100 numbers its classes alphabetically
    coarse_of = {f: c for c, f in pairs}
    return [("cra" if f == "crab" else f) for f in fine], sorted(set(coarse_of.values())), coarse_of


def _cifar_pairs(split: str):
    import json
    from importlib import resources

    return json.loads(resources.files("benchmarks.fewshot").joinpath("splits", "cifar-fs", f"{split}.json").read_text())


def write_cifar100(root: Path, per_split: dict[str, int] | None = None) -> Path:
    per_split = per_split or {"train": 500, "test": 100}
    fine, coarse, coarse_of = cifar100_names()
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine),
                                  "coarse_label": datasets.ClassLabel(names=coarse)})
    pngs = _class_pngs(len(fine))
    splits = {}
    for split, n in per_split.items():
        labels = [k for k in range(len(fine)) for _ in range(n)]
        splits[split] = {"img": [{"bytes": pngs[k], "path": None} for k in labels], "fine_label": labels,
                         "coarse_label": [coarse.index(coarse_of["crab" if fine[k] == "cra" else fine[k]])
                                          for k in labels]}
    return _write(root, splits, features)


def write_mini_imagenet(root: Path, per_split: dict[str, int] | None = None, rename: dict[str, str] | None = None) -> Path:
    """``rename`` replaces label names (e.g. a wnid that is not one of miniImageNet's)."""
    per_split = per_split or {"train": 500, "validation": 100, "test": 50}
    wnids = sorted(w for s in SPLITS for w in shipped_split("miniimagenet")[s])
    names = [(rename or {}).get(w, w) for w in wnids]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    pngs = _class_pngs(len(names))
    splits = {}
    for split, n in per_split.items():
        labels = [k for k in range(len(names)) for _ in range(n)]
        splits[split] = {"image": [{"bytes": pngs[k], "path": None} for k in labels], "label": labels}
    return _write(root, splits, features)


def write_cub(root: Path, split_rows: dict[str, int] | None = None) -> Path:
    split_rows = split_rows or CUB_SPLIT_ROWS
    folders = sorted(c for s in SPLITS for c in shipped_split("cub")[s])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folders),
                                  "bbox": datasets.Sequence(datasets.Value("float32"), length=4)})
    total = sum(split_rows.values())
    labels = sorted(k % len(folders) for k in range(total))   # hub counts: 58 or 59 images per class
    pngs = _class_pngs(len(folders))
    rows = {"train": labels[::2] + labels[1::2][:split_rows["train"] - len(labels[::2])]}
    rows["test"] = labels[1::2][split_rows["train"] - len(labels[::2]):]
    splits = {split: {"image": [{"bytes": pngs[k], "path": None} for k in ls], "label": ls,
                      "bbox": [[0.0, 0.0, 8.0, 8.0]] * len(ls)} for split, ls in rows.items()}
    return _write(root, splits, features)


WRITERS = {"cub": write_cub, "miniimagenet": write_mini_imagenet, "cifar-fs": write_cifar100}


# Few images per class for the rehearsal (>= 20 per class: 5 support + 15 queries).
SMALL = {"cub": {"split_rows": {"train": 2000, "test": 2000}},
         "miniimagenet": {"per_split": {"train": 16, "validation": 4, "test": 2}},
         "cifar-fs": {"per_split": {"train": 16, "test": 4}}}
