"""Long-tail benchmark registry: a string name -> :class:`LongTailSpec` (the list files of the
train / val / test splits, their expected sizes and the image layout they refer to).

The lists ship with the package (``benchmarks/longtail/lists/``, gzipped, see its SOURCES.md) except
ImageNet-LT's train list, which the data stage downloads and checks by sha256. The images come from a
local copy of the source dataset (ILSVRC2012 or Places365); see :mod:`benchmarks.longtail.data`."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

from benchmarks.fewshot.registry import unknown_error

SPLITS = ("train", "val", "test")
LAYOUTS = ("imagenet", "places")
# classifier-balancing's utils.shot_acc: many-shot if a class has > 100 training images, few-shot if
# < 20, medium otherwise (OLTR's older code used >= 100 / <= 20).
MANY_SHOT_THRESHOLD = 100
FEW_SHOT_THRESHOLD = 20

# TensorFlow Datasets' imagenet_lt builder (_TRAIN_SUBSET) and its checksums.tsv.
IMAGENET_LT_TRAIN_URL = "https://drive.google.com/uc?export=download&id=1Sl1cwy6Dei1I1BMS1YKjI35fkaR1UA_7"
IMAGENET_LT_TRAIN_SHA256 = "efdbdad4f050237c310b2f354cf95a8b1d7c8d57a63c4ea4bb6bf2bcb012f37f"
IMAGENET_LT_TRAIN_BYTES = 4_658_674


@dataclass(frozen=True)
class ListFile:
    """One split's list (``<relative/path> <label>`` per line): shipped in the package
    (``resource``, gzipped), or a file (``path``), or downloaded (``url``); always checked against
    ``sha256`` (of the text) and, if given, ``size``."""

    sha256: str
    name: str = ""                  # file name of the published list, e.g. ImageNet_LT_train.txt
    resource: str | None = None     # path under benchmarks/longtail/lists/
    path: str | None = None
    url: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class LongTailSpec:
    """A long-tailed train split and balanced val / test splits over ``classes`` (label i = classes[i]).

    ``layout`` says how list paths map to image files: ``imagenet`` (ILSVRC2012 file names are
    unique, so an image is found by its file name alone) or ``places`` (Places365 train files are
    numbered per class, so an image is found by class folder and file name; val files by name)."""

    name: str
    layout: str
    classes: tuple[str, ...]
    lists: dict[str, ListFile]
    images_per_split: dict[str, int]
    images_per_class: dict[str, int] = field(default_factory=dict)   # balanced splits: exact count per class
    many_shot_threshold: int = MANY_SHOT_THRESHOLD
    few_shot_threshold: int = FEW_SHOT_THRESHOLD
    image_size: int = 224
    display_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"benchmark {self.name!r}: layout {self.layout!r} not in {LAYOUTS}")
        if set(self.lists) != set(SPLITS) or set(self.images_per_split) != set(SPLITS):
            raise ValueError(f"benchmark {self.name!r}: lists and images_per_split need exactly the splits {SPLITS}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"benchmark {self.name!r}: repeated class names")

    def display_name(self, class_name: str) -> str:
        return self.display_names.get(class_name, class_name).replace("_", " ").replace("-", " ")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LongTailSpec":
        return cls(**{**data, "classes": tuple(data["classes"]),
                      "lists": {s: ListFile(**lf) for s, lf in data["lists"].items()}})


def shipped_list(resource: str) -> bytes:
    """The published bytes of a shipped list (gunzipped)."""
    return gzip.decompress(resources.files("benchmarks.longtail").joinpath("lists", *resource.split("/")).read_bytes())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ILSVRC2012 wnids in label order (the Keras class index shipped with the few-shot splits)."""
    text = resources.files("benchmarks.fewshot").joinpath("splits", "imagenet", "imagenet_class_index.json").read_text()
    index = json.loads(text)
    return tuple(index[str(i)][0] for i in range(len(index)))


def _imagenet_lt() -> LongTailSpec:
    from benchmarks.fewshot.registry import imagenet_names

    return LongTailSpec(
        name="imagenet-lt", layout="imagenet", classes=imagenet_wnids(),
        lists={"train": ListFile(IMAGENET_LT_TRAIN_SHA256, "ImageNet_LT_train.txt", url=IMAGENET_LT_TRAIN_URL,
                                 size=IMAGENET_LT_TRAIN_BYTES),
               "val": ListFile("9af7ba688acf9532ff5845a8fb14a1e97fdc4c51ac48bc72c08ea9c3f7ff142e", "ImageNet_LT_val.txt",
                               resource="imagenet_lt/ImageNet_LT_val.txt.gz", size=804_172),
               "test": ListFile("d1590191cf8a71fada7b1aaedaa2d139a2aea93ff2f1b755319d0bd8dbaa55d5", "ImageNet_LT_test.txt",
                                resource="imagenet_lt/ImageNet_LT_test.txt.gz", size=2_344_500)},
        images_per_split={"train": 115_846, "val": 20_000, "test": 50_000},
        images_per_class={"val": 20, "test": 50},
        display_names=dict(imagenet_names()))


@lru_cache(maxsize=None)
def places_lt_classes() -> tuple[str, ...]:
    """The 365 Places-LT classes in label order: the class folder of each label in the train list."""
    by_label: dict[int, str] = {}
    for line in shipped_list("places_lt/Places_LT_train.txt.gz").decode().splitlines():
        path, label = line.rsplit(" ", 1)
        by_label.setdefault(int(label), path.split("/")[1])
    return tuple(by_label[i] for i in range(len(by_label)))


def _places_lt() -> LongTailSpec:
    return LongTailSpec(
        name="places-lt", layout="places", classes=places_lt_classes(),
        lists={"train": ListFile("726c4871dcbf07ce2f857703bfe32e9a83ffbf52d704239f6d95c4f4f4c247f7", "Places_LT_train.txt",
                                 resource="places_lt/Places_LT_train.txt.gz", size=2_092_674),
               "val": ListFile("719e3cf3766c09134ea28f56f1036c78def511ac1ed2c2532a6beef78f2439ba", "Places_LT_val.txt",
                               resource="places_lt/Places_LT_val.txt.gz", size=253_480),
               "test": ListFile("44eee8441c8098c59195465abede425721bc35525d75209f9433b161a6eb37bc", "Places_LT_test.txt",
                                resource="places_lt/Places_LT_test.txt.gz", size=1_705_400)},
        images_per_split={"train": 62_500, "val": 7_300, "test": 36_500},
        images_per_class={"val": 20, "test": 100})


_REGISTRY: dict[str, Callable[[], LongTailSpec]] = {"imagenet-lt": _imagenet_lt, "places-lt": _places_lt}


def register_benchmark(name: str, factory: Callable[[], LongTailSpec] | LongTailSpec, overwrite: bool = False) -> None:
    """Add a benchmark (e.g. a fixture or the miniature world) under ``name``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"long-tail benchmark {name!r} is already registered")
    _REGISTRY[name] = factory if callable(factory) else (lambda: factory)


def list_benchmarks() -> list[str]:
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> LongTailSpec:
    """Spec of a registered benchmark, or of a JSON spec file (``path/to/spec.json``, e.g. mini-lt's)."""
    if name.endswith(".json") and Path(name).is_file():
        return LongTailSpec.from_json(json.loads(Path(name).read_text()))
    if name not in _REGISTRY:
        raise unknown_error("unknown long-tail benchmark", name, list_benchmarks())
    return _REGISTRY[name]()


def with_train_list(spec: LongTailSpec, path: str | Path | None) -> LongTailSpec:
    """``spec`` reading its train list from a local copy at ``path`` (checked like a download)."""
    if path is None:
        return spec
    return dataclasses.replace(spec, lists={**spec.lists, "train": dataclasses.replace(spec.lists["train"], path=str(path))})
