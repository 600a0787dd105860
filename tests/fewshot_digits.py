"""A tiny few-shot benchmark in the Hugging Face ``datasets`` format, built from real images that
ship with scikit-learn (``load_digits``: 8x8 handwritten digits, upscaled), plus a trivial real
generator (augmented copies of the references). Shared by the ``test_benchmarks_fewshot_*`` modules."""
from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from benchmarks.fewshot.registry import BenchmarkSpec

PER_CLASS = 24
SIZE = 32
CLASSES = {"train": ("zero", "one", "two", "three"), "val": ("four", "five", "six"),
           "test": ("seven", "eight", "nine")}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_images(per_class: int = PER_CLASS, size: int = SIZE) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images, labels = [], []
    for d in range(10):
        for row in np.flatnonzero(y == d)[:per_class]:
            pixels = (x[row].reshape(8, 8) / 16.0 * 255).astype(np.uint8)
            images.append(Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB"))
            labels.append(d)
    return images, labels


def write_digits_source(root: Path, per_class: int = PER_CLASS, drop: int = 0) -> Path:
    """Parquet files ``root/data/{train,test}-*.parquet`` (the layout of a hub dataset) with an
    ``image`` column and a ``label`` ClassLabel; rows alternate between the two source splits.
    ``drop`` removes that many rows (an incomplete download)."""
    images, labels = digit_images(per_class)
    if drop:
        images, labels = images[:-drop], labels[:-drop]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    for k, split in enumerate(("train", "test")):
        ds = datasets.Dataset.from_dict({"image": images[k::2], "label": labels[k::2]}, features=features)
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def digits_spec(hf_id: str | Path, per_class: int = PER_CLASS) -> BenchmarkSpec:
    return BenchmarkSpec(name="digits", hf_id=str(hf_id), classes=CLASSES,
                         source_splits={"train": "*", "test": "*"}, images_per_class=per_class,
                         images_per_split={s: per_class * len(c) for s, c in CLASSES.items()},
                         min_images_per_class=per_class, image_size=SIZE)


def augment_generator(prompt, ref_paths, out_paths, seed):
    """Real, trivial generator: each output is a randomly flipped, shifted, contrast-jittered copy of
    a random reference image (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    refs = [Image.open(p).convert("RGB") for p in ref_paths]
    for out in out_paths:
        im = refs[int(rng.integers(len(refs)))]
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        im = im.transform(im.size, Image.AFFINE, (1, 0, dx, 0, 1, dy))
        im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.7, 1.3)))
        im.save(out)


def copy_generator(prompt, ref_paths, out_paths, seed):
    """Real, trivial generator: output j is an exact copy of reference j mod K (tests can check that a
    synthetic image's features land on its own support set)."""
    for j, out in enumerate(out_paths):
        Image.open(ref_paths[j % len(ref_paths)]).convert("RGB").save(out)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Torch's OpenMP threads spin-wait; on the shared 2-core test machine one thread is much faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
