"""What every generation pipeline shares: the diffusers base class, ``from_pretrained`` with an image
encoder, one ``__call__`` input shape (one or several concepts, each with its reference images) and
one output type.

A call asks for images ``(concept c, index i)``: image i of every concept starts from integer seed
``seed + i`` (or the method's own start for that index), so an image does not depend on how many
images or which other concepts are asked for, except through a loss that contrasts the concepts.
That makes calls resumable: ``image_indices`` asks for some indices only.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from .loading import (DEFAULT_IMAGE_ENCODER_ID, DEFAULT_MODEL_ID, Components, SizesMixin, compute_dtype,
                      load_components)
from .prompts import encode_prompts
from .references import ReferenceImage, load_reference_images


@dataclass
class ImageResult:
    """One finished image, handed to ``callback`` as soon as its batch is done."""
    concept: int
    index: int
    image: Image.Image
    tensors: dict[str, torch.Tensor]              # saved beside the image (at least "seed")
    record: dict = field(default_factory=dict)    # JSON-able facts: losses, stop reason, timings, ...


@dataclass
class ConceptPipelineOutput(BaseOutput):
    """``images`` prompt-major (all images of prompt 0, then prompt 1, ...), ``seeds`` (N, C, h, w) the
    final seed of each image, ``records`` one dict per image (concept, index, prompt, method facts)."""
    images: Any
    seeds: torch.Tensor
    records: list


@dataclass
class CallPlan:
    prompts: list[str]
    references: list[list[ReferenceImage]]
    pairs: list[tuple[int, int]]   # (concept, image index) to make, concept-major
    seed: int
    settings: Any


def _is_reference_item(x) -> bool:
    return isinstance(x, (Image.Image, ReferenceImage, str, os.PathLike))


class ConceptPipeline(DiffusionPipeline, SizesMixin):
    """A diffusers pipeline over the SD components plus an (optional) CLIP image encoder."""

    _optional_components = ["image_encoder", "image_processor"]
    settings_cls: ClassVar[type | None] = None
    needs_image_encoder: ClassVar[bool] = False
    min_references: ClassVar[int] = 0

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike = DEFAULT_MODEL_ID, *,
                        image_encoder: str | os.PathLike | torch.nn.Module | None = DEFAULT_IMAGE_ENCODER_ID,
                        image_processor=None, torch_dtype: str | torch.dtype = "fp32",
                        device: str | torch.device = "cpu"):
        """A hub id or local diffusers SD folder, plus (for methods with a semantic loss) a CLIP vision
        model id / folder, or an already loaded ``CLIPVisionModelWithProjection`` with its processor."""
        loaded_encoder = isinstance(image_encoder, torch.nn.Module)
        comps = load_components(pretrained_model_name_or_path,
                                image_encoder if cls.needs_image_encoder and not loaded_encoder else None,
                                device=device, dtype=torch_dtype)
        if cls.needs_image_encoder and loaded_encoder:
            if image_processor is None:
                raise ValueError("pass image_processor with a loaded image_encoder")
            comps.image_encoder, comps.image_processor = image_encoder, image_processor
            comps.image_encoder_id = getattr(image_encoder, "name_or_path", "") or type(image_encoder).__name__
            comps.to(device=device, dtype=comps.dtype)
        return cls.from_components(comps)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    def encode_prompt(self, prompt: str, batch: int, guidance_scale: float):
        """(cond, uncond) text embeddings repeated to ``batch``; uncond is None without guidance."""
        emb = encode_prompts(self, [prompt, ""])
        cond = emb[:1].expand(batch, -1, -1)
        uncond = emb[1:].expand(batch, -1, -1) if guidance_scale != 1.0 else None
        return cond, uncond

    # ------------------------------------------------------------------------------ call inputs
    def plan(self, prompt: str | Sequence[str], reference_images=None, num_images_per_prompt: int = 1,
             image_indices: Sequence[int] | dict[int, Sequence[int]] | None = None,
             generator: torch.Generator | None = None, seed: int | None = None, settings=None,
             **overrides) -> CallPlan:
        """Normalise a call's inputs (see the module docstring)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must name at least one concept")
        if reference_images is None:
            per_concept: list = [None] * len(prompts)
        elif len(prompts) == 1 and (isinstance(reference_images, (str, os.PathLike))
                                    or all(_is_reference_item(x) for x in reference_images)):
            per_concept = [reference_images]
        else:
            per_concept = list(reference_images)
        if len(per_concept) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_concept)} reference sets")
        references = []
        for p, refs in zip(prompts, per_concept):
            if refs is None or (not isinstance(refs, (str, os.PathLike)) and len(refs) == 0):
                if self.min_references:
                    raise ValueError(f"{type(self).__name__} needs at least {self.min_references} reference "
                                     f"images of {p!r}")
                references.append([])
            else:
                references.append(load_reference_images(refs, min_count=max(self.min_references, 1)))
        if image_indices is None:
            if num_images_per_prompt < 1:
                raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
            wanted = {c: range(num_images_per_prompt) for c in range(len(prompts))}
        elif isinstance(image_indices, dict):
            wanted = {c: image_indices.get(c, ()) for c in range(len(prompts))}
        else:
            wanted = {c: image_indices for c in range(len(prompts))}
        pairs = [(c, int(i)) for c in range(len(prompts)) for i in wanted[c]]
        if any(i < 0 for _, i in pairs):
            raise ValueError("image indices must be >= 0")
        if seed is None:  # diffusers' convention: the generator (or torch's global RNG) decides
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if settings is None:
            settings = self.settings_cls(**overrides)
        elif overrides:
            settings = dataclasses.replace(settings, **overrides)
        return CallPlan(prompts, references, pairs, int(seed), settings)

    # ----------------------------------------------------------------------------- call output
    @staticmethod
    def output(plan: CallPlan, results: dict[tuple[int, int], ImageResult], output_type: str = "pil",
               return_dict: bool = True):
        done = [results[p] for p in plan.pairs]
        images = [r.image for r in done]
        if output_type == "np":
            images = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]) if images else np.zeros(0)
        elif output_type == "pt":
            images = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
                                  for im in images]) if images else torch.zeros(0)
        elif output_type != "pil":
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        seeds = torch.stack([r.tensors["seed"] for r in done]) if done else torch.zeros(0)
        records = [{"concept": r.concept, "index": r.index, "prompt": plan.prompts[r.concept], **r.record}
                   for r in done]
        if not return_dict:
            return images, seeds, records
        return ConceptPipelineOutput(images=images, seeds=seeds, records=records)


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]
