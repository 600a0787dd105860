"""Long-tail reports: ``accuracy.csv`` / ``accuracy.md`` (method x loss x many / medium / few /
overall, mean ± 95% CI over seeds; then each method's gain over real-only, paired by training seed),
DVC metrics and a plot of per-class accuracy against the number of training images, one line per
method."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from benchmarks.intervals import format_interval, notes_for, t_interval
from benchmarks.longtail.evaluation import METRICS
from pipelines.io import save_figure, write_json, write_text

ROW_FIELDS = ["benchmark", "method", "loss", "metric", "mean", "ci95", "seeds", "values", "seed_ids"]
BASELINE = "real"   # the gains' reference: the real training set alone
CLASS_FIELDS = ["benchmark", "method", "loss", "class_name", "train_images", "group", "accuracy"]


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def accuracy_rows(benchmark: str, method: str, loss: str, summary: dict) -> list[dict]:
    """CSV rows of one (method, loss) from :func:`benchmarks.longtail.evaluation.summarise`."""
    return [{"benchmark": benchmark, "method": method, "loss": loss, "metric": m, "mean": summary[m]["mean"],
             "ci95": summary[m]["ci95"], "seeds": len(summary[m]["seeds"]),
             "values": ";".join(f"{v:.6f}" for v in summary[m]["values"]),
             "seed_ids": ";".join(str(s) for s in summary[m]["seeds"])} for m in METRICS]


def write_accuracy_csv(rows: list[dict], path: str | Path) -> Path:
    return write_text(path, _csv(rows, ROW_FIELDS))


def read_accuracy_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "mean": float(r["mean"]), "ci95": float(r["ci95"]), "seeds": int(r["seeds"])} for r in csv.DictReader(f)]


def write_class_csv(rows: list[dict], path: str | Path) -> Path:
    return write_text(path, _csv(rows, CLASS_FIELDS))


def read_class_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "train_images": int(r["train_images"]), "accuracy": float(r["accuracy"])} for r in csv.DictReader(f)]


def _fmt(mean: float, ci: float) -> str:
    return format_interval(mean, ci, 100, 2)


def markdown_table(rows: list[dict], methods: list[str] | None = None, group_sizes: dict[str, int] | None = None) -> str:
    """Methods x losses as rows, many / medium / few / overall as columns (top-1 %, mean ± 95% CI)."""
    cell = {(r["method"], r["loss"], r["metric"]): r for r in rows}
    order = [m for m in (methods or []) if any(r["method"] == m for r in rows)]
    order += sorted({r["method"] for r in rows} - set(order))
    losses = sorted({r["loss"] for r in rows})
    head = [f"{m} ({group_sizes[m]} class{'es' if group_sizes[m] != 1 else ''})" if group_sizes and m in group_sizes else m
            for m in METRICS]
    seeds = sorted({r["seeds"] for r in rows})
    out = [f"Top-1 accuracy (%), mean ± 95% CI (Student t) over {'/'.join(map(str, seeds))} training seeds.\n",
           "| method | loss | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(METRICS)]
    for m in order:
        for loss in losses:
            if any((m, loss, k) in cell for k in METRICS):
                out.append(f"| {m} | {loss} | " + " | ".join(
                    _fmt(cell[(m, loss, k)]["mean"], cell[(m, loss, k)]["ci95"]) if (m, loss, k) in cell else "–"
                    for k in METRICS) + " |")
    note = notes_for("\n".join(out))
    return "\n".join(out + ([f"\n{note}"] if note else [])) + "\n"


def _by_seed(row: dict) -> dict[str, float]:
    """Seed -> value; empty for a row without seed ids (a CSV from before they were written: no pairing)."""
    if not row.get("seed_ids"):
        return {}
    return dict(zip(row["seed_ids"].split(";"), map(float, row["values"].split(";"))))


def paired_gain(row: dict, base: dict) -> tuple[float, float, int]:
    """``(mean, 95% half-width, seeds)`` of ``row`` minus ``base`` over the training seeds both hold,
    each seed's difference one replicate (a seed fixes the classifier's initialisation, so the
    difference leaves out the part of the spread that the seed gives both); NaN where none is shared."""
    mine, theirs = _by_seed(row), _by_seed(base)
    diffs = [mine[s] - theirs[s] for s in mine if s in theirs and not math.isnan(mine[s] - theirs[s])]
    return (*t_interval(diffs), len(diffs)) if diffs else (math.nan, math.nan, 0)


def gains(rows: list[dict]) -> dict[tuple[str, str, str, str], tuple[float, float, int]]:
    """``(benchmark, method, loss, metric) -> paired_gain`` over ``BASELINE`` with the same loss."""
    base = {(r["benchmark"], r["loss"], r["metric"]): r for r in rows if r["method"] == BASELINE}
    return {(r["benchmark"], r["method"], r["loss"], r["metric"]): paired_gain(r, base[(r["benchmark"], r["loss"], r["metric"])])
            for r in rows if r["method"] != BASELINE and (r["benchmark"], r["loss"], r["metric"]) in base}


def gain_table(rows: list[dict], methods: list[str] | None = None) -> str:
    """Methods x losses, many / medium / few / overall: the gain over ``BASELINE`` in points, mean ± 95% CI
    of the per-seed differences; empty without the baseline."""
    g = {(m, loss, k): v for (_, m, loss, k), v in gains(rows).items()}
    if not g:
        return ""
    order = [m for m in (methods or []) if any(key[0] == m for key in g)]
    order += sorted({key[0] for key in g} - set(order))
    seeds = sorted({v[2] for v in g.values()})
    out = [f"Gain over `{BASELINE}` with the same loss (points): mean ± 95% CI (Student t) of the per-seed differences "
           f"over {'/'.join(map(str, seeds))} training seeds (the same seed: the same initialisation).\n",
           "| method | loss | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for m in order:
        for loss in sorted({key[1] for key in g if key[0] == m}):
            out.append(f"| {m} | {loss} | " + " | ".join(
                format_interval(*g[(m, loss, k)][:2], 100, 1, "+") if (m, loss, k) in g else "–" for k in METRICS) + " |")
    note = notes_for("\n".join(out))
    return "\n".join(out + ([f"\n{note}"] if note else [])) + "\n"


def metrics(rows: list[dict]) -> dict:
    """DVC metrics: ``{benchmark: {method: {loss: {metric: {"mean", "ci95", "seeds"[, "gain", "gain_ci95"]}}}}}``,
    the gain over ``BASELINE`` paired by seed (:func:`paired_gain`)."""
    def num(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 6)

    out: dict = {}
    g = gains(rows)
    for r in rows:
        cell = out.setdefault(r["benchmark"], {}).setdefault(r["method"], {}).setdefault(r["loss"], {})[r["metric"]] = {
            "mean": num(r["mean"]), "ci95": num(r["ci95"]), "seeds": r["seeds"]}
        key = (r["benchmark"], r["method"], r["loss"], r["metric"])
        if key in g:
            cell.update(gain=num(g[key][0]), gain_ci95=num(g[key][1]))
    return out


def plot_per_class(class_rows: list[dict], path: str | Path, many_threshold: int, few_threshold: int,
                   title: str = "", bins: int = 12) -> Path:
    """One panel per loss: each class's accuracy (mean over seeds) against its number of real
    training images (log scale), as points, and the mean within log-spaced bins as a line per
    method; dashed lines mark the shot-group boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({r["loss"] for r in class_rows})
    fig, axes = plt.subplots(1, len(losses), figsize=(5.5 * len(losses), 4), squeeze=False)
    counts = np.asarray([r["train_images"] for r in class_rows])
    edges = np.unique(np.geomspace(max(1, counts.min()), counts.max() + 1, bins + 1).round())
    for ax, loss in zip(axes[0], losses):
        for method in sorted({r["method"] for r in class_rows if r["loss"] == loss}):
            sel = [r for r in class_rows if r["loss"] == loss and r["method"] == method]
            x = np.asarray([r["train_images"] for r in sel])
            y = 100 * np.asarray([r["accuracy"] for r in sel])
            points = ax.scatter(x, y, s=6, alpha=0.25)
            which = np.clip(np.digitize(x, edges) - 1, 0, len(edges) - 2)
            centres, means = [], []
            for b in range(len(edges) - 1):
                if (which == b).any():
                    centres.append(np.sqrt(edges[b] * edges[b + 1]))
                    means.append(y[which == b].mean())
            ax.plot(centres, means, marker="o", color=points.get_facecolor()[0][:3], label=method)
        for t in (few_threshold, many_threshold):
            ax.axvline(t, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("real training images of the class")
        ax.set_ylabel("class accuracy (%)")
        ax.set_title(f"{title} {loss}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(rows: list[dict], class_rows: list[dict], out_dir: str | Path, many_threshold: int,
                 few_threshold: int, methods: list[str] | None = None, notes: list[str] = ()) -> dict[str, Path]:
    """``accuracy.md``, ``metrics.json`` and ``per_class_accuracy.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    bench = ", ".join(sorted({r["benchmark"] for r in rows}))
    first = {(r["method"], r["loss"]) for r in class_rows}
    key = min(first) if first else None
    sizes: dict[str, int] = {}
    for r in class_rows:
        if (r["method"], r["loss"]) == key:
            sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    text = (f"# Long-tail accuracy: {bench}\n\n" + "".join(f"{n}\n\n" for n in notes)
            + markdown_table(rows, methods, sizes) + (f"\n{table}" if (table := gain_table(rows, methods)) else ""))
    return {"md": write_text(out_dir / "accuracy.md", text),
            "metrics": write_json(out_dir / "metrics.json", metrics(rows)),
            "plot": plot_per_class(class_rows, out_dir / "per_class_accuracy.png", many_threshold, few_threshold, bench)}
