"""Discriminative Class Tokens (Schwartz et al., arXiv 2303.17155): learn one new text token per
class with a frozen diffusion model, steered by a frozen image classifier.

ALGORITHMS.md §4. A placeholder token, initialised from the embedding of "a", is inserted before the
class name ("A photo of <dct> tiger cat"). Only that token's embedding is trained, as a separate
parameter: the text encoder's vocabulary table is never resized or written (the token is injected
by hooks on the embedding module), so weight decay cannot drift it. Each training image runs the
DDIM chain without gradient except for the **last** step; the loss is the classifier's
cross-entropy for the target class on the decoded image (differentiable resize/crop/normalise),
back through the VAE decoder, the last UNet call and the text encoder. AdamW (lr 0.00125, wd 0.01),
one update per "epoch" of 5 images (gradient accumulation), gradient clipped *after* backward (the
authors clip before it, which clips nothing); at most 50 epochs; stop once >= 4 of an epoch's 5
images are classified as the target, or after 16 epochs without a lower epoch loss. As in the
authors' code every epoch reuses the same 5 initial latents.

The token returned is the one *evaluated* in the best epoch (the successful one, else the lowest
loss), not the one after the following update. Only that embedding and its settings are saved.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .base import ConceptPipeline, ImageResult, chunks
from .classifiers import ImageClassifier, load_classifier
from .imaging import decode_latents, to_pil
from .io import load_tensors, save_tensors
from .registry import Method, register_method
from .sampling import denoise, guided_eps, random_seeds
from .seedselect import NonFiniteLossError

log = logging.getLogger(__name__)

DEFAULT_CLASSIFIER_ID = "google/vit-large-patch16-224"
DCT_TEMPLATES = ("A photo of {}", "a high resolution realistic image of {}", "A close-up photo of a {}")


@dataclass
class DctSettings:
    """Reference settings (ALGORITHMS.md §4) by default."""
    num_inference_steps: int = 30
    guidance_scale: float = 7.0
    lr: float = 0.00125
    weight_decay: float = 0.01
    epoch_size: int = 5                   # images (batch 1, accumulated) per update
    max_epochs: int = 50
    patience: int = 16                    # epochs without a lower epoch loss
    min_correct: int = 4                  # of epoch_size images classified as the target: done
    max_grad_norm: float = 1.0
    templates: tuple[str, ...] = DCT_TEMPLATES
    generation_template: str = "A photo of {}"
    placeholder: str = "<dct>"
    initializer: str = "a"
    train_seed: int = 35                  # the authors' seed for the training latents
    batch_size: int = 4                   # images per generation batch
    prompt_template: str = "{}"           # the registry fills the class name through it
    dtype: str | None = None
    # the guiding classifier (read by the registry adapter and the CLI)
    classifier: str = DEFAULT_CLASSIFIER_ID
    classifier_checkpoint: str | None = None
    classifier_labels: str | None = None

    def __post_init__(self) -> None:
        self.templates = tuple(self.templates)
        if not self.templates or any("{}" not in t for t in self.templates + (self.generation_template,)):
            raise ValueError("every prompt template must contain '{}' for '<token> <class name>'")
        if not 1 <= self.min_correct <= self.epoch_size:
            raise ValueError(f"min_correct must lie in 1..epoch_size={self.epoch_size}, got {self.min_correct}")
        if self.max_epochs < 1 or self.patience < 1 or self.num_inference_steps < 1:
            raise ValueError("max_epochs, patience and num_inference_steps must be positive")

    def training_key(self) -> dict:
        """The settings that determine the learned token (generation-only ones excluded)."""
        skip = {"generation_template", "batch_size", "prompt_template", "dtype"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class DctToken:
    """A learned class token: the embedding vector and how it was made."""
    embedding: torch.Tensor               # (D,) float32, CPU
    class_name: str
    class_index: int
    record: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        meta = {"class_name": self.class_name, "class_index": str(self.class_index),
                "record": json.dumps(self.record, default=str)}
        return save_tensors(path, {"token_embedding": self.embedding.float()}, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "DctToken":
        path = Path(path)
        loaded = load_tensors(path, "DCT token")
        if loaded is None:
            raise FileNotFoundError(f"DCT token file not found or damaged: {path}")
        emb, meta = loaded[0]["token_embedding"], loaded[1]
        return cls(emb, meta.get("class_name", ""), int(meta.get("class_index", -1)),
                   json.loads(meta.get("record", "{}")))


@contextmanager
def injected_token(text_encoder, token_id: int, vector: torch.Tensor, substitute_id: int):
    """While active, ``token_id`` in the text encoder's input embeds as ``vector``.

    The id lies outside the frozen embedding table: a pre-hook swaps it for a valid id before the
    lookup and a forward hook puts ``vector`` (differentiably) at its positions."""
    embedding = text_encoder.get_input_embeddings()
    masks: list[torch.Tensor] = []

    def pre(module, args):
        ids = args[0]
        mask = ids == token_id
        masks.append(mask)
        return (torch.where(mask, torch.full_like(ids, substitute_id), ids), *args[1:])

    def post(module, args, out):
        mask = masks.pop()
        return torch.where(mask[..., None], vector.to(out.dtype), out)

    handles = [embedding.register_forward_pre_hook(pre), embedding.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class DctPipeline(ConceptPipeline):
    """Train a discriminative class token against a classifier, then generate with it."""

    settings_cls = DctSettings

    def _placeholder_ids(self, settings: DctSettings) -> tuple[object, int, int]:
        """A private tokenizer copy that knows the placeholder, its id, and the initializer's id."""
        # a word the vocabulary already has ("cat") would also capture its ordinary occurrences
        known = len(self.tokenizer.encode(settings.placeholder, add_special_tokens=False)) == 1
        tokenizer = copy.deepcopy(self.tokenizer)
        if known or tokenizer.add_tokens(settings.placeholder) == 0:
            raise ValueError(f"placeholder {settings.placeholder!r} is already a token of the vocabulary; pick another")
        init = tokenizer.encode(settings.initializer, add_special_tokens=False)
        if len(init) != 1:
            raise ValueError(f"initializer {settings.initializer!r} must be a single token, got {len(init)}")
        return tokenizer, tokenizer.convert_tokens_to_ids(settings.placeholder), init[0]

    def _encode(self, tokenizer, prompts: Sequence[str], token_id: int, init_id: int,
                vector: torch.Tensor) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(self.device)
        with injected_token(self.text_encoder, token_id, vector, init_id):
            return self.text_encoder(ids)[0]

    @torch.no_grad()
    def _uncond(self, tokenizer, batch: int) -> torch.Tensor:
        ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].expand(batch, -1, -1)

    def initial_embedding(self, settings: DctSettings = DctSettings()) -> torch.Tensor:
        _, _, init_id = self._placeholder_ids(settings)
        return self.text_encoder.get_input_embeddings().weight[init_id].detach().float().cpu().clone()

    def _last_step_image(self, z_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                         settings: DctSettings) -> torch.Tensor:
        """DDIM without gradient except for the last UNet call; returns the decoded [0, 1] image."""
        sched = self.scheduler
        sched.set_timesteps(settings.num_inference_steps, device=z_T.device)
        x = z_T * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps[:-1]:
                x = sched.step(guided_eps(self.unet, x, t, cond.detach(), uncond, settings.guidance_scale), t, x).prev_sample
        t = sched.timesteps[-1]
        z0 = sched.step(guided_eps(self.unet, x, t, cond, uncond, settings.guidance_scale), t, x).prev_sample
        return decode_latents(self, z0)

    def train_token(self, class_name: str, classifier: ImageClassifier, target: int,
                    settings: DctSettings = DctSettings(), progress: bool = True) -> DctToken:
        """Learn the class token for ``class_name`` (label ``target`` of ``classifier``)."""
        tokenizer, token_id, init_id = self._placeholder_ids(settings)
        cdt = self.compute_dtype
        token = torch.nn.Parameter(self.text_encoder.get_input_embeddings().weight[init_id].detach().to(cdt).clone())
        optimizer = torch.optim.AdamW([token], lr=settings.lr, weight_decay=settings.weight_decay)
        subject = f"{settings.placeholder} {class_name.replace('_', ' ').strip()}"
        uncond = self._uncond(tokenizer, 1) if settings.guidance_scale != 1.0 else None
        target_t = torch.tensor([target], device=self.device)

        best = {"correct": -1, "loss": math.inf, "epoch": -1, "token": token.detach().clone()}
        history: list[dict] = []
        stale, reason, start = 0, f"max_epochs ({settings.max_epochs})", time.perf_counter()
        bar = tqdm(range(settings.max_epochs), desc=f"DCT {class_name}", disable=not progress, leave=False)
        for epoch in bar:
            latents = torch.Generator().manual_seed(settings.train_seed)  # same 5 latents every epoch
            prompts = torch.Generator().manual_seed(settings.train_seed * 100_003 + epoch)
            evaluated = token.detach().clone()
            epoch_loss, correct = 0.0, 0
            optimizer.zero_grad(set_to_none=True)
            for _ in range(settings.epoch_size):
                template = settings.templates[int(torch.randint(len(settings.templates), (1,), generator=prompts))]
                z_T = torch.randn((1, *self.latent_shape), generator=latents, dtype=cdt).to(self.device)
                cond = self._encode(tokenizer, [template.format(subject)], token_id, init_id, token)
                logits = classifier.logits(self._last_step_image(z_T, cond.to(self.dtype), uncond, settings))
                loss = F.cross_entropy(logits, target_t)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"DCT loss is {loss.item()} at epoch {epoch} for class {class_name!r}")
                (loss / settings.epoch_size).backward()
                epoch_loss += loss.item()
                correct += int(logits.argmax(-1).item() == target)
            torch.nn.utils.clip_grad_norm_([token], settings.max_grad_norm)
            history.append({"epoch": epoch, "loss": epoch_loss, "correct": correct})
            bar.set_postfix(loss=f"{epoch_loss:.3f}", correct=f"{correct}/{settings.epoch_size}")
            if (correct, -epoch_loss) > (best["correct"], -best["loss"]):
                best.update(correct=correct, loss=epoch_loss, epoch=epoch, token=evaluated)
            if correct >= settings.min_correct:
                reason = f"{correct} of {settings.epoch_size} images classified as the target"
                break
            if epoch_loss < min(h["loss"] for h in history[:-1] or [{"loss": math.inf}]):
                stale = 0
            else:
                stale += 1
                if stale >= settings.patience:
                    reason = f"no lower epoch loss for {settings.patience} epochs"
                    break
            optimizer.step()
        bar.close()
        record = {"stop_reason": reason, "epochs": len(history), "best_epoch": best["epoch"],
                  "best_correct": best["correct"], "best_loss": best["loss"], "history": history,
                  "seconds": time.perf_counter() - start, "settings": settings.training_key(),
                  "model_id": self.model_id, "classifier": classifier.source, "target": target}
        return DctToken(best["token"].float().cpu(), class_name, target, record)

    @torch.no_grad()
    def generate_with_token(self, class_name: str, token: DctToken, seeds: Sequence[int] | torch.Tensor,
                            settings: DctSettings = DctSettings()) -> "DctOutput":
        """One image per seed from ``<token> <class name>`` in the generation template."""
        tokenizer, token_id, init_id = self._placeholder_ids(settings)
        prompt = settings.generation_template.format(f"{settings.placeholder} {class_name.replace('_', ' ').strip()}")
        vector = token.embedding.to(self.device, self.dtype)
        z = seeds if torch.is_tensor(seeds) else random_seeds(self.latent_shape, seeds, self.compute_dtype)
        images = []
        for start in range(0, len(z), settings.batch_size):
            chunk = z[start:start + settings.batch_size].to(self.device, self.compute_dtype)
            cond = self._encode(tokenizer, [prompt] * len(chunk), token_id, init_id, vector)
            uncond = self._uncond(tokenizer, len(chunk)) if settings.guidance_scale != 1.0 else None
            z0 = denoise(self, chunk, cond, uncond, settings.guidance_scale, settings.num_inference_steps)[-1]
            images += to_pil(decode_latents(self, z0))
        return DctOutput(images=images, seeds=z.cpu(), prompt=prompt)

    def __call__(self, prompt, reference_images=None, num_images_per_prompt: int = 1, *,
                 settings: DctSettings | None = None, classifier: ImageClassifier | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None, image_indices=None,
                 output_type: str = "pil", cache_dir: str | Path | None = None, callback=None,
                 progress: bool = True, return_dict: bool = True, **overrides):
        """Images of each class in ``prompt`` (class names of the guide ``classifier``, by default the one
        ``settings.classifier`` names). Each class's token is trained once (reused from ``cache_dir``);
        image i starts from seed ``seed + i``. Reference images are accepted and unused."""
        plan = self.plan(prompt, reference_images, num_images_per_prompt, image_indices, generator, seed,
                         settings, **overrides)
        s = plan.settings
        if classifier is None:
            classifier = guide_classifier(s, self.device)
        results: dict[tuple[int, int], ImageResult] = {}
        for c, name in enumerate(plan.prompts):
            pairs = [(cc, i) for cc, i in plan.pairs if cc == c]
            if not pairs:
                continue
            if cache_dir is None:
                token, path = self.train_token(name, classifier, classifier.class_index(name), s, progress), None
            else:
                token, path = train_or_load_token(self, classifier, name, cache_dir, s, progress=progress)
            facts = {"token_file": str(path) if path else None, "class_index": token.class_index,
                     "classifier": classifier.source,
                     "token_record": {k: v for k, v in token.record.items() if k != "settings"}}
            for chunk in chunks(pairs, s.batch_size):
                t0 = time.perf_counter()
                out = self.generate_with_token(name, token, [plan.seed + i for _, i in chunk], s)
                seconds = (time.perf_counter() - t0) / len(chunk)
                for (cc, i), image, z in zip(chunk, out.images, out.seeds):
                    results[cc, i] = ImageResult(cc, i, image, {"seed": z, "token_embedding": token.embedding},
                                                 {**facts, "prompt_used": out.prompt, "seed_int": plan.seed + i,
                                                  "seconds": seconds})
                    if callback is not None:
                        callback(results[cc, i])
        return self.output(plan, results, output_type, return_dict)


@dataclass
class DctOutput:
    images: list
    seeds: torch.Tensor
    prompt: str


def token_path(cache_dir: str | Path, pipe: ConceptPipeline, classifier: ImageClassifier, target: int,
               class_name: str, settings: DctSettings) -> Path:
    """Deterministic file name of a token: what made it is hashed into the name."""
    key = json.dumps({"model": pipe.model_id, "classifier": classifier.source, "target": target,
                      "class": class_name, **settings.training_key()}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", class_name).strip("_")[:40] or "class"
    return Path(cache_dir) / f"dct-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def train_or_load_token(pipe: DctPipeline, classifier: ImageClassifier, class_name: str, cache_dir: str | Path,
                        settings: DctSettings = DctSettings(), target: str | int | None = None,
                        progress: bool = True) -> tuple[DctToken, Path]:
    """The learned token of ``class_name``: reused from ``cache_dir`` when a finished token made with
    the same model, classifier, class and training settings exists; trained and saved otherwise."""
    index = classifier.class_index(class_name if target is None else target)
    path = token_path(cache_dir, pipe, classifier, index, class_name, settings)
    if load_tensors(path, "DCT token") is not None:
        log.info("reusing DCT token %s", path)
        return DctToken.load(path), path
    token = pipe.train_token(class_name, classifier, index, settings, progress=progress)
    token.save(path)
    return token, path


_GUIDES: dict[tuple, ImageClassifier] = {}


def guide_classifier(s: DctSettings, device) -> ImageClassifier:
    """The guiding classifier of ``s``, loaded once per process for a given (classifier, labels file
    state, device): a benchmark runs DCT class after class, and reloading a ViT-H/14 CLIP for each
    costs more than training a token at few steps. One guide is kept at a time."""
    labels = s.classifier_labels
    stamp = Path(labels).stat().st_mtime_ns if labels and Path(labels).is_file() else None
    key = (s.classifier, s.classifier_checkpoint, labels, stamp, str(device))
    if key not in _GUIDES:
        _GUIDES.clear()
        _GUIDES[key] = load_classifier(s.classifier, s.classifier_checkpoint, labels, device=device, for_guidance=True)
    return _GUIDES[key]


register_method(Method(
    "dct", DctPipeline, DctSettings,
    aliases=("DCT", "discriminative-class-tokens"), description="classifier-guided class token",
    presets={"reference": {"dtype": "fp32", "batch_size": 1},
             "fast": {"dtype": "auto-bf16", "batch_size": 8}}))
