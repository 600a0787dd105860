"""Seeds and the deterministic DDIM loop shared by every method."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def derive_seed(*key) -> int:
    """A deterministic 63-bit integer seed from a key of ints and strings (the project's one derivation:
    bootstrap resamples, perturbations, NAO path inits and call seeds are all keyed through it)."""
    return int.from_bytes(hashlib.sha256(",".join(map(str, key)).encode()).digest()[:8], "little") >> 1


def random_seeds(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One N(0, I) seed per integer, drawn on the CPU (identical on every device), stacked (B, *shape)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                        for s in seeds])


def guided_eps(unet, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided noise prediction: UNet in its dtype, the guidance combination in the
    latents' (compute) dtype. ``t`` is an explicit tensor argument so a checkpointed call recomputes
    at the right timestep."""
    model_dtype = unet.dtype
    if uncond is None or guidance_scale == 1.0:
        return unet(latents.to(model_dtype), t, encoder_hidden_states=cond.to(model_dtype)).sample.to(latents.dtype)
    x = torch.cat([latents, latents]).to(model_dtype)
    emb = torch.cat([uncond, cond]).to(model_dtype)
    out = unet(x, t, encoder_hidden_states=emb).sample.to(latents.dtype)
    e_uncond, e_cond = out.chunk(2)
    return e_uncond + guidance_scale * (e_cond - e_uncond)


def denoise(comps, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
            num_inference_steps: int, keep_last: int = 1, checkpoint: bool = False) -> list[torch.Tensor]:
    """Deterministic DDIM (eta 0) from seeds ``latents`` (compute dtype); differentiable when grad is on.

    Returns the scheduler's ``prev_sample`` of the last ``keep_last`` steps (the last one is z_0).
    With ``checkpoint`` every UNet call is gradient-checkpointed, so memory stays flat in the
    number of steps (only each step's input latent is kept for the backward pass).
    """
    from torch.utils.checkpoint import checkpoint as ckpt

    sched = comps.scheduler
    sched.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = sched.timesteps
    x = latents * sched.init_noise_sigma
    kept: list[torch.Tensor] = []
    for i, t in enumerate(timesteps):
        if checkpoint and torch.is_grad_enabled():
            eps = ckpt(guided_eps, comps.unet, x, t, cond, uncond, guidance_scale, use_reentrant=False)
        else:
            eps = guided_eps(comps.unet, x, t, cond, uncond, guidance_scale)
        x = sched.step(eps, t, x).prev_sample
        if i >= len(timesteps) - keep_last:
            kept.append(x)
    return kept
