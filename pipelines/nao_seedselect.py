"""NAO-SeedSelect (Samuel et al., NeurIPS 2023): fast SeedSelect from norm-aware seed paths.

ALGORITHMS.md §3: invert the reference images with DDIM (50 steps, prompt-conditioned, no guidance,
from the VAE latent mean), build the NAO centroid of the inverted seeds together with one
norm-aware path from every seed to it (:func:`pipelines.seed_space.nao_centroid`), and use the
interior path points (``paths[:, 1:-1]``, as the authors do) as initial seeds of short SeedSelect runs:
5 iterations, lr 0.05 then 0.005 from iteration 3, guidance 1 (inverted seeds only reconstruct
without guidance).

Image i uses the i-th interior point in a fixed order that spreads any prefix over the whole paths:
round-robin over the K paths, and along each path the positions in van der Corput order (the
middle first, then the quarters, the eighths, ...). The first M images therefore cover each path
from near its inverted reference to near the centroid instead of crowding at one end (taking the
points nearest the centroid first made the first 50 of 50-point paths near-copies of each other).
At most K·(n_points − 2) images. With several concepts in a call, each has its own inversions,
centroid and paths, and the contrastive loss of :mod:`pipelines.seedselect` runs across them.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .base import ImageResult, chunks
from .inversion import DDIMInversionPipeline, InversionSettings
from .io import load_tensors, save_tensors
from .references import ReferenceImage, encode_references
from .sampling import derive_seed
from .seedselect import SeedSelectPipeline, SeedSelectSettings


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


def spread_order(m: int) -> list[int]:
    """A permutation of 0..m-1 whose every prefix is spread over the range: positions (vdc(j) · m) for
    the van der Corput sequence vdc(1), vdc(2), ... = 1/2, 1/4, 3/4, 1/8, ..., duplicates skipped."""
    order, seen, j = [], set(), 1
    while len(order) < m:
        x, base, u = j, 0.5, 0.0
        while x:
            u, x, base = u + base * (x & 1), x >> 1, base / 2
        pos = min(int(u * m), m - 1)
        if pos not in seen:
            seen.add(pos)
            order.append(pos)
        j += 1
    return order


def start_points(k: int, n_points: int) -> list[tuple[int, int]]:
    """(path, point) of the i-th start: round-robin over the k paths, interior points 1..n-2 in spread order."""
    return [(path, 1 + pos) for pos in spread_order(n_points - 2) for path in range(k)]


def interior_points(paths: torch.Tensor) -> torch.Tensor:
    """(K, n, *shape) paths -> (K·(n−2), *shape) interior points in the order of :func:`start_points`."""
    order = start_points(paths.shape[0], paths.shape[1])
    return torch.stack([paths[path, point] for path, point in order])


class NaoSeedSelectPipeline(SeedSelectPipeline):
    """Inversion -> NAO centroid and paths -> short SeedSelect runs from the path points."""

    settings_cls = NaoSeedSelectSettings
    min_references = 2

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
                      generator=torch.Generator().manual_seed(derive_seed(base_seed, 0xA0)))
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

    def __call__(self, prompt, reference_images=None, num_images_per_prompt: int = 1, *,
                 settings: NaoSeedSelectSettings | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, image_indices=None, negative_reference_images=None, output_type: str = "pil",
                 cache_dir: str | os.PathLike | None = None, callback=None, progress: bool = True,
                 return_dict: bool = True, **overrides):
        """Images of each concept from the interior points of its NAO paths (see the module docstring);
        the call shape (``negative_reference_images`` included) and output are SeedSelect's."""
        plan = self.plan(prompt, reference_images, num_images_per_prompt, image_indices, generator, seed,
                         settings, **overrides)
        s = plan.settings
        starts, meta = [], []
        for p, refs in zip(plan.prompts, plan.references):
            inverted = self.invert(refs, p, s, cache_dir, progress)
            paths, m = self.nao_paths(inverted, s, plan.seed, cache_dir)
            starts.append(interior_points(paths))
            meta.append(m)
        for c, i in plan.pairs:
            if i >= len(starts[c]):
                raise ValueError(f"NAO-SeedSelect offers {len(starts[c])} starting seeds for {plan.prompts[c]!r} "
                                 f"({len(plan.references[c])} references x {s.n_points - 2} interior path points); "
                                 f"asked for image index {i}. Raise n_points or add references.")
        contrast = self.contrast_set(plan.prompts, [encode_references(self, r, cache_dir) for r in plan.references], s,
                                     self.encode_negatives(negative_reference_images, cache_dir))
        results: dict[tuple[int, int], ImageResult] = {}
        for chunk in chunks(plan.pairs, s.batch_size):
            res = self.optimize(torch.stack([starts[c][i] for c, i in chunk]), [contrast.target(c) for c, _ in chunk],
                                s, progress=progress)
            for (c, i), r in zip(chunk, res):
                path, point = start_points(len(plan.references[c]), s.n_points)[i]
                results[c, i] = r.as_image_result(c, i, nao=meta[c], start_point={"path": path, "point": point})
                if callback is not None:
                    callback(results[c, i])
        return self.output(plan, results, output_type, return_dict)
