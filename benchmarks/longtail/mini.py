"""The offline long-tail benchmark ``mini-lt``, built from the miniature world (``benchmarks/mini``):
the default of ``dvc repro``.

``source`` writes a long-tailed ``train`` split with the mini world's corpus profile (graded counts,
the tail digits at the floor, see :func:`benchmarks.mini.data.train_profile`; which images: below) and
the mini world's balanced held-out ``val`` and ``test`` splits as PNG files in an ILSVRC2012-like tree
(``<out>/images/<split>/<class>/<class>_<split>_<source index>.png``),
the three lists (``<out>/lists/<split>.txt``, ``<path> <label>`` lines) and ``<out>/spec.json``, the
:class:`LongTailSpec` with the lists' sha256 and the shot-group thresholds. The long-tail stages take
that JSON file as the benchmark name, so the data go through the same list checks and image search as
ImageNet-LT.

The classifier's training set (``train_draw``):
- ``independent`` (the default): a long-tailed set drawn the same way as the corpus the mini diffusion
  model and its CLIP-style encoder were pretrained on (the same per-class counts, each class a uniform
  draw from the images no balanced split holds), by its own keyed generator. The most frequent digits'
  sets overlap the corpus as much as the pool forces (mini-lt: zero's 170 are its whole pool); a rare
  digit's 5 are mostly images the models never saw, as ImageNet-LT's few images of a rare class are not what SD
  learnt that class from. ``source.json`` counts the shared images per class.
- ``corpus``: the corpus itself: the models learnt each rare digit from exactly the images the
  classifier trains on and synthesis starts from.
Synthesis references come from the classifier's training set only.

The tree also holds, unlisted, the mini world's ``references`` split (disjoint from train, val and test,
and never a mini model's class data) as ``images/heldout/<class>/<class>_heldout_<source index>.png``: the real
training images outside the lists that the ``heldout`` stage draws from, as it draws ILSVRC2012 training
images outside ImageNet-LT's lists (:mod:`benchmarks.longtail.heldout`).

Thresholds (:func:`scaled_thresholds`): ImageNet-LT's many / few cut points (100 / 20 images, over its
5..1,280 range) moved to the same relative positions in log count over the mini corpus's range.

``fidelity`` judges the generated images of the synthesize stage (:mod:`benchmarks.longtail.mini_fidelity`).

``python -m benchmarks.longtail.mini {source,fidelity} --params params.yaml`` (section ``mini_lt``)."""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fewshot.registry import UnknownNameError
from benchmarks.longtail.registry import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD, SPLITS, ListFile, LongTailSpec, sha256
from benchmarks.params import load_section
from pipelines.io import write_json

IMAGENET_LT_RANGE = (5, 1280)   # fewest and most training images of an ImageNet-LT class
TRAIN_DRAWS = ("independent", "corpus")


@dataclass
class MiniLongTailParams:
    name: str = "mini-lt"
    mini_data: str = "data/mini/data"            # the mini_data stage's output
    out_dir: str = "data/longtail/mini-lt-source"
    evaluator: str = "data/mini/evaluator"       # fidelity's judges: the independent evaluator and
    image_encoder: str = "data/mini/clip"        # the CLIP-style encoder of SeedSelect's loss
    train_draw: str = "independent"              # the classifier's training set: "independent" | "corpus" (docstring)
    seed: int = 0                                # the independent draw's key

    def __post_init__(self):
        if self.train_draw not in TRAIN_DRAWS:
            raise ValueError(f"unknown train_draw {self.train_draw!r}; expected one of {TRAIN_DRAWS}")

    @property
    def spec_path(self) -> Path:
        return Path(self.out_dir) / "spec.json"


def scaled_thresholds(n_min: int, n_max: int, reference: tuple[int, int] = IMAGENET_LT_RANGE,
                      many: int = MANY_SHOT_THRESHOLD, few: int = FEW_SHOT_THRESHOLD) -> tuple[int, int]:
    """``(many_threshold, few_threshold)`` for training counts in ``[n_min, n_max]``: each of the
    reference cut points keeps its relative position in log count, ``cut = n_min * (n_max / n_min) **
    (log(c / lo) / log(hi / lo))``; returned as the integers that select the same counts under
    ``shot_group``'s rule (many: n > floor(cut), few: n < ceil(cut))."""
    lo, hi = reference
    if not 1 <= n_min < n_max:
        raise ValueError(f"scaled thresholds need 1 <= fewest < most training images, got {n_min} and {n_max}")

    def cut(c: int) -> float:
        return n_min * (n_max / n_min) ** (math.log(c / lo) / math.log(hi / lo))

    return math.floor(cut(many)), math.ceil(cut(few))


def source_splits(p: MiniLongTailParams):
    """``(images uint8 (N, 3, S, S) and labels (N,) of the mini world's whole source, {split: source
    indices}, {class: training images shared with the corpus})``. ``val`` / ``test`` / ``heldout`` are the
    mini world's val / test / references splits; ``train`` is drawn by ``p.train_draw`` (module
    docstring). The splits are re-derived from the config saved beside the mini data and must be the
    ones it holds."""
    import numpy as np
    import torch

    from benchmarks.mini.config import DIGIT_NAMES, DataConfig
    from benchmarks.mini.data import corpus_pool, load_source, load_split, manifest, split_indices, to_rgb
    from pipelines.sampling import derive_seed

    path = Path(p.mini_data) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"mini world data not built: {path} (run the mini_data stage)")
    try:
        cfg = DataConfig(**manifest(p.mini_data)["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:  # damaged, or written by other code
        raise ValueError(f"{path}: no readable mini data config ({type(e).__name__}: {e}); rebuild it "
                         "(dvc repro mini_data)") from None
    x, labels = load_source(cfg.source)
    images = to_rgb(x, cfg.image_size)
    parts = split_indices(labels, cfg)
    for split in ("train", "val", "test", "references"):
        if not torch.equal(images[parts[split]], load_split(p.mini_data, split)[0]):
            raise ValueError(f"{p.mini_data}: its {split} split is not the one its manifest's config draws from "
                             f"{cfg.source}; rebuild it (dvc repro mini_data)")
    corpus = parts["train"]
    if p.train_draw == "independent":  # one keyed generator per class, as the corpus's own per-class draw
        train = np.concatenate([np.random.default_rng(derive_seed("mini-lt-train", p.seed, c)).permutation(pool)[:n]
                                for c, (pool, n) in corpus_pool(labels, cfg).items()])
    else:
        train = corpus
    shared = {c: int(np.isin(train[labels[train] == k], corpus).sum()) for k, c in enumerate(DIGIT_NAMES)}
    return images, torch.from_numpy(labels), {"train": train, "val": parts["val"], "test": parts["test"],
                                              "heldout": parts["references"]}, shared


def build_source(p: MiniLongTailParams) -> LongTailSpec:
    from PIL import Image

    from benchmarks.mini.config import DIGIT_NAMES

    out = Path(p.out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    images, labels, parts, shared = source_splits(p)

    def write(split: str, folder: str) -> list[str]:
        """``<folder>/<class>/<class>_<split>_<source index>.png``: the name says which source image it is
        (unique over splits, found by name alone; another draw gives other names, lists and checksums)."""
        lines = []
        for i in parts[split].tolist():
            c = DIGIT_NAMES[int(labels[i])]
            rel = f"{folder}/{c}/{c}_{split}_{i:04d}.png"
            (tmp / "images" / folder / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(tmp / "images" / rel)
            lines.append(f"{rel} {int(labels[i])}\n")
        return lines

    lists, counts = {}, {}
    for split in SPLITS:
        text = "".join(write(split, split)).encode()
        (tmp / "lists").mkdir(parents=True, exist_ok=True)
        (tmp / "lists" / f"{split}.txt").write_bytes(text)
        lists[split] = ListFile(sha256(text), f"{split}.txt", path=str(out / "lists" / f"{split}.txt"), size=len(text))
        counts[split] = [int((labels[parts[split]] == k).sum()) for k in range(len(DIGIT_NAMES))]
    many, few = scaled_thresholds(min(counts["train"]), max(counts["train"]))
    per_class = {s: counts[s][0] for s in ("val", "test") if len(set(counts[s])) == 1}
    if len(per_class) != 2:
        raise ValueError(f"{p.mini_data}: the val and test splits must be balanced, got {counts['val']} and {counts['test']}")
    spec = LongTailSpec(name=p.name, layout="imagenet", classes=tuple(DIGIT_NAMES), lists=lists,
                        images_per_split={s: sum(counts[s]) for s in SPLITS}, images_per_class=per_class,
                        many_shot_threshold=many, few_shot_threshold=few, image_size=int(images.shape[-1]))
    write_json(tmp / "spec.json", spec.to_json())
    write("heldout", "heldout")  # unlisted: the heldout stage's candidates
    held = [int((labels[parts["heldout"]] == k).sum()) for k in range(len(DIGIT_NAMES))]
    write_json(tmp / "source.json", {"mini_data": p.mini_data, "train_images_per_class": dict(zip(DIGIT_NAMES, counts["train"])),
                                     "train_draw": p.train_draw, "seed": p.seed,
                                     "train_images_shared_with_corpus": shared,
                                     "threshold_rule": f"ImageNet-LT's cut points {MANY_SHOT_THRESHOLD} / {FEW_SHOT_THRESHOLD} over "
                                     f"{IMAGENET_LT_RANGE[0]}..{IMAGENET_LT_RANGE[1]} at the same relative log-count positions",
                                     "unlisted": {"images/heldout": "the mini world's references split",
                                                  "images_per_class": dict(zip(DIGIT_NAMES, held))}})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.longtail.mini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("source", "fidelity"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="mini_lt")
    parser.add_argument("--longtail-section", default="longtail", help="fidelity: the section of the long-tail stages")
    args = parser.parse_args(argv)
    try:
        p = load_section(MiniLongTailParams, args.section, args.params)
        if args.stage == "source":
            spec = build_source(p)
            print(json.dumps({"spec": str(p.spec_path), "images_per_split": spec.images_per_split,
                              "many_shot_threshold": spec.many_shot_threshold,
                              "few_shot_threshold": spec.few_shot_threshold}))
        else:
            from benchmarks.longtail import mini_fidelity
            from benchmarks.longtail.stages import LongTailParams, Run
            from benchmarks.mini.common import set_threads

            lp = load_section(LongTailParams, args.longtail_section, args.params)
            set_threads(lp.threads)
            run = Run(lp, str(p.spec_path))
            paths = mini_fidelity.write_report(mini_fidelity.fidelity(run, p.evaluator, p.image_encoder),
                                               run.results, run.spec.name)
            print(json.dumps({k: str(v) for k, v in paths.items()}))
    except (FileNotFoundError, UnknownNameError, ValueError) as e:  # bad input: one line, exit 2
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
