"""Long-tail accuracy: overall top-1 and top-1 on many-, medium- and few-shot classes, summarised
over classifier seeds.

Shot groups follow classifier-balancing's ``utils.shot_acc`` (Kang et al., ICLR 2020): a class is
many-shot if it has more than 100 training images, few-shot if it has fewer than 20, medium-shot
otherwise (20 to 100 inclusive). OLTR's older code (Liu et al., CVPR 2019) used >= 100 and <= 20,
which moves the classes with exactly 100 or exactly 20 images. The count is of the benchmark's real
training images: extra (synthetic) images never move a class to another group. A group's accuracy is
the mean of its classes' accuracies; overall accuracy is over all test images (with a balanced test
set the two coincide)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from benchmarks.intervals import t_interval
from benchmarks.longtail.registry import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD

GROUPS = ("many", "medium", "few")
METRICS = GROUPS + ("overall",)


def shot_group(train_count: int, many_threshold: int = MANY_SHOT_THRESHOLD, few_threshold: int = FEW_SHOT_THRESHOLD) -> str:
    if train_count > many_threshold:
        return "many"
    if train_count < few_threshold:
        return "few"
    return "medium"


def shot_groups(train_counts: Sequence[int], many_threshold: int = MANY_SHOT_THRESHOLD,
                few_threshold: int = FEW_SHOT_THRESHOLD) -> np.ndarray:
    return np.asarray([shot_group(int(n), many_threshold, few_threshold) for n in train_counts])


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class on its test images (NaN for a class without test images)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.shape[0]} predictions for {labels.shape[0]} labels")
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def shot_accuracies(preds: np.ndarray, labels: np.ndarray, train_counts: Sequence[int],
                    many_threshold: int = MANY_SHOT_THRESHOLD, few_threshold: int = FEW_SHOT_THRESHOLD) -> dict[str, float]:
    """``{"many", "medium", "few", "overall"}`` accuracies (fractions) of one classifier; a group
    without classes is NaN (classifier-balancing reports 0 there, which reads like a result)."""
    counts = np.asarray(train_counts)
    acc = per_class_accuracy(preds, labels, len(counts))
    groups = shot_groups(counts, many_threshold, few_threshold)
    tested = ~np.isnan(acc)
    out = {g: float(acc[(groups == g) & tested].mean()) if ((groups == g) & tested).any() else math.nan for g in GROUPS}
    out["overall"] = float((np.asarray(preds) == np.asarray(labels)).mean())
    return out


def summarise(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict]:
    """Per metric: mean, 95% t-interval half-width and the per-seed values."""
    seeds = sorted(per_seed)
    out = {}
    for m in METRICS:
        values = [per_seed[s][m] for s in seeds]
        mean, ci = t_interval(values) if not any(math.isnan(v) for v in values) else (math.nan, math.nan)
        out[m] = {"mean": mean, "ci95": ci, "seeds": seeds, "values": values}
    return out
