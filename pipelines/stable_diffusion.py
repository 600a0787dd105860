"""Plain text-to-image Stable Diffusion, the baseline ("StableDiffusion" in the authors' code).

DDIM with the reference settings of ALGORITHMS.md §1 (20 steps, eta 0, classifier-free guidance 7.5
with the empty prompt as the unconditional branch). Seeds are drawn per image from
``torch.Generator().manual_seed(seed)`` on the CPU, so an image index maps to the same seed on any
device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .components import ConceptPipeline, decode_latents, denoise, random_seeds, to_pil


@dataclass
class StableDiffusionSettings:
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 4
    prompt_template: str = "{}"
    dtype: str | None = None  # None: the preset's choice for the device


@dataclass
class StableDiffusionOutput:
    images: list
    seeds: torch.Tensor                 # (B, C, h, w) initial noise, compute dtype, CPU


class StableDiffusionSamplingPipeline(ConceptPipeline):
    """Text-to-image sampling from explicit integer seeds."""

    @torch.no_grad()
    def __call__(self, prompt: str, seeds: Sequence[int] | torch.Tensor,
                 settings: StableDiffusionSettings = StableDiffusionSettings()) -> StableDiffusionOutput:
        z = seeds if torch.is_tensor(seeds) else random_seeds(self.latent_shape, seeds, self.compute_dtype)
        images = []
        for start in range(0, len(z), settings.batch_size):
            chunk = z[start:start + settings.batch_size].to(self.device, self.compute_dtype)
            cond, uncond = self.encode_prompt(prompt, len(chunk), settings.guidance_scale)
            z0 = denoise(self, chunk, cond, uncond, settings.guidance_scale, settings.num_inference_steps)[-1]
            images += to_pil(decode_latents(self, z0))
        return StableDiffusionOutput(images=images, seeds=z.cpu())
