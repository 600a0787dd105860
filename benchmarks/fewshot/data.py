"""Download, canonicalise and check a few-shot benchmark.

``prepare`` loads the source with ``datasets.load_dataset`` (a hub id, or a local directory of
parquet files; downloads land in the Hugging Face cache, which resumes partial files), maps every
row to the benchmark's class and split, checks integrity, and saves one on-disk dataset with the
columns ``image, class_name, split, label`` (``label`` = position in ``spec.all_classes``). The
saved directory appears complete or not at all, and a rerun whose directory passes the check
returns at once."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.fewshot.registry import SPLITS, BenchmarkSpec, unknown_error
from pipelines.hub import dataset_load_error, ensure_available
from pipelines.io import read_record, write_json, write_record

INTEGRITY_FILE = "integrity.json"


class DatasetIntegrityError(ValueError):
    """A downloaded or prepared dataset does not match its benchmark's expected structure."""


DATASET_SETTING = "fewshot.dataset_ids"


def load_source(spec: BenchmarkSpec, cache_dir: str | None = None) -> datasets.DatasetDict:
    """The real download path: every source split of ``spec.hf_id`` as a ``DatasetDict``. A hub id
    that cannot be reached (or, offline, is not cached) raises :class:`HubUnavailableError` at once."""
    what = f"benchmark {spec.name!r}: dataset"
    ensure_available(spec.hf_id, repo_type="dataset", what=what, setting=f"{DATASET_SETTING}.{spec.name}")
    try:
        return datasets.load_dataset(spec.hf_id, spec.hf_config, cache_dir=cache_dir)
    except Exception as e:
        error = dataset_load_error(spec.hf_id, e, what, f"{DATASET_SETTING}.{spec.name}")
        if error is None:
            raise
        raise error from None


def _class_names(spec: BenchmarkSpec, ds: datasets.Dataset, source_split: str, target: str) -> list[str]:
    labels = ds[spec.label_column]
    if spec.label_mode == "names":
        feature = ds.features[spec.label_column]
        if not isinstance(feature, datasets.ClassLabel):
            raise DatasetIntegrityError(
                f"{spec.hf_id} [{source_split}]: column {spec.label_column!r} is {feature}, not a ClassLabel; "
                f"use label_mode='per_split_rank' for plain integer labels")
        names = [spec.name_aliases.get(n, n) for n in feature.names]
        return [names[i] for i in labels]
    # plain integers: per split or offset globally, so map by rank within the source split
    pool = spec.classes[target]
    distinct = sorted({int(i) for i in labels})
    if len(distinct) != len(pool):
        raise DatasetIntegrityError(
            f"{spec.hf_id} [{source_split}]: {len(distinct)} distinct labels, expected the {len(pool)} classes of split {target!r}")
    rank = {label: pool[k] for k, label in enumerate(distinct)}
    return [rank[int(i)] for i in labels]


def canonicalize(spec: BenchmarkSpec, source: datasets.DatasetDict) -> datasets.Dataset:
    """Map each row of ``source`` to (image, class_name, split, label) following ``spec``."""
    parts = []
    for source_split, target in spec.source_splits.items():
        if source_split not in source:
            raise DatasetIntegrityError(
                f"{spec.hf_id}: source split {source_split!r} missing (has {sorted(source)}); incomplete download?")
        ds = source[source_split]
        for col in (spec.image_column, spec.label_column):
            if col not in ds.column_names:
                raise DatasetIntegrityError(f"{spec.hf_id} [{source_split}]: no column {col!r} (has {ds.column_names})")
        if target == "*" and spec.label_mode != "names":
            raise ValueError(f"benchmark {spec.name!r}: split-by-class source needs label_mode='names'")
        names = _class_names(spec, ds, source_split, target)
        known = set(spec.all_classes)
        for n in set(names) - known:
            raise DatasetIntegrityError(str(unknown_error(f"{spec.hf_id} [{source_split}]: benchmark {spec.name!r} has no class", n, sorted(known))))
        splits = [spec.split_of(n) for n in names] if target == "*" else [target] * len(names)
        wrong = {n for n, s in zip(names, splits) if n not in spec.classes[s]}
        if wrong:
            raise DatasetIntegrityError(f"{spec.hf_id} [{source_split}]: classes {sorted(wrong)[:5]} do not belong to split {target!r}")
        ds = ds.select_columns([spec.image_column])
        if spec.image_column != "image":
            ds = ds.rename_column(spec.image_column, "image")
        position = {c: i for i, c in enumerate(spec.all_classes)}
        ds = ds.add_column("class_name", names).add_column("split", splits)
        ds = ds.add_column("label", [position[n] for n in names])
        parts.append(ds)
    return datasets.concatenate_datasets(parts)


def count_images(ds: datasets.Dataset) -> Counter:
    """(split, class_name) -> number of rows, without decoding any image."""
    return Counter(zip(ds["split"], ds["class_name"]))


def verify(ds: datasets.Dataset, spec: BenchmarkSpec, check_images: bool = True, progress: bool = True) -> dict:
    """Check class counts per split, images per class, totals (the exact figures only for the source
    they describe, ``spec.exact_counts_apply``) and (optionally) that every image decodes. Raises
    :class:`DatasetIntegrityError` listing every mismatch; returns the counts."""
    problems: list[str] = []
    counts = count_images(ds)
    exact = spec.exact_counts_apply
    for split in SPLITS:
        expected = set(spec.classes[split])
        present = {c for (s, c) in counts if s == split}
        if present != expected:
            missing, extra = sorted(expected - present), sorted(present - expected)
            problems.append(f"split {split!r}: {len(present)} classes, expected {len(expected)}"
                            + (f"; missing {missing[:5]}{'…' if len(missing) > 5 else ''}" if missing else "")
                            + (f"; unexpected {extra[:5]}" if extra else ""))
        for c in sorted(present & expected):
            n = counts[(split, c)]
            if exact and spec.images_per_class is not None and n != spec.images_per_class:
                problems.append(f"class {c!r} ({split}): {n} images, expected {spec.images_per_class}")
            elif n < spec.min_images_per_class:
                problems.append(f"class {c!r} ({split}): {n} images, fewer than the minimum {spec.min_images_per_class}")
        total = sum(n for (s, _), n in counts.items() if s == split)
        if exact and split in spec.images_per_split and total != spec.images_per_split[split]:
            problems.append(f"split {split!r}: {total} images, expected {spec.images_per_split[split]}")
    if exact and spec.total_images is not None and ds.num_rows != spec.total_images:
        problems.append(f"{ds.num_rows} images in total, expected {spec.total_images}")
    if not problems and check_images:
        problems += _undecodable(ds, spec, progress)
    if problems:
        raise DatasetIntegrityError(f"benchmark {spec.name!r} ({spec.hf_id}) failed the integrity check:\n  "
                                    + "\n  ".join(problems[:50]) + (f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""))
    return {"splits": {s: {"classes": len(spec.classes[s]),
                           "images": sum(n for (sp, _), n in counts.items() if sp == s)} for s in SPLITS},
            "images": ds.num_rows,
            "exact_counts": f"checked: the figures of {spec.counts_source or spec.hf_id}" if exact else
            f"not checked: the source is not {spec.counts_source}; checked instead: class sets, >= "
            f"{spec.min_images_per_class} per class, split sizes against the source's own dataset card if it has one"}


def _undecodable(ds: datasets.Dataset, spec: BenchmarkSpec, progress: bool) -> list[str]:
    raw = ds.select_columns(["image", "class_name"]).cast_column("image", datasets.Image(decode=False))
    problems = []
    for i, row in enumerate(tqdm(raw, desc=f"{spec.name}: decoding images", disable=not progress, total=raw.num_rows)):
        image = row["image"]
        try:
            data = image["bytes"] if image.get("bytes") is not None else Path(image["path"]).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if min(im.size) < 1:
                    raise ValueError(f"empty image {im.size}")
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported with its row
            problems.append(f"row {i} (class {row['class_name']!r}): image does not decode: {type(e).__name__}: {e}")
    return problems


def prepare(spec: BenchmarkSpec, out_dir: str | Path, source: datasets.DatasetDict | None = None,
            cache_dir: str | None = None, check_images: bool = True, progress: bool = True) -> Path:
    """Download (unless ``source`` is given), canonicalise, check and save ``spec`` under ``out_dir``.

    Skips all work if ``out_dir`` already holds a prepared dataset that passes the count check."""
    out_dir = Path(out_dir)
    if read_record(out_dir / INTEGRITY_FILE, what="prepared dataset record") is not None:  # files re-hashed
        try:
            verify(datasets.load_from_disk(str(out_dir)), spec, check_images=False)
        except DatasetIntegrityError as e:
            raise DatasetIntegrityError(f"{e}\n(the prepared copy in {out_dir} does not match the benchmark; "
                                        "delete that directory to rebuild it)") from None
        return out_dir
    if out_dir.exists():  # a directory without its integrity record is an interrupted earlier attempt
        shutil.rmtree(out_dir)
    if source is None:
        source = load_source(spec, cache_dir)
    ds = canonicalize(spec, source)
    report = verify(ds, spec, check_images=check_images, progress=progress)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ds.save_to_disk(str(tmp))
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    _pin_fingerprint(tmp, files)
    write_record(tmp / INTEGRITY_FILE, {"benchmark": spec.name, "source": spec.hf_id, "spec": spec.to_json(), **report},
                 {p.name: p for p in files}, overwrite=True)
    os.replace(tmp, out_dir)
    return out_dir


def _pin_fingerprint(folder: Path, files: list[Path]) -> None:
    """Replace the saved dataset's fingerprint by a hash of its Arrow data: ``datasets`` derives it
    from the source files' paths and modification times, so identical inputs gave a different
    ``state.json`` on every fresh clone (and a different DVC output hash)."""
    state = json.loads((folder / "state.json").read_text())
    digest = hashlib.sha256()
    for p in files:
        if p.suffix == ".arrow":
            digest.update(p.read_bytes())
    state["_fingerprint"] = digest.hexdigest()[:16]
    write_json(folder / "state.json", state)


def load_prepared(spec: BenchmarkSpec, out_dir: str | Path) -> datasets.Dataset:
    """The prepared dataset of ``spec``; re-checks the counts (cheap) so a damaged copy is caught."""
    out_dir = Path(out_dir)
    if not (out_dir / INTEGRITY_FILE).is_file():
        raise FileNotFoundError(f"{out_dir}: no prepared dataset for benchmark {spec.name!r}; run the download stage first")
    ds = datasets.load_from_disk(str(out_dir))
    verify(ds, spec, check_images=False)
    return ds


def class_index(ds: datasets.Dataset) -> dict[str, np.ndarray]:
    """class_name -> sorted array of the dataset rows of that class."""
    names = np.asarray(ds["class_name"])
    order = np.argsort(names, kind="stable")
    uniq, starts = np.unique(names[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return {str(c): np.sort(order[a:b]) for c, a, b in zip(uniq, starts, bounds)}


def export_images(ds: datasets.Dataset, rows, out_dir: str | Path) -> list[Path]:
    """Write dataset rows as PNG files ``<out_dir>/<row>.png`` (skipping existing ones), e.g. as the
    reference images of a generator. Returns the paths in the order of ``rows``."""
    from pipelines.io import check_image, save_image

    out_dir = Path(out_dir)
    paths = [out_dir / f"{int(r):07d}.png" for r in rows]
    todo = [(int(r), p) for r, p in zip(rows, paths) if not check_image(p, "exported image")]
    for r, p in todo:
        save_image(p, ds[r]["image"].convert("RGB"))
    return paths


def save_spec_json(spec: BenchmarkSpec, path: str | Path) -> Path:
    return write_json(path, spec.to_json())


def read_integrity(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / INTEGRITY_FILE).read_text())
