"""A timm classifier trained on a long-tailed training set (real images plus, optionally, extra
images per class), with cross-entropy or the logit-adjusted loss.

Defaults (:class:`TrainConfig`) are the joint-training recipe of classifier-balancing (Kang et al.,
ICLR 2020, ``config/ImageNet_LT/feat_uniform.yaml``), which Balanced Softmax (Ren et al., NeurIPS
2020) and logit adjustment (Menon et al., ICLR 2021) also train ImageNet-LT with: 90 epochs, batch
512, SGD (momentum 0.9, weight decay 5e-4), lr 0.2 with a cosine decay to 0, RandomResizedCrop(224)
+ horizontal flip + ColorJitter(0.4, 0.4, 0.4), test on Resize(256) + CenterCrop(224). The backbone
is a setting (``model``, any timm name; ResNet-50 by default).

A run is resumable: the state after every epoch (model, optimiser, schedule, random generators) is
saved atomically, and a rerun continues from it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from benchmarks import distributed
from benchmarks.fewshot.backbones import IMAGENET_MEAN, IMAGENET_STD
from benchmarks.fewshot.registry import unknown_error
from pipelines.io import atomic_path, load_whole

LOSSES = ("ce", "logit-adjusted")
SCHEDULES = ("cosine", "step")


@dataclass
class TrainConfig:
    model: str = "resnet50"
    pretrained: bool = False          # timm's ImageNet weights: never for ImageNet-LT (trained on the full, balanced train set)
    image_size: int = 224
    epochs: int = 90
    batch_size: int = 512
    lr: float = 0.2                   # the classifier layer's lr, and the backbone's unless backbone_lr is set
    backbone_lr: float | None = None  # e.g. fine-tuning a pretrained backbone slower than the new classifier
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # cosine to 0 over all epochs, or step (x step_gamma every step_epochs)
    step_epochs: int = 30
    step_gamma: float = 0.1
    color_jitter: float = 0.4
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop's area range
    hflip: bool = True                # off for digits (a mirrored digit is another shape)
    test_resize: float = 256 / 224    # test: Resize(image_size * test_resize) + CenterCrop(image_size)
    amp: bool = True                  # bfloat16 autocast on CUDA
    num_workers: int = 8
    decode_once: bool = False         # keep each decoded image in memory for the next epochs (small sets: mini-lt)
    eval_batch_size: int = 256
    device: str = "auto"

    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device


# --- the long-tail-aware loss --------------------------------------------------------------------

def logit_adjusted_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts: torch.Tensor,
                        tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted softmax cross-entropy (Menon et al., "Long-tail learning via logit
    adjustment", ICLR 2021, eq. 10), averaged over the batch:

        l(y, f(x)) = -log( exp(f_y(x) + tau * log pi_y) / sum_y' exp(f_y'(x) + tau * log pi_y') )

    with pi_y = n_y / sum_j n_j the label frequencies of the training set. At tau = 1 this is
    Balanced Softmax (Ren et al., NeurIPS 2020, eq. 4: softmax over n_j exp(f_j)), since log n_y and
    log pi_y differ by a constant that cancels. Predictions use the plain logits, argmax_y f_y(x),
    which then estimate the balanced (test) label distribution. Every class needs n_y >= 1."""
    counts = class_counts.to(device=logits.device, dtype=torch.float32)
    if (counts <= 0).any():
        raise ValueError(f"logit adjustment needs every class in the training set; class {int((counts <= 0).nonzero()[0])} has none")
    log_prior = torch.log(counts / counts.sum())
    return F.cross_entropy(logits.float() + tau * log_prior, targets)


def loss_fn(name: str, class_counts: torch.Tensor, tau: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "ce":
        return lambda logits, y: F.cross_entropy(logits.float(), y)
    if name == "logit-adjusted":
        return lambda logits, y: logit_adjusted_loss(logits, y, class_counts, tau)
    raise unknown_error("unknown loss", name, LOSSES)


# --- images --------------------------------------------------------------------------------------

def transforms(cfg: TrainConfig, train: bool):
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        jitter = [T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter, 0)] if cfg.color_jitter else []
        flip = [T.RandomHorizontalFlip()] if cfg.hflip else []
        return T.Compose([T.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale)), *flip, *jitter, *norm])
    return T.Compose([T.Resize(round(cfg.image_size * cfg.test_resize)), T.CenterCrop(cfg.image_size), *norm])


class ImageFiles(torch.utils.data.Dataset):
    """``(transformed image, label)`` per file; with ``decode_once`` each file is decoded on first use
    and kept (the same pixels, so the same batches: only for sets that fit in memory)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform, decode_once: bool = False):
        self.paths, self.labels, self.transform = list(paths), torch.as_tensor(np.asarray(labels)), transform
        self.decoded: dict[int, Image.Image] | None = {} if decode_once else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.decoded.get(i) if self.decoded is not None else None
        if image is None:
            with Image.open(self.paths[i]) as im:
                image = im.convert("RGB")
            if self.decoded is not None:
                self.decoded[i] = image
        return self.transform(image), self.labels[i]


def training_items(paths: Sequence[str], labels: Sequence[int], classes: Sequence[str],
                   extra: Mapping[str, Sequence[str | Path]] | Callable[[str], Sequence[str | Path]] | None = None
                   ) -> tuple[list[str], np.ndarray]:
    """The real training images plus the ``extra`` images of each class (a mapping or a function
    ``class -> image paths``, e.g. synthetic images), labelled by the class's position in ``classes``."""
    paths, labels = [str(p) for p in paths], list(np.asarray(labels).tolist())
    if extra is not None:
        get = extra if callable(extra) else (lambda c: extra.get(c, ()))
        if not callable(extra):
            unknown = sorted(set(extra) - set(classes))
            if unknown:
                raise unknown_error("extra images for an unknown class: no class", unknown[0], classes)
        for i, c in enumerate(classes):
            more = [str(p) for p in get(c)]
            paths += more
            labels += [i] * len(more)
    return paths, np.asarray(labels, dtype=np.int64)


# --- training ------------------------------------------------------------------------------------

def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    import timm

    if cfg.model not in timm.list_models():
        raise unknown_error("unknown timm model", cfg.model, timm.list_models())
    return timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes)


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    head = set(id(p) for p in model.get_classifier().parameters())
    body = [p for p in model.parameters() if id(p) not in head]
    return [{"params": body, "lr": cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr},
            {"params": list(model.get_classifier().parameters()), "lr": cfg.lr}]


def _schedule(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.step_gamma ** (s // (cfg.step_epochs * steps_per_epoch)))
    raise unknown_error("unknown lr schedule", cfg.schedule, SCHEDULES)


def train_classifier(paths: Sequence[str], labels: np.ndarray, num_classes: int, cfg: TrainConfig, loss: str,
                     seed: int, tau: float = 1.0, state_path: str | Path | None = None,
                     progress: bool = True, prior_counts: np.ndarray | None = None) -> torch.nn.Module:
    """Train ``cfg.model`` from its initialisation under ``seed`` on (paths, labels) with ``loss``
    (the logit adjustment's prior is ``prior_counts``, by default the label counts of exactly these
    images, extra images included).

    Initialisation, the order of each epoch and the augmentation of each sample all derive from
    ``seed`` (order and augmentation keyed by epoch and sample), so a run is reproducible whatever
    ``num_workers``, and under a launcher's several processes it takes the steps of one process
    (:mod:`benchmarks.distributed`; only the first process writes the resume point). With ``state_path``
    the state after each epoch is saved there and a rerun resumes."""
    device = cfg.resolved_device()
    counts = torch.as_tensor(np.bincount(labels, minlength=num_classes) if prior_counts is None else prior_counts)
    if counts.shape != (num_classes,):
        raise ValueError(f"prior_counts must hold one count per class ({num_classes}), got shape {tuple(counts.shape)}")
    criterion = loss_fn(loss, counts, tau)
    torch.manual_seed(seed)
    model = distributed.global_batch_norm(create_model(cfg, num_classes).to(device))
    batches = distributed.GlobalBatches(len(paths), cfg.batch_size, seed, drop_last=len(paths) > cfg.batch_size)
    loader = torch.utils.data.DataLoader(
        distributed.KeyedRows(ImageFiles(paths, labels, transforms(cfg, train=True), cfg.decode_once), seed),
        batch_sampler=batches,
        collate_fn=distributed.collate, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=device.startswith("cuda"))
    opt = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg, len(batches))
    start = 0
    state = load_whole(state_path, lambda p: torch.load(p, map_location="cpu", weights_only=True), "resume point") \
        if state_path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"]
    params = [p for group in opt.param_groups for p in group["params"]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.startswith("cuda"))
    bar = tqdm(range(start, cfg.epochs), desc=f"{cfg.model} {loss} seed {seed}", disable=not progress,
               initial=start, total=cfg.epochs)
    for epoch in bar:
        model.train()
        batches.set_epoch(epoch)
        for b, batch in enumerate(loader):
            x, y = batch if batch is not None else (torch.zeros(0, 3, cfg.image_size, cfg.image_size),
                                                    torch.zeros(0, dtype=torch.long))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                logits = model(x)
            share = len(y) / batches.global_size(b)   # this slice's part of the global batch's mean
            value = criterion(logits, y) * share if len(y) else logits.float().sum() * 0
            opt.zero_grad(set_to_none=True)
            value.backward()
            value = distributed.sum_gradients(params, value)
            if not torch.isfinite(value):
                raise FloatingPointError(f"{loss} loss is {value.item()} at epoch {epoch}, batch {b}; lower the lr")
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{value.item():.3f}")
        if state_path is not None and distributed.is_main():
            with atomic_path(state_path) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch + 1}, tmp)
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, paths: Sequence[str], cfg: TrainConfig, progress: bool = True) -> np.ndarray:
    """Top-1 class of every image (test-time Resize + CenterCrop, argmax of the plain logits); under
    several processes each predicts a contiguous part and every process returns all, in order."""
    device = cfg.resolved_device()
    model.to(device).eval()
    part = [paths[i] for i in distributed.shard(len(paths))]
    loader = torch.utils.data.DataLoader(ImageFiles(part, np.zeros(len(part), dtype=np.int64), transforms(cfg, train=False)),
                                         batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.startswith("cuda"))
    out = []
    for x, _ in tqdm(loader, desc="predicting", disable=not progress):
        with autocast:
            out.append(model(x.to(device)).argmax(-1).cpu())
    return distributed.gather_rows(torch.cat(out) if out else torch.zeros(0, dtype=torch.long)).numpy().astype(np.int64)
