"""The offline few-shot benchmark ``mini-digits``, built from the miniature world's bundled digits
(issue 5, ``benchmarks/mini``): the default of ``dvc repro``.

- ``source``: turns the mini world's splits into a local dataset in the hub layout
  (``<out_dir>/data/train-00000-of-00001.parquet``, an ``image`` column and a ``label`` ClassLabel)
  plus ``<out_dir>/spec.json``, the :class:`BenchmarkSpec` with the class split and the exact image
  counts. The few-shot stages take that JSON file as the benchmark name, so the data go through the
  same prepare + integrity path as CUB / miniImageNet / CIFAR-FS. Base classes take their images
  from the mini diffusion model's training split (``base_split``); validation and test classes from
  the balanced held-out split (``novel_split``), which no mini model has seen. The default test
  classes are the mini world's *tail* digits (rare for the mini SD) plus one head digit: the papers'
  question is whether synthetic images of rare classes help a few-shot learner.
- ``guide``: the classifier that steers Discriminative Class Tokens. It must not be the mini world's
  evaluator (that one scores fidelity only), so a separate small classifier is trained here on the
  balanced ``encoder`` split (the "broad" data the mini CLIP saw) with its own seed, and saved as a
  transformers image-classification folder (a tiny ViT at the images' native 32 px, which
  ``pipelines.classifiers.load_classifier`` loads like ``google/vit-large-patch16-224``).

``python -m benchmarks.fewshot.mini {source,guide} --params params.yaml`` (section ``mini_fewshot``).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.fewshot.registry import SPLITS, BenchmarkSpec
from benchmarks.mini.common import set_threads
from benchmarks.params import load_section
from pipelines.io import atomic_dir, write_json

log = logging.getLogger("benchmarks.fewshot.mini")


@dataclass
class GuideParams:
    hidden_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 128
    patch_size: int = 4
    split: str = "encoder"            # mini world split it learns from (never the evaluator's or test)
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2                # random translation, so it judges shape, not position
    seed: int = 3


@dataclass
class MiniFewShotParams:
    name: str = "mini-digits"
    mini_data: str = "data/mini/data"                 # the mini_data stage's output (splits.safetensors)
    out_dir: str = "data/fewshot/mini-digits-source"  # parquet + spec.json
    classes: dict = field(default_factory=lambda: {
        "train": ["zero", "one", "three", "four"],
        "val": ["six", "seven", "eight"],
        "test": ["two", "five", "nine"]})
    base_split: str = "train"          # mini split giving the base (train) classes' images
    novel_split: str = "test"          # mini split giving the val / test classes' images
    min_images_per_class: int = 20     # 5 shots + 15 queries
    guide_dir: str = "data/fewshot/mini-digits-guide"
    guide: GuideParams = field(default_factory=GuideParams)
    threads: int = 1                   # torch threads: fixed, so the guide's weights do not depend on the machine

    @property
    def spec_path(self) -> Path:
        return Path(self.out_dir) / "spec.json"


def _digit_names() -> tuple[str, ...]:
    from benchmarks.mini.config import DIGIT_NAMES

    return DIGIT_NAMES


def build_source(p: MiniFewShotParams) -> BenchmarkSpec:
    """Write the parquet source and its spec (see the module docstring); returns the spec."""
    import datasets
    from PIL import Image

    from benchmarks.mini.data import load_split, manifest

    names = list(_digit_names())
    if set(p.classes) != set(SPLITS):
        raise ValueError(f"mini_fewshot.classes must have exactly the splits {SPLITS}, got {sorted(p.classes)}")
    for split in SPLITS:
        unknown = [c for c in p.classes[split] if c not in names]
        if unknown:
            raise ValueError(f"mini_fewshot.classes.{split}: {unknown} are not digits {names}")
    tail = manifest(p.mini_data).get("tail_classes", [])
    if not set(tail) & set(p.classes["test"]):
        log.warning("no tail digit of the mini world (%s) is a test class: synthesis is then not tested on rare classes", tail)
    pools = {s: load_split(p.mini_data, s) for s in {p.base_split, p.novel_split}}
    images, labels, counts = [], [], {}
    for split in SPLITS:
        src_images, src_labels = pools[p.base_split if split == "train" else p.novel_split]
        for c in p.classes[split]:
            idx = (src_labels == names.index(c)).nonzero().flatten()
            if len(idx) < p.min_images_per_class:
                raise ValueError(f"class {c!r} ({split}): the mini split {p.base_split if split == 'train' else p.novel_split!r} "
                                 f"has {len(idx)} images, fewer than {p.min_images_per_class}")
            counts[c] = len(idx)
            images += [Image.fromarray(src_images[i].permute(1, 2, 0).numpy()) for i in idx.tolist()]
            labels += [names.index(c)] * len(idx)
    spec = BenchmarkSpec(
        name=p.name, hf_id=str(p.out_dir), classes={s: tuple(p.classes[s]) for s in SPLITS},
        source_splits={"train": "*"},
        images_per_split={s: sum(counts[c] for c in p.classes[s]) for s in SPLITS}, total_images=len(labels),
        min_images_per_class=p.min_images_per_class, image_size=int(pools[p.novel_split][0].shape[-1]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    with atomic_dir(p.out_dir) as tmp:
        (tmp / "data").mkdir(parents=True)
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features) \
            .to_parquet(str(tmp / "data" / "train-00000-of-00001.parquet"))
        write_json(tmp / "spec.json", spec.to_json())
        write_json(tmp / "source.json", {"mini_data": p.mini_data, "base_split": p.base_split,
                                         "novel_split": p.novel_split, "tail_classes": tail,
                                         "images_per_class": counts})
    return spec


def train_guide(p: MiniFewShotParams) -> dict:
    """Train the DCT guide (a tiny ViT classifier over all 10 digits) and save it as a transformers
    image-classification folder; returns its training report (held-out accuracy on the test split)."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from benchmarks.mini.data import load_split, random_shift, to_unit

    g = p.guide
    names = list(_digit_names())
    t0 = time.perf_counter()
    x_u8, y = load_split(p.mini_data, g.split)
    size = int(x_u8.shape[-1])
    torch.manual_seed(g.seed)
    config = ViTConfig(image_size=size, patch_size=g.patch_size, num_channels=3, hidden_size=g.hidden_size,
                       num_hidden_layers=g.num_hidden_layers, num_attention_heads=g.num_attention_heads,
                       intermediate_size=g.intermediate_size, num_labels=len(names),
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = ViTForImageClassification(config)
    mean = std = (0.5, 0.5, 0.5)
    processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std))
    x = (to_unit(x_u8) - 0.5) / 0.5
    gen = torch.Generator().manual_seed(g.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=g.lr, total_steps=g.steps, pct_start=0.1)
    model.train()
    for step in (bar := tqdm(range(g.steps), desc="DCT guide", mininterval=5)):
        idx = torch.randint(0, len(x), (g.batch_size,), generator=gen)
        loss = F.cross_entropy(model(pixel_values=random_shift(x[idx], g.max_shift, gen)).logits, y[idx],
                               label_smoothing=0.1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DCT guide: loss {loss.item()} at step {step}; lower mini_fewshot.guide.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    test_x, test_y = load_split(p.mini_data, "test")
    with torch.no_grad():
        pred = model(pixel_values=(to_unit(test_x) - 0.5) / 0.5).logits.argmax(1)
    report = {"test_accuracy": float((pred == test_y).float().mean()), "trained_on": g.split,
              "seconds": round(time.perf_counter() - t0, 1), "params": asdict(g)}
    with atomic_dir(p.guide_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / "training.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fewshot.mini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("source", "guide"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="mini_fewshot")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = load_section(MiniFewShotParams, args.section, args.params)
    set_threads(p.threads)
    if args.stage == "source":
        spec = build_source(p)
        print(json.dumps({"spec": str(p.spec_path), "images_per_split": spec.images_per_split}))
    else:
        print(json.dumps(train_guide(p)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
