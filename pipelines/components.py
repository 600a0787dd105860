"""Components shared by every generation method: model loading, prompt encoding, the (differentiable)
decode -> CLIP path, reference-image loading and the content-addressed cache of reference encodings.

Everything is generic in sizes: the image size is ``unet.config.sample_size * vae_scale_factor``,
latent channels come from the UNet config and the CLIP input size / mean / std from the
``CLIPImageProcessor``. A miniature SD (32x32 images, 8x8 latents) runs through the same code as
SD 2.1-base at 512x512.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .io import load_tensors, save_tensors

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_IMAGE_ENCODER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# ALGORITHMS.md §1: the authors' DDIM settings (SD 2.1-base ships a PNDM config with these betas).
REFERENCE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
# Applied on top of a loaded model's own scheduler config (which keeps its betas / prediction type).
_DDIM_OVERRIDES = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def compute_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Seeds, scheduler arithmetic and losses: fp32, or fp64 when the models run in fp64 (tests)."""
    return torch.promote_types(model_dtype, torch.float32)


class SizesMixin:
    """Geometry derived from the configs (shared by :class:`Components` and the pipelines)."""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)


@dataclass
class Components(SizesMixin):
    """The frozen networks of a Stable-Diffusion-style model plus a CLIP image encoder."""
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object
    image_encoder: torch.nn.Module | None = None
    image_processor: object | None = None
    model_id: str = ""
    image_encoder_id: str = ""

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder, self.unet, self.image_encoder) if m is not None]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Components":
        for m in self.modules():
            m.to(device=device, dtype=None if dtype == m.dtype else dtype)
            m.requires_grad_(False)
            m.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def as_kwargs(self) -> dict:
        return dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    scheduler=self.scheduler, image_encoder=self.image_encoder,
                    image_processor=self.image_processor)


def ddim_scheduler(config) -> "DDIMScheduler":  # noqa: F821
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(config), **_DDIM_OVERRIDES)


def load_components(model: str | os.PathLike = DEFAULT_MODEL_ID,
                    image_encoder: str | os.PathLike | None = DEFAULT_IMAGE_ENCODER_ID,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32") -> Components:
    """Load a diffusers SD folder / hub id and (optionally) a transformers CLIP image encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = str(model)
    if _looks_local(model) and not Path(model).is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    dt = resolve_dtype(dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dt)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dt)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dt)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    try:
        scheduler = ddim_scheduler(DDIMScheduler.load_config(model, subfolder="scheduler"))
    except OSError:  # a folder without scheduler/: the reference DDIM of SD 2.1-base
        log.warning("%s has no scheduler config; using the reference DDIM settings", model)
        scheduler = DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    enc = proc = None
    if image_encoder is not None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        image_encoder = str(image_encoder)
        if _looks_local(image_encoder) and not Path(image_encoder).is_dir():
            raise FileNotFoundError(f"image encoder folder not found: {image_encoder}")
        enc = CLIPVisionModelWithProjection.from_pretrained(image_encoder, dtype=dt)
        proc = CLIPImageProcessor.from_pretrained(image_encoder)
    comps = Components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                       image_encoder=enc, image_processor=proc, model_id=model,
                       image_encoder_id=str(image_encoder or ""))
    return comps.to(device=device, dtype=dt)


def _looks_local(name: str) -> bool:
    """A hub id is ``owner/name``; anything else (or an existing path) is a local folder."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


# ----------------------------------------------------------------------------------------- text
@torch.no_grad()
def encode_prompts(comps: Components, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden state of the text encoder for each prompt, (P, L, D) in the model dtype."""
    tok = comps.tokenizer(list(prompts), padding="max_length", max_length=comps.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    return comps.text_encoder(tok.input_ids.to(comps.device))[0]


def format_prompt(name: str, template: str = "{}") -> str:
    """Class name -> prompt: underscores become spaces, then the template is filled."""
    return template.format(name.replace("_", " ").strip())


# ----------------------------------------------------------------------------- decode and CLIP
def decode_latents(comps: Components, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (B, 3, H, W), compute dtype; differentiable."""
    vae = comps.vae
    x = vae.decode((latents / vae.config.scaling_factor).to(comps.dtype)).sample
    return (x.to(compute_dtype(comps.dtype)) / 2 + 0.5).clamp(0, 1)


def clip_input_size(processor) -> tuple[int, int]:
    crop = getattr(processor, "crop_size", None) or {}
    if "height" in crop:
        return int(crop["height"]), int(crop["width"])
    size = processor.size
    edge = size.get("shortest_edge") or size.get("height")
    return int(edge), int(size.get("width", edge))


def clip_preprocess(processor, images: torch.Tensor) -> torch.Tensor:
    """Differentiable CLIP preprocessing of [0,1] images: bicubic resize to the CLIP input, mean/std."""
    h, w = clip_input_size(processor)
    x = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False)
    mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def clip_embed(comps: Components, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (un-normalised) CLIP image embeddings in the compute dtype."""
    out = comps.image_encoder(pixel_values=pixel_values.to(comps.dtype))
    return out.image_embeds.to(compute_dtype(comps.dtype))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


# --------------------------------------------------------------------------- reference images
@dataclass
class ReferenceImage:
    name: str
    image: Image.Image  # RGB

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256(f"{self.image.size}".encode())
        h.update(self.image.tobytes())
        return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_reference_images(refs: str | os.PathLike | Iterable, min_count: int = 1) -> list[ReferenceImage]:
    """Reference images from a folder, a list of paths, or a list of PIL images, all as RGB.

    Raises FileNotFoundError / ValueError naming the folder or file that is missing, empty or corrupt;
    non-RGB modes (grey, palette, alpha, CMYK) are converted and any size is accepted.
    """
    if isinstance(refs, (str, os.PathLike)):
        folder = Path(refs)
        if not folder.exists():
            raise FileNotFoundError(f"reference folder not found: {folder}")
        if not folder.is_dir():
            raise NotADirectoryError(f"reference path is not a folder: {folder}")
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        skipped = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
        if skipped:
            log.warning("%s: ignoring non-image files %s", folder, skipped)
        items: list = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise ValueError(f"reference folder {folder} contains no images (suffixes {sorted(IMAGE_SUFFIXES)})")
    else:
        items = list(refs)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            out.append(ReferenceImage(f"image_{i}", _to_rgb(item)))
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"reference image not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                out.append(ReferenceImage(path.name, _to_rgb(img)))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read reference image {path}: {e}") from e
    if len(out) < min_count:
        raise ValueError(f"need at least {min_count} reference images, got {len(out)}")
    return out


@dataclass
class ReferenceEncodings:
    """Per-image encodings of a reference set (fp32 / compute dtype)."""
    clip: torch.Tensor     # (N, D) un-normalised projected CLIP embeddings
    latents: torch.Tensor  # (N, C, h, w) VAE latent means times the scaling factor

    def subset(self, index: torch.Tensor | Sequence[int]) -> "ReferenceEncodings":
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, clip=self.clip[index], latents=self.latents[index])

    def clip_centroid(self) -> torch.Tensor:
        """Mean of the un-normalised embeddings, then L2-normalised (the authors' order)."""
        return F.normalize(self.clip.mean(0), dim=-1)

    def latent_centroid(self) -> torch.Tensor:
        return self.latents.mean(0)


def vae_input(comps: Components, img: Image.Image) -> torch.Tensor:
    """Image resized to the model resolution without crop (bicubic), in [-1, 1], (3, H, W)."""
    s = comps.image_size
    arr = np.asarray(img.resize((s, s), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.no_grad()
def encode_latent_means(comps: Components, images: Sequence[Image.Image]) -> torch.Tensor:
    x = torch.stack([vae_input(comps, im) for im in images]).to(comps.device, comps.dtype)
    mean = comps.vae.encode(x).latent_dist.mean  # the mean, not a sample (reproducible)
    return mean.to(compute_dtype(comps.dtype)) * comps.vae.config.scaling_factor


@torch.no_grad()
def encode_references(comps: Components, refs: Sequence[ReferenceImage],
                      cache_dir: str | os.PathLike | None = None) -> ReferenceEncodings:
    """CLIP embeddings (CLIP eval transform) and VAE latent means of the references.

    Cached under ``cache_dir`` by a key of the images' pixel content, the model ids, dtype and sizes,
    so changed images never reuse stale encodings.
    """
    if comps.image_encoder is None:
        raise ValueError("an image encoder is required to encode reference images")
    key = hashlib.sha256("|".join(
        [comps.model_id, comps.image_encoder_id, str(comps.dtype), str(comps.image_size),
         str(clip_input_size(comps.image_processor))] + [r.content_hash for r in refs]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"refenc-{key}.safetensors" if cache_dir is not None else None
    cdt = compute_dtype(comps.dtype)
    cached = load_tensors(path, "reference encodings") if path is not None else None
    if cached is not None:
        t = cached[0]
        return ReferenceEncodings(clip=t["clip"].to(comps.device, cdt), latents=t["latents"].to(comps.device, cdt))
    pix = comps.image_processor(images=[r.image for r in refs], return_tensors="pt").pixel_values
    enc = ReferenceEncodings(clip=clip_embed(comps, pix.to(comps.device)),
                             latents=encode_latent_means(comps, [r.image for r in refs]))
    if path is not None:
        save_tensors(path, {"clip": enc.clip, "latents": enc.latents},
                     metadata={"images": ",".join(r.name for r in refs)[:4000]})
    return enc


# ------------------------------------------------------------------------------------ sampling
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


# ------------------------------------------------------------------------------ pipeline base
def _pipeline_base():
    from diffusers import DiffusionPipeline

    class ConceptPipeline(DiffusionPipeline, SizesMixin):
        """A diffusers pipeline over the SD components plus an (optional) CLIP image encoder."""

        _optional_components = ["image_encoder", "image_processor"]

        def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, image_encoder=None, image_processor=None):
            super().__init__()
            self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                  scheduler=scheduler, image_encoder=image_encoder, image_processor=image_processor)
            self.model_id = ""
            self.image_encoder_id = ""

        @classmethod
        def from_components(cls, comps: Components):
            pipe = cls(**comps.as_kwargs())
            pipe.model_id, pipe.image_encoder_id = comps.model_id, comps.image_encoder_id
            return pipe

        @property
        def compute_dtype(self) -> torch.dtype:
            return compute_dtype(self.dtype)

        def encode_prompt(self, prompt: str, batch: int, guidance_scale: float):
            """(cond, uncond) text embeddings repeated to ``batch``; uncond is None without guidance."""
            emb = encode_prompts(self, [prompt, ""])
            cond = emb[:1].expand(batch, -1, -1)
            uncond = emb[1:].expand(batch, -1, -1) if guidance_scale != 1.0 else None
            return cond, uncond

    return ConceptPipeline


ConceptPipeline = _pipeline_base()
