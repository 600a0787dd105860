"""Fidelity as a function of the optimisation budget, for SeedSelect-type pipelines.

:class:`TracedSeedSelect` and :class:`TracedNaoSeedSelect` are the pipelines plus a mixin: after each
``optimize`` call every result carries ``extras["trace"]``, the image the run would have returned had
it been capped at iteration k (the best seed seen up to k, as the pipeline returns its best), for
k = 0..iterations, as uint8 (iterations + 1, 3, H, W). The images are the ones ``compute_losses`` renders anyway, so tracing
costs no extra forward pass. Early-stopped seeds keep their best image for the remaining budget."""
from __future__ import annotations

import math

import torch

from pipelines.nao_seedselect import NaoSeedSelectPipeline
from pipelines.seedselect import SeedSelectPipeline


class _TraceMixin:
    def compute_losses(self, seeds, targets, settings, iteration):
        out = super().compute_losses(seeds, targets, settings, iteration)
        self._trace.append((out["total"].detach().cpu(), out["images"].detach().cpu()))
        return out

    def optimize(self, seeds, targets, settings, iterations=None, progress=True):
        self._trace = []
        results = super().optimize(seeds, targets, settings, iterations, progress)
        budget = settings.iterations if iterations is None else iterations
        n = len(results)
        best = [math.inf] * n
        image: list = [None] * n
        frames: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for it in range(budget + 1):
            if it < len(self._trace):
                totals, images = self._trace[it]
                # seeds active at iteration `it`, in batch order: those whose history reaches it
                active = [i for i in range(n) if len(results[i].history) > it]
                if len(active) != len(totals):
                    raise RuntimeError(f"trace of iteration {it} has {len(totals)} images for {len(active)} seeds")
                for j, i in enumerate(active):
                    if float(totals[j]) < best[i]:
                        best[i], image[i] = float(totals[j]), images[j]
            for i in range(n):
                frames[i].append((image[i].float().clamp(0, 1) * 255).round().to(torch.uint8))  # as to_pil
        for i, r in enumerate(results):
            r.extras["trace"] = torch.stack(frames[i])
        self._trace = []
        return results


class TracedSeedSelect(_TraceMixin, SeedSelectPipeline):
    """SeedSelect whose results carry their best-so-far image per iteration."""


class TracedNaoSeedSelect(_TraceMixin, NaoSeedSelectPipeline):
    """NAO-SeedSelect whose results carry their best-so-far image per iteration."""
