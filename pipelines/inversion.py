"""DDIM inversion of real images into seeds (ALGORITHMS.md §3): 50 steps, conditioned on the prompt,
no guidance, starting from the VAE latent *mean* of the image at the model resolution.

Uses diffusers' ``DDIMInverseScheduler`` built from the model's DDIM config, so inversion walks the
same timesteps (1, 21, ..., 981 for 50 steps) that DDIM sampling walks backwards and the first
step starts at alpha_cumprod[0], where sampling ends. Regenerating the inverted seed with DDIM at
guidance 1 and the same steps reconstructs the latent (up to the usual eps(x_t) ~ eps(x_{t-1})
approximation error of DDIM inversion).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .base import ConceptPipeline
from .prompts import encode_prompts
from .references import ReferenceImage, encode_latent_means
from .io import load_tensors, save_tensors


@dataclass
class InversionSettings:
    num_inference_steps: int = 50
    batch_size: int = 4


class DDIMInversionPipeline(ConceptPipeline):
    """Latents or images -> seeds z_T by inverse DDIM."""

    def inverse_scheduler(self):
        from diffusers import DDIMInverseScheduler

        return DDIMInverseScheduler.from_config(self.scheduler.config)

    @torch.no_grad()
    def invert_latents(self, latents: torch.Tensor, prompt: str, num_inference_steps: int = 50,
                       progress: bool = False) -> torch.Tensor:
        """Scaled clean latents (B, C, h, w) -> seeds, compute dtype."""
        sched = self.inverse_scheduler()
        sched.set_timesteps(num_inference_steps, device=self.device)
        x = latents.to(self.device, self.compute_dtype)
        cond = encode_prompts(self, [prompt]).expand(len(x), -1, -1)
        for t in tqdm(sched.timesteps, desc="DDIM inversion", leave=False, disable=not progress):
            eps = self.unet(x.to(self.dtype), t, encoder_hidden_states=cond).sample.to(x.dtype)
            x = sched.step(eps, t, x).prev_sample
        return x

    @torch.no_grad()
    def __call__(self, images: Sequence[ReferenceImage], prompt: str,
                 settings: InversionSettings = InversionSettings(), cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> torch.Tensor:
        """Seeds (N, C, h, w) of the images, cached by image content, model id, prompt and steps."""
        key = hashlib.sha256("|".join([self.model_id, str(self.dtype), str(self.image_size), prompt,
                                       str(settings.num_inference_steps)] + [r.content_hash for r in images])
                             .encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"inverted-{key}.safetensors" if cache_dir is not None else None
        cached = load_tensors(path, "inversion") if path is not None else None
        if cached is not None:
            return cached[0]["seeds"].to(self.compute_dtype)
        seeds = []
        for start in tqdm(range(0, len(images), settings.batch_size), desc="inverting references", leave=False,
                          disable=not progress):
            chunk = images[start:start + settings.batch_size]
            lat = encode_latent_means(self, [r.image for r in chunk])
            seeds.append(self.invert_latents(lat, prompt, settings.num_inference_steps).cpu())
        seeds = torch.cat(seeds)
        if path is not None:
            save_tensors(path, {"seeds": seeds}, metadata={"images": ",".join(r.name for r in images)[:4000]})
        return seeds
