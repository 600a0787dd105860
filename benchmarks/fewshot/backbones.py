"""Backbones and their features: a timm model by name, trained here on the base (meta-train)
classes — the standard protocol — or loaded pretrained from timm (``pretrained=True``; note that
ImageNet pretraining has seen miniImageNet's test classes); features extracted once and cached on
disk (safetensors, atomic), keyed by the backbone that made them."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from benchmarks import distributed
from benchmarks.fewshot.registry import unknown_error
from pipelines.io import load_tensors, save_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def create_backbone(name: str, pretrained: bool = False, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """A timm feature extractor (``num_classes=0``), optionally with weights from ``checkpoint``."""
    import timm

    if name not in timm.list_models(pretrained=False):
        raise unknown_error("unknown timm backbone", name, timm.list_models(pretrained=False))
    if pretrained:
        warnings.warn(f"backbone {name!r} is ImageNet-pretrained: it has seen miniImageNet's test classes, "
                      "so its few-shot accuracies are not comparable with base-class training", stacklevel=2)
    model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    if checkpoint is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(checkpoint)))
    return model.eval()


def image_transform(image_size: int, augment: bool = False, generator: torch.Generator | None = None) -> Callable:
    """PIL image -> normalised (3, s, s) tensor; ``augment`` adds a random flip and a small shift
    drawn from ``generator`` (the data augmentation of base training and fine-tuning)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if augment:
            if torch.rand((), generator=generator) < 0.5:
                x = x.flip(-1)
            pad = max(1, image_size // 8)
            dx, dy = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=generator))
            x = torch.roll(F.pad(x, (pad, pad, pad, pad), mode="reflect"), (dy, dx), (1, 2))[:, pad:-pad, pad:-pad]
        return (x - mean) / std

    return transform


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0


class ImageRows(torch.utils.data.Dataset):
    """``images(keys[i])`` through ``transform``, with ``targets[i]`` if given (for DataLoader workers)."""

    def __init__(self, images: Callable, keys: Sequence, transform: Callable, targets: torch.Tensor | None = None):
        self.images, self.keys, self.transform, self.targets = images, list(keys), transform, targets

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        x = self.transform(self.images(self.keys[i]))
        return x if self.targets is None else (x, self.targets[i])


def train_backbone(model: torch.nn.Module, images: Callable[[int], Image.Image], rows: Sequence[int],
                   labels: Sequence[int], image_size: int, cfg: TrainConfig, device: str = "cpu",
                   num_workers: int = 0, progress: bool = True) -> torch.nn.Module:
    """Supervised training on the base classes (cross-entropy over a linear classifier that is
    discarded afterwards), SGD with momentum and a cosine schedule. ``images(row)`` returns a PIL image.

    The order of each epoch and the augmentation of each sample are keyed by ``cfg.seed`` (and epoch,
    sample), so a run is reproducible whatever ``num_workers``, and under a launcher's several
    processes it takes the steps of one process (:mod:`benchmarks.distributed`)."""
    torch.manual_seed(cfg.seed)  # initialisation of the classifier
    classes = sorted(set(int(y) for y in labels))
    remap = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([remap[int(y)] for y in labels])
    batches = distributed.GlobalBatches(len(rows), cfg.batch_size, cfg.seed)
    dataset = ImageRows(images, [int(r) for r in rows], image_transform(image_size, augment=True), targets)
    loader = torch.utils.data.DataLoader(
        distributed.KeyedRows(dataset, cfg.seed), batch_sampler=batches, collate_fn=distributed.collate,
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=device.startswith("cuda"))
    classifier = torch.nn.Linear(model.num_features, len(classes))
    model = distributed.global_batch_norm(model.to(device).train())
    classifier.to(device)
    params = list(model.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * len(batches))
    bar = tqdm(range(cfg.epochs), desc=f"base training {type(model).__name__}", disable=not progress)
    for epoch in bar:
        batches.set_epoch(epoch)
        for b, batch in enumerate(loader):
            x, y = batch if batch is not None else (torch.zeros(0, 3, image_size, image_size), torch.zeros(0, dtype=torch.long))
            logits = classifier(model(x.to(device)))
            share = len(y) / batches.global_size(b)   # this slice's part of the global batch's mean
            loss = F.cross_entropy(logits, y.to(device)) * share if len(y) else logits.sum() * 0
            opt.zero_grad()
            loss.backward()
            loss = distributed.sum_gradients(params, loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"base training: loss is {loss.item()} at epoch {epoch}, batch {b}; lower the lr")
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save_backbone(model: torch.nn.Module, path: str | Path, meta: dict) -> Path:
    return save_tensors(path, dict(model.state_dict()), metadata={"config": json.dumps(meta, sort_keys=True)})


def file_digest(path: str | Path, n: int = 12) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:n]


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: Callable[[int], Image.Image], count: int, image_size: int,
                     batch_size: int = 256, device: str = "cpu", desc: str = "features", num_workers: int = 0,
                     progress: bool = True) -> torch.Tensor:
    """(count, D) float32 features of ``images(0..count-1)``; under several processes each extracts a
    contiguous part and every process returns all of them in row order."""
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(ImageRows(images, distributed.shard(count), image_transform(image_size)),
                                         batch_size=batch_size, num_workers=num_workers)
    out = [model(x.to(device)).float().cpu() for x in tqdm(loader, desc=desc, disable=not progress)]
    return distributed.gather_rows(torch.cat(out) if out else torch.zeros(0, model.num_features))


def cached_features(path: str | Path, keys: list[str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Features of ``keys`` (row ids or image paths) from ``path`` if it holds exactly those keys,
    else computed by ``compute()`` (by every process of a launcher) and saved there atomically by the first."""
    path = Path(path)
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    cached = load_tensors(path, "features")
    if cached is not None and cached[1].get("keys_sha256") == digest:
        return cached[0]["features"]
    feats = compute()
    if feats.shape[0] != len(keys):
        raise ValueError(f"{path}: computed {feats.shape[0]} features for {len(keys)} keys")
    if distributed.is_main():
        save_tensors(path, {"features": feats}, metadata={"keys_sha256": digest, "count": str(len(keys))})
    distributed.barrier()
    return feats
