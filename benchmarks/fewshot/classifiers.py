"""Few-shot classifiers on timm backbones.

* A backbone is a timm model by name (a setting), trained here on the base (meta-train) classes
  — the standard protocol — or loaded pretrained from timm (``pretrained=True``; note that ImageNet
  pretraining has seen miniImageNet's test classes).
* Features are extracted once and cached on disk (safetensors, atomic); per-episode heads then run on
  cached features, vectorised across episodes: ``prototype`` (cosine nearest centroid) and ``linear``
  (multinomial logistic regression, fitted with L-BFGS for all episodes at once — their objectives
  are independent, so the joint optimum is each episode's optimum). ``finetune_accuracies`` is the
  slow path that fine-tunes the whole backbone per episode.
* Hyper-parameters are selected by :func:`select_hyperparameters`, which refuses any episode that is
  not made of validation classes."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.fewshot.registry import BenchmarkSpec, unknown_error
from benchmarks.fewshot.sampling import Episodes
from pipelines.io import load_tensors, save_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- statistics ----------------------------------------------------------------------------------

def mean_ci95(values) -> tuple[float, float]:
    """Mean and 95% half-width over episodes: 1.96 * std / sqrt(n), with the population std
    (``np.std``), as in the few-shot literature's evaluation code."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no episode accuracies to summarise")
    return float(v.mean()), float(1.96 * v.std() / math.sqrt(v.size))


# --- backbones -----------------------------------------------------------------------------------

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

    Shuffling comes from a generator seeded by ``cfg.seed``; augmentation draws from the torch RNG of
    the process or DataLoader worker, which torch seeds from that generator, so a run is
    reproducible for a given ``num_workers``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # initialisation of the classifier, augmentation when num_workers == 0
    classes = sorted(set(int(y) for y in labels))
    remap = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([remap[int(y)] for y in labels])
    loader = torch.utils.data.DataLoader(
        ImageRows(images, [int(r) for r in rows], image_transform(image_size, augment=True), targets),
        batch_size=cfg.batch_size, shuffle=True, generator=gen, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=device.startswith("cuda"))
    classifier = torch.nn.Linear(model.num_features, len(classes))
    model.to(device).train()
    classifier.to(device)
    params = list(model.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * len(loader))
    bar = tqdm(range(cfg.epochs), desc=f"base training {type(model).__name__}", disable=not progress)
    for epoch in bar:
        for b, (x, y) in enumerate(loader):
            loss = F.cross_entropy(classifier(model(x.to(device))), y.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"base training: loss is {loss.item()} at epoch {epoch}, batch {b}; lower the lr")
            opt.zero_grad()
            loss.backward()
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
    """(count, D) float32 features of ``images(0..count-1)``."""
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(ImageRows(images, range(count), image_transform(image_size)),
                                         batch_size=batch_size, num_workers=num_workers)
    out = [model(x.to(device)).float().cpu() for x in tqdm(loader, desc=desc, disable=not progress)]
    return torch.cat(out) if out else torch.zeros(0, model.num_features)


def cached_features(path: str | Path, keys: list[str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Features of ``keys`` (row ids or image paths) from ``path`` if it holds exactly those keys,
    else computed by ``compute()`` and saved there atomically."""
    path = Path(path)
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    cached = load_tensors(path, "features")
    if cached is not None and cached[1].get("keys_sha256") == digest:
        return cached[0]["features"]
    feats = compute()
    if feats.shape[0] != len(keys):
        raise ValueError(f"{path}: computed {feats.shape[0]} features for {len(keys)} keys")
    save_tensors(path, {"features": feats}, metadata={"keys_sha256": digest, "count": str(len(keys))})
    return feats


# --- per-episode heads on cached features --------------------------------------------------------

def prototype_logits(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity to class centroids. support (E, N, S, D), query (E, M, D) -> (E, M, N)."""
    protos = F.normalize(support.mean(2), dim=-1)
    return torch.einsum("emd,end->emn", F.normalize(query, dim=-1), protos)


def linear_logits(support: torch.Tensor, query: torch.Tensor, l2: float = 1e-2, max_iter: int = 100) -> torch.Tensor:
    """Multinomial logistic regression per episode on L2-normalised features: minimise, for every
    episode, mean cross-entropy over its support + ``l2``/2 ||W||^2, all episodes in one L-BFGS run."""
    E, N, S, D = support.shape
    x = F.normalize(support.reshape(E, N * S, D), dim=-1)
    y = torch.arange(N).repeat_interleave(S).repeat(E)
    w = torch.zeros(E, D, N, requires_grad=True)
    b = torch.zeros(E, 1, N, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        logits = torch.baddbmm(b, x, w)
        loss = F.cross_entropy(logits.reshape(-1, N), y, reduction="sum") / (N * S) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return torch.baddbmm(b, F.normalize(query, dim=-1), w)


HEADS: dict[str, Callable[..., torch.Tensor]] = {"prototype": prototype_logits, "linear": linear_logits}


def get_head(name: str) -> Callable[..., torch.Tensor]:
    if name not in HEADS:
        raise unknown_error("unknown classifier head", name, sorted(HEADS))
    return HEADS[name]


def episode_tensors(features: torch.Tensor, episodes: Episodes, synthetic: dict | None = None,
                    select: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support (E, N, K[+M], D), query (E, N*Q, D) and query labels (E, N*Q) of ``episodes[select]``.

    ``synthetic`` maps (class, shot, trial) -> (M, D) features of the images made for that support set;
    they join the real support of their class."""
    sup = features[torch.as_tensor(episodes.support[select])]
    qry = features[torch.as_tensor(episodes.query[select])]
    E, N, Q, D = qry.shape
    if synthetic is not None:
        first = select.start or 0
        extra = []
        for e, (classes, trials) in enumerate(zip(episodes.classes[select], episodes.trials[select])):
            row = []
            for c, t in zip(classes, trials):
                key = (c, episodes.shot, int(t))
                if key not in synthetic:
                    raise KeyError(f"episode {first + e}: no synthetic images for class {c!r}, {episodes.shot}-shot, trial {int(t)}")
                row.append(synthetic[key])
            sizes = {r.shape[0] for r in row}
            if len(sizes) != 1:
                raise ValueError(f"episode {first + e}: classes have different numbers of synthetic images {sorted(sizes)}")
            extra.append(torch.stack(row))
        sup = torch.cat([sup, torch.stack(extra)], dim=2)
    labels = torch.arange(N).repeat_interleave(Q).expand(E, N * Q)
    return sup, qry.reshape(E, N * Q, D), labels


def episode_accuracies(head: str, features: torch.Tensor, episodes: Episodes, synthetic: dict | None = None,
                       chunk: int = 200, progress: bool = False, **hyper) -> np.ndarray:
    """Query accuracy of every episode (float64 array of length E)."""
    fn = get_head(head)
    accs = []
    for start in tqdm(range(0, len(episodes), chunk), desc=f"{head} episodes", disable=not progress):
        sup, qry, labels = episode_tensors(features, episodes, synthetic, slice(start, start + chunk))
        pred = fn(sup, qry, **hyper).argmax(-1)
        accs.append((pred == labels).double().mean(-1).numpy())
    return np.concatenate(accs)


def select_hyperparameters(spec: BenchmarkSpec, head: str, grid: list[dict], features: torch.Tensor,
                           episodes: Episodes, synthetic: dict | None = None) -> tuple[dict, list[dict]]:
    """Best hyper-parameters of ``head`` by mean accuracy on validation episodes. Episodes that are
    not of the validation split, or contain any non-validation class, are refused."""
    if episodes.split != "val":
        raise ValueError(f"hyper-parameters are selected on validation classes only; got {episodes.split!r} episodes")
    val = set(spec.classes["val"])
    for e, classes in enumerate(episodes.classes):
        for c in classes:
            if c not in val:
                raise ValueError(f"hyper-parameters are selected on validation classes only; episode {e} "
                                 f"contains class {c!r} of split {spec.split_of(c)!r}")
    table = []
    for hp in grid or [{}]:
        mean, ci = mean_ci95(episode_accuracies(head, features, episodes, synthetic, **hp))
        table.append({**hp, "val_accuracy": mean, "val_ci95": ci})
    best = max(range(len(table)), key=lambda i: table[i]["val_accuracy"])  # first of equals: grid order decides
    return dict((grid or [{}])[best]), table


# --- the slow path: fine-tune the backbone per episode ------------------------------------------

def finetune_accuracies(backbone: torch.nn.Module, images: Callable[[int], Image.Image], episodes: Episodes,
                        image_size: int, synthetic: dict | None = None, steps: int = 100, lr: float = 1e-3,
                        seed: int = 0, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """Per episode: copy the backbone, add a linear head, train both with Adam on the support (+ the
    synthetic images of each support set, ``synthetic``: (class, shot, trial) -> list of PIL images or
    paths) for ``steps`` full-batch steps with flip/shift augmentation; accuracy on the queries."""
    accs = []
    plain = image_transform(image_size)
    for e in tqdm(range(len(episodes)), desc="fine-tuning episodes", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 100003 + e)
        torch.manual_seed(seed * 100003 + e)
        augment = image_transform(image_size, augment=True, generator=gen)
        sup_images, sup_labels = [], []
        for i, (c, t) in enumerate(zip(episodes.classes[e], episodes.trials[e])):
            extra = (synthetic or {}).get((c, episodes.shot, int(t)), [])
            if synthetic is not None and not extra:
                raise KeyError(f"episode {e}: no synthetic images for class {c!r}, {episodes.shot}-shot, trial {int(t)}")
            for im in [images(int(r)) for r in episodes.support[e, i]] + [_open(p) for p in extra]:
                sup_images.append(im)
                sup_labels.append(i)
        model = copy.deepcopy(backbone).to(device).train()
        head = torch.nn.Linear(model.num_features, episodes.ways).to(device)
        opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=lr)
        y = torch.tensor(sup_labels, device=device)
        for step in range(steps):
            x = torch.stack([augment(im) for im in sup_images]).to(device)
            loss = F.cross_entropy(head(model(x)), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning episode {e}: loss is {loss.item()} at step {step}")
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            q = episodes.query[e]
            x = torch.stack([plain(images(int(r))) for r in q.ravel()]).to(device)
            pred = head(model(x)).argmax(-1).cpu()
        accs.append((pred == torch.arange(episodes.ways).repeat_interleave(q.shape[1])).double().mean().item())
    return np.asarray(accs)


def _open(item) -> Image.Image:
    return item if isinstance(item, Image.Image) else Image.open(item).convert("RGB")
