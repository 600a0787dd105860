"""Do two runs of the pipeline tell the same story? Compare the DVC metrics of two checkouts (e.g. a
clean ``make repro`` at 1 and at 2 torch threads, which changes floating-point reduction order as
another CPU does) figure by figure against the figures' own 95% intervals, and their ``dvc.lock``
output hashes stage by stage (which outputs are bit-identical).

    python -m benchmarks.compare RUN_A RUN_B [--out results/reproduction.json]

RUN_A / RUN_B are repository roots (their ``results/**/metrics.json`` and ``dvc.lock`` are read).
A figure is a number with an interval beside it: ``{"mean": m, "ci95": c}`` (also ``gain`` /
``gain_ci95``) or ``"<key>": m, "<key>_ci95": c``. For each figure present in both runs: the
difference, whether B's value lies inside A's interval and A's inside B's, and whether the intervals
overlap. Reference point: for two independent runs whose intervals capture all their variation, a
value falls inside the other run's 95% interval about 83% of the time (|N(0, 2)| < 1.96), and two
intervals overlap about 99.4% of the time."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from pipelines.io import write_json, write_text


def figures(metrics: dict, prefix: str = "") -> dict[str, tuple[float, float]]:
    """``path -> (value, ci95)`` for every number of ``metrics`` that has an interval beside it."""
    out: dict[str, tuple[float, float]] = {}
    if not isinstance(metrics, dict):
        return out
    for key, value in metrics.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(figures(value, path))
            continue
        if key.endswith("ci95") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ci = metrics.get("ci95" if key == "mean" else f"{key}_ci95")
        if isinstance(ci, (int, float)) and math.isfinite(value) and math.isfinite(ci):
            out[path] = (float(value), float(ci))
    return out


def run_figures(root: Path) -> dict[str, tuple[float, float]]:
    out = {}
    for path in sorted(Path(root, "results").rglob("metrics.json")):
        rel = path.relative_to(root).as_posix()
        out.update({f"{rel}:{k}": v for k, v in figures(json.loads(path.read_text())).items()})
    return out


def lock_outputs(root: Path) -> dict[str, str]:
    """``stage/out path -> md5`` from ``dvc.lock`` (empty if there is none)."""
    lock = Path(root, "dvc.lock")
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"{name}:{o['path']}": o.get("md5", "") for name, st in stages.items() for o in st.get("outs", [])}


def compare(a: Path, b: Path) -> dict:
    fa, fb = run_figures(a), run_figures(b)
    common = sorted(set(fa) & set(fb))
    if not common:
        raise ValueError(f"no figure with an interval is present in both {a}/results and {b}/results")
    rows = []
    for k in common:
        (va, ca), (vb, cb) = fa[k], fb[k]
        d = vb - va
        rows.append({"figure": k, "a": va, "a_ci95": ca, "b": vb, "b_ci95": cb, "difference": d,
                     "b_inside_a": abs(d) <= ca, "a_inside_b": abs(d) <= cb, "overlap": abs(d) <= ca + cb})
    la, lb = lock_outputs(a), lock_outputs(b)
    outs = sorted(set(la) & set(lb))

    def share(key):
        return sum(r[key] for r in rows) / len(rows)

    return {"a": str(a), "b": str(b), "figures": len(rows),
            "b_inside_a_share": share("b_inside_a"), "a_inside_b_share": share("a_inside_b"),
            "overlap_share": share("overlap"),
            "reference": "independent runs with honest 95% intervals: ~0.83 inside, ~0.994 overlap",
            "identical_outputs": [o for o in outs if la[o] == lb[o]],
            "different_outputs": [o for o in outs if la[o] != lb[o]],
            "only_in_a": sorted(set(fa) - set(fb)), "only_in_b": sorted(set(fb) - set(fa)), "rows": rows}


def render(result: dict) -> str:
    lines = [f"# {result['a']} vs {result['b']}", "",
             f"{result['figures']} figures with intervals; B inside A's 95% interval: "
             f"{100 * result['b_inside_a_share']:.0f}%, A inside B's: {100 * result['a_inside_b_share']:.0f}%, "
             f"intervals overlap: {100 * result['overlap_share']:.0f}% ({result['reference']}).",
             f"Bit-identical stage outputs: {len(result['identical_outputs'])} of "
             f"{len(result['identical_outputs']) + len(result['different_outputs'])}.", "",
             "| figure | A | B | B − A | inside A | inside B |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['figure']} | {r['a']:.4f} ± {r['a_ci95']:.4f} | {r['b']:.4f} ± {r['b_ci95']:.4f} | "
                     f"{r['difference']:+.4f} | {'yes' if r['b_inside_a'] else '**no**'} | "
                     f"{'yes' if r['a_inside_b'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, help="write the comparison as JSON here (and Markdown beside it)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.run_a, args.run_b)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        parser.exit(2, f"error: {e}\n")
    if args.out:
        write_json(args.out, result)
        write_text(args.out.with_suffix(".md"), render(result))
    summary = {k: v for k, v in result.items() if k not in ("rows", "identical_outputs", "different_outputs")}
    summary["identical_outputs"] = len(result["identical_outputs"])
    summary["different_outputs"] = len(result["different_outputs"])
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
