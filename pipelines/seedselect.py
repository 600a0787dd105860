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

A call takes one or several concepts (prompt + reference images each), and optionally negative
concepts (reference images only: contrasted, never generated). With several, each seed's semantic
loss is the paper's contrastive loss across the call's concepts and negatives (``semantic_loss=
"contrastive"``, the default; ``"per_concept"`` is the authors' code), bootstrap resampling works per
concept, and seeds of different concepts share batches. Several seeds are optimised as one batch;
each has its own optimiser state, loss history, best seed and early stop (a stopped seed leaves the
batch). Seeds, scheduler arithmetic and losses are
fp32 whatever the model dtype.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as ckpt
from tqdm.auto import tqdm

from .base import ConceptPipeline, ImageResult, chunks
from .imaging import clip_embed, clip_preprocess, decode_latents, to_pil
from .prompts import encode_prompts
from .references import ReferenceEncodings, encode_references, load_reference_images
from .sampling import denoise, derive_seed, random_seeds

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The SeedSelect loss became NaN/inf (typically fp16 overflow or a too large learning rate)."""


SEMANTIC_LOSSES = ("contrastive", "per_concept")


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
    semantic_loss: str = "contrastive"    # several concepts in a call: the paper's contrastive loss across
                                          # them; "per_concept": the authors' code (each its own distance)
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
        if self.semantic_loss not in SEMANTIC_LOSSES:
            raise ValueError(f"semantic_loss must be one of {SEMANTIC_LOSSES}, got {self.semantic_loss!r}")


@dataclass
class Target:
    """What one seed is pulled towards: all class centroids (unit CLIP), its class index, a latent."""
    clip_centroids: torch.Tensor  # (K, D) L2-normalised
    label: int
    latent: torch.Tensor          # (C, h, w)
    prompt_embeds: torch.Tensor   # (L, D) conditional text embedding of its class

    @classmethod
    def from_encodings(cls, enc: ReferenceEncodings, prompt_embeds: torch.Tensor,
                       others: torch.Tensor | None = None, label: int = 0) -> "Target":
        """Pull towards ``enc``'s centroids; with ``others`` (K, D) the unit centroids of every concept
        of the contrast set, row ``label`` is replaced by ``enc``'s centroid (a bootstrap resample)."""
        own = enc.clip_centroid()
        if others is None:
            return cls(own[None], 0, enc.latent_centroid(), prompt_embeds)
        centroids = others.clone()
        centroids[label] = own
        return cls(centroids, label, enc.latent_centroid(), prompt_embeds)


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
    extras: dict = field(default_factory=dict)         # method-specific facts (tensors are saved as files)

    @property
    def updates(self) -> int:
        """Optimiser updates run (the history holds one more, evaluation-only entry)."""
        return len(self.history) - 1

    def as_image_result(self, concept: int, index: int, **record) -> ImageResult:
        tensors = {"seed": self.seed, "initial_seed": self.initial_seed}
        facts = {"losses": self.history, "best_iteration": self.best_iteration, "best_loss": self.best_loss,
                 "stop_reason": self.stop_reason, "updates": self.updates, "seconds": self.seconds, **record}
        for k, v in self.extras.items():
            (tensors if torch.is_tensor(v) else facts)[k] = v
        return ImageResult(concept, index, self.image, tensors, facts)


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
    """Seed optimisation against reference images, for one or several concepts per call."""

    settings_cls = SeedSelectSettings
    needs_image_encoder = True
    min_references = 1

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

    # ------------------------------------------------------------------------------- targets
    def contrast_set(self, prompts: Sequence[str], encodings: Sequence[ReferenceEncodings],
                     settings: SeedSelectSettings, negatives: Sequence[ReferenceEncodings] = ()) -> "ContrastSet":
        """The concepts of one call: their text embeddings and unit centroids, followed by the centroids
        of the ``negatives`` (concepts contrasted but not generated); the contrastive loss runs across
        them all when there are several and ``settings.semantic_loss`` says so."""
        if negatives and settings.semantic_loss != "contrastive":
            raise ValueError("negative reference images enter only the contrastive loss; "
                             f"semantic_loss is {settings.semantic_loss!r}")
        emb = encode_prompts(self, list(prompts)).to(self.compute_dtype)
        centroids = torch.stack([e.clip_centroid() for e in [*encodings, *negatives]])
        contrastive = settings.semantic_loss == "contrastive" and len(centroids) > 1
        return ContrastSet(emb, list(encodings), centroids if contrastive else None)

    def encode_negatives(self, negative_reference_images, cache_dir: str | os.PathLike | None
                         ) -> list[ReferenceEncodings]:
        """Encodings of the negative concepts: one reference set (a folder or a list of images) each."""
        if negative_reference_images is None:
            return []
        if isinstance(negative_reference_images, (str, os.PathLike)):
            raise TypeError("negative_reference_images takes one reference set per negative concept "
                            "(a list of folders or of image lists), not a single folder")
        return [encode_references(self, load_reference_images(refs), cache_dir) for refs in negative_reference_images]

    def targets_for(self, prompt: str, encodings: ReferenceEncodings, count: int) -> list[Target]:
        """``count`` targets pulling towards one concept's references (the single-concept loss)."""
        return [self.contrast_set([prompt], [encodings], SeedSelectSettings()).target(0)] * count

    def bootstrap_target(self, contrast: "ContrastSet", concept: int, index: int, seed: int) -> Target:
        """A bootstrap resample (with replacement) of the concept's references, keyed by (seed, index)."""
        enc = contrast.encodings[concept]
        n = len(enc.clip)
        g = torch.Generator().manual_seed(derive_seed(seed, index, 0xB007))
        return contrast.target(concept, enc.subset(torch.randint(0, n, (n,), generator=g)))

    def bootstrap_seeds(self, z_star: torch.Tensor, indices: Sequence[int], seed: int,
                        settings: SeedSelectSettings) -> torch.Tensor:
        """Start points z*·sqrt(1-r²) + r·eps (variance-preserving, so still N(0, I)-shaped)."""
        r = settings.bootstrap_perturbation
        eps = random_seeds(z_star.shape, [derive_seed(seed, i, 0x5EED) for i in indices], z_star.dtype)
        return math.sqrt(1 - r * r) * z_star.cpu()[None] + r * eps

    # ---------------------------------------------------------------------------------- call
    def __call__(self, prompt: str | Sequence[str], reference_images=None, num_images_per_prompt: int = 1, *,
                 settings: SeedSelectSettings | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, image_indices=None, z_star: dict[int, torch.Tensor] | None = None,
                 negative_reference_images=None, output_type: str = "pil", cache_dir: str | None = None,
                 callback=None, progress: bool = True, return_dict: bool = True, **overrides):
        """``num_images_per_prompt`` images of each concept in ``prompt`` (a string or a list), each from
        its reference images (``reference_images``: one folder / list of images, or one per prompt).

        Image i starts from seed ``seed + i``. With ``settings.bootstrap``, image 0 of each concept is z*
        (all references, all iterations) and image i > 0 starts near z* with its own bootstrap resample
        of the references and ``bootstrap_iterations`` iterations; ``z_star`` ({concept: seed}) passes
        finished z* seeds in. ``negative_reference_images`` (one reference set per concept) adds concepts
        that are contrasted but not generated: each image is pushed from their centroids too, e.g. the
        other classes a downstream classifier must tell it from. Several seeds (of any concepts) are
        optimised per batch; ``callback(ImageResult)`` is called for every image as soon as its batch
        is done."""
        plan = self.plan(prompt, reference_images, num_images_per_prompt, image_indices, generator, seed,
                         settings, **overrides)
        s = plan.settings
        contrast = self.contrast_set(plan.prompts, [encode_references(self, r, cache_dir) for r in plan.references], s,
                                     self.encode_negatives(negative_reference_images, cache_dir))
        results: dict[tuple[int, int], ImageResult] = {}

        def run(pairs, seeds, targets, iterations=None):
            res = self.optimize(seeds, targets, s, iterations=iterations, progress=progress)
            for (c, i), r in zip(pairs, res):
                results[c, i] = r.as_image_result(c, i, seed_int=plan.seed + i)
                if callback is not None:
                    callback(results[c, i])
            return res

        if not s.bootstrap:
            for chunk in chunks(plan.pairs, s.batch_size):
                run(chunk, random_seeds(self.latent_shape, [plan.seed + i for _, i in chunk], self.compute_dtype),
                    [contrast.target(c) for c, _ in chunk])
            return self.output(plan, results, output_type, return_dict)
        stars = dict(z_star or {})
        rest = [(c, i) for c, i in plan.pairs if i != 0]
        # z* of every concept that has image 0 to make, or bootstrap images but no finished z*
        first = [(c, 0) for c in range(len(plan.prompts))
                 if (c, 0) in plan.pairs or (c not in stars and any(cc == c for cc, _ in rest))]
        for chunk in chunks(first, s.batch_size):
            res = run(chunk, random_seeds(self.latent_shape, [plan.seed] * len(chunk), self.compute_dtype),
                      [contrast.target(c) for c, _ in chunk])
            stars.update({c: r.seed for (c, _), r in zip(chunk, res)})
        for chunk in chunks(rest, s.batch_size):
            seeds = torch.cat([self.bootstrap_seeds(stars[c], [i], plan.seed, s) for c, i in chunk])
            run(chunk, seeds, [self.bootstrap_target(contrast, c, i, plan.seed) for c, i in chunk],
                iterations=s.bootstrap_iterations)
        return self.output(plan, results, output_type, return_dict)


@dataclass
class ContrastSet:
    """Text embeddings (P, L, D), reference encodings and, when the loss contrasts them, the unit
    centroids (P, D) of the concepts of one call."""
    prompt_embeds: torch.Tensor
    encodings: list[ReferenceEncodings]
    centroids: torch.Tensor | None

    def target(self, concept: int, encodings: ReferenceEncodings | None = None) -> Target:
        enc = self.encodings[concept] if encodings is None else encodings
        return Target.from_encodings(enc, self.prompt_embeds[concept], self.centroids, concept)
