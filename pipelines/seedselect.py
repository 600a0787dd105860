"""SeedSelect (Samuel et al., AAAI 2024): optimise the initial noise of a frozen diffusion model so
that the generated image matches a few reference images of a rare concept.

ALGORITHMS.md §2. The seed is an optimised tensor; the full DDIM chain runs with gradients through
every step, every UNet call gradient-checkpointed (timestep passed explicitly), so memory is flat in
the number of steps. Losses:

* semantic: cosine distance between the CLIP embedding of the decoded ``prev_sample`` of each of the
  last k steps and the L2-normalised centroid of the un-normalised reference embeddings, weighted
  (0.05, 0.25, 0.70) for k = 3; with several classes optimised together, the supervised-contrastive
  form ``-log softmax(-dist)`` over the class centroids (with one class it is the plain distance);
* appearance: MSE between the final latent z_0 and the centroid of the reference VAE latent means.

Total ``10 * semantic + 1 * appearance``; AdamW (wd 0.01), lr 0.1 for iterations 0-2 then 0.01, 30
iterations, guidance 7.5. Unlike the authors' code (which renders the image of iteration i from the
seed *before* update i and never renders the final seed) the final seed is evaluated too and the
BEST seed seen is returned with its image. Added by the paper: early stopping when the loss rose for
more than ``early_stop_patience`` consecutive iterations, and bootstrap resampling of the references
to make many diverse images per concept quickly.

Several seeds are optimised as one batch; each has its own optimiser state, loss history, best
seed and early stop (a stopped seed leaves the batch). Seeds, scheduler arithmetic and losses are
fp32 whatever the model dtype.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as ckpt
from tqdm.auto import tqdm

from .components import (ConceptPipeline, ReferenceEncodings, clip_embed, clip_preprocess, decode_latents,
                         denoise, encode_prompts, random_seeds, to_pil)

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The SeedSelect loss became NaN/inf (typically fp16 overflow or a too large learning rate)."""


@dataclass
class SeedSelectSettings:
    """Reference settings (the authors' code) by default; see ``pipelines.registry`` for presets."""
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    iterations: int = 30
    lr: float = 0.1
    lr_after: float = 0.01
    lr_switch_iteration: int = 3          # lr_after from this iteration on
    weight_decay: float = 0.01
    semantic_weight: float = 10.0
    appearance_weight: float = 1.0
    last_k_weights: tuple[float, ...] = (0.05, 0.25, 0.70)  # oldest ... final step
    early_stop_patience: int | None = 3   # stop after > patience consecutive increases; None: never
    batch_size: int = 1                   # seeds optimised together
    bootstrap: bool = False               # extra images: bootstrap-resampled references from z*
    bootstrap_iterations: int = 5
    bootstrap_perturbation: float = 0.3   # z = sqrt(1-r^2) z* + r eps keeps the seed N(0, I)-shaped
    gradient_checkpointing: bool = True
    checkpoint_decoder: bool = True       # also checkpoint decode + CLIP of the last-k steps
    prompt_template: str = "{}"
    dtype: str | None = None              # None: the preset's choice for the device

    def __post_init__(self):
        self.last_k_weights = tuple(float(w) for w in self.last_k_weights)
        if not self.last_k_weights:
            raise ValueError("last_k_weights must name at least one step")
        if len(self.last_k_weights) > self.num_inference_steps:
            raise ValueError(f"last_k_weights has {len(self.last_k_weights)} entries but only "
                             f"{self.num_inference_steps} steps")
        if self.iterations < 0 or self.batch_size < 1:
            raise ValueError("iterations must be >= 0 and batch_size >= 1")


@dataclass
class Target:
    """What one seed is pulled towards: all class centroids (unit CLIP), its class index, a latent."""
    clip_centroids: torch.Tensor  # (K, D) L2-normalised
    label: int
    latent: torch.Tensor          # (C, h, w)
    prompt_embeds: torch.Tensor   # (L, D) conditional text embedding of its class

    @classmethod
    def from_encodings(cls, enc: ReferenceEncodings, prompt_embeds: torch.Tensor) -> "Target":
        return cls(enc.clip_centroid()[None], 0, enc.latent_centroid(), prompt_embeds)


@dataclass
class SeedResult:
    seed: torch.Tensor            # best seed (CPU, compute dtype)
    initial_seed: torch.Tensor
    image: object                 # PIL image of the best seed
    best_iteration: int
    best_loss: float
    stop_reason: str              # "iterations" | "early_stop"
    history: list[dict] = field(default_factory=list)  # per evaluated iteration: total/semantic/appearance/lr
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)         # method-specific facts for the record


def semantic_distance(embeds: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-seed semantic loss.

    embeds (B, D) un-normalised CLIP embeddings; centroids (B, K, D) unit class centroids; labels (B,).
    With K == 1 it is the cosine distance ``1 - e.c``; with K > 1 the supervised-contrastive
    ``-log( exp(-d_label) / sum_k exp(-d_k) )``. (With one class the softmax is identically 1, so the
    plain distance is what single-class SeedSelect optimises.)
    """
    e = F.normalize(embeds, dim=-1)
    dist = 1.0 - torch.einsum("bd,bkd->bk", e, centroids)
    if centroids.shape[1] == 1:
        return dist[:, 0]
    return -torch.log_softmax(-dist, dim=1).gather(1, labels[:, None])[:, 0]


class SeedSelectPipeline(ConceptPipeline):
    """Seed optimisation against reference images; ``__call__`` makes ``num_images`` images of one concept."""

    # ------------------------------------------------------------------ differentiable forward
    def _embed_image(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = decode_latents(self, latents)
        return clip_embed(self, clip_preprocess(self.image_processor, images)), images

    def compute_losses(self, seeds: torch.Tensor, targets: Sequence[Target], settings: SeedSelectSettings,
                       iteration: int) -> dict[str, torch.Tensor]:
        """Per-seed losses (B,) of one forward pass, plus the final images (B, 3, H, W) in [0, 1].

        ``iteration`` is not used here; it lets a subclass schedule its loss (the tests script one)."""
        k = len(settings.last_k_weights)
        cond = torch.stack([t.prompt_embeds for t in targets])
        uncond = None
        if settings.guidance_scale != 1.0:
            uncond = encode_prompts(self, [""]).expand(len(targets), -1, -1)
        kept = denoise(self, seeds, cond, uncond, settings.guidance_scale, settings.num_inference_steps,
                       keep_last=k, checkpoint=settings.gradient_checkpointing)
        centroids = torch.stack([t.clip_centroids for t in targets]).to(seeds.dtype)
        labels = torch.tensor([t.label for t in targets], device=seeds.device)
        semantic = torch.zeros(len(targets), dtype=seeds.dtype, device=seeds.device)
        images = None
        for w, z in zip(settings.last_k_weights, kept):
            if settings.checkpoint_decoder and torch.is_grad_enabled():
                emb, images = ckpt(self._embed_image, z, use_reentrant=False)
            else:
                emb, images = self._embed_image(z)
            semantic = semantic + w * semantic_distance(emb, centroids, labels)
        latent_targets = torch.stack([t.latent for t in targets]).to(seeds.dtype)
        appearance = ((kept[-1] - latent_targets) ** 2).flatten(1).mean(1)
        total = settings.semantic_weight * semantic + settings.appearance_weight * appearance
        return {"total": total, "semantic": semantic, "appearance": appearance, "images": images}

    # ------------------------------------------------------------------------- optimisation
    def optimize(self, seeds: torch.Tensor, targets: Sequence[Target], settings: SeedSelectSettings,
                 iterations: int | None = None, progress: bool = True) -> list[SeedResult]:
        """Optimise a batch of seeds (B, C, h, w), seed b towards ``targets[b]``; returns the best of each."""
        if len(seeds) != len(targets):
            raise ValueError(f"{len(seeds)} seeds but {len(targets)} targets")
        iterations = settings.iterations if iterations is None else iterations
        cdt = self.compute_dtype
        params = [torch.nn.Parameter(s.detach().to(self.device, cdt).clone()) for s in seeds]
        opts = [torch.optim.AdamW([p], lr=settings.lr, weight_decay=settings.weight_decay) for p in params]
        n = len(params)
        best_loss = [math.inf] * n
        best_seed: list = [None] * n
        best_image: list = [None] * n
        best_iter = [-1] * n
        rises = [0] * n
        stop = [None] * n
        history: list[list[dict]] = [[] for _ in range(n)]
        t0 = time.perf_counter()
        bar = tqdm(total=iterations, desc="SeedSelect", leave=False, disable=not progress)
        # iteration == iterations only evaluates the final seed (never rendered by the authors' code)
        for it in range(iterations + 1):
            active = [i for i in range(n) if stop[i] is None]
            if not active:
                break
            lr = settings.lr if it < settings.lr_switch_iteration else settings.lr_after
            evaluate_only = it == iterations
            with torch.set_grad_enabled(not evaluate_only):
                z = torch.stack([params[i] for i in active])
                out = self.compute_losses(z, [targets[i] for i in active], settings, it)
            total = out["total"]
            if not torch.isfinite(total).all():
                bad = [active[j] for j in torch.nonzero(~torch.isfinite(total))[:, 0].tolist()]
                raise NonFiniteLossError(
                    f"SeedSelect loss is not finite at iteration {it} for seed(s) {bad} "
                    f"(values {total.detach().cpu().tolist()}); use fp32/bf16 instead of fp16 or a smaller lr")
            values = total.detach().cpu().tolist()
            for j, i in enumerate(active):
                history[i].append({"iteration": it, "total": values[j], "lr": lr if not evaluate_only else None,
                                   "semantic": float(out["semantic"][j].detach()),
                                   "appearance": float(out["appearance"][j].detach())})
                if values[j] < best_loss[i]:
                    best_loss[i], best_iter[i] = values[j], it
                    best_seed[i] = params[i].detach().cpu().clone()
                    best_image[i] = out["images"][j].detach().cpu()
                if it > 0:
                    rises[i] = rises[i] + 1 if values[j] > history[i][-2]["total"] else 0
                if settings.early_stop_patience is not None and rises[i] > settings.early_stop_patience:
                    stop[i] = "early_stop"
            if evaluate_only:
                break
            still = [j for j, i in enumerate(active) if stop[i] is None]
            if still:
                total[still].sum().backward()
                for j in still:
                    i = active[j]
                    for group in opts[i].param_groups:
                        group["lr"] = lr
                    opts[i].step()
                    opts[i].zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{min(values):.4f}")
        bar.close()
        seconds = (time.perf_counter() - t0) / n
        images = to_pil(torch.stack(best_image))
        return [SeedResult(seed=best_seed[i], initial_seed=seeds[i].detach().cpu().clone(), image=images[i],
                           best_iteration=best_iter[i], best_loss=best_loss[i],
                           stop_reason=stop[i] or "iterations", history=history[i], seconds=seconds)
                for i in range(n)]

    # ------------------------------------------------------------------------------ one concept
    def targets_for(self, prompt: str, encodings: ReferenceEncodings, count: int) -> list[Target]:
        emb = encode_prompts(self, [prompt])[0].to(self.compute_dtype)
        return [Target.from_encodings(encodings, emb)] * count

    def class_targets(self, prompts: Sequence[str], encodings: Sequence[ReferenceEncodings],
                      labels: Sequence[int]) -> list[Target]:
        """Targets for seeds of several classes optimised together (the contrastive semantic loss):
        seed b pulls towards class ``labels[b]`` and away from the other classes' centroids."""
        if len(prompts) != len(encodings):
            raise ValueError(f"{len(prompts)} prompts but {len(encodings)} reference sets")
        emb = encode_prompts(self, list(prompts)).to(self.compute_dtype)
        centroids = torch.stack([e.clip_centroid() for e in encodings])
        return [Target(centroids, int(c), encodings[c].latent_centroid(), emb[c]) for c in labels]

    def bootstrap_targets(self, prompt: str, encodings: ReferenceEncodings, indices: Sequence[int],
                          base_seed: int) -> list[Target]:
        """One bootstrap resample (with replacement) of the references per image index, seeded by it."""
        emb = encode_prompts(self, [prompt])[0].to(self.compute_dtype)
        n = len(encodings.clip)
        out = []
        for idx in indices:
            g = torch.Generator().manual_seed(_mix(base_seed, idx, 0xB007))
            pick = torch.randint(0, n, (n,), generator=g)
            out.append(Target.from_encodings(encodings.subset(pick), emb))
        return out

    def bootstrap_seeds(self, z_star: torch.Tensor, indices: Sequence[int], base_seed: int,
                        settings: SeedSelectSettings) -> torch.Tensor:
        """Start points z*·sqrt(1-r²) + r·eps (variance-preserving, so still N(0, I)-shaped)."""
        r = settings.bootstrap_perturbation
        eps = random_seeds(z_star.shape, [_mix(base_seed, i, 0x5EED) for i in indices], z_star.dtype)
        return math.sqrt(1 - r * r) * z_star.cpu()[None] + r * eps

    def __call__(self, prompt: str, encodings: ReferenceEncodings, image_indices: Sequence[int], base_seed: int = 0,
                 settings: SeedSelectSettings = SeedSelectSettings(), z_star: torch.Tensor | None = None,
                 progress: bool = True, callback=None) -> list[SeedResult]:
        """Images ``image_indices`` of one concept (image i starts from seed ``base_seed + i``).

        With ``settings.bootstrap``, image 0 is z* (full references, all iterations) and every other
        index starts from ``z_star`` (pass it, or include index 0) with its own bootstrap resample and
        ``bootstrap_iterations`` iterations. Batches of ``settings.batch_size`` seeds; ``callback``
        gets ``{index: SeedResult}`` after each batch (so callers can save finished images at once).
        """
        indices = list(image_indices)
        results: dict[int, SeedResult] = {}
        if settings.bootstrap:
            if 0 in indices:
                results[0] = self.optimize(random_seeds(self.latent_shape, [base_seed], self.compute_dtype),
                                           self.targets_for(prompt, encodings, 1), settings, progress=progress)[0]
                z_star = results[0].seed
                if callback is not None:
                    callback({0: results[0]})
            rest = [i for i in indices if i != 0]
            if rest and z_star is None:
                raise ValueError("bootstrap images need z* (image 0) first")
            for chunk in _chunks(rest, settings.batch_size):
                seeds = self.bootstrap_seeds(z_star, chunk, base_seed, settings)
                res = self.optimize(seeds, self.bootstrap_targets(prompt, encodings, chunk, base_seed), settings,
                                    iterations=settings.bootstrap_iterations, progress=progress)
                results.update(zip(chunk, res))
                if callback is not None:
                    callback(dict(zip(chunk, res)))
        else:
            for chunk in _chunks(indices, settings.batch_size):
                seeds = random_seeds(self.latent_shape, [base_seed + i for i in chunk], self.compute_dtype)
                res = self.optimize(seeds, self.targets_for(prompt, encodings, len(chunk)), settings,
                                    progress=progress)
                results.update(zip(chunk, res))
                if callback is not None:
                    callback(dict(zip(chunk, res)))
        return [results[i] for i in indices]


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from several integers."""
    import hashlib

    return int.from_bytes(hashlib.sha256(",".join(map(str, values)).encode()).digest()[:8], "little") >> 1
