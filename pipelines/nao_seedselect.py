"""NAO-SeedSelect (Samuel et al., NeurIPS 2023): fast SeedSelect from norm-aware seed paths.

ALGORITHMS.md §3: invert the reference images with DDIM (50 steps, prompt-conditioned, no guidance,
from the VAE latent mean), build the NAO centroid of the inverted seeds together with one
norm-aware path from every seed to it (:func:`pipelines.seed_space.nao_centroid`), and use the
interior path points (``paths[:, 1:-1]``, as the authors do) as initial seeds of short SeedSelect runs:
5 iterations, lr 0.05 then 0.005 from iteration 3, guidance 1 (inverted seeds only reconstruct
without guidance).

Image i uses the i-th interior point in a fixed order: round-robin over the K paths, starting next
to the centroid and walking back towards the inverted seeds, so the first images are the most
"central" and consecutive images come from different references. At most K·(n_points − 2) images.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .components import ReferenceEncodings, ReferenceImage
from .inversion import DDIMInversionPipeline, InversionSettings
from .io import load_tensors, save_tensors
from .seedselect import SeedResult, SeedSelectPipeline, SeedSelectSettings, _chunks, _mix


@dataclass
class NaoSeedSelectSettings(SeedSelectSettings):
    """SeedSelect settings with the short-run defaults of NAO-SeedSelect, plus inversion and NAO."""
    guidance_scale: float = 1.0
    iterations: int = 5
    lr: float = 0.05
    lr_after: float = 0.005
    lr_switch_iteration: int = 3
    inversion_steps: int = 50
    n_points: int = 50
    nao_eps: float | None = None          # None: 2 ||p1 - p2|| / n_points
    nao_init: str = "slerp"               # the authors' centroid start
    nao_solver: str = "reference"         # "reference": the authors' Adam; "default": seed_space's default

    def __post_init__(self):
        super().__post_init__()
        if self.bootstrap:
            raise ValueError("NAO-SeedSelect takes its diverse starting seeds from the NAO paths; "
                             "bootstrap is a plain SeedSelect option")
        if self.n_points < 3:
            raise ValueError(f"n_points must be >= 3 (one interior point per path), got {self.n_points}")


def interior_points(paths: torch.Tensor) -> torch.Tensor:
    """(K, n, *shape) paths -> (K·(n−2), *shape) interior points, round-robin from the centroid end."""
    interior = paths[:, 1:-1].flip(1)                        # (K, n-2, ...), nearest the centroid first
    return interior.transpose(0, 1).reshape(-1, *paths.shape[2:])


def _describe_point(index: int, k: int, n_points: int) -> dict:
    """Which path / point the ``index``-th start came from (path k runs from reference k to the centroid)."""
    step, path = divmod(index, k)
    return {"path": path, "point": n_points - 2 - step}


class NaoSeedSelectPipeline(SeedSelectPipeline):
    """Inversion -> NAO centroid and paths -> short SeedSelect runs from the path points."""

    def invert(self, refs: Sequence[ReferenceImage], prompt: str, settings: NaoSeedSelectSettings,
               cache_dir: str | os.PathLike | None = None, progress: bool = True) -> torch.Tensor:
        inv = DDIMInversionPipeline(**self.components)
        inv.model_id, inv.image_encoder_id = self.model_id, self.image_encoder_id
        return inv(refs, prompt, InversionSettings(settings.inversion_steps), cache_dir=cache_dir, progress=progress)

    def nao_paths(self, inverted: torch.Tensor, settings: NaoSeedSelectSettings, base_seed: int,
                  cache_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, dict]:
        """(K, n_points, *shape) paths from each inverted seed to the NAO centroid, cached by content."""
        from . import seed_space

        key = hashlib.sha256(b"".join([inverted.double().cpu().numpy().tobytes(),
                                       repr((settings.n_points, settings.nao_eps, settings.nao_init,
                                             settings.nao_solver, base_seed)).encode()])).hexdigest()[:24]
        path = Path(cache_dir) / f"nao-{key}.safetensors" if cache_dir is not None else None
        cached = load_tensors(path, "NAO paths") if path is not None else None
        if cached is not None:
            return cached[0]["paths"], cached[1]
        kwargs = dict(n_points=settings.n_points, eps=settings.nao_eps,
                      generator=torch.Generator().manual_seed(_mix(base_seed, 0xA0)))
        if settings.nao_solver == "reference" and hasattr(seed_space, "NaoSettings"):
            kwargs["settings"] = seed_space.NaoSettings.reference_centroid(n_points=settings.n_points,
                                                                           eps=settings.nao_eps)
        result = seed_space.nao_centroid(inverted, init=settings.nao_init, **kwargs)
        rec = result.record
        meta = {"nao_iterations": str(rec.iterations), "nao_objective": str(rec.objective),
                "nao_stop_reason": str(rec.stop_reason), "nao_seconds": str(rec.seconds)}
        if path is not None:
            save_tensors(path, {"paths": result.paths, "centroid": result.centroid}, metadata=meta)
        return result.paths, meta

    def __call__(self, prompt: str, refs: Sequence[ReferenceImage], encodings: ReferenceEncodings,
                 image_indices: Sequence[int], base_seed: int = 0,
                 settings: NaoSeedSelectSettings = NaoSeedSelectSettings(),
                 cache_dir: str | os.PathLike | None = None, progress: bool = True, callback=None) -> list[SeedResult]:
        if len(refs) < 2:
            raise ValueError(f"NAO-SeedSelect needs at least 2 reference images (a centroid of inverted "
                             f"seeds), got {len(refs)}")
        inverted = self.invert(refs, prompt, settings, cache_dir, progress)
        paths, meta = self.nao_paths(inverted, settings, base_seed, cache_dir)
        starts = interior_points(paths)
        indices = list(image_indices)
        if indices and max(indices) >= len(starts):
            raise ValueError(f"NAO-SeedSelect offers {len(starts)} starting seeds ({len(refs)} references x "
                             f"{settings.n_points - 2} interior path points); asked for image index {max(indices)}. "
                             f"Raise n_points or add references.")
        results: dict[int, SeedResult] = {}
        for chunk in _chunks(indices, settings.batch_size):
            res = self.optimize(starts[chunk], self.targets_for(prompt, encodings, len(chunk)), settings,
                                progress=progress)
            for i, r in zip(chunk, res):
                r.extras.update(nao=meta, start_point=_describe_point(i, len(refs), settings.n_points))
            results.update(zip(chunk, res))
            if callback is not None:
                callback(dict(zip(chunk, res)))
        return [results[i] for i in indices]
