"""Image classifiers behind one interface: a transformers image-classification model (hub id or
folder) or a timm architecture with a checkpoint. Used to *guide* generation (Discriminative Class
Tokens) and, as a separate instance, to *score* it: the preprocessing is differentiable so a
classifier loss can reach the generator.

``load_classifier("google/vit-large-patch16-224")``,
``load_classifier("timm:resnet50", checkpoint="ckpt.pth", labels="labels.txt")`` or
``load_classifier("clip-zeroshot:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", labels=["house finch", ...])``: a
zero-shot CLIP classifier over the given label names ("a photo of a {label}"), trained on no
benchmark image.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .io import write_text

TIMM_PREFIX = "timm:"
CLIP_ZEROSHOT_PREFIX = "clip-zeroshot:"
CLIP_ZEROSHOT_TEMPLATE = "a photo of a {}"
# Benchmark code marks every classifier that *scores* generated images with this file; such a model
# may never *guide* generation (a method optimised against its own judge would score itself).
EVALUATOR_MARKER = "fidelity_evaluator.json"


def mark_as_evaluator(folder: str | os.PathLike) -> Path:
    """Mark ``folder`` (a saved classifier) as a fidelity evaluator: it can no longer guide generation."""
    path = Path(folder) / EVALUATOR_MARKER
    return write_text(path, '{"role": "fidelity evaluator: scores generated images, never guides them"}\n')


def check_not_evaluator(source: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> None:
    """Raise if ``source`` or ``checkpoint`` belongs to a folder marked as a fidelity evaluator."""
    source = str(source)
    candidates = [Path(source.removeprefix(CLIP_ZEROSHOT_PREFIX))] if not source.startswith(TIMM_PREFIX) else []
    if checkpoint is not None:
        candidates += [Path(checkpoint), Path(checkpoint).parent]
    for folder in candidates:
        if folder.is_dir() and (folder / EVALUATOR_MARKER).is_file():
            raise ValueError(f"{folder} is a fidelity evaluator ({EVALUATOR_MARKER}): it scores generated images "
                             "and cannot guide their generation; use an independent classifier")


@dataclass
class ImageClassifier:
    """A frozen classifier with its label names and its (differentiable) input transform:
    bicubic resize of the short side to ``resize``, centre crop to ``input_size``, mean/std."""

    model: torch.nn.Module
    labels: list[str]
    input_size: tuple[int, int]
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""
    kind: str = "module"  # "transformers", "timm", "clip-zeroshot" or "module"

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "ImageClassifier":
        self.model.to(device=device, dtype=dtype)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W) -> normalised classifier input; differentiable."""
        h, w = images.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.input_size[0], round(h * scale)), max(self.input_size[1], round(w * scale)))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        top, left = (size[0] - self.input_size[0]) // 2, (size[1] - self.input_size[1]) // 2
        x = x[..., top:top + self.input_size[0], left:left + self.input_size[1]]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) in float32 for [0, 1] images; differentiable w.r.t. the images."""
        x = self.preprocess(images.to(self.device)).to(self.dtype)
        out = self.model(x)
        out = getattr(out, "logits", out)
        return out.float()

    def class_index(self, name_or_index: str | int) -> int:
        """Index of a class given by index or by name (case-insensitive; any comma-separated synonym
        of a label matches, e.g. "tabby" for "tabby, tabby cat"). Unknown names raise a ValueError
        that lists close matches."""
        if isinstance(name_or_index, int) or (isinstance(name_or_index, str) and name_or_index.strip().isdigit()):
            index = int(name_or_index)
            if not 0 <= index < len(self.labels):
                raise ValueError(f"class index {index} out of range: {self.source or 'classifier'} has "
                                 f"{len(self.labels)} classes")
            return index
        wanted = _norm(name_or_index)
        names: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            for synonym in [label, *label.split(",")]:
                names.setdefault(_norm(synonym), i)
        if wanted in names:
            return names[wanted]
        close = difflib.get_close_matches(wanted, list(names), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
        raise ValueError(f"unknown class {name_or_index!r} for classifier {self.source or '(module)'} "
                         f"({len(self.labels)} classes){hint}")


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def load_classifier(source: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                    labels: str | os.PathLike | Sequence[str] | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    for_guidance: bool = False) -> ImageClassifier:
    """A transformers image classifier (hub id or folder), ``timm:<architecture>`` with a
    checkpoint, or ``clip-zeroshot:<CLIP id or folder>`` (``labels``: a text file with one class
    name per line, or a list; required by the zero-shot kind). With ``for_guidance`` a classifier
    marked as a fidelity evaluator is refused."""
    source = str(source)
    if for_guidance:
        check_not_evaluator(source, checkpoint)
    if source.startswith(TIMM_PREFIX):
        clf = _load_timm(source[len(TIMM_PREFIX):], checkpoint, labels)
    elif source.startswith(CLIP_ZEROSHOT_PREFIX):
        clf = _load_clip_zeroshot(source[len(CLIP_ZEROSHOT_PREFIX):], labels)
    else:
        clf = _load_transformers(source, labels)
    return clf.to(device=device, dtype=dtype)


def _label_list(labels: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if not path.is_file():
            raise FileNotFoundError(f"label file not found: {path}")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [str(x) for x in labels]


def _load_transformers(source: str, labels) -> ImageClassifier:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    _check_source(source)
    model = AutoModelForImageClassification.from_pretrained(source)
    proc = AutoImageProcessor.from_pretrained(source)
    names = _label_list(labels) or [model.config.id2label[i] for i in range(model.config.num_labels)]
    size = proc.size
    if getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None):
        crop = (int(proc.crop_size["height"]), int(proc.crop_size["width"]))
        resize = int(size.get("shortest_edge") or size.get("height"))
    else:  # resized straight to (height, width), e.g. ViT
        crop = (int(size.get("height") or size["shortest_edge"]), int(size.get("width") or size["shortest_edge"]))
        resize = min(crop)
    return ImageClassifier(model, names, crop, resize, tuple(proc.image_mean), tuple(proc.image_std),
                           source=source, kind="transformers")


def _load_timm(name: str, checkpoint, labels) -> ImageClassifier:
    import timm
    from timm.data import resolve_data_config

    names = _label_list(labels)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {checkpoint}")
    kwargs = {"num_classes": len(names)} if names else {}
    model = timm.create_model(name, pretrained=False, checkpoint_path=str(checkpoint) if checkpoint else "", **kwargs)
    if names is None:
        if model.num_classes != 1000:
            raise ValueError(f"timm:{name} has {model.num_classes} classes: pass labels=<file with one name per line>")
        from timm.data import ImageNetInfo

        names = [ImageNetInfo().index_to_description(i) for i in range(1000)]
    cfg = resolve_data_config({}, model=model)
    size = tuple(int(s) for s in cfg["input_size"][1:])
    resize = int(round(min(size) / float(cfg.get("crop_pct", 1.0))))
    return ImageClassifier(model, names, size, resize, tuple(cfg["mean"]), tuple(cfg["std"]),
                           source=f"{TIMM_PREFIX}{name}", kind="timm")


def _check_source(source: str) -> None:
    from .hub import ensure_available, is_hub_id

    if not is_hub_id(source) and not Path(source).is_dir():
        raise FileNotFoundError(f"classifier folder not found: {source}")
    ensure_available(source, what="classifier", setting="--classifier")


class ClipZeroShotHead(torch.nn.Module):
    """CLIP's image tower and projection, scored by cosine against fixed text embeddings of the
    label prompts, times CLIP's logit scale: logits (B, num_labels)."""

    def __init__(self, vision_model: torch.nn.Module, visual_projection: torch.nn.Module,
                 text_embeds: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection
        self.register_buffer("text_embeds", F.normalize(text_embeds, dim=-1))
        self.register_buffer("logit_scale", logit_scale.detach().exp().reshape(()))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        image = F.normalize(self.visual_projection(pooled), dim=-1)
        return self.logit_scale * image @ self.text_embeds.T


def _load_clip_zeroshot(source: str, labels) -> ImageClassifier:
    """Zero-shot CLIP over ``labels``; the text tower is run once for the prompts, then dropped."""
    import hashlib

    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    names = _label_list(labels)
    if not names:
        raise ValueError(f"{CLIP_ZEROSHOT_PREFIX}{source} needs labels (a file with one class name per line, or a list)")
    normalised = [_norm(n) for n in names]
    repeated = sorted({n for n in normalised if normalised.count(n) > 1})
    if repeated:
        raise ValueError(f"{CLIP_ZEROSHOT_PREFIX}{source}: repeated label names {repeated[:5]}")
    _check_source(source)
    clip = CLIPModel.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    proc = CLIPImageProcessor.from_pretrained(source)
    prompts = [CLIP_ZEROSHOT_TEMPLATE.format(n) for n in names]
    with torch.no_grad():
        tok = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        text = clip.text_projection(clip.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output)
    head = ClipZeroShotHead(clip.vision_model, clip.visual_projection, text, clip.logit_scale)
    crop = proc.crop_size if getattr(proc, "do_center_crop", True) else proc.size
    size = (int(crop["height"]), int(crop["width"]))
    resize = int(proc.size.get("shortest_edge") or min(size))
    # the labels and the prompt template define this classifier: they are part of its name (DCT
    # caches tokens by classifier source)
    digest = hashlib.sha256(json.dumps([CLIP_ZEROSHOT_TEMPLATE, names]).encode()).hexdigest()[:12]
    return ImageClassifier(head, names, size, resize, tuple(proc.image_mean), tuple(proc.image_std),
                           source=f"{CLIP_ZEROSHOT_PREFIX}{source}#labels-{digest}", kind="clip-zeroshot")
