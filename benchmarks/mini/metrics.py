"""Metrics of generated images, written for any report that scores them (mini claims, few-shot and
long-tail synthesis). Features are the evaluator's pooled pre-logit features, L2-normalised; feature
distances are Euclidean between unit vectors (cosine similarity = 1 - d^2 / 2).

- fidelity: the independent evaluator's accuracy on generated images of one class;
- nearest-reference similarity: per generated image, the cosine similarity (features) and the RMS pixel
  distance (pixels in [0, 1]) to its nearest reference image — the images the method was given;
- near-copy: a generated image whose nearest-reference feature distance is below the class's near-copy
  threshold, the ``percentile`` (default 5th) of the nearest-neighbour distances among *distinct* held-out
  real images of that class (each one's distance to the nearest other one). Calibrated on held-out real
  data only: at most ~5% of genuinely new real images would be flagged (fewer, as a generated image is
  compared with a few references, a held-out image with all other held-out images);
- novel fidelity: the share of images that the evaluator classifies as the class *and* that are not
  near-copies (a copy of a reference is a failure however recognisable it is);
- diversity: mean distance from each generated image to its nearest *other* generated image, over the
  same for held-out real images of the class, both on sets of the same size m = min(#generated, #real)
  (the average over 20 seeded random subsets of the larger set; nearest-neighbour distances shrink as
  sets grow). 1: as spread out as real data; ~0: copies (every copy has a twin). Unlike a mean pairwise
  distance it sees copies of several far-apart references;
- ci95: mean and half-width of a Student-t 95% interval over replicates."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SUBSETS = 20          # random subsets that equalise set sizes for the diversity ratio
SUBSET_SEED = 0


def fidelity(evaluator, images01: torch.Tensor, label: int) -> float:
    if len(images01) == 0:
        raise ValueError("fidelity of an empty image set")
    return (evaluator.predict(images01) == label).float().mean().item()


def unit_features(evaluator, images01: torch.Tensor) -> torch.Tensor:
    return F.normalize(evaluator.features(images01).double().flatten(1), dim=1)


def nearest_distance(query: torch.Tensor, pool: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Per row of ``query``: Euclidean distance to the nearest row of ``pool`` (``exclude_self``: query is
    pool, and a row is not its own neighbour)."""
    if len(pool) < (2 if exclude_self else 1):
        raise ValueError(f"nearest neighbours need {'>= 2' if exclude_self else '>= 1'} images, got {len(pool)}")
    d = torch.cdist(query.double().flatten(1), pool.double().flatten(1))
    if exclude_self:
        d.fill_diagonal_(math.inf)
    return d.min(dim=1).values


def near_copy_threshold(heldout_features: torch.Tensor, percentile: float = 5.0) -> float:
    """The ``percentile`` of the distances between each held-out real image and its nearest other one."""
    if not 0 < percentile < 100:
        raise ValueError(f"near-copy percentile must be in (0, 100), got {percentile}")
    return float(torch.quantile(nearest_distance(heldout_features, heldout_features, exclude_self=True),
                                percentile / 100))


def memorisation(evaluator, generated01: torch.Tensor, references01: torch.Tensor, heldout01: torch.Tensor,
                 percentile: float = 5.0, label: int | None = None) -> dict:
    """How close generated images are to the references they were made from (see the module docstring).
    Returns means over the images plus the per-image ``near_copy`` flags (a bool tensor)."""
    gen = unit_features(evaluator, generated01)
    d_feat = nearest_distance(gen, unit_features(evaluator, references01))
    d_pix = nearest_distance(generated01, references01) / math.sqrt(generated01[0].numel())
    threshold = near_copy_threshold(unit_features(evaluator, heldout01), percentile)
    copies = d_feat < threshold
    out = {"nearest_reference_cosine": float((1 - d_feat ** 2 / 2).mean()),
           "nearest_reference_pixel_rmse": float(d_pix.mean()),
           "near_copy_threshold": threshold, "near_copy_share": float(copies.double().mean()), "near_copy": copies}
    if label is not None:
        out["novel_fidelity"] = novel_fidelity(evaluator, generated01, label, copies)
    return out


def novel_fidelity(evaluator, images01: torch.Tensor, label: int, near_copy: torch.Tensor) -> float:
    """Share of images classified as ``label`` and not near-copies."""
    correct = evaluator.predict(images01) == label
    return float((correct & ~near_copy.to(correct.device)).double().mean())


def mean_nearest_other(features: torch.Tensor, m: int, generator: torch.Generator) -> float:
    """Mean nearest-other distance within sets of ``m`` of the rows (all of them when there are m)."""
    if len(features) == m:
        return float(nearest_distance(features, features, exclude_self=True).mean())
    values = []
    for _ in range(SUBSETS):
        sub = features[torch.randperm(len(features), generator=generator)[:m]]
        values.append(float(nearest_distance(sub, sub, exclude_self=True).mean()))
    return sum(values) / len(values)


def diversity(evaluator, generated01: torch.Tensor, real01: torch.Tensor) -> float:
    m = min(len(generated01), len(real01))
    if m < 2:
        raise ValueError(f"diversity needs >= 2 generated and >= 2 real images, got {len(generated01)} and "
                         f"{len(real01)}")
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    real = mean_nearest_other(unit_features(evaluator, real01), m, gen)
    if real <= 0:
        raise ValueError("real images of the class are all identical in feature space")
    return mean_nearest_other(unit_features(evaluator, generated01), m, gen) / real
