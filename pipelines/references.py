"""Reference images of a concept: loading (any folder, path list or PIL images, as RGB) and their
encodings (CLIP embeddings and VAE latent means), cached by content."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .imaging import clip_embed, clip_input_size
from .io import load_tensors, save_tensors
from .loading import compute_dtype

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ReferenceImage:
    name: str
    image: Image.Image  # RGB

    @cached_property  # hashed once, however many calls contrast with it
    def content_hash(self) -> str:
        image = self.image  # once: a ReferenceFile decodes on each access
        h = hashlib.sha256(f"{image.size}".encode())
        h.update(image.tobytes())
        return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read reference image {path}: {e}") from e


class ReferenceFile(ReferenceImage):
    """A reference image on disk that holds no pixels: ``image`` decodes the file on each use. For the
    reference sets a process needs only (cached) encodings of, such as the negatives of a 1,000-class
    benchmark, whose decoded images would take ~2.8 GB (5 of 500x375 per class). The file is decoded
    once on creation, so a damaged one fails there, and hashed then, as a ReferenceImage of the same
    pixels (same cache keys)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name
        self.content_hash  # noqa: B018 (cached_property: decode and hash now)

    @property
    def image(self) -> Image.Image:  # type: ignore[override]
        return _open_rgb(self.path)

    def __repr__(self) -> str:
        return f"ReferenceFile({str(self.path)!r})"


def load_reference_images(refs: str | os.PathLike | Iterable, min_count: int = 1,
                          lazy: bool = False) -> list[ReferenceImage]:
    """Reference images from a folder, a list of paths, or a list of PIL images, all as RGB; with
    ``lazy``, files become :class:`ReferenceFile` (checked and hashed now, pixels not held).

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
        if isinstance(item, ReferenceImage):
            out.append(item)
            continue
        if isinstance(item, Image.Image):
            out.append(ReferenceImage(f"image_{i}", _to_rgb(item)))
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"reference image not found: {path}")
        out.append(ReferenceFile(path) if lazy else ReferenceImage(path.name, _open_rgb(path)))
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


def vae_input(comps, img: Image.Image) -> torch.Tensor:
    """Image resized to the model resolution without crop (bicubic), in [-1, 1], (3, H, W)."""
    s = comps.image_size
    arr = np.asarray(img.resize((s, s), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.no_grad()
def encode_latent_means(comps, images: Sequence[Image.Image]) -> torch.Tensor:
    x = torch.stack([vae_input(comps, im) for im in images]).to(comps.device, comps.dtype)
    mean = comps.vae.encode(x).latent_dist.mean  # the mean, not a sample (reproducible)
    return mean.to(compute_dtype(comps.dtype)) * comps.vae.config.scaling_factor


@torch.no_grad()
def encode_references(comps, refs: Sequence[ReferenceImage],
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
