"""Which classes get extra (synthetic) images, how many, and where training finds them.

The generation itself is the few-shot synthesis machinery (``benchmarks/fewshot/synthesis.py``:
manifest, resumable claim-sharing worker, pipelines); this module holds only the long-tail rules
(:func:`synthesis_plan`, :func:`reference_images`, :func:`contrast_sets`), so that any producer of
images can feed :func:`benchmarks.longtail.training.training_items` through a mapping
``class -> image paths``.

A long-tail *contrast set* is a chunk of ``contrast_size`` planned classes (in label order), given to
one generator call as the few-shot stages give the classes of a (shot, trial): SeedSelect and
NAO-SeedSelect then optimise those classes together under the contrastive loss. All planned classes
in one call would be one batch of (classes x images) seeds: several hundred ImageNet-LT classes do
not fit one accelerator, so the chunk size is a setting (20 by default).

What an image is contrasted with is another setting (``contrast_with``). In a few-shot episode the
contrast set is every class the classifier tells apart; here the classifier tells a rare class from
all the benchmark's classes, the frequent ones included, which no contrast set holds. With ``all``
(the default) every other class of the benchmark enters the contrastive loss as a *negative*: the
centroid of its own ``references_per_class`` training images (drawn as a planned class's are), which
costs one encoding per class and no seeds. With ``generated`` only the contrast set's classes do.
Without negatives a rare class's images can drift towards a frequent look-alike that the loss never
names (in mini-lt most of SeedSelect's nines look like fours, a frequent digit)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from benchmarks.fewshot.registry import unknown_error
from benchmarks.fewshot.sampling import key_rng
from benchmarks.longtail.data import IMAGE_SUFFIXES, Split
from benchmarks.longtail.evaluation import GROUPS, shot_group
from benchmarks.longtail.registry import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD


CONTRAST_WITH = ("all", "generated")


@dataclass
class SynthesisParams:
    """The ``synthesis`` sub-section of :class:`benchmarks.longtail.stages.LongTailParams`."""
    methods: list[str] = field(default_factory=list)        # pipeline methods or variants; [] = no synthesis
    variants: dict[str, dict] = field(default_factory=dict)  # name: {method: <pipeline method>, <setting>: value}
    groups: list[str] = field(default_factory=lambda: ["medium", "few"])  # shot groups that get images
    images_per_class: int | None = 20                       # M per class, or
    top_up_to: int | None = None                            # enough to reach this many (real + generated)
    references_per_class: int = 5                           # drawn from the class's training images only
    contrast_size: int = 20                                 # classes per generator call (see the module docstring)
    contrast_with: str = "all"                              # all: every class as a negative; generated: the call's
    prompt_template: str = "{}"                             # of the class's display name; methods add theirs
    settings: dict = field(default_factory=dict)            # benchmarks.fewshot.synthesis.pipeline_generator's
    selection: str | None = None                            # settings chosen on validation classes (as few-shot)
    seed: int = 0

    def __post_init__(self):
        if self.contrast_size < 1:
            raise ValueError(f"synthesis.contrast_size must be >= 1, got {self.contrast_size}")
        if self.references_per_class < 1:
            raise ValueError(f"synthesis.references_per_class must be >= 1, got {self.references_per_class}")
        if self.contrast_with not in CONTRAST_WITH:
            raise unknown_error("synthesis.contrast_with: unknown value", self.contrast_with, CONTRAST_WITH)


def contrast_sets(classes: Sequence[str], planned: Mapping[str, int], size: int) -> list[list[str]]:
    """The planned classes in label order (``classes``), in chunks of ``size``."""
    chosen = [c for c in classes if c in planned]
    return [chosen[i:i + size] for i in range(0, len(chosen), size)]


def synthesis_plan(train_counts: Mapping[str, int], groups: Sequence[str] = ("medium", "few"),
                   images_per_class: int | None = None, top_up_to: int | None = None,
                   many_threshold: int = MANY_SHOT_THRESHOLD, few_threshold: int = FEW_SHOT_THRESHOLD) -> dict[str, int]:
    """``class -> number of images to generate`` for the classes whose shot group (by real training
    images, :func:`benchmarks.longtail.evaluation.shot_group`) is in ``groups``: either a fixed
    ``images_per_class`` (M each) or enough to bring the class up to ``top_up_to`` images. Classes
    that need none are left out."""
    if (images_per_class is None) == (top_up_to is None):
        raise ValueError("give exactly one of images_per_class (M per class) and top_up_to (a target count)")
    for g in groups:
        if g not in GROUPS:
            raise unknown_error("unknown shot group", g, GROUPS)
    plan = {}
    for c, n in train_counts.items():
        if shot_group(n, many_threshold, few_threshold) not in groups:
            continue
        k = images_per_class if images_per_class is not None else max(0, top_up_to - n)
        if k < 0:
            raise ValueError(f"images_per_class must be >= 0, got {k}")
        if k:
            plan[c] = k
    return plan


def reference_images(train: Split, classes: Sequence[str], wanted: Sequence[str], per_class: int, seed: int,
                     benchmark: str) -> dict[str, list[str]]:
    """Up to ``per_class`` reference images for each class in ``wanted``, drawn from that class's
    images in the **training** split only (val and test never condition a generator), each class from
    its own generator keyed by (seed, benchmark, class) so adding a class changes no other's draw."""
    position = {c: i for i, c in enumerate(classes)}
    out = {}
    for c in wanted:
        if c not in position:
            raise unknown_error("reference images for an unknown class: no class", c, classes)
        rows = [i for i, y in enumerate(train.labels) if y == position[c]]
        take = key_rng(seed, "references", benchmark, c).choice(len(rows), size=min(per_class, len(rows)), replace=False)
        out[c] = [train.paths[rows[int(k)]] for k in sorted(take)]
    return out


def images_in_folder(folder: str | Path, classes: Sequence[str]) -> dict[str, list[Path]]:
    """``class -> sorted image files`` of ``<folder>/<class>/``; a class without a folder has none,
    a folder that is not a class is an error (a typo would otherwise drop its images silently)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"extra-image folder not found: {folder}")
    known = set(classes)
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if d.name not in known:
            raise unknown_error(f"{folder}: folder is not a class: no class", d.name, classes)
        out[d.name] = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return out
