"""Accuracy tables (CSV + markdown), DVC metrics, accuracy-vs-shots plots and sample grids.

Input rows (one per benchmark x method x head x shot) carry ``mean`` and ``ci95`` (fractions in
[0, 1]), the ``gain`` over real-only and its ``gain_ci95`` (empty for real-only), and what the
interval spans: ``episodes``, backbone ``replicates``, support-set ``trials`` and bootstrap
``resamples`` (benchmarks/fewshot/stats.py); tables print percentages, each with a note saying what
its intervals cover."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable

from PIL import Image

from benchmarks.intervals import format_interval, notes_for
from pipelines.io import save_figure, save_image, write_json, write_text

ROW_FIELDS = ["benchmark", "method", "head", "shot", "mean", "ci95", "gain", "gain_ci95", "episodes", "replicates",
              "trials", "resamples"]
_FLOATS, _OPTIONAL, _INTS = ("mean", "ci95"), ("gain", "gain_ci95"), ("shot", "episodes", "replicates", "trials", "resamples")


def _fmt(mean: float, ci: float, sign: str = "") -> str:
    return format_interval(mean, ci, 100, 2, sign)  # n/a: nothing resampled


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 6)


def interval_note(rows: list[dict]) -> str:
    """What the ± of ``rows`` covers, from the fields that made them (one line)."""
    def values(key):
        return "/".join(map(str, sorted({r[key] for r in rows})))

    return (f"± = 95% interval over {values('replicates')} backbone replicate(s), each trained with its own seed, "
            f"and a cluster bootstrap over the {values('trials')} support-set trials per class "
            f"({values('resamples')} resamples; an episode counts as often as its trial is drawn), combined as "
            f"Student t with Welch df from replicates − 1 and trials − 1; Δ = method − real-only, paired by episode "
            f"and replicate, same resampling. Test classes are fixed.")


def write_accuracy_csv(rows: list[dict], path: str | Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (r["benchmark"], r["head"], r["method"], r["shot"])))
    return write_text(path, buf.getvalue())


def read_accuracy_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, **{k: float(r[k]) for k in _FLOATS}, **{k: int(r[k]) for k in _INTS},
                 **{k: float(r[k]) if r[k] else None for k in _OPTIONAL}} for r in csv.DictReader(f)]


def markdown_table(rows: list[dict], methods: list[str] | None = None) -> str:
    """One table per (benchmark, head): methods as rows; per shot, ``mean ± 95% CI`` and the gain
    over real-only ``Δ ± 95% CI``, in %; under each table, what its intervals cover."""
    out = []
    for bench in sorted({r["benchmark"] for r in rows}):
        for head in sorted({r["head"] for r in rows if r["benchmark"] == bench}):
            sel = [r for r in rows if r["benchmark"] == bench and r["head"] == head]
            shots = sorted({r["shot"] for r in sel})
            order = [m for m in (methods or []) if any(r["method"] == m for r in sel)]
            order += sorted({r["method"] for r in sel} - set(order))
            cell = {(r["method"], r["shot"]): r for r in sel}
            episodes = sorted({r["episodes"] for r in sel})
            start = len(out)
            out.append(f"### {bench} — {head} head ({'/'.join(map(str, episodes))} episodes, accuracy % ± 95% CI)\n")
            out.append("| method | " + " | ".join(f"{k}-shot | Δ {k}-shot" for k in shots) + " |")
            out.append("|---|" + "---|---|" * len(shots))
            for m in order:
                cells = []
                for k in shots:
                    r = cell.get((m, k))
                    cells.append(_fmt(r["mean"], r["ci95"]) if r else "–")
                    cells.append(_fmt(r["gain"], r["gain_ci95"], "+") if r and r["gain"] is not None else "–")
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
            out.append(interval_note(sel) + (f" {note}" if (note := notes_for("\n".join(out[start:]))) else ""))
            out.append("")
    return "\n".join(out)


def metrics(rows: list[dict]) -> dict:
    """DVC metrics: ``{benchmark: {head: {method: {"<k>shot": {"mean", "ci95", "gain", "gain_ci95", …}}}}}``
    plus ``interval``: what the intervals cover."""
    out: dict = {"interval": interval_note(rows)} if rows else {}
    for r in rows:
        out.setdefault(r["benchmark"], {}).setdefault(r["head"], {}).setdefault(r["method"], {})[f"{r['shot']}shot"] = {
            **{k: _round(r[k]) for k in _FLOATS + _OPTIONAL},
            **{k: r[k] for k in _INTS if k != "shot"}}
    return out


def plot_accuracy_vs_shots(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per head: accuracy (%) against shots, one line with 95% CI bars per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({r["head"] for r in rows})
    fig, axes = plt.subplots(1, len(heads), figsize=(4.5 * len(heads), 3.5), squeeze=False)
    for ax, head in zip(axes[0], heads):
        for m in sorted({r["method"] for r in rows if r["head"] == head}):
            sel = sorted((r for r in rows if r["head"] == head and r["method"] == m), key=lambda r: r["shot"])
            ax.errorbar([r["shot"] for r in sel], [100 * r["mean"] for r in sel], yerr=[100 * r["ci95"] for r in sel],
                        marker="o", capsize=3, label=m)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(sorted({r["shot"] for r in rows}))
        ax.set_title(f"{title} {head}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def image_grid(paths: Iterable[str | Path], columns: int = 8, cell: int = 96) -> Image.Image:
    paths = list(paths)
    if not paths:
        raise ValueError("no images for the grid")
    rows = math.ceil(len(paths) / columns)
    grid = Image.new("RGB", (min(columns, len(paths)) * cell, rows * cell), "white")
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            grid.paste(im.convert("RGB").resize((cell, cell), Image.BILINEAR), ((i % columns) * cell, (i // columns) * cell))
    return grid


def write_report(rows: list[dict], out_dir: str | Path, methods: list[str] | None = None,
                 notes: list[str] = ()) -> dict[str, Path]:
    """``accuracy.csv``, ``accuracy.md`` (with ``notes`` under the title, e.g. the backbone),
    ``metrics.json`` and ``accuracy_vs_shots.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    bench = ", ".join(sorted({r["benchmark"] for r in rows}))
    head = f"# Few-shot accuracy: {bench}\n\n" + "".join(f"{n}\n\n" for n in notes)
    return {
        "csv": write_accuracy_csv(rows, out_dir / "accuracy.csv"),
        "md": write_text(out_dir / "accuracy.md", head + markdown_table(rows, methods) + "\n"),
        "metrics": write_json(out_dir / "metrics.json", metrics(rows)),
        "plot": plot_accuracy_vs_shots(rows, out_dir / "accuracy_vs_shots.png", title=bench),
    }


def write_combined(csv_paths: Iterable[str | Path], path: str | Path, methods: list[str] | None = None) -> Path:
    rows = [r for p in csv_paths for r in read_accuracy_csv(p)]
    return write_text(path, "# Few-shot accuracy, all benchmarks\n\n" + markdown_table(rows, methods) + "\n")


def write_sample_grids(images: dict[tuple[str, str], list[str]], out_dir: str | Path, per_grid: int = 16,
                       columns: int = 8) -> list[Path]:
    """One PNG per (method, class): ``<out_dir>/<method>/<class>.png`` with up to ``per_grid`` images."""
    from benchmarks.fewshot.synthesis import class_dir_name

    written = []
    for (method, cls), paths in sorted(images.items()):
        grid = image_grid(paths[:per_grid], columns=columns)
        written.append(save_image(Path(out_dir) / method / f"{class_dir_name(cls)}.png", grid))
    return written
