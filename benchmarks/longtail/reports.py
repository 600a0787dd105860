"""Long-tail reports: ``accuracy.csv`` / ``accuracy.md`` (method x loss x many / medium / few /
overall, mean ± 95% CI over seeds), DVC metrics and a plot of per-class accuracy against the number of
training images, one line per method."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from benchmarks.intervals import format_interval, notes_for
from benchmarks.longtail.evaluation import METRICS
from pipelines.io import save_figure, write_json, write_text

ROW_FIELDS = ["benchmark", "method", "loss", "metric", "mean", "ci95", "seeds", "values"]
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
             "values": ";".join(f"{v:.6f}" for v in summary[m]["values"])} for m in METRICS]


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


def metrics(rows: list[dict]) -> dict:
    """DVC metrics: ``{benchmark: {method: {loss: {metric: {"mean", "ci95", "seeds"}}}}}``."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["benchmark"], {}).setdefault(r["method"], {}).setdefault(r["loss"], {})[r["metric"]] = {
            "mean": None if math.isnan(r["mean"]) else round(r["mean"], 6),
            "ci95": None if math.isnan(r["ci95"]) else round(r["ci95"], 6), "seeds": r["seeds"]}
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
            + markdown_table(rows, methods, sizes))
    return {"md": write_text(out_dir / "accuracy.md", text),
            "metrics": write_json(out_dir / "metrics.json", metrics(rows)),
            "plot": plot_per_class(class_rows, out_dir / "per_class_accuracy.png", many_threshold, few_threshold, bench)}
