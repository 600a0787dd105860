"""What the paper's recipe is worth on the offline benchmark (issue 10): SeedSelect and NAO-SeedSelect
with the contrastive multi-class loss vs the authors' per-concept loss, with and without bootstrap
resampling, each run as a synthesis *variant* of the few-shot benchmark (``fewshot.synthesis.variants``:
same support sets, same contrast sets, same seeds).

For each variant: fidelity of its images of the mini world's tail classes (the independent mini
evaluator's accuracy; never the DCT guide or SeedSelect's CLIP), novel fidelity and near-copy share
(against the support images the variant was given; benchmarks.mini.metrics), diversity (real = 1),
optimiser updates and seconds per image (from the per-image records the pipelines wrote),
and the few-shot accuracy gain over real-only at each shot, paired by episode (the evaluate stage's
gains and intervals). Fidelity and diversity intervals are Student-t over the synthesis groups (one
contrast set per shot and trial), the unit that is resampled when support sets are redrawn.

``python -m benchmarks.fewshot.recipe --params params.yaml`` writes ``<results>/<benchmark>/recipe.md``
and ``recipe.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.fewshot import synthesis
from benchmarks.fewshot.stages import FewShotParams, Run
from benchmarks.intervals import format_interval, notes_for, t_interval
from benchmarks.params import load_section
from pipelines.io import write_json, write_text

log = logging.getLogger("benchmarks.fewshot.recipe")


@dataclass
class RecipeParams:
    benchmark: str = "data/fewshot/mini-digits-source/spec.json"
    evaluator: str = "data/mini/evaluator"      # the mini world's independent evaluator (fidelity only)
    mini_data: str = "data/mini/data"           # real held-out images: the diversity reference
    tail_classes: list[str] = field(default_factory=lambda: ["two", "five"])
    head: str = "linear"
    # (label, variant) rows of the table; each variant must be a method of fewshot.synthesis
    rows: dict[str, str] = field(default_factory=lambda: {
        "SeedSelect, contrastive + bootstrap": "seedselect",
        "SeedSelect, per-concept + bootstrap": "seedselect-per-concept",
        "SeedSelect, per-concept (the authors')": "seedselect-per-concept-no-bootstrap",
        "NAO-SeedSelect, contrastive": "nao-seedselect"})


def _records(run: Run, variant: str) -> list[dict]:
    """The per-image JSON records of a variant's runs (matched by its resolved settings and models)."""
    settings = synthesis.apply_selection(dict(run.p.synthesis.settings), run.p.synthesis.selection)
    gen = synthesis.Generation(settings, run.p.synthesis.variants)
    method = gen.resolved(variant)[0]
    ident = json.loads(json.dumps(gen.identity(variant)))   # tuples as the records hold them
    out = []
    for path in sorted((run.dir / "generation-runs").glob(f"{method}-*/*/{method}-*-[0-9][0-9][0-9][0-9][0-9].json")):
        rec = json.loads(path.read_text())
        if rec.get("settings") == ident["settings"] and rec.get("model_id") == ident["model"]:
            out.append(rec)
    return out


def _load(paths) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(x).convert("RGB"))).permute(2, 0, 1)
                        for x in paths]).float() / 255


def _gains(run: Run, variant: str, head: str) -> dict[int, tuple[float, float]]:
    """shot -> (gain over real-only, its 95% half-width) from the evaluate stage's accuracy table."""
    from benchmarks.fewshot.reports import read_accuracy_csv

    return {r["shot"]: (r["gain"], r["gain_ci95"]) for r in read_accuracy_csv(run.results / "accuracy.csv")
            if r["method"] == variant and r["head"] == head and r["gain"] is not None}


def measure(p: RecipeParams, fs: FewShotParams) -> dict:
    from benchmarks.mini import data as mini_data
    from benchmarks.mini.config import DIGIT_NAMES
    from benchmarks.mini.evaluator import load_evaluator
    from benchmarks.mini.metrics import diversity, fidelity, memorisation

    run = Run(fs, p.benchmark)
    evaluator = load_evaluator(p.evaluator)
    test_x, test_y = mini_data.load_split(p.mini_data, "test")
    labels = {c: DIGIT_NAMES.index(c) for c in p.tail_classes}
    real = {c: mini_data.to_unit(test_x[test_y == labels[c]]) for c in p.tail_classes}
    rows = synthesis.read_manifest(run.dir / "synthesis.csv")
    out = {}
    for label, variant in p.rows.items():
        mine = [r for r in rows if r.method == variant and r.class_name in p.tail_classes]
        if not mine:
            raise ValueError(f"recipe row {label!r}: no synthetic images of {variant!r} for {p.tail_classes} in "
                             f"{run.dir / 'synthesis.csv'}; list it in fewshot.synthesis.methods")
        per_group: dict[str, list[float]] = {k: [] for k in ("fid", "novel", "copies", "div")}
        for key in sorted({(r.shot, r.trial) for r in mine}):   # one contrast set per (shot, trial)
            g: dict[str, list[float]] = {k: [] for k in per_group}
            for c in p.tail_classes:
                rows_c = [r for r in mine if (r.shot, r.trial) == key and r.class_name == c]
                images = _load([r.path for r in rows_c])
                refs = _load([x for x in rows_c[0].refs.split(";") if x])
                mem = memorisation(evaluator, images, refs, real[c], label=labels[c])
                g["fid"].append(fidelity(evaluator, images, labels[c]))
                g["novel"].append(mem["novel_fidelity"])
                g["copies"].append(mem["near_copy_share"])
                g["div"].append(diversity(evaluator, images, real[c]))
            for k in per_group:
                per_group[k].append(float(np.mean(g[k])))
        records = _records(run, variant)
        if not records:
            raise ValueError(f"recipe row {label!r}: no per-image records of {variant!r} under "
                             f"{run.dir / 'generation-runs'}; rerun the synthesize stage")
        out[variant] = {
            "label": label, "groups": len(per_group["fid"]), "tail_fidelity": t_interval(per_group["fid"]),
            "tail_novel_fidelity": t_interval(per_group["novel"]), "near_copy_share": t_interval(per_group["copies"]),
            "tail_diversity": t_interval(per_group["div"]),
            "updates_per_image": float(np.mean([r.get("updates", 0) for r in records])),
            "seconds_per_image": float(np.mean([r.get("seconds", 0.0) for r in records])),
            "images": len(records), "gain_over_real_only": _gains(run, variant, p.head)}
    return {"benchmark": run.spec.name, "head": p.head, "tail_classes": p.tail_classes, "variants": out,
            "shots": list(fs.shots)}


def _pm(value: tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    return format_interval(value[0], value[1], scale, digits)


def render(result: dict, target_row: str = "seedselect", baseline_row: str = "seedselect-per-concept-no-bootstrap") -> str:
    v = result["variants"]
    shots = result["shots"]
    lines = [f"# What the recipe is worth: {result['benchmark']}", "",
             "Generated by `python -m benchmarks.fewshot.recipe` (stage `mini_fewshot_recipe`). Each row is a "
             "synthesis variant of the few-shot benchmark: the same support sets, contrast sets (all test classes "
             "at a shot and trial) and seeds; only the loss and bootstrap differ.", "",
             f"Tail fidelity: accuracy of the independent mini evaluator on the images of {', '.join(result['tail_classes'])}; "
             "novel fidelity: the same, counting near-copies of the variant's own support images as failures; "
             "near-copies: share of images closer to a support image than 95% of held-out real images are to "
             "their nearest other; diversity: nearest-other-image distance over the same for real images "
             "(real = 1; copies ~0). Their ± "
             "is a Student-t 95% interval over the synthesis groups (shot, trial). Gains: "
             f"{result['head']} head, accuracy minus real-only, paired by episode, with the evaluate stage's interval.",
             "", "| variant | tail fidelity (%) | novel fidelity (%) | near-copies (%) | diversity | updates / image "
             "| s / image | " + " | ".join(f"gain {k}-shot (points)" for k in shots) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(shots)]
    for name, r in v.items():
        gains = [(_pm(r["gain_over_real_only"][k], 100) if k in r["gain_over_real_only"] else "–") for k in shots]
        lines.append(f"| {r['label']} | {_pm(r['tail_fidelity'], 100)} | {_pm(r['tail_novel_fidelity'], 100)} | "
                     f"{_pm(r['near_copy_share'], 100)} | {_pm(r['tail_diversity'], 1, 2)} | "
                     f"{r['updates_per_image']:.1f} | {r['seconds_per_image']:.3f} | " + " | ".join(gains) + " |")
    if note := notes_for("\n".join(lines)):
        lines += ["", note]
    if target_row in v and baseline_row in v:
        a, b = v[target_row], v[baseline_row]
        ratio = a["updates_per_image"] / b["updates_per_image"]
        met = a["tail_fidelity"][0] >= b["tail_fidelity"][0] and ratio <= 0.25
        lines += ["", f"Target (issue 10): contrastive + bootstrap reaches at least the authors' per-concept tail "
                  f"fidelity at ≤ 1/4 of its optimiser updates per image: fidelity {100 * a['tail_fidelity'][0]:.1f}% vs "
                  f"{100 * b['tail_fidelity'][0]:.1f}%, updates ratio {ratio:.2f} — **{'met' if met else 'not met'}**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fewshot.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="fewshot_recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = load_section(RecipeParams, args.section, args.params)
    fs = load_section(FewShotParams, "fewshot", args.params)
    result = measure(p, fs)
    out = Path(fs.results_dir) / result["benchmark"]
    write_json(out / "recipe.json", result)
    write_text(out / "recipe.md", render(result))
    print(json.dumps({k: {"tail_fidelity": r["tail_fidelity"], "updates_per_image": r["updates_per_image"]}
                      for k, r in result["variants"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
