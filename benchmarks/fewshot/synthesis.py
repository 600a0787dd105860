"""Synthetic support images: a manifest of every image to make, and a resumable worker.

A *generator* is any callable ``fn(prompt, ref_paths, out_paths, seed)`` that writes one image to each
of ``out_paths`` (deterministic in ``seed``). Generators are found by name: registered callables,
``"module:function"`` import strings, or the generation methods of :mod:`pipelines` (``sd``,
``seedselect``, ``nao-seedselect``, ``dct``) through ``pipelines.generate_concept``. The method
``real-only`` makes no images.

The manifest has one row per image. Rows of one (method, class, shot, trial) form a *group*: the
generator is called once per group (SeedSelect optimises one seed from the references, then renders
``M`` images), into a scratch directory; each image is then renamed onto its final path, so a file
under its final name is always complete. A rerun skips groups whose images all exist and only
renames the missing images of a partly finished group."""
from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import shutil
import tempfile
from dataclasses import astuple, dataclass, fields
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image
from tqdm.auto import tqdm

from benchmarks.fewshot.registry import unknown_error
from benchmarks.fewshot.sampling import SupportSet, key_seed, write_text_if_changed
from pipelines.io import check_image

REAL_ONLY = "real-only"
PIPELINE_METHODS = ("sd", "seedselect", "nao-seedselect", "dct")
Generator = Callable[[str, list[Path], list[Path], int], None]
_GENERATORS: dict[str, Generator] = {}


class SynthesisError(RuntimeError):
    """A generator failed or wrote no / an unreadable image; the message names the class and image."""


def register_generator(name: str, fn: Generator, overwrite: bool = False) -> None:
    if name == REAL_ONLY:
        raise ValueError(f"{REAL_ONLY!r} is reserved for 'no synthetic images'")
    if name in _GENERATORS and not overwrite:
        raise ValueError(f"generator {name!r} is already registered")
    _GENERATORS[name] = fn


CALL_KEYS = ("preset", "model", "image_encoder", "device", "dtype", "cache_dir")


def pipeline_generator(method: str, settings: dict | None = None) -> Generator:
    """Adapter onto :func:`pipelines.generate.generate_concept`.

    ``settings`` holds generate_concept's keyword arguments (``preset``, ``model``, ``image_encoder``,
    ``device``, ``dtype``, ``cache_dir``) and ``methods: {method: {setting: value}}``, overrides of the
    method's settings dataclass on top of the preset (e.g. ``prompt_template``, DCT's ``classifier``).
    The models are loaded once per generator; the images generate_concept writes are moved, in order,
    onto ``out_paths``. ``cache_dir`` should outlive the call, so that reference encodings, inversions
    and DCT class tokens are computed once per class rather than once per support set."""
    from pipelines.registry import get_method

    settings = dict(settings or {})
    per_method = settings.pop("methods", None) or {}
    unknown = sorted(set(settings) - set(CALL_KEYS))
    if unknown:
        raise ValueError(f"unknown generation setting(s) {unknown}; expected some of {list(CALL_KEYS)} "
                         "and 'methods: {method: {setting: value}}'")
    m = get_method(method)
    kwargs = {k: v for k, v in settings.items() if k != "cache_dir"}
    preset, device = kwargs.get("preset", "reference"), kwargs.get("device")
    cache_dir = settings.get("cache_dir")
    state: dict = {}

    def generate(prompt: str, ref_paths: list[Path], out_paths: list[Path], seed: int) -> None:
        from pipelines.components import DEFAULT_MODEL_ID, load_components
        from pipelines.generate import default_device, generate_concept

        dev = device or default_device()
        method_settings = m.settings(preset, dev, **per_method.get(method, {}))
        if kwargs.get("dtype"):
            method_settings = dataclasses.replace(method_settings, dtype=kwargs["dtype"])
        if "components" not in state:  # loaded once, reused by every support set
            state["components"] = load_components(
                kwargs.get("model", DEFAULT_MODEL_ID), kwargs.get("image_encoder") if m.needs_image_encoder else None,
                device=dev, dtype=method_settings.dtype or "fp32")
        with tempfile.TemporaryDirectory(dir=Path(out_paths[0]).parent, prefix=".gen-") as tmp:
            records = generate_concept(
                method, prompt, [str(p) for p in ref_paths], tmp, len(out_paths), method_settings, seed,
                preset=preset, device=dev, components=state["components"],
                cache_dir=cache_dir or Path(tmp) / "cache", progress=False,
                **{k: v for k, v in kwargs.items() if k in ("model", "image_encoder")})
            if len(records) < len(out_paths):
                raise SynthesisError(f"{method}: asked for {len(out_paths)} images, got {len(records)}")
            for record, out in zip(records, out_paths):
                shutil.move(str(Path(tmp) / record["files"]["image"]), out)

    generate.__name__ = f"pipelines:{method}"
    return generate


def min_refs(method: str) -> int:
    """Reference images a method needs (NAO-SeedSelect interpolates between >= 2 seeds)."""
    if method in PIPELINE_METHODS:
        from pipelines.registry import get_method

        return get_method(method).min_refs
    return 0


def get_generator(name: str, settings: dict | None = None) -> Generator:
    if name in _GENERATORS:
        return _GENERATORS[name]
    if name in PIPELINE_METHODS:
        return pipeline_generator(name, settings)
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    raise unknown_error("unknown generation method", name, sorted(_GENERATORS) + list(PIPELINE_METHODS))


@dataclass(frozen=True)
class SynthesisRow:
    path: str          # deterministic: <root>/<method>/<class>/<shot>shot-t<trial>-<image>.png
    method: str
    benchmark: str
    class_name: str
    shot: int
    trial: int
    image: int         # position j of the image in its group (out_paths[j])
    seed: int          # the group's seed, given to the generator
    prompt: str
    refs: str          # reference image paths, ';'-separated

    @property
    def group(self) -> tuple[str, str, int, int]:
        return (self.method, self.class_name, self.shot, self.trial)


FIELDS = [f.name for f in fields(SynthesisRow)]


def class_dir_name(class_name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in class_name)


def build_manifest(supports: Iterable[SupportSet], methods: Iterable[str], images_per_support: int,
                   out_root: str | Path, ref_paths: Callable[[SupportSet], list[Path]],
                   prompt_for: Callable[[str], str], seed: int) -> list[SynthesisRow]:
    """One row per image to make: every generating method x support set x ``images_per_support``."""
    out_root = Path(out_root)
    rows = []
    for method in methods:
        if method == REAL_ONLY:
            continue
        need = min_refs(method)
        for s in supports:
            if len(s.rows) < need:  # e.g. NAO at 1-shot: no path between seeds; reported as "–"
                continue
            refs = ";".join(str(p) for p in ref_paths(s))
            group_seed = key_seed(seed, "synthesis", method, s.benchmark, s.class_name, s.shot, s.trial)
            for j in range(images_per_support):
                path = out_root / method / class_dir_name(s.class_name) / f"{s.shot}shot-t{s.trial}-{j:03d}.png"
                rows.append(SynthesisRow(str(path), method, s.benchmark, s.class_name, s.shot, s.trial, j,
                                         group_seed, prompt_for(s.class_name), refs))
    return rows


def write_manifest(rows: list[SynthesisRow], path: str | Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    w.writerows(astuple(r) for r in rows)
    return write_text_if_changed(path, buf.getvalue())


def read_manifest(path: str | Path) -> list[SynthesisRow]:
    with open(path, newline="") as f:
        return [SynthesisRow(r["path"], r["method"], r["benchmark"], r["class_name"], int(r["shot"]), int(r["trial"]),
                             int(r["image"]), int(r["seed"]), r["prompt"], r["refs"]) for r in csv.DictReader(f)]


@dataclass
class SynthesisReport:
    made: int = 0
    skipped: int = 0
    groups_run: int = 0


def run_manifest(rows: list[SynthesisRow], resolve: Callable[[str], Generator] = get_generator,
                 progress: bool = True) -> SynthesisReport:
    """Make every image of ``rows`` that does not exist yet (see the module docstring)."""
    report = SynthesisReport()
    groups = [list(g) for _, g in groupby(rows, key=lambda r: r.group)]
    generators: dict[str, Generator] = {}
    bar = tqdm(groups, desc="synthesis", unit="group", disable=not progress)
    for group in bar:
        missing = [r for r in group if not check_image(r.path, "synthetic image")]
        report.skipped += len(group) - len(missing)
        if not missing:
            continue
        first = group[0]
        where = (f"method {first.method!r}, class {first.class_name!r}, {first.shot}-shot, trial {first.trial}")
        bar.set_postfix_str(f"{first.method}/{first.class_name}")
        if first.method not in generators:
            generators[first.method] = resolve(first.method)
        refs = [Path(p) for p in first.refs.split(";") if p]
        for ref in refs:
            if not ref.is_file():
                raise SynthesisError(f"{where}: reference image {ref} does not exist")
        final = [Path(r.path) for r in group]
        final[0].parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final[0].parent, prefix=".synth-") as tmp:
            scratch = [Path(tmp) / p.name for p in final]
            try:
                generators[first.method](first.prompt, refs, scratch, first.seed)
            except Exception as e:
                raise SynthesisError(f"{where}: generator failed while making {missing[0].path}: {type(e).__name__}: {e}") from e
            for r in missing:  # check the whole group before publishing any of it
                try:
                    with Image.open(Path(tmp) / Path(r.path).name) as im:
                        im.load()
                except Exception as e:
                    raise SynthesisError(f"{where}: image {r.path} was not written or does not decode: {e}") from e
            for r in missing:
                (Path(tmp) / Path(r.path).name).replace(r.path)
        report.made += len(missing)
        report.groups_run += 1
    return report


def images_by_support(rows: Iterable[SynthesisRow], method: str) -> dict[tuple[str, int, int], list[str]]:
    """(class, shot, trial) -> the image paths ``method`` made for that support set, in order."""
    out: dict[tuple[str, int, int], list[str]] = {}
    for r in sorted((r for r in rows if r.method == method), key=lambda r: (r.class_name, r.shot, r.trial, r.image)):
        out.setdefault((r.class_name, r.shot, r.trial), []).append(r.path)
    return out
