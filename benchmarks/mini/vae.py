"""The mini world's VAE: a small ``diffusers.AutoencoderKL`` (32x32 RGB -> 8x8x4 latents, as
SD's 512x512 -> 64x64x4), trained on the broad balanced split so that it can represent every
digit (like SD's VAE, which reconstructs rare concepts fine), with ``scaling_factor`` set so that
scaled latents have unit standard deviation (SD's 0.18215 was chosen the same way)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.io import atomic_dir, write_json

from . import data
from .common import Timer, train_loop
from .config import MiniConfig


def build_vae(cfg: MiniConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.vae.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae.block_out_channels), layers_per_block=1,
        norm_num_groups=cfg.vae.norm_num_groups, sample_size=cfg.data.image_size, scaling_factor=1.0,
    )


def training_images(cfg: MiniConfig) -> torch.Tensor:
    return torch.cat([data.load_split(cfg.data_dir, s)[0] for s in cfg.vae.train_splits])


def train(cfg: MiniConfig) -> dict:
    vc = cfg.vae
    torch.manual_seed(vc.seed)
    vae = build_vae(cfg)
    images = data.to_unit(training_images(cfg)) * 2 - 1  # SD's VAE works in [-1, 1]
    gen = torch.Generator().manual_seed(vc.seed)

    def step_fn(step: int) -> dict:
        x = images[torch.randint(0, len(images), (vc.batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        mse = F.mse_loss(vae.decode(z).sample, x)
        kl = post.kl().mean() / post.mean[0].numel()
        return {"loss": mse + vc.kl_weight * kl, "mse": mse, "kl": kl}

    timer = Timer()
    vae.train()
    log = train_loop("mini vae", vae.parameters(), steps=vc.steps, lr=vc.lr, weight_decay=0.0, warmup=50,
                     step_fn=step_fn)
    vae.eval()
    with torch.no_grad():
        post = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        std = post.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        rec = torch.cat([vae.decode(post[i:i + 256]).sample for i in range(0, len(post), 256)])
        rec_mse = F.mse_loss(rec.clamp(-1, 1), images).item()
    report = {"config": asdict(vc), "seconds": timer.seconds, "latent_std": std,
              "scaling_factor": 1.0 / std, "reconstruction_mse": rec_mse, "log": log}
    with atomic_dir(cfg.vae_dir) as tmp:
        vae.save_pretrained(tmp)
        write_json(tmp / "training.json", report)
    return report
