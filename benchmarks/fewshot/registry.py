"""Benchmark registry: a string name -> :class:`BenchmarkSpec` (where the images come from and which
classes form the meta-train / meta-val / meta-test splits).

The class lists ship with the package (``benchmarks/fewshot/splits/``, copied byte for byte from
the public split files, see ``/work/shared/splits/README.md``); the images are downloaded through
Hugging Face ``datasets`` from the id in ``BenchmarkSpec.hf_id`` (a setting: a hub id or a local
directory of parquet files)."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

SPLITS = ("train", "val", "test")
LABEL_MODES = ("names", "per_split_rank")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything needed to download, split and check one few-shot benchmark.

    ``source_splits`` maps each split of the source dataset to the benchmark split its rows belong
    to, or to ``"*"`` when rows are assigned by class (CIFAR-100 train+test are pooled, then split by
    class). ``label_mode`` says how the integer label column becomes a class name: ``"names"`` uses
    the ``ClassLabel`` names of the source; ``"per_split_rank"`` (datasets that store plain integers)
    maps the ``i``-th smallest distinct label of a source split to the ``i``-th class of its benchmark
    split, so labels numbered per split (0..15) or globally (64..79) both work."""

    name: str
    hf_id: str
    classes: dict[str, tuple[str, ...]]
    source_splits: dict[str, str]
    hf_config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    label_mode: str = "names"
    name_aliases: dict[str, str] = field(default_factory=dict)
    images_per_class: int | None = None     # exact count every class must have, if the benchmark fixes one
    images_per_split: dict[str, int] = field(default_factory=dict)  # exact totals, if known
    total_images: int | None = None          # exact total over the three splits, if known
    counts_source: str | None = None         # the id whose content the exact counts describe (None: any source)
    min_images_per_class: int = 20           # K=5 support + 15 queries
    image_size: int = 84                     # the classic resolution of the benchmark
    display_names: dict[str, str] = field(default_factory=dict)  # class -> human-readable name for prompts

    def __post_init__(self):
        if set(self.classes) != set(SPLITS):
            raise ValueError(f"benchmark {self.name!r}: classes must have exactly the splits {SPLITS}, got {sorted(self.classes)}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"benchmark {self.name!r}: label_mode {self.label_mode!r} not in {LABEL_MODES}")
        seen: dict[str, str] = {}
        for split in SPLITS:
            for c in self.classes[split]:
                if c in seen:
                    raise ValueError(f"benchmark {self.name!r}: class {c!r} is in both {seen[c]!r} and {split!r}")
                seen[c] = split
        for src, dst in self.source_splits.items():
            if dst not in SPLITS + ("*",):
                raise ValueError(f"benchmark {self.name!r}: source split {src!r} maps to unknown split {dst!r}")

    @property
    def all_classes(self) -> list[str]:
        return [c for s in SPLITS for c in self.classes[s]]

    def split_of(self, class_name: str) -> str:
        for split in SPLITS:
            if class_name in self.classes[split]:
                return split
        raise unknown_error(f"benchmark {self.name!r} has no class", class_name, self.all_classes)

    def check_classes(self, names, split: str | None = None) -> None:
        """Raise a clear error (with close matches) if a name is not a class (of ``split``)."""
        pool = list(self.classes[split]) if split else self.all_classes
        for n in names:
            if n not in pool:
                where = f"split {split!r} of benchmark {self.name!r}" if split else f"benchmark {self.name!r}"
                raise unknown_error(f"{where} has no class", n, pool)

    def display_name(self, class_name: str) -> str:
        """Human-readable class name for prompts: ``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
        name = self.display_names.get(class_name, class_name)
        if "." in name and name.split(".", 1)[0].isdigit():
            name = name.split(".", 1)[1]
        return name.replace("_", " ")

    @property
    def exact_counts_apply(self) -> bool:
        """The exact counts are facts of one dataset id; another source (a local folder, a copy under
        another id) is checked for its class sets, the minimum per class and its own dataset card."""
        return self.counts_source is None or self.hf_id == self.counts_source

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "BenchmarkSpec":
        data = dict(data)
        data["classes"] = {k: tuple(v) for k, v in data["classes"].items()}
        return cls(**data)


class UnknownNameError(KeyError):
    """An unknown benchmark, class, method or head; the message lists the closest known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def unknown_error(prefix: str, name: str, choices) -> UnknownNameError:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; known: {', '.join(choices[:10])}{'…' if len(choices) > 10 else ''}"
    return UnknownNameError(f"{prefix} {name!r}{hint}")


# --- shipped split files -------------------------------------------------------------------------

def _split_file(*parts: str) -> str:
    return resources.files("benchmarks.fewshot").joinpath("splits", *parts).read_text()


@lru_cache(maxsize=None)
def shipped_split(benchmark: str) -> dict[str, tuple[str, ...]]:
    """Class lists of the public split files shipped with the package."""
    if benchmark == "miniimagenet":
        data = json.loads(_split_file("miniimagenet", "classes.json"))
        return {s: tuple(data[s]) for s in SPLITS}
    if benchmark == "cifar-fs":  # lists of [coarse, fine] pairs; the class is the fine label
        return {s: tuple(fine for _, fine in json.loads(_split_file("cifar-fs", f"{s}.json"))) for s in SPLITS}
    if benchmark == "cub":
        return {s: tuple(json.loads(_split_file("cub", f"{s}.json"))) for s in SPLITS}
    raise unknown_error("no shipped split file for benchmark", benchmark, ["miniimagenet", "cifar-fs", "cub"])


def cub_split_by_rule(class_folders) -> dict[str, tuple[str, ...]]:
    """Chen et al. 2019 (CloserLookFewShot ``write_CUB_filelist.py``): sort the 200 class folders,
    position i -> base if i % 2 == 0, val if i % 4 == 1, novel (test) if i % 4 == 3."""
    folders = sorted(class_folders)
    return {
        "train": tuple(c for i, c in enumerate(folders) if i % 2 == 0),
        "val": tuple(c for i, c in enumerate(folders) if i % 4 == 1),
        "test": tuple(c for i, c in enumerate(folders) if i % 4 == 3),
    }


@lru_cache(maxsize=None)
def imagenet_names() -> dict[str, str]:
    """wnid -> first human-readable name (Keras ``imagenet_class_index.json``)."""
    index = json.loads(_split_file("imagenet", "imagenet_class_index.json"))
    return {wnid: name for wnid, name in index.values()}


# --- the registry --------------------------------------------------------------------------------

def _cub() -> BenchmarkSpec:
    folders = [c for s in SPLITS for c in shipped_split("cub")[s]]
    return BenchmarkSpec(
        name="cub", hf_id="bentrevett/caltech-ucsd-birds-200-2011",
        classes=cub_split_by_rule(folders),
        source_splits={"train": "*", "test": "*"},  # the official train/test split is not the few-shot split
        total_images=11788, counts_source="bentrevett/caltech-ucsd-birds-200-2011", image_size=84)


def _miniimagenet() -> BenchmarkSpec:
    names = imagenet_names()
    classes = shipped_split("miniimagenet")
    return BenchmarkSpec(
        name="miniimagenet", hf_id="timm/mini-imagenet",
        classes=classes,
        # The hub copy holds all 100 classes in each split, labelled by wnid (ClassLabel names):
        # train 500 + validation 100 images per class (the 600 of Vinyals et al.), test 50 more per
        # class from ImageNet-1k's validation set, which miniImageNet never had (left out). Pooled,
        # then split by wnid with the shipped Ravi & Larochelle class lists.
        source_splits={"train": "*", "validation": "*"},
        images_per_class=600, images_per_split={"train": 38400, "val": 9600, "test": 12000}, total_images=60000,
        counts_source="timm/mini-imagenet", image_size=84, display_names={w: names[w] for s in SPLITS for w in classes[s]})


def _cifar_fs() -> BenchmarkSpec:
    return BenchmarkSpec(
        name="cifar-fs", hf_id="uoft-cs/cifar100",
        classes=shipped_split("cifar-fs"),
        source_splits={"train": "*", "test": "*"},  # 500 + 100 images per class pooled, as in Bertinetto et al.
        image_column="img", label_column="fine_label",
        name_aliases={"cra": "crab"},  # the hub's ClassLabel names spell class 26 "cra"
        images_per_class=600, images_per_split={"train": 38400, "val": 9600, "test": 12000},
        counts_source="uoft-cs/cifar100", image_size=32)


_REGISTRY: dict[str, Callable[[], BenchmarkSpec]] = {
    "cub": _cub,
    "miniimagenet": _miniimagenet,
    "cifar-fs": _cifar_fs,
}


def register_benchmark(name: str, factory: Callable[[], BenchmarkSpec] | BenchmarkSpec, overwrite: bool = False) -> None:
    """Add a benchmark (e.g. the offline miniature world) under ``name``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"benchmark {name!r} is already registered")
    _REGISTRY[name] = factory if callable(factory) else (lambda: factory)


def list_benchmarks() -> list[str]:
    return sorted(_REGISTRY)


def get_benchmark(name: str, **overrides) -> BenchmarkSpec:
    """Spec of a registered benchmark, or of a JSON spec file (``path/to/spec.json``).

    ``overrides`` replace spec fields, e.g. ``hf_id`` to point at a mirror or a local directory."""
    if name.endswith(".json") and Path(name).is_file():
        spec = BenchmarkSpec.from_json(json.loads(Path(name).read_text()))
    elif name in _REGISTRY:
        spec = _REGISTRY[name]()
    else:
        raise unknown_error("unknown benchmark", name, list_benchmarks())
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(spec, **overrides) if overrides else spec
