"""The mini world's text-to-image model: a small ``UNet2DConditionModel`` trained as latent
diffusion (epsilon prediction, SD's scaled-linear betas, 1000 steps) on the LONG-TAILED split with
class-name prompts and prompt dropout for classifier-free guidance, then saved together with the
VAE, tokenizer, frozen text encoder and a DDIM scheduler in SD's folder layout, so that
``StableDiffusionPipeline.from_pretrained(folder)`` loads it and every pipeline runs unchanged."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.io import atomic_dir, write_json

from . import data
from .common import Timer, train_loop
from .config import MiniConfig

# ALGORITHMS.md section 1: the SD 2.1-base DDIM configuration
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER)


def build_unet(cfg: MiniConfig, latent_channels: int, latent_size: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    dc = cfg.diffusion
    n = len(dc.block_out_channels)
    # cross-attention at every level but the finest (cheap on CPU); the mid block attends too
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1) if n > 1 else ("CrossAttnDownBlock2D",)
    up = tuple(reversed(["CrossAttnUpBlock2D" if b.startswith("CrossAttn") else "UpBlock2D" for b in down]))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=dc.layers_per_block, block_out_channels=tuple(dc.block_out_channels),
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
        attention_head_dim=dc.attention_head_dim, norm_num_groups=dc.norm_num_groups,
    )


def load_components(cfg: MiniConfig):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    for folder in (cfg.vae_dir, cfg.text_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"missing mini world component {folder} (run its DVC stage first)")
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir).eval()
    tok = CLIPTokenizer.from_pretrained(cfg.text_dir / "tokenizer")
    enc = CLIPTextModel.from_pretrained(cfg.text_dir / "text_encoder").eval()
    return vae, tok, enc


class Ema:
    """Exponential moving average of the UNet weights with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - d)


def train(cfg: MiniConfig) -> dict:
    from diffusers import StableDiffusionPipeline

    from .encoder import build_image_processor
    from .text import encode_prompts

    dc = cfg.diffusion
    timer = Timer()
    vae, tok, text_encoder = load_components(cfg)
    images, labels = data.load_split(cfg.data_dir, "train")
    weights = data.load_train_weights(cfg.data_dir)
    sf = vae.config.scaling_factor
    with torch.no_grad():  # latent distribution of every training image, computed once
        posts = [vae.encode(data.to_unit(images[i:i + 256]) * 2 - 1).latent_dist for i in range(0, len(images), 256)]
        mean = torch.cat([p.mean for p in posts]) * sf
        std = torch.cat([p.std for p in posts]) * sf
    n_cls = len(cfg.class_names)
    # rows 0..n_cls-1: class prompts, row n_cls: the empty prompt (unconditional branch)
    prompts = [cfg.prompt(c) for c in range(n_cls)] + [""]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    context = encode_prompts(tok, text_encoder, prompts)

    torch.manual_seed(dc.seed)
    unet = build_unet(cfg, mean.shape[1], mean.shape[-1], context.shape[-1])
    sched = build_scheduler()
    alphas = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(dc.seed)
    # The mini text encoder stands in for a pretrained CLIP that already tells concepts apart; a
    # frozen *random* one makes the class prompts nearly identical and the UNet ignores them, so
    # by default it learns with the UNet (both are saved, the pipeline loads them as SD's).
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    # the 49k-row vocabulary stays frozen (distinct random rows already name the classes); the
    # transformer layers learn to carry the class word to every position the UNet attends to
    text_encoder.requires_grad_(False)
    params = [{"params": unet.parameters()}]
    if dc.train_text_encoder:
        text_encoder.train()
        text_encoder.encoder.requires_grad_(True)
        text_encoder.final_layer_norm.requires_grad_(True)
        params.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": dc.text_lr})
    ema = Ema(models, dc.ema_decay)
    seen = torch.zeros(n_cls, dtype=torch.long)

    def step_fn(step: int) -> dict:
        idx = torch.multinomial(weights, dc.batch_size, replacement=True, generator=gen)
        seen.add_(torch.bincount(labels[idx], minlength=n_cls))
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (dc.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        drop = torch.rand(dc.batch_size, generator=gen) < dc.prompt_dropout
        ctx = text_encoder(ids)[0] if dc.train_text_encoder else context
        cond = ctx[torch.where(drop, n_cls, labels[idx])]
        return {"loss": F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)}

    unet.train()
    log = train_loop("mini diffusion", params, steps=dc.steps, lr=dc.lr, weight_decay=0.01, warmup=dc.warmup_steps,
                     step_fn=step_fn, clip_grad=1.0, after_step=lambda: ema.update(models))
    models.load_state_dict(ema.shadow)
    models.eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=build_image_processor(cfg), requires_safety_checker=False,
    )
    report = {"config": asdict(dc), "seconds": timer.seconds, "steps": dc.steps,
              "images_seen_per_class": dict(zip(cfg.class_names, seen.tolist())),
              "tail_classes": [cfg.class_names[c] for c in cfg.data.tail_classes],
              "scheduler": SD_SCHEDULER, "log": log}
    with atomic_dir(cfg.sd_dir) as tmp:
        pipe.save_pretrained(tmp)
        write_json(tmp / "training.json", report)
    return report
