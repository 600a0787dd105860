"""The differentiable image path: scaled latents -> [0, 1] images -> CLIP input -> CLIP embedding."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .loading import compute_dtype


def decode_latents(comps, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (B, 3, H, W), compute dtype; differentiable."""
    vae = comps.vae
    x = vae.decode((latents / vae.config.scaling_factor).to(comps.dtype)).sample
    return (x.to(compute_dtype(comps.dtype)) / 2 + 0.5).clamp(0, 1)


def clip_input_size(processor) -> tuple[int, int]:
    crop = getattr(processor, "crop_size", None) or {}
    if "height" in crop:
        return int(crop["height"]), int(crop["width"])
    size = processor.size
    edge = size.get("shortest_edge") or size.get("height")
    return int(edge), int(size.get("width", edge))


def clip_preprocess(processor, images: torch.Tensor) -> torch.Tensor:
    """Differentiable CLIP preprocessing of [0,1] images: bicubic resize to the CLIP input, mean/std."""
    h, w = clip_input_size(processor)
    x = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False)
    mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def clip_embed(comps, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (un-normalised) CLIP image embeddings in the compute dtype."""
    out = comps.image_encoder(pixel_values=pixel_values.to(comps.dtype))
    return out.image_embeds.to(compute_dtype(comps.dtype))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
