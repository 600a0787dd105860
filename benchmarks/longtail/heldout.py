"""Real images that a long-tail benchmark's lists leave out: the bar generated images are measured against.

ImageNet-LT takes 115,846 of ILSVRC2012's 1.28M training images and Places-LT 62,500 of Places365's
1.8M, so every rare class has real images that no split lists. For each class of ``groups`` (by real
training images, as synthesis plans them), the ``heldout`` stage copies ``images_per_class`` of them
to ``<data_dir>/<benchmark>/heldout/<class>/``, and the method ``real-heldout`` trains on the real set
plus these: what M *new real* images of a class buy, beside what M generated ones buy.

Candidates are the source's training images of the class (ILSVRC2012 ``<wnid>_<n>.JPEG``, Places365
``<class>/<n>.jpg``; never a validation image, which is where the test lists come from) that no list
names. The M chosen are those with the smallest keyed hash of their list key, so a folder tree and the
official tars, read in any order, give the same choice, and a larger M keeps the smaller one's images.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from benchmarks.fewshot.registry import unknown_error
from benchmarks.longtail.data import SPLITS, _is_image, _is_tar, entry_key, source_keys, tar_images
from benchmarks.longtail.evaluation import GROUPS
from benchmarks.longtail.registry import LongTailSpec
from pipelines.io import write_bytes, write_json

METHOD = "real-heldout"
RECORD = "heldout.json"


@dataclass
class HeldoutParams:
    """The ``heldout`` sub-section of :class:`benchmarks.longtail.stages.LongTailParams`."""
    images_per_class: int = 0        # 0: off; M > 0: `real-heldout` trains on the real set plus M per class
    groups: list[str] = field(default_factory=lambda: ["medium", "few"])   # as synthesis.groups
    seed: int = 0

    def __post_init__(self):
        if self.images_per_class < 0:
            raise ValueError(f"heldout.images_per_class must be >= 0, got {self.images_per_class}")
        for g in self.groups:
            if g not in GROUPS:
                raise unknown_error("unknown shot group", g, GROUPS)


def class_of(spec: LongTailSpec, key: str, classes: frozenset[str]) -> str | None:
    """The class a training image's key belongs to, or None (a validation image, or not a class)."""
    if spec.layout == "imagenet":
        name = key.split("_")[0]          # ILSVRC2012 training files are <wnid>_<n>.JPEG
    elif "/" in key:
        name = key.split("/")[0]          # Places365 training files are keyed <class>/<n>.jpg
    else:
        return None
    return name if name in classes else None


class _Chooser:
    """Per class, the M candidates with the smallest keyed hash seen so far (payload: a path or bytes)."""

    def __init__(self, spec: LongTailSpec, wanted: Mapping[str, int], listed: set[str], seed: int):
        self.spec, self.wanted, self.listed, self.seed = spec, dict(wanted), listed, seed
        self.classes = frozenset(wanted)
        self.heaps: dict[str, list] = {c: [] for c in wanted}

    def rank(self, key: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.seed}|{self.spec.name}|{key}".encode()).digest()[:8], "big")

    def candidate(self, parts: list[str]) -> tuple[str, str, int] | None:
        """``(class, key, rank)`` of a source file that would enter its class's choice, else None."""
        for key in source_keys(self.spec, parts):
            c = class_of(self.spec, key, self.classes)
            if c is None or key in self.listed:
                continue
            heap, r = self.heaps[c], self.rank(key)
            if any(k == key for _, k, _ in heap):
                return None                   # the same image twice in the source (a tree and a tar)
            if len(heap) < self.wanted[c] or r < -heap[0][0]:
                return c, key, r
        return None

    def add(self, c: str, key: str, r: int, payload) -> None:
        heap = self.heaps[c]
        item = (-r, key, payload)
        if len(heap) < self.wanted[c]:
            heapq.heappush(heap, item)
        else:
            heapq.heapreplace(heap, item)

    def scan_tar(self, name: str) -> None:
        for parts, read in tar_images(name):
            if hit := self.candidate(parts):
                self.add(*hit, read())


def choose(spec: LongTailSpec, lists: Mapping[str, list[tuple[str, int]]], root: str | Path,
           wanted: Mapping[str, int], seed: int) -> dict[str, list[tuple[str, Path | bytes]]]:
    """``class -> [(key, file or bytes)]``: ``wanted[class]`` unlisted training images of each class
    from the image files and tars under ``root``, in key order. Raises ValueError naming a class with
    too few."""
    if not wanted:
        return {}
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root}")
    listed = {entry_key(spec, p) for s in SPLITS for p, _ in lists[s]}
    chooser = _Chooser(spec, wanted, listed, seed)
    tars = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        parts = Path(dirpath).relative_to(root).parts
        for f in filenames:
            if _is_image(f) and (hit := chooser.candidate([*parts, f])):
                chooser.add(*hit, Path(dirpath) / f)
            elif _is_tar(f):
                tars.append(Path(dirpath) / f)
    for t in sorted(tars):
        chooser.scan_tar(name=str(t))
    out = {}
    for c, n in wanted.items():
        got = sorted((key, payload) for _, key, payload in chooser.heaps[c])
        if len(got) < n:
            raise ValueError(f"{spec.name}: class {c} has {len(got)} training images outside the lists under {root}, "
                             f"heldout.images_per_class is {n}")
        out[c] = got
    return out


def write_heldout(spec: LongTailSpec, lists: Mapping[str, list[tuple[str, int]]], root: str | Path | None,
                  wanted: Mapping[str, int], seed: int, out_dir: str | Path) -> dict[str, list[str]]:
    """Copy the chosen images to ``out_dir/<class>/<file name>`` (the folder appears complete or not at
    all) with ``heldout.json`` (what chose them); returns ``class -> keys``."""
    out_dir = Path(out_dir)
    chosen = choose(spec, lists, root, wanted, seed)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for c, items in chosen.items():
        (tmp / c).mkdir()
        for key, payload in items:
            dest = tmp / c / key.split("/")[-1]
            if isinstance(payload, Path):
                shutil.copyfile(payload, dest)
            else:
                write_bytes(dest, payload)
    keys = {c: [k for k, _ in items] for c, items in chosen.items()}
    write_json(tmp / RECORD, {"benchmark": spec.name, "root": None if root is None else str(root), "seed": seed,
                              "images": keys})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return keys
