"""Student-t intervals over replicates, and how every report prints an interval.

One helper for the mini world's claims, the recipe table and the long-tail accuracies: each replicate
(a seed: its own references and random seeds, or its own classifier) gives one value, and the 95%
half-width is ``t_{0.975, n-1} * s / sqrt(n)``. Printing goes through :func:`format_interval` so that
the two intervals that claim more than they know read as such: one value resamples nothing (``n/a``),
and replicates that all gave the same value give a zero-width interval, which is not certainty (three
seeds cannot show a spread they did not draw): it is marked ``†`` and explained by :data:`ZERO_WIDTH_NOTE`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

ZERO_MARK = "†"
ZERO_WIDTH_NOTE = (f"{ZERO_MARK} every replicate gave the same value, so the interval has zero width; that is not "
                   "certainty: the replicates drew no spread, and the images within a replicate are a finite sample.")


def t_interval(values: Iterable[float]) -> tuple[float, float]:
    """``(mean, 95% half-width)`` with Student's t over ``values`` (one per replicate); the half-width
    is NaN for a single value, which resamples nothing."""
    from scipy import stats

    v = [float(x) for x in values]
    if not v:
        raise ValueError("an interval over no values")
    if len(v) == 1:
        return v[0], math.nan
    if min(v) == max(v):  # exactly: the float mean and sd of equal values can be off by an ulp
        return v[0], 0.0
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return mean, float(stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)))


def format_interval(mean: float | None, half: float | None, scale: float = 1.0, digits: int = 1, sign: str = "") -> str:
    """``mean ± half`` scaled; ``–`` for a missing mean, ``n/a`` for a half-width that resamples nothing
    (None or NaN), and ``0.0†`` for an exactly zero-width interval (:data:`ZERO_WIDTH_NOTE`)."""
    if mean is None or math.isnan(mean):
        return "–"
    text = f"{mean * scale:{sign}.{digits}f} ± "
    if half is None or math.isnan(half):
        return text + "n/a"
    return text + f"{half * scale:.{digits}f}" + (ZERO_MARK if half == 0 else "")


def notes_for(text: str) -> str:
    """The footnote a report needs under ``text``: :data:`ZERO_WIDTH_NOTE`, or empty when no interval in
    it has zero width."""
    return ZERO_WIDTH_NOTE if ZERO_MARK in text else ""
