"""Programmatic entry point: make ``num_images`` images of one or several concepts with a registered
method, as files.

Artifacts (all written atomically, never overwritten), per concept, named
``{method}-{run}-{index:05d}.{png,json,safetensors}`` where ``run`` hashes everything that decides the
concept's images (method, resolved settings, model ids, prompt, reference content, base seed and,
when a loss contrasts the call's concepts, every concept of the contrast set, negatives included). A
rerun with the same inputs skips finished images; any change gives new names. Beside them:
``{method}-{run}.config.json`` (the resolved configuration) and ``{method}-{run}.contact.png``
(references above the generated images). One concept writes into ``out_dir``; several write into
``out_dir/<concept>/`` each.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .base import ImageResult
from .loading import DEFAULT_IMAGE_ENCODER_ID, DEFAULT_MODEL_ID, Components, load_components, resolve_dtype
from .prompts import format_prompt
from .references import ReferenceImage, load_reference_images
from .io import load_tensors, read_record, save_image, save_tensors, write_bytes, write_record
from .registry import get_method

log = logging.getLogger(__name__)


@dataclass
class Concept:
    """One concept of a call: its name (filled into the method's prompt template) and references
    (a folder, a list of image paths or PIL images, or None)."""
    prompt: str
    refs: Any = None


def default_device() -> str:
    """``cuda`` (the process's own GPU, ``cuda:LOCAL_RANK``, under accelerate launch / torchrun) or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(rank) % torch.cuda.device_count()}" if rank is not None else "cuda"


def run_name(method: str, config: dict) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{method}-{digest}"


def concept_dir_name(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", prompt).strip("_")[:60] or "concept"


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


def resolve_settings(method, settings: Any, preset: str, device: str, dtype: str | None):
    """The method's settings dataclass from ``settings`` (a dataclass, a dict of overrides on ``preset``,
    or None), with ``dtype`` applied and a concrete dtype."""
    if settings is None or isinstance(settings, dict):
        settings = method.settings(preset, device, **(settings or {}))
    elif not isinstance(settings, method.settings_cls):
        raise TypeError(f"{method.name} takes {method.settings_cls.__name__} or a dict of overrides, "
                        f"got {type(settings).__name__}")
    if dtype is not None:
        settings = dataclasses.replace(settings, dtype=dtype)
    if settings.dtype is None:
        settings = dataclasses.replace(settings, dtype="fp32")
    resolve_dtype(settings.dtype)
    return settings


def contrasts(method, settings, n_concepts: int) -> bool:
    """Whether a concept's images depend on the call's other (or negative) concepts: the contrastive loss."""
    return method.needs_image_encoder and n_concepts > 1 and getattr(settings, "semantic_loss", "") == "contrastive"


def generate_concepts(method: str, concepts: Sequence[Concept | tuple], out_dir: str | os.PathLike, num_images: int,
                      settings: Any = None, seed: int = 0, *, preset: str = "reference",
                      model: str | os.PathLike = DEFAULT_MODEL_ID,
                      image_encoder: str | os.PathLike | None = DEFAULT_IMAGE_ENCODER_ID,
                      device: str | None = None, dtype: str | None = None, components: Components | None = None,
                      cache_dir: str | os.PathLike | None = None, progress: bool = True,
                      concept_dirs: bool | None = None, negatives: Sequence[Any] = ()) -> list[list["ImageRecord"]]:
    """Generate images 0..num_images-1 of each concept in one call of the method's pipeline (so that
    SeedSelect-type methods contrast them); returns, per concept, the JSON records of its images
    (finished ones reused) in index order, as :class:`ImageRecord` dicts with ``.path`` / ``.save``.

    ``settings``: the method's settings dataclass, or a dict of overrides on ``preset``; each concept's
    name is filled into the settings' ``prompt_template``; ``components``: already loaded models
    (``model``/``image_encoder`` are then only used as ids when the components carry none). Reference
    encodings, inversions, NAO paths and DCT tokens are cached in ``cache_dir`` (default
    ``out_dir/cache``). ``concept_dirs`` (default: when there are several concepts) writes each
    concept into ``out_dir/<concept>/``. ``negatives``: reference sets (a folder or a list of images
    each) of concepts the contrastive loss pushes every image from without generating them
    (SeedSelect and NAO-SeedSelect with ``semantic_loss="contrastive"``; other methods refuse them).
    Nothing is written before the first image is made, so a model or classifier that cannot be
    loaded leaves the output folder untouched."""
    m = get_method(method)
    device = device or default_device()
    settings = resolve_settings(m, settings, preset, device, dtype)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    concepts = [c if isinstance(c, Concept) else Concept(*c) for c in concepts]
    if not concepts:
        raise ValueError("no concepts to generate")
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    references: list[list[ReferenceImage]] = []
    for c in concepts:
        if c.refs is None and m.min_refs > 0:
            raise ValueError(f"{m.name} needs reference images of {c.prompt!r} (at least {m.min_refs})")
        refs = [] if c.refs is None else load_reference_images(c.refs, min_count=max(m.min_refs, 1))
        if len(refs) < m.min_refs:
            raise ValueError(f"{m.name} needs at least {m.min_refs} reference images of {c.prompt!r}, got {len(refs)}")
        references.append(refs)
    model_id = components.model_id if components is not None and components.model_id else str(model)
    enc_id = ""
    if m.needs_image_encoder:
        enc_id = components.image_encoder_id if components is not None and components.image_encoder_id \
            else str(image_encoder)
    prompts = [format_prompt(c.prompt, settings.prompt_template) for c in concepts]
    ref_ids = [[{"name": r.name, "sha256": r.content_hash} for r in refs] for refs in references]
    if isinstance(negatives, (str, os.PathLike)):
        raise TypeError("negatives takes one reference set per negative concept, not a single folder")
    contrastive = contrasts(m, settings, len(concepts) + len(negatives))
    if negatives and not contrastive:
        raise ValueError(f"negative concepts enter only a contrastive loss; {m.name} with these settings has none")
    negative_refs = [load_reference_images(refs) for refs in negatives]
    # the negatives by one digest: a long-tail call has ~1,000, and every image record repeats the config
    negative_ids = [{"negatives": len(negative_refs), "sha256": hashlib.sha256(json.dumps(
        [[r.content_hash for r in refs] for refs in negative_refs]).encode()).hexdigest()}] if negative_refs else []
    contrast = [{"prompt": p, "references": [r["sha256"] for r in ids]} for p, ids in zip(prompts, ref_ids)] \
        + negative_ids if contrastive else []
    base = {"method": m.name, "settings": dataclasses.asdict(settings), "model_id": model_id,
            "image_encoder_id": enc_id or None, "seed": seed}
    # references enter the run name only for methods that use them (sd shows them on the sheet only)
    configs = [{**base, "prompt": p, "references": ids if m.min_refs else [], **({"contrast_set": contrast} if contrast else {})}
               for p, ids in zip(prompts, ref_ids)]
    runs = [run_name(m.name, cfg) for cfg in configs]
    split = len(concepts) > 1 if concept_dirs is None else concept_dirs
    dirs = [out_dir / concept_dir_name(c.prompt) if split else out_dir for c in concepts]
    todo = {k: [i for i in range(num_images) if not _finished(_artifacts(dirs[k], runs[k], i))]
            for k in range(len(concepts))}
    done = sum(num_images - len(v) for v in todo.values())
    if done:
        log.info("%s: %d of %d images already finished, skipping them", m.name, done, num_images * len(concepts))
    if any(todo.values()):
        if components is None:
            components = load_components(model, image_encoder if m.needs_image_encoder else None, device=device,
                                         dtype=settings.dtype)
        else:
            components.to(device=device, dtype=resolve_dtype(settings.dtype))
        pipe = m.pipeline_cls.from_components(components)
        pipe.model_id, pipe.image_encoder_id = model_id, enc_id
    if any(todo.values()):
        extra = {}
        if getattr(settings, "bootstrap", False):  # SeedSelect: the finished z* (image 0) of resumed concepts
            extra["z_star"] = {k: load_tensors(_artifacts(dirs[k], runs[k], 0)["seeds"], "seeds")[0]["seed"]
                               for k in range(len(concepts)) if todo[k] and 0 not in todo[k]}
        from tqdm.auto import tqdm

        total = num_images * len(concepts)
        bar = tqdm(total=total, initial=done, desc=f"{m.name} {len(concepts)} concept(s)", disable=not progress)

        configured: set[int] = set()

        def save(result: ImageResult) -> None:
            k = result.concept
            if k not in configured:  # with its first image: a run that fails before any image writes nothing
                config = {**configs[k], "preset": preset, "num_images": num_images, "device": device,
                          "versions": _versions()}
                _write_if_changed(dirs[k] / f"{runs[k]}.config.json",
                                  (json.dumps(config, indent=2, sort_keys=True, default=str) + "\n").encode())
                configured.add(k)
            _save(dirs[k], runs[k], result, configs[k], device)
            bar.update(1)

        try:
            if negative_refs:
                extra["negative_reference_images"] = negative_refs
            pipe(prompts, [refs or None for refs in references], image_indices=todo, seed=seed, settings=settings,
                 cache_dir=cache_dir, callback=save, progress=progress, **extra)
        finally:
            bar.close()
    out = []
    for k in range(len(concepts)):
        records = [ImageRecord(json.loads(_artifacts(dirs[k], runs[k], i)["record"].read_text()),
                               _artifacts(dirs[k], runs[k], i)["image"]) for i in range(num_images)]
        generated = [Image.open(r.path) for r in records]
        sheet = io.BytesIO()
        contact_sheet([r.image for r in references[k]], generated).save(sheet, format="PNG")
        _write_if_changed(dirs[k] / f"{runs[k]}.contact.png", sheet.getvalue())
        out.append(records)
    return out


def generate_concept(method: str, prompt: str, refs: str | os.PathLike | Sequence[Any] | None,
                     out_dir: str | os.PathLike, num_images: int, settings: Any = None, seed: int = 0,
                     **kwargs) -> list[ImageRecord]:
    """:func:`generate_concepts` for one concept, written into ``out_dir``."""
    return generate_concepts(method, [Concept(prompt, refs)], out_dir, num_images, settings, seed, **kwargs)[0]


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file untouched (a rerun that makes nothing changes nothing)."""
    if not (path.is_file() and path.read_bytes() == data):
        write_bytes(path, data)


def _save(out_dir: Path, run: str, result: ImageResult, config: dict, device: str) -> None:
    paths = _artifacts(out_dir, run, result.index)
    if _finished(paths):  # never overwrite a finished image
        return
    save_image(paths["image"], result.image, overwrite=True)
    save_tensors(paths["seeds"], result.tensors, metadata={"run": run, "index": str(result.index)}, overwrite=True)
    record = {**config, "index": result.index, "run": run, "device": device,
              "files": {k: p.name for k, p in paths.items()},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.record}
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
