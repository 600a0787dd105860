"""Synthetic support images: a manifest of every image to make, and a resumable worker.

The manifest has one row per image. Rows of one (method, shot, trial) form a *group*: the support
sets of every class of the split at that shot and trial, i.e. one **contrast set** of classes. The
generator is called once per group with all its classes, so SeedSelect and NAO-SeedSelect optimise
the classes together with the paper's contrastive multi-class loss (and bootstrap resampling, in the
``fast`` preset); plain SD and DCT treat the classes independently. The split's classes at a (shot,
trial) rather than each episode's N-way set: episodes reuse a few support sets per class (that bounds
generation cost), and an episode's classes are a subset of the split's, so every episode's classes
were contrasted with each other.

A *generator* is any callable ``fn(concepts, out_paths, seed)`` where ``concepts`` is a list of
``(prompt, ref_paths)`` and ``out_paths[c]`` the images to write for concept c (deterministic in
``seed``). One-concept callables ``fn(prompt, ref_paths, out_paths, seed)`` are wrapped by
:func:`per_concept`. Generators are found by name: registered callables, ``"module:function"`` import
strings (one-concept), or the generation methods of :mod:`pipelines` (``sd``, ``seedselect``,
``nao-seedselect``, ``dct``) through :func:`pipelines.generate.generate_concepts`. The method
``real-only`` makes no images.

Each image's path holds a key that hashes what made it (method, generation settings, seed and the
group's classes, prompts and references), so changed settings never reuse old images. A group runs
into a scratch directory; each image is then renamed onto its final path, so a file under its final
name is always complete. A rerun skips groups whose images all exist."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import astuple, dataclass, fields
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image
from tqdm.auto import tqdm

from benchmarks.fewshot.registry import unknown_error
from benchmarks.fewshot.sampling import SupportSet, key_seed, write_text_if_changed
from benchmarks.worksharing import ClaimBoard
from pipelines.io import check_image

REAL_ONLY = "real-only"
PIPELINE_METHODS = ("sd", "seedselect", "nao-seedselect", "dct")
Generator = Callable[[list[tuple[str, list[Path]]], list[list[Path]], int], None]
_GENERATORS: dict[str, Generator] = {}


class SynthesisError(RuntimeError):
    """A generator failed or wrote no / an unreadable image; the message names the class and image."""


def per_concept(fn: Callable[[str, list[Path], list[Path], int], None]) -> Generator:
    """A group generator from a one-concept generator ``fn(prompt, ref_paths, out_paths, seed)``: each
    concept of a group is made independently, from the group's seed."""
    def generate(concepts, out_paths, seed):
        for (prompt, refs), outs in zip(concepts, out_paths):
            fn(prompt, refs, outs, seed)

    generate.__name__ = getattr(fn, "__name__", "generator")
    generate.one_concept = fn
    return generate


def register_generator(name: str, fn: Generator, overwrite: bool = False, contrast: bool = False) -> None:
    """Register ``fn`` under ``name``: a group generator (``contrast=True``) or a one-concept one."""
    if name == REAL_ONLY:
        raise ValueError(f"{REAL_ONLY!r} is reserved for 'no synthetic images'")
    if name in _GENERATORS and not overwrite:
        raise ValueError(f"generator {name!r} is already registered")
    _GENERATORS[name] = fn if contrast else per_concept(fn)


CALL_KEYS = ("preset", "model", "image_encoder", "device", "dtype", "cache_dir", "work_dir", "negatives")
_SHARED_COMPONENTS: dict = {}


def shared_components(model: str, image_encoder: str | None, device: str, dtype: str):
    """One copy of the models per (model, device, dtype) for every method of a run; the image encoder is
    added when the first method that needs it asks."""
    from pipelines.loading import load_components

    key = (str(model), device, dtype)
    comps = _SHARED_COMPONENTS.get(key)
    if comps is None:
        comps = _SHARED_COMPONENTS[key] = load_components(model, image_encoder, device=device, dtype=dtype)
    elif image_encoder is not None and comps.image_encoder is None:
        extra = load_components(model, image_encoder, device=device, dtype=dtype)
        comps.image_encoder, comps.image_processor = extra.image_encoder, extra.image_processor
        comps.image_encoder_id = extra.image_encoder_id
    return comps


def generation_identity(method: str, settings: dict | None = None) -> dict:
    """What decides a pipeline method's images besides its inputs: the resolved settings dataclass,
    the preset, the model ids and, for a contrastive method, the negatives table's content (JSON-able;
    hashed into every image path)."""
    from pipelines.generate import contrasts
    from pipelines.loading import DEFAULT_IMAGE_ENCODER_ID, DEFAULT_MODEL_ID
    from pipelines.registry import get_method

    settings = dict(settings or {})
    m = get_method(method)
    preset, device = settings.get("preset", "reference"), settings.get("device") or "cpu"
    resolved = m.settings(preset, device, **((settings.get("methods") or {}).get(method) or {}))
    if settings.get("dtype"):
        resolved = dataclasses.replace(resolved, dtype=settings["dtype"])
    identity = {"method": m.name, "preset": preset, "settings": dataclasses.asdict(resolved),
                "model": str(settings.get("model") or DEFAULT_MODEL_ID),
                "image_encoder": str(settings.get("image_encoder") or DEFAULT_IMAGE_ENCODER_ID)
                if m.needs_image_encoder else None}
    if settings.get("negatives") and contrasts(m, resolved, 2):
        identity["negatives"] = read_negatives(settings["negatives"])["sha256"]
    return identity


def write_negatives(path: str | Path, classes: list[tuple[str, list[str]]]) -> Path:
    """The negatives table of a synthesize stage: ``(class, reference paths)`` of every class a
    contrastive method pushes its images from (``negatives`` generation setting), with the
    references' content hashes, so that changed images change the identity of what they shaped."""
    table = [{"class": c, "references": [str(r) for r in refs], "sha256": [_file_digest(str(r)) for r in refs]}
             for c, refs in classes]
    return write_text_if_changed(path, json.dumps({"classes": table}, indent=1) + "\n")


def read_negatives(path: str | Path) -> dict:
    """``{"classes": [...], "sha256": <digest of the file>}``; a missing or damaged file is one line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        classes = json.loads(raw)["classes"]
    except FileNotFoundError:
        raise FileNotFoundError(f"negatives table {path} not found (the synthesize stage writes it)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"negatives table {path} is damaged ({e}); run the synthesize stage again") from None
    return {"classes": classes, "sha256": hashlib.sha256(raw).hexdigest()[:16]}


def pipeline_generator(method: str, settings: dict | None = None) -> Generator:
    """Group generator onto :func:`pipelines.generate.generate_concepts` (one call per contrast set).

    ``settings`` holds generate_concepts' keyword arguments (``preset``, ``model``, ``image_encoder``,
    ``device``, ``dtype``, ``cache_dir``), ``work_dir`` (where each group's run folder stays, so an
    interrupted group resumes image by image; default: a temporary folder) and ``methods: {method:
    {setting: value}}``, overrides of the method's settings dataclass on top of the preset (e.g.
    ``prompt_template``, DCT's ``classifier``), and ``negatives``, a table (:func:`write_negatives`) of
    classes that a contrastive method pushes every image from besides the group's own (the table's
    classes whose references are a group concept's are that concept). Models are loaded once and
    shared by every method of the process; the negatives' files are hashed once per generator and
    decoded again only to encode them, their pixels never held (``ReferenceFile``); ``cache_dir``
    should outlive the call, so that reference encodings, inversions and DCT class tokens are computed once per class
    rather than once per support set."""
    from pipelines.registry import get_method

    settings = dict(settings or {})
    per_method = settings.pop("methods", None) or {}
    unknown = sorted(set(settings) - set(CALL_KEYS))
    if unknown:
        raise ValueError(f"unknown generation setting(s) {unknown}; expected some of {list(CALL_KEYS)} "
                         "and 'methods: {method: {setting: value}}'")
    m = get_method(method)
    preset, device, dtype = settings.get("preset", "reference"), settings.get("device"), settings.get("dtype")
    identity = generation_identity(method, {**settings, "methods": per_method})
    negatives = read_negatives(settings["negatives"])["classes"] if "negatives" in identity else []
    loaded: dict[tuple[str, ...], list] = {}

    def negatives_for(concepts: list[tuple[str, list[Path]]]) -> list[list]:
        from pipelines.references import load_reference_images

        own = {tuple(str(r) for r in refs) for _, refs in concepts}
        out = []
        for entry in negatives:
            key = tuple(entry["references"])
            if key and key not in own:
                if key not in loaded:
                    loaded[key] = load_reference_images(list(key), lazy=True)  # only their encodings are used
                out.append(loaded[key])
        return out

    def generate(concepts: list[tuple[str, list[Path]]], out_paths: list[list[Path]], seed: int) -> None:
        from pipelines.generate import Concept, default_device, generate_concepts

        dev = device or default_device()
        method_settings = m.settings(preset, dev, **per_method.get(method, {}))
        if dtype:
            method_settings = dataclasses.replace(method_settings, dtype=dtype)
        comps = shared_components(identity["model"], identity["image_encoder"], dev, method_settings.dtype or "fp32")
        key = hashlib.sha256(json.dumps([identity, seed, [[p, [str(r) for r in refs]] for p, refs in concepts]],
                                        sort_keys=True).encode()).hexdigest()[:16]
        with tempfile.TemporaryDirectory(prefix=".gen-") as tmp:
            work = Path(settings["work_dir"]) / f"{m.name}-{key}" if settings.get("work_dir") else Path(tmp)
            per_concept_records = generate_concepts(
                method, [Concept(p, [str(r) for r in refs] or None) for p, refs in concepts], work,
                max(len(o) for o in out_paths), method_settings, seed, preset=preset, device=dev, components=comps,
                cache_dir=settings.get("cache_dir") or Path(tmp) / "cache", progress=False, concept_dirs=True,
                negatives=negatives_for(concepts))
            for records, outs in zip(per_concept_records, out_paths):
                for record, out in zip(records, outs):
                    shutil.copyfile(record.path, out)

    generate.__name__ = f"pipelines:{method}"
    return generate


def resolve_variant(name: str, variants: dict[str, dict], settings: dict) -> tuple[str, dict]:
    """A variant (``name: {method: <pipeline method>, <setting>: <value>, ...}``) as its pipeline method
    and the generation settings with its overrides; any other name as it is."""
    if name not in variants:
        return name, settings
    spec = dict(variants[name])
    base = spec.pop("method", None)
    if base not in PIPELINE_METHODS:
        raise ValueError(f"variant {name!r}: 'method' must be one of {list(PIPELINE_METHODS)}, got {base!r}")
    methods = dict(settings.get("methods") or {})
    methods[base] = {**(methods.get(base) or {}), **spec}
    return base, {**settings, "methods": methods}


BENCHMARK_CLASSES = "benchmark-classes"   # a classifier_labels value: the synthesised classes' display names


def bind_class_labels(settings: dict, names: list[str], path: str | Path) -> dict:
    """``settings`` with every per-method ``classifier_labels: benchmark-classes`` replaced by a file
    (``path``, one name per line) of ``names``: e.g. DCT's zero-shot guide over the test classes."""
    per_method = settings.get("methods") or {}
    if not any(m.get("classifier_labels") == BENCHMARK_CLASSES for m in per_method.values()):
        return settings
    write_text_if_changed(path, "".join(f"{n}\n" for n in names))
    bound = {k: ({**m, "classifier_labels": str(path)} if m.get("classifier_labels") == BENCHMARK_CLASSES else m)
             for k, m in per_method.items()}
    return {**settings, "methods": bound}


def apply_selection(settings: dict, path: str | Path | None) -> dict:
    """``settings`` with the values a selection stage chose on validation classes (``{"chosen": {method:
    {setting: value}}}``, e.g. ``results/mini/selection.json``) set on each method; None: unchanged."""
    if not path:
        return settings
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings selection {path} not found (run the stage that writes it first)")
    chosen = json.loads(path.read_text()).get("chosen") or {}
    methods = dict(settings.get("methods") or {})
    for method, values in chosen.items():
        methods[method] = {**(methods.get(method) or {}), **values}
    return {**settings, "methods": methods}


@dataclass
class Generation:
    """How a stage's method names (pipeline methods, variants, registered generators) become generators,
    the identities hashed into image names, and the references each needs: one place for the few-shot
    and long-tail synthesize stages."""
    settings: dict
    variants: dict

    def resolved(self, name: str) -> tuple[str, dict]:
        return resolve_variant(name, self.variants, self.settings)

    def identity(self, name: str) -> dict:
        method, s = self.resolved(name)
        return generation_identity(method, s) if method in PIPELINE_METHODS else {"method": name}

    def refs_needed(self, name: str) -> int:
        return min_refs(self.resolved(name)[0])

    def generator(self, name: str) -> Generator:
        return get_generator(*self.resolved(name))


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
        return per_concept(getattr(importlib.import_module(module), attr))
    raise unknown_error("unknown generation method", name, sorted(_GENERATORS) + list(PIPELINE_METHODS))


@dataclass(frozen=True)
class SynthesisRow:
    path: str          # deterministic: <root>/<method>/<class>/<shot>shot-t<trial>-<key>-<image>.png
    method: str
    benchmark: str
    class_name: str
    shot: int
    trial: int
    image: int         # position j of the image among its class's images in the group (out_paths[c][j])
    seed: int          # the group's seed, given to the generator
    prompt: str
    refs: str          # reference image paths, ';'-separated

    @property
    def group(self) -> tuple[str, int, int, int]:
        """The contrast set: the rows of every class made by one generator call."""
        return (self.method, self.shot, self.trial, self.seed)


FIELDS = [f.name for f in fields(SynthesisRow)]


def class_dir_name(class_name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in class_name)


def _file_digest(path: str) -> str:
    """Content hash of a reference image (missing: its path, and run_manifest names it as missing)."""
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else str(path)


def build_manifest(supports: Iterable[SupportSet], methods: Iterable[str], images_per_support: int | Callable[[SupportSet], int],
                   out_root: str | Path, ref_paths: Callable[[SupportSet], list[Path]],
                   prompt_for: Callable[[str], str], seed: int,
                   identity: Callable[[str], dict] = lambda method: {"method": method},
                   refs_needed: Callable[[str], int] = min_refs) -> list[SynthesisRow]:
    """One row per image to make: every generating method x contrast set (the classes of a split at a
    shot and trial) x class x ``images_per_support`` (a number, or a function of the support set, e.g. a
    long-tail class's top-up count). ``identity(method)`` is hashed into the paths
    with the group's seed, classes, prompts and reference contents (:func:`generation_identity` for
    pipelines), so the same inputs give the same names in any data folder."""
    out_root = Path(out_root)
    supports = sorted(supports, key=lambda s: (s.split, s.shot, s.trial, s.class_name))
    rows = []
    for method in methods:
        if method == REAL_ONLY:
            continue
        need, ident = refs_needed(method), identity(method)
        for (split, shot, trial), group in groupby(supports, key=lambda s: (s.split, s.shot, s.trial)):
            group = [s for s in group if len(s.rows) >= need]  # e.g. NAO at 1-shot: no path between seeds
            if not group:
                continue
            benchmark = group[0].benchmark
            members = [(s.class_name, prompt_for(s.class_name), [str(p) for p in ref_paths(s)]) for s in group]
            group_seed = key_seed(seed, "synthesis", method, benchmark, split, shot, trial)
            content = [(c, prompt, [_file_digest(r) for r in refs]) for c, prompt, refs in members]
            key = hashlib.sha256(json.dumps([ident, group_seed, content], sort_keys=True).encode()).hexdigest()[:10]
            for s, (_, prompt, refs) in zip(group, members):
                for j in range(images_per_support(s) if callable(images_per_support) else images_per_support):
                    path = out_root / method / class_dir_name(s.class_name) / f"{shot}shot-t{trial}-{key}-{j:03d}.png"
                    rows.append(SynthesisRow(str(path), method, benchmark, s.class_name, shot, trial, j,
                                             group_seed, prompt, ";".join(refs)))
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
                 progress: bool = True, board: ClaimBoard | None = None, poll_s: float = 2.0) -> SynthesisReport:
    """Make every image of ``rows`` that does not exist yet (see the module docstring).

    With a ``board`` any number of processes share the manifest: each claims a group before making
    it, skips groups other processes hold, and returns once every group is finished (taking over the
    groups of processes that died)."""
    report = SynthesisReport()
    groups: dict[tuple, list[SynthesisRow]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    generators: dict[str, Generator] = {}
    bar = tqdm(total=len(groups), desc="synthesis", unit="group", disable=not progress)
    pending = dict(groups)
    while pending:
        progressed = False
        for gkey, group in list(pending.items()):
            missing = [r for r in group if not check_image(r.path, "synthetic image")]
            if not missing:
                report.skipped += len(group)
                del pending[gkey]
                bar.update(1)
                continue
            claim = hashlib.sha256(repr(gkey).encode()).hexdigest()[:20]
            if board is not None and not board.try_claim(claim):
                continue  # another process makes it; come back to it at the end
            with board.holding(claim) if board is not None else contextlib.nullcontext():
                missing = [r for r in group if not check_image(r.path, "synthetic image")]
                report.skipped += len(group) - len(missing)
                if missing:
                    _run_group(group, missing, generators, resolve, bar)
                    report.made += len(missing)
                    report.groups_run += 1
            del pending[gkey]
            bar.update(1)
            progressed = True
        if pending and not progressed:
            time.sleep(poll_s)
    bar.close()
    return report


def _run_group(group: list[SynthesisRow], missing: list[SynthesisRow], generators: dict,
               resolve: Callable[[str], Generator], bar) -> None:
    """One generator call for a contrast set, into scratch files; published only once all decode."""
    first = group[0]
    classes = list(dict.fromkeys(r.class_name for r in group))
    where = f"method {first.method!r}, {first.shot}-shot, trial {first.trial}, classes {classes}"
    bar.set_postfix_str(f"{first.method} {first.shot}-shot t{first.trial}")
    if first.method not in generators:
        generators[first.method] = resolve(first.method)
    by_class = {c: sorted((r for r in group if r.class_name == c), key=lambda r: r.image) for c in classes}
    concepts = []
    for c in classes:
        refs = [Path(p) for p in by_class[c][0].refs.split(";") if p]
        for ref in refs:
            if not ref.is_file():
                raise SynthesisError(f"{where}: reference image {ref} of class {c!r} does not exist")
        concepts.append((by_class[c][0].prompt, refs))
    final = [Path(r.path) for r in group]
    for p in {f.parent for f in final}:
        p.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final[0].parents[2], prefix=".synth-") as tmp:
        scratch = {r.path: Path(tmp) / f"{k:06d}.png" for k, r in enumerate(group)}
        outs = [[scratch[r.path] for r in by_class[c]] for c in classes]
        try:
            generators[first.method](concepts, outs, first.seed)
        except Exception as e:
            raise SynthesisError(f"{where}: generator failed while making {missing[0].path}: "
                                 f"{type(e).__name__}: {e}") from e
        for r in missing:  # check the whole group before publishing any of it
            try:
                with Image.open(scratch[r.path]) as im:
                    im.load()
            except Exception as e:
                raise SynthesisError(f"{where}: image {r.path} was not written or does not decode: {e}") from e
        for r in missing:
            os.replace(scratch[r.path], r.path)


def images_by_support(rows: Iterable[SynthesisRow], method: str) -> dict[tuple[str, int, int], list[str]]:
    """(class, shot, trial) -> the image paths ``method`` made for that support set, in order."""
    out: dict[tuple[str, int, int], list[str]] = {}
    for r in sorted((r for r in rows if r.method == method), key=lambda r: (r.class_name, r.shot, r.trial, r.image)):
        out.setdefault((r.class_name, r.shot, r.trial), []).append(r.path)
    return out
