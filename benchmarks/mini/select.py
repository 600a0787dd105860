"""Settings of the claims' methods chosen on validation classes, never on the tail (test) classes.

The validation digits (``mini.data.val_classes``) are made exactly as rare in the diffusion model's
training as the tail digits (same ``imbalance`` and ``n_train_tail``), so a setting that rescues a
concept the UNet barely saw there is the fair proxy for the tail; they are never scored by the claims.
For each method in ``mini.select.grid``, every combination of the candidate values runs over the
claims' settings of that method (from random seeds with the full budget for SeedSelect, no bootstrap:
the traced run that decides z*), ``images_per_class`` images per validation class from a reference set
drawn from the class's pool with the selection's own seed. The candidate with the highest novel
fidelity (correct and not a near-copy, :mod:`benchmarks.mini.metrics`) averaged over the validation
classes wins; ties go to the earlier candidate (list the authors' value first). Writes
``results/mini/selection.json``, which ``mini_claims`` applies."""
from __future__ import annotations

import itertools

import numpy as np

from pipelines.io import write_json

from . import data
from .claims import LABELS, ClaimsRun
from .common import Timer
from .config import MiniConfig
from .evaluator import load_evaluator

SELECTABLE = ("seedselect", "nao-seedselect")
CRITERION = ("the candidate with the highest novel fidelity (classified correctly and not a near-copy of its "
             "references) over the validation digits, ties to the earlier candidate (the authors' value is listed "
             "first); SeedSelect from random seeds with its full budget.")


def candidates(grid: dict[str, list]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def run(cfg: MiniConfig) -> dict:
    sc, timer = cfg.select, Timer()
    val = list(cfg.data.val_classes)
    if not val:
        raise ValueError("mini.data.val_classes is empty: settings need validation classes to be chosen on")
    unknown = sorted(set(sc.grid) - set(SELECTABLE))
    if unknown:
        raise ValueError(f"mini.select.grid: cannot select settings of {unknown}; expected some of {list(SELECTABLE)}")
    missing = sorted(set(sc.grid) - set(cfg.claims.methods))
    if missing:
        raise ValueError(f"mini.select.grid names {missing}, which mini.claims.methods does not run")
    run_ = ClaimsRun(cfg, classes=val, work_dir=sc.work_dir)
    evaluator = load_evaluator(cfg.evaluator_dir)
    test_x, test_y = data.load_split(cfg.data_dir, "test")
    real = {c: data.to_unit(test_x[test_y == c]) for c in val}
    rows, chosen = [], {}
    for method, grid in sc.grid.items():
        best = None
        for values in candidates(grid):
            extra = {"bootstrap": False} if method == "seedselect" else {}
            settings = run_.settings(method, **values, **extra)
            scores = [run_.score(evaluator, run_.unit("select", method, c, sc.seed, sc.images_per_class, settings)["images"],
                                 c, sc.seed, real[c]) for c in val]
            row = {"method": method, "values": values,
                   **{k: float(np.mean([s[k] for s in scores]))
                      for k in ("fidelity", "novel_fidelity", "near_copy_share", "diversity")}}
            rows.append(row)
            if best is None or row["novel_fidelity"] > best["novel_fidelity"]:
                best = row
        chosen[method] = best["values"]
    result = {"val_classes": [cfg.class_names[c] for c in val], "criterion": CRITERION,
              "images_per_class": sc.images_per_class, "seed": sc.seed, "candidates": rows, "chosen": chosen,
              "labels": {m: LABELS[m] for m in chosen}}
    # no timing in the file: the same choice then gives the same bytes, and the stages that apply it do not rerun
    write_json(cfg.selection_path, result)
    return {**result, "seconds": timer.seconds}
