"""Metrics of the mini benchmark (issue 5).

- fidelity: the independent evaluator's accuracy on generated images of one class;
- diversity: mean pairwise distance between generated images of a class in the evaluator's
  (L2-normalised, pooled pre-logit) feature space, divided by the same for real images of that
  class — 1 means as varied as real data, near 0 means copies of one image;
- ci95: mean and half-width of a Student-t 95% interval over seeds."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fidelity(evaluator, images01: torch.Tensor, label: int) -> float:
    if len(images01) == 0:
        raise ValueError("fidelity of an empty image set")
    return (evaluator.predict(images01) == label).float().mean().item()


def mean_pairwise_distance(features: torch.Tensor) -> float:
    if len(features) < 2:
        raise ValueError(f"mean pairwise distance needs >= 2 images, got {len(features)}")
    f = F.normalize(features.double(), dim=1)
    d = torch.cdist(f, f)
    n = len(f)
    return (d.sum() / (n * (n - 1))).item()


def diversity(evaluator, generated01: torch.Tensor, real01: torch.Tensor) -> float:
    real = mean_pairwise_distance(evaluator.features(real01))
    if real <= 0:
        raise ValueError("real images of the class are all identical in feature space")
    return mean_pairwise_distance(evaluator.features(generated01)) / real


def ci95(values) -> tuple[float, float]:
    """``(mean, half_width)``; half-width 0 for a single value."""
    from scipy import stats

    v = [float(x) for x in values]
    if not v:
        raise ValueError("ci95 of no values")
    mean = sum(v) / len(v)
    if len(v) == 1:
        return mean, 0.0
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return mean, float(stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)))
