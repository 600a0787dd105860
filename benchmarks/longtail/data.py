"""Lists and images of a long-tail benchmark.

``prepare`` reads the three lists (shipped, a local copy, or downloaded; every one checked by size and
sha256), checks them against the spec (totals, labels, images per class of the balanced splits, the
class folder of every path), finds each listed image in a local copy of the source dataset, and
writes ``<out>/{train,val,test}.csv`` (``path,label,class_name``) and ``integrity.json`` into a
directory that appears complete or not at all.

Images are selected by file name, so the source may be laid out in any of the usual ways:

* ILSVRC2012 as a folder tree (``train/<wnid>/<wnid>_<n>.JPEG``; ``val/`` flat or per wnid), a hub copy
  that keeps the original file names, or the official tars (``ILSVRC2012_img_train.tar`` holding one tar
  per wnid, ``ILSVRC2012_img_val.tar``); images found inside tars are extracted under ``<out>/../images``.
* Places365 as ``train/<class>/<n>.jpg`` and ``val/<class>/Places365_val_<n>.jpg`` (the "easyformat"
  layout of the Places-LT lists), ``data_256/<letter>/<class>[/<sub>]/<n>.jpg`` with ``val_256/`` flat,
  or tars of those.

A listed image that is in none of them is an error that names it."""
from __future__ import annotations

import csv
import io
import os
import shutil
import tarfile
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.longtail.registry import SPLITS, ListFile, LongTailSpec, sha256, shipped_list
from pipelines.io import check_image, read_record, write_bytes, write_record, write_text

INTEGRITY_FILE = "integrity.json"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
PLACES_VAL_PREFIX = "Places365_val_"


class ListChecksumError(ValueError):
    """A list file is not the published one (size or sha256 differ)."""


class DatasetIntegrityError(ValueError):
    """A list does not match its benchmark (counts, labels, class folders)."""


class MissingImageError(FileNotFoundError):
    """A listed image is not in the source dataset."""

    def __str__(self) -> str:
        return str(self.args[0])


# --- lists ---------------------------------------------------------------------------------------

def check_list_bytes(data: bytes, lf: ListFile, where: str) -> bytes:
    digest = sha256(data)
    if digest != lf.sha256 or (lf.size is not None and len(data) != lf.size):
        expected = f"{lf.size:,} bytes, " if lf.size is not None else ""
        raise ListChecksumError(f"{where}: {len(data):,} bytes with sha256 {digest}; the official {lf.name or 'list'} "
                                f"has {expected}sha256 {lf.sha256}")
    return data


def list_bytes(lf: ListFile, cache_dir: str | Path | None = None, timeout: float = 60) -> bytes:
    """The bytes of one list: a local copy (``lf.path``), the shipped resource, or a download from
    ``lf.url`` (kept in ``cache_dir`` once it passes the check). Any copy must pass the checksum."""
    if lf.path is not None:
        path = Path(lf.path)
        if not path.is_file():
            raise FileNotFoundError(f"list file not found: {path}")
        return check_list_bytes(path.read_bytes(), lf, str(path))
    if lf.resource is not None:
        return check_list_bytes(shipped_list(lf.resource), lf, f"shipped {lf.resource}")
    if lf.url is None:
        raise ValueError(f"list {lf.name!r} has no path, resource or url")
    cached = Path(cache_dir) / lf.name if cache_dir is not None and lf.name else None
    if cached is not None and cached.is_file():
        return check_list_bytes(cached.read_bytes(), lf, str(cached))
    try:
        with urllib.request.urlopen(lf.url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise ConnectionError(f"could not download {lf.name or 'list'} from {lf.url}: {e}; "
                              "pass a local copy instead (train_lists in params)") from None
    check_list_bytes(data, lf, f"download of {lf.url}")
    if cached is not None:
        write_bytes(cached, data)
    return data


def parse_list(text: str, where: str) -> list[tuple[str, int]]:
    """``<relative/path> <label>`` lines -> [(path, label)]; a malformed line is an error naming it."""
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetIntegrityError(f"{where}, line {n}: expected '<path> <label>', got {line[:80]!r}")
        entries.append((parts[0], int(parts[1])))
    return entries


def check_entries(spec: LongTailSpec, split: str, entries: list[tuple[str, int]], check_folders: bool = True) -> Counter:
    """Raise :class:`DatasetIntegrityError` listing every mismatch between a list and ``spec``
    (with ``check_folders``, also a path whose class folder is not its label's class); returns the
    images per label."""
    problems = []
    expected = spec.images_per_split[split]
    if len(entries) != expected:
        problems.append(f"{len(entries):,} images, expected {expected:,}")
    counts = Counter(label for _, label in entries)
    bad = sorted(label for label in counts if not 0 <= label < len(spec.classes))
    if bad:
        problems.append(f"labels {bad[:5]} outside 0..{len(spec.classes) - 1}")
    missing = [spec.classes[i] for i in range(len(spec.classes)) if counts[i] == 0]
    if missing:
        problems.append(f"{len(missing)} classes without images, e.g. {missing[:3]}")
    per_class = spec.images_per_class.get(split)
    if per_class is not None:
        off = sorted(i for i in range(len(spec.classes)) if counts[i] != per_class)
        if off:
            problems.append(f"class {spec.classes[off[0]]!r} has {counts[off[0]]} images, expected {per_class} "
                            f"({len(off)} classes differ)")
    if check_folders and not bad:
        for path, label in entries:
            folder = path.split("/")[-2] if path.count("/") >= 1 else None
            if folder is not None and folder not in (split, "train", "val") and folder != spec.classes[label]:
                problems.append(f"{path}: label {label} is class {spec.classes[label]!r}, not the folder {folder!r}")
                break
    repeated = [p for p, n in Counter(p for p, _ in entries).items() if n > 1]
    if repeated:
        problems.append(f"{len(repeated)} paths listed twice, e.g. {repeated[0]}")
    if problems:
        raise DatasetIntegrityError(f"{spec.name} {split} list: " + "; ".join(problems))
    return counts


def read_lists(spec: LongTailSpec, cache_dir: str | Path | None = None) -> dict[str, list[tuple[str, int]]]:
    """Every split's checked list."""
    out = {}
    for split in SPLITS:
        lf = spec.lists[split]
        entries = parse_list(list_bytes(lf, cache_dir).decode(), lf.name or split)
        check_entries(spec, split, entries)
        out[split] = entries
    return out


# --- finding images by file name -----------------------------------------------------------------

def entry_key(spec: LongTailSpec, path: str) -> str:
    """What identifies a listed image in any layout: the file name (ILSVRC2012, Places365 val) or
    ``<class>/<file name>`` (Places365 train files are numbered per class)."""
    parts = path.split("/")
    if spec.layout == "imagenet" or parts[-1].startswith(PLACES_VAL_PREFIX):
        return parts[-1]
    return f"{parts[-2]}/{parts[-1]}"


def source_keys(spec: LongTailSpec, parts: list[str]) -> list[str]:
    """Keys a source file at path ``parts`` may stand for (see :func:`entry_key`). A Places365
    ``data_256`` class with a sub-category sits two folders deep (``arena/hockey``) and is named
    ``arena-hockey`` in the lists."""
    name = parts[-1]
    if spec.layout == "imagenet" or name.startswith(PLACES_VAL_PREFIX) or len(parts) < 2:
        return [name]
    keys = [f"{parts[-2]}/{name}"]
    if len(parts) >= 3:
        keys.append(f"{parts[-3]}-{parts[-2]}/{name}")
    return keys


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _is_tar(name: str) -> bool:
    return name.endswith((".tar", ".tar.gz", ".tgz"))


@dataclass
class _Search:
    spec: LongTailSpec
    wanted: dict[str, str]          # key -> relative list path, still to be found
    found: dict[str, Path]          # key -> image file
    extract_dir: Path

    def offer(self, parts: list[str]) -> str | None:
        for key in source_keys(self.spec, parts):
            if key in self.wanted:
                return key
        return None

    def scan_tar(self, name: str) -> None:
        """Stream a tar and extract wanted images."""
        for parts, read in tar_images(name):
            if not self.wanted:
                return
            key = self.offer(parts)
            if key is not None:
                rel = self.wanted.pop(key)
                self.found[key] = write_bytes(self.extract_dir / rel, read())


def tar_images(name: str | None = None, fileobj=None):
    """``(path parts, read)`` of every image in a streamed tar, nested tars too (ILSVRC2012_img_train.tar
    holds one tar per wnid); ``read()`` returns the image's bytes and is valid until the next item."""
    with tarfile.open(name=name, fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if _is_tar(member.name):
                yield from tar_images(fileobj=tar.extractfile(member))
            elif _is_image(member.name):
                yield member.name.split("/"), (lambda m=member: tar.extractfile(m).read())


def find_images(spec: LongTailSpec, entries: dict[str, list[tuple[str, int]]], root: str | Path,
                extract_dir: str | Path, progress: bool = True) -> dict[str, Path]:
    """``entry_key -> image file`` for every listed image: first images extracted earlier, then image
    files anywhere under ``root``, then tars under ``root`` (extracting what they hold). Raises
    :class:`MissingImageError` naming a listed image found nowhere."""
    root, extract_dir = Path(root), Path(extract_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root}")
    wanted = {entry_key(spec, p): p for split in SPLITS for p, _ in entries[split]}
    search = _Search(spec, wanted, {}, extract_dir)
    for key, rel in list(wanted.items()):  # extracted by an earlier, interrupted run
        if check_image(extract_dir / rel, "extracted image"):
            search.found[key] = extract_dir / wanted.pop(key)
    tars = []
    walk = tqdm(desc=f"{spec.name}: indexing {root}", unit=" dirs", disable=not progress)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        walk.update()
        if Path(dirpath).resolve() == extract_dir.resolve():
            dirnames.clear()
            continue
        parts = Path(dirpath).relative_to(root).parts
        for f in filenames:
            if _is_image(f):
                key = search.offer([*parts, f])
                if key is not None:
                    wanted.pop(key)
                    search.found[key] = Path(dirpath) / f
            elif _is_tar(f):
                tars.append(Path(dirpath) / f)
    walk.close()
    for t in sorted(tars):
        if not wanted:
            break
        search.scan_tar(name=str(t))
    if wanted:
        rel = next(iter(wanted.values()))
        split = next(s for s in SPLITS if any(p == rel for p, _ in entries[s]))
        raise MissingImageError(f"{spec.name}: image {rel} ({split} list) not found under {root}"
                                + (f" ({len(wanted) - 1} more missing)" if len(wanted) > 1 else ""))
    return search.found


def _decode_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoding failure is reported with its file
        return f"{path}: image does not decode: {type(e).__name__}: {e}"
    return None


def undecodable(paths: list[Path], progress: bool, name: str) -> list[str]:
    """Decode every image (threads: PIL releases the GIL while decoding); the problems found."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        results = pool.map(_decode_problem, paths, chunksize=256)
        return [r for r in tqdm(results, total=len(paths), desc=f"{name}: decoding images", disable=not progress) if r]


# --- the prepared benchmark ----------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    paths: tuple[str, ...]
    labels: np.ndarray


def prepare(spec: LongTailSpec, image_root: str | Path, out_dir: str | Path, cache_dir: str | Path | None = None,
            check_images: bool = True, progress: bool = True) -> Path:
    """Check the lists, find every listed image under ``image_root`` and write the prepared split
    files to ``out_dir``; returns at once if ``out_dir`` already holds a prepared copy."""
    out_dir = Path(out_dir)
    if read_record(out_dir / INTEGRITY_FILE, what="prepared split record") is not None:  # split files re-hashed
        load_prepared(spec, out_dir)
        return out_dir
    entries = read_lists(spec, cache_dir)
    found = find_images(spec, entries, image_root, out_dir.parent / "images", progress)
    if check_images:
        problems = undecodable(sorted(set(found.values())), progress, spec.name)
        if problems:
            raise DatasetIntegrityError(f"{spec.name}: {len(problems)} images do not decode, e.g. {problems[0]}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for split in SPLITS:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "class_name"])
        for rel, label in entries[split]:
            w.writerow([str(found[entry_key(spec, rel)].resolve()), label, spec.classes[label]])
        write_text(tmp / f"{split}.csv", buf.getvalue())
    write_record(tmp / INTEGRITY_FILE, {"benchmark": spec.name, "image_root": str(image_root), "spec": spec.to_json(),
                                        "images": {s: len(entries[s]) for s in SPLITS}, "images_decoded": check_images},
                 {s: tmp / f"{s}.csv" for s in SPLITS}, overwrite=True)
    if out_dir.exists():  # an earlier attempt without its integrity record
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_prepared(spec: LongTailSpec, out_dir: str | Path) -> dict[str, Split]:
    """The prepared splits; re-checks the counts so a damaged or foreign copy is caught."""
    out_dir = Path(out_dir)
    if not (out_dir / INTEGRITY_FILE).is_file():
        raise FileNotFoundError(f"{out_dir}: no prepared {spec.name}; run the data stage first")
    out = {}
    for split in SPLITS:
        with open(out_dir / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        try:
            check_entries(spec, split, [(r["path"], int(r["label"])) for r in rows], check_folders=False)
        except DatasetIntegrityError as e:
            raise DatasetIntegrityError(f"{e} (in {out_dir}; delete it to rebuild)") from None
        out[split] = Split(tuple(r["path"] for r in rows), np.asarray([int(r["label"]) for r in rows], dtype=np.int64))
    return out


def class_counts(split: Split, num_classes: int) -> np.ndarray:
    return np.bincount(split.labels, minlength=num_classes)
