"""The mini world's independent evaluator: a timm architecture trained from random init on its own
balanced split with its own seed. It only scores fidelity and gives features for the diversity
metric; it never enters a generation loss. Saved timm-style: weights + the resolved config."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.classifiers import mark_as_evaluator
from pipelines.io import atomic_dir, save_tensors, write_json

from . import data
from .common import Timer, train_loop
from .config import MiniConfig

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class Evaluator(torch.nn.Module):
    """A timm classifier plus its input normalisation; takes RGB images in [0, 1]."""

    def __init__(self, model: torch.nn.Module, config: dict) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1))

    def _prepare(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"evaluator expects RGB images (N, 3, H, W) in [0, 1], got {tuple(images01.shape)}")
        size = self.config["input_size"][-1]
        if images01.shape[-1] != size or images01.shape[-2] != size:
            images01 = F.interpolate(images01, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (images01.clamp(0, 1) - self.mean) / self.std

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model(self._prepare(images01))

    @torch.no_grad()
    def predict(self, images01: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self(images01[i:i + batch_size]).argmax(1) for i in range(0, len(images01), batch_size)])

    @torch.no_grad()
    def features(self, images01: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Pooled pre-logit features (the diversity metric's space)."""
        out = []
        for i in range(0, len(images01), batch_size):
            f = self.model.forward_features(self._prepare(images01[i:i + batch_size]))
            out.append(self.model.forward_head(f, pre_logits=True))
        return torch.cat(out)


def build_model(model_name: str, num_classes: int) -> torch.nn.Module:
    import timm

    if model_name not in timm.list_models():
        raise ValueError(f"unknown timm architecture {model_name!r}")
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=3)


def load_evaluator(folder: str | Path) -> Evaluator:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"evaluator checkpoint incomplete: {p} is missing")
    config = json.loads(cfg_path.read_text())
    model = build_model(config["architecture"], config["num_classes"])
    model.load_state_dict(load_file(str(w_path)))
    return Evaluator(model, config).eval()


def train(cfg: MiniConfig) -> dict:
    ec = cfg.evaluator
    timer = Timer()
    images, labels = data.load_split(cfg.data_dir, "evaluator")
    x_all = data.to_unit(images)
    torch.manual_seed(ec.seed)
    model = build_model(ec.model_name, len(cfg.class_names))
    s = cfg.data.image_size
    config = {"architecture": ec.model_name, "num_classes": len(cfg.class_names), "class_names": cfg.class_names,
              "input_size": [3, s, s], "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear",
              "pretrained_cfg": dict(getattr(model, "pretrained_cfg", {}) or {}), "train": asdict(ec)}
    ev = Evaluator(model, config)
    gen = torch.Generator().manual_seed(ec.seed)

    def step_fn(step: int) -> dict:
        idx = torch.randint(0, len(x_all), (ec.batch_size,), generator=gen)
        logits = ev(data.random_shift(x_all[idx], ec.max_shift, gen))
        return {"loss": F.cross_entropy(logits, labels[idx], label_smoothing=0.1)}

    ev.train()
    log = train_loop("mini evaluator", model.parameters(), steps=ec.steps, lr=ec.lr, weight_decay=0.05, warmup=30,
                     step_fn=step_fn)
    ev.eval()
    test_x, test_y = data.load_split(cfg.data_dir, "test")
    acc = (ev.predict(data.to_unit(test_x)) == test_y).float().mean().item()
    report = {"seconds": timer.seconds, "test_accuracy": acc, "log": log}
    with atomic_dir(cfg.evaluator_dir) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        write_json(tmp / "config.json", config)
        write_json(tmp / "training.json", report)
        mark_as_evaluator(tmp)  # the fidelity judge: refused as a DCT guide
    return report
