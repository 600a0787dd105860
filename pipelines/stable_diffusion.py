"""Plain text-to-image Stable Diffusion, the baseline ("StableDiffusion" in the authors' code).

DDIM with the reference settings of ALGORITHMS.md §1 (20 steps, eta 0, classifier-free guidance 7.5
with the empty prompt as the unconditional branch). Image i of every prompt starts from the seed
drawn by ``torch.Generator().manual_seed(seed + i)`` on the CPU, so an image index maps to the same
seed on any device. Reference images are accepted (one call shape for every method) and unused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .base import ConceptPipeline, ImageResult, chunks
from .imaging import decode_latents, to_pil
from .prompts import encode_prompts
from .sampling import denoise, random_seeds


@dataclass
class StableDiffusionSettings:
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 4
    prompt_template: str = "{}"
    dtype: str | None = None  # None: the preset's choice for the device


class StableDiffusionSamplingPipeline(ConceptPipeline):
    """Text-to-image sampling from explicit integer seeds."""

    settings_cls = StableDiffusionSettings

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], reference_images=None, num_images_per_prompt: int = 1, *,
                 settings: StableDiffusionSettings | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, image_indices=None, output_type: str = "pil", cache_dir=None,
                 callback=None, progress: bool = True, return_dict: bool = True, **overrides):
        plan = self.plan(prompt, reference_images, num_images_per_prompt, image_indices, generator, seed,
                         settings, **overrides)
        s = plan.settings
        emb = encode_prompts(self, plan.prompts + [""])
        results: dict[tuple[int, int], ImageResult] = {}
        for chunk in chunks(plan.pairs, s.batch_size):
            t0 = time.perf_counter()
            z = random_seeds(self.latent_shape, [plan.seed + i for _, i in chunk], self.compute_dtype)
            cond = emb[[c for c, _ in chunk]]
            uncond = emb[-1:].expand(len(chunk), -1, -1) if s.guidance_scale != 1.0 else None
            z0 = denoise(self, z.to(self.device), cond, uncond, s.guidance_scale, s.num_inference_steps)[-1]
            images = to_pil(decode_latents(self, z0))
            seconds = (time.perf_counter() - t0) / len(chunk)
            for (c, i), image, seed_tensor in zip(chunk, images, z):
                results[c, i] = ImageResult(c, i, image, {"seed": seed_tensor},
                                            {"seconds": seconds, "seed_int": plan.seed + i})
                if callback is not None:
                    callback(results[c, i])
        return self.output(plan, results, output_type, return_dict)
