"""The mini world's "CLIP" image encoder: a small ``CLIPVisionModelWithProjection`` (+ its
``CLIPImageProcessor``) pretrained on the long-tailed corpus (the ``train`` split, drawn with its
per-image weights, exactly as the diffusion model sees it), as CLIP was pretrained on a long-tailed web
corpus: it knows the rare digits only from their few, rarely drawn images. It never sees the held-out
splits (test, val, references, evaluator).

Training: cosine-softmax classification of the L2-normalised projected embedding against learned
class prototypes (a supervised-contrastive objective with one prototype per class), so that class
identity lives in the embedding *direction* — exactly what SeedSelect's cosine semantic loss reads."""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from pipelines.io import atomic_dir, write_json

from . import data
from .common import Timer, train_loop
from .config import MiniConfig

MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]


def build_image_processor(cfg: MiniConfig):
    from transformers import CLIPImageProcessor

    s = cfg.data.image_size
    return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                              image_mean=MEAN, image_std=STD, do_convert_rgb=True)


def build_encoder(cfg: MiniConfig):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    ec = cfg.encoder
    torch.manual_seed(ec.seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=cfg.data.image_size, patch_size=ec.patch_size, hidden_size=ec.hidden_size,
        intermediate_size=ec.intermediate_size, num_hidden_layers=ec.num_hidden_layers,
        num_attention_heads=ec.num_attention_heads, projection_dim=ec.projection_dim, hidden_act="quick_gelu"))


def normalize(x01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


@torch.no_grad()
def accuracy(model, prototypes: torch.Tensor, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    emb = torch.cat([model(pixel_values=normalize(data.to_unit(images_u8[i:i + 256]))).image_embeds
                     for i in range(0, len(images_u8), 256)])
    pred = (F.normalize(emb, dim=-1) @ F.normalize(prototypes, dim=-1).T).argmax(1)
    return (pred == labels).float().mean().item()


def training_set(cfg: MiniConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, labels, draw weights)``: the long-tailed corpus, drawn as the diffusion model draws it."""
    images, labels = data.load_split(cfg.data_dir, "train")
    return images, labels, data.load_train_weights(cfg.data_dir)


def train(cfg: MiniConfig) -> dict:
    ec = cfg.encoder
    timer = Timer()
    images, labels, weights = training_set(cfg)
    x_all = data.to_unit(images)
    model = build_encoder(cfg)
    prototypes = torch.nn.Parameter(torch.randn(len(cfg.class_names), ec.projection_dim,
                                                generator=torch.Generator().manual_seed(ec.seed)))
    gen = torch.Generator().manual_seed(ec.seed)

    def step_fn(step: int) -> dict:
        idx = torch.multinomial(weights, ec.batch_size, replacement=True, generator=gen)
        x = data.random_shift(x_all[idx], ec.max_shift, gen)
        emb = F.normalize(model(pixel_values=normalize(x)).image_embeds, dim=-1)
        logits = emb @ F.normalize(prototypes, dim=-1).T / ec.temperature
        return {"loss": F.cross_entropy(logits, labels[idx])}

    model.train()
    log = train_loop("mini clip encoder", list(model.parameters()) + [prototypes], steps=ec.steps, lr=ec.lr,
                     weight_decay=0.05, warmup=50, step_fn=step_fn)
    model.eval()
    test_x, test_y = data.load_split(cfg.data_dir, "test")
    tail = torch.isin(test_y, torch.as_tensor(cfg.data.tail_classes))
    report = {"config": asdict(ec), "seconds": timer.seconds, "train_split": "train (long-tailed, draw weights)",
              "test_accuracy_nearest_prototype": accuracy(model, prototypes.detach(), test_x, test_y),
              "tail_test_accuracy_nearest_prototype": accuracy(model, prototypes.detach(), test_x[tail], test_y[tail]),
              "log": log}
    with atomic_dir(cfg.clip_dir) as tmp:
        model.save_pretrained(tmp)
        build_image_processor(cfg).save_pretrained(tmp)
        write_json(tmp / "training.json", report)
    return report
