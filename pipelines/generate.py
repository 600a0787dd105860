"""Programmatic entry point: make ``num_images`` images of one concept with a registered method.

Artifacts (all written atomically, never overwritten) under ``out_dir``, named
``{method}-{run}-{index:05d}.{png,json,safetensors}`` where ``run`` hashes everything that decides
the images (method, resolved settings, model ids, prompt, reference content, base seed, dtype). A
rerun with the same inputs skips finished images; any change gives new names. Beside them:
``{method}-{run}.config.json`` (the resolved configuration) and ``{method}-{run}.contact.png``
(references above the generated images).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .components import (DEFAULT_IMAGE_ENCODER_ID, DEFAULT_MODEL_ID, Components, ReferenceImage, format_prompt,
                         load_components, load_reference_images, resolve_dtype)
from .io import load_tensors, make_dirs, read_record, save_image, save_tensors, write_json, write_record
from .registry import Generated, Job, get_method

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_name(method: str, config: dict) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{method}-{digest}"


def _artifacts(out_dir: Path, run: str, index: int) -> dict[str, Path]:
    stem = out_dir / f"{run}-{index:05d}"
    return {"image": stem.with_suffix(".png"), "seeds": stem.with_suffix(".safetensors"),
            "record": stem.with_suffix(".json")}


def _finished(paths: dict[str, Path]) -> bool:
    # the record is written last with the image's and the seeds' hashes: damaged ones are removed and redone
    return read_record(paths["record"], {"image": paths["image"], "seeds": paths["seeds"]}, "image record") is not None


class ImageRecord(dict):
    """The JSON record of one generated image (a dict), which also knows where its PNG is."""

    def __init__(self, record: dict, path: Path):
        super().__init__(record)
        self.path = path

    def image(self) -> Image.Image:
        return Image.open(self.path)

    def save(self, dest: str | os.PathLike) -> None:
        """Copy the PNG to ``dest`` (re-encoded if ``dest`` has another suffix)."""
        self.image().save(dest)


def generate_concept(method: str, prompt: str, refs: str | os.PathLike | Sequence[Any] | None, out_dir: str | os.PathLike,
                     num_images: int, settings: Any = None, seed: int = 0, *, preset: str = "reference",
                     model: str | os.PathLike = DEFAULT_MODEL_ID,
                     image_encoder: str | os.PathLike | None = DEFAULT_IMAGE_ENCODER_ID,
                     device: str | None = None, dtype: str | None = None, components: Components | None = None,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[ImageRecord]:
    """Generate images 0..num_images-1 of one concept; returns their JSON records (finished ones reused)
    in index order, as :class:`ImageRecord` dicts with ``.path`` / ``.save(dest)`` for the PNG.

    ``refs``: a folder, a list of image paths or PIL images (converted to RGB, any size); ``settings``:
    the method's settings dataclass, or a dict of overrides on ``preset``; ``prompt`` is filled into the settings'
    ``prompt_template``; ``components``: already loaded models (``model``/``image_encoder`` are then
    only used as ids when the components carry none). Reference encodings, inversions and NAO paths
    are cached in ``cache_dir`` (default ``out_dir/cache``).
    """
    m = get_method(method)
    device = device or default_device()
    if settings is None or isinstance(settings, dict):
        settings = m.settings(preset, device, **(settings or {}))
    elif not isinstance(settings, m.settings_cls):
        raise TypeError(f"{m.name} takes {m.settings_cls.__name__} or a dict of overrides, "
                        f"got {type(settings).__name__}")
    if dtype is not None:
        settings = dataclasses.replace(settings, dtype=dtype)
    if settings.dtype is None:
        settings = dataclasses.replace(settings, dtype="fp32")
    resolve_dtype(settings.dtype)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    references: list[ReferenceImage] = []
    if refs is not None or m.min_refs > 0:
        if refs is None:
            raise ValueError(f"{m.name} needs reference images (at least {m.min_refs})")
        references = load_reference_images(refs, min_count=max(m.min_refs, 1))
        if len(references) < m.min_refs:
            raise ValueError(f"{m.name} needs at least {m.min_refs} reference images, got {len(references)}")
    model_id = components.model_id if components is not None and components.model_id else str(model)
    enc_id = ""
    if m.needs_image_encoder:
        enc_id = components.image_encoder_id if components is not None and components.image_encoder_id \
            else str(image_encoder)
    full_prompt = format_prompt(prompt, settings.prompt_template)
    # references enter the run name only for methods that use them (sd shows them on the sheet only)
    config = {"method": m.name, "settings": dataclasses.asdict(settings), "model_id": model_id,
              "image_encoder_id": enc_id or None, "prompt": full_prompt, "seed": seed,
              "references": [{"name": r.name, "sha256": r.content_hash} for r in references] if m.min_refs else []}
    run = run_name(m.name, config)
    make_dirs(out_dir)
    write_json(out_dir / f"{run}.config.json",
               {**config, "preset": preset, "num_images": num_images, "device": device,
                "versions": _versions()})

    todo = [i for i in range(num_images) if not _finished(_artifacts(out_dir, run, i))]
    if len(todo) < num_images:
        log.info("%s: %d of %d images already finished, skipping them", run, num_images - len(todo), num_images)
    if todo:
        if components is None:
            components = load_components(model, image_encoder if m.needs_image_encoder else None, device=device,
                                         dtype=settings.dtype)
        else:
            components.to(device=device, dtype=resolve_dtype(settings.dtype))
        pipe = m.pipeline_cls.from_components(components)
        pipe.model_id, pipe.image_encoder_id = model_id, enc_id
        resume = {}
        for i in range(num_images):
            if i not in todo:
                resume[i] = load_tensors(_artifacts(out_dir, run, i)["seeds"], "seeds")[0]
                break  # methods only need the first finished image (SeedSelect's z*)
        job = Job(prompt=full_prompt, refs=references, indices=todo, seed=seed, settings=settings,
                  cache_dir=cache_dir, progress=progress, resume=resume)
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, initial=num_images - len(todo), desc=f"{m.name} {prompt!r}", disable=not progress)

        def save(results: dict[int, Generated]) -> None:
            for index, gen in results.items():
                _save(out_dir, run, index, gen, config, device)
                bar.update(1)

        try:
            m.run(pipe, job, save)
        finally:
            bar.close()
    records = [ImageRecord(json.loads(_artifacts(out_dir, run, i)["record"].read_text()),
                           _artifacts(out_dir, run, i)["image"]) for i in range(num_images)]
    generated = [Image.open(_artifacts(out_dir, run, i)["image"]) for i in range(num_images)]
    save_image(out_dir / f"{run}.contact.png", contact_sheet([r.image for r in references], generated))
    return records


def _save(out_dir: Path, run: str, index: int, gen: Generated, config: dict, device: str) -> None:
    paths = _artifacts(out_dir, run, index)
    if _finished(paths):  # never overwrite a finished image
        return
    save_image(paths["image"], gen.image, overwrite=True)
    save_tensors(paths["seeds"], gen.tensors, metadata={"run": run, "index": str(index)}, overwrite=True)
    record = {**config, "index": index, "run": run, "device": device,
              "files": {k: p.name for k, p in paths.items()}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime()),
              **gen.record}
    write_record(paths["record"], record, {"image": paths["image"], "seeds": paths["seeds"]}, overwrite=False)


def contact_sheet(references: Sequence[Image.Image], images: Sequence[Image.Image], thumb: int = 128,
                  columns: int = 8) -> Image.Image:
    """References in the first row(s), a gap, then the generated images, as one RGB image."""
    def rows(n: int) -> int:
        return (n + columns - 1) // columns

    cols = max(1, min(columns, max(len(references), len(images), 1)))
    ref_rows, gen_rows = rows(len(references)), rows(len(images))
    gap = thumb // 4 if references else 0
    sheet = Image.new("RGB", (cols * thumb, (ref_rows + gen_rows) * thumb + gap), (255, 255, 255))
    for k, im in enumerate(references):
        sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC), ((k % cols) * thumb, (k // cols) * thumb))
    top = ref_rows * thumb + gap
    for k, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC),
                    ((k % cols) * thumb, top + (k // cols) * thumb))
    return sheet


def _versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
