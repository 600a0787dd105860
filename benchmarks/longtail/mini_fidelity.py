"""mini-lt's generated images judged twice: are they their class, and where does SeedSelect's loss see them?

The mini world has what a real benchmark lacks, an independent evaluator (:mod:`benchmarks.mini.evaluator`,
trained on its own balanced split), so ``results/mini-lt/fidelity.{md,json}`` can say for each method and
generated class:

* **evaluator**: how many of the class's generated images the evaluator classifies as that class;
* **encoder**: how many lie nearest to their own class's centroid in the CLIP-style image encoder that
  SeedSelect's semantic loss uses (pretrained on the long-tailed corpus), among the centroids of all
  classes, each the L2-normalised mean embedding of the class's training images (the authors' order).

The same two counts for the real validation images of every class say how far each judge can be
trusted: the evaluator should get them right, and the encoder's count is how well SeedSelect's loss
can tell the classes apart at all. A diagnostic of the mini world only; it chooses nothing.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.fewshot.synthesis import read_manifest
from pipelines.io import write_json, write_text

JUDGES = ("evaluator", "encoder")


def _load(paths: Sequence[str | Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from e
    return out


class Judges:
    """The mini evaluator and the CLIP-style encoder with its class centroids."""

    def __init__(self, evaluator_dir: str | Path, encoder_dir: str | Path, train_paths: Sequence[str],
                 train_labels: Sequence[int], num_classes: int):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from benchmarks.mini.evaluator import load_evaluator

        if not Path(encoder_dir).is_dir():
            raise FileNotFoundError(f"image encoder folder not found: {encoder_dir}")
        self.evaluator = load_evaluator(evaluator_dir)
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir)).eval()
        self.processor = CLIPImageProcessor.from_pretrained(str(encoder_dir))
        emb = torch.cat([self.embed(_load(train_paths[i:i + 256])) for i in range(0, len(train_paths), 256)])
        labels = torch.as_tensor(np.asarray(train_labels))
        missing = [k for k in range(num_classes) if not (labels == k).any()]
        if missing:
            raise ValueError(f"classes {missing} have no training images: no encoder centroid")
        self.centroids = torch.stack([F.normalize(emb[labels == k].mean(0), dim=-1) for k in range(num_classes)])

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Un-normalised projected embeddings through the processor (SeedSelect's reference path)."""
        pix = self.processor(images=list(images), return_tensors="pt").pixel_values
        return self.encoder(pixel_values=pix).image_embeds.float()

    @torch.no_grad()
    def right(self, paths: Sequence[str | Path], label: int) -> dict[str, int]:
        """How many of ``paths`` (one class's images, a few hundred at most) each judge assigns to ``label``."""
        images = _load(paths)
        pixels01 = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
        nearest = (F.normalize(self.embed(images), dim=-1) @ self.centroids.T).argmax(1)
        return {"images": len(paths), "evaluator": int((self.evaluator.predict(pixels01) == label).sum()),
                "encoder": int((nearest == label).sum())}


def fidelity(run, evaluator_dir: str | Path, encoder_dir: str | Path) -> dict:
    """``{"generated": {method: {class: counts}}, "val": {class: counts}}`` for a mini-lt run
    (:class:`benchmarks.longtail.stages.Run` after its synthesize stage)."""
    classes = list(run.spec.classes)
    train, val = run.splits["train"], run.splits["val"]
    judges = Judges(evaluator_dir, encoder_dir, train.paths, train.labels, len(classes))
    made: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in read_manifest(run.manifest_path):
        made[r.method][r.class_name].append(r.path)
    generated = {m: {c: judges.right(paths, classes.index(c)) for c, paths in sorted(by_class.items(),
                                                                                       key=lambda kv: classes.index(kv[0]))}
                 for m, by_class in made.items()}
    val_by_class = defaultdict(list)
    for p, y in zip(val.paths, val.labels):
        val_by_class[int(y)].append(p)
    return {"generated": generated, "val": {c: judges.right(val_by_class[k], k) for k, c in enumerate(classes)}}


def _table(rows: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| class | images | evaluator: its class | encoder: nearest its centroid |", "|---|---|---|---|"]
    for c, n in rows.items():
        lines.append(f"| {c} | {n['images']} | {n['evaluator']} | {n['encoder']} |")
    total = {k: sum(n[k] for n in rows.values()) for k in ("images",) + JUDGES}
    lines.append(f"| all | {total['images']} | {total['evaluator']} | {total['encoder']} |")
    return lines


def write_report(result: dict, out_dir: str | Path, name: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    lines = [f"# Generated images judged: {name}", "",
             "Per method and generated class: how many images the mini world's independent evaluator classifies "
             "as their class (*evaluator*), and how many lie nearest to their class's centroid in the CLIP-style "
             "encoder of SeedSelect's semantic loss, among every class's centroid (the L2-normalised mean "
             "embedding of its training images; *encoder*). The real validation images at the end say how far "
             "each judge can be trusted. A diagnostic: it chooses nothing. Counts from one run of the "
             "synthesize stage: the images are fixed, so there is no interval.", ""]
    for method, rows in result["generated"].items():
        lines += [f"## `{method}`", ""] + _table(rows) + [""]
    lines += ["## Real validation images", "", "How far each judge can be trusted on real images of every class.", ""]
    lines += _table(result["val"]) + [""]
    return {"md": write_text(out_dir / "fidelity.md", "\n".join(lines)),
            "json": write_json(out_dir / "fidelity.json", result)}
