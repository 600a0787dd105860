"""Intervals for few-shot accuracies that resample what the design shares.

Episodes reuse ``T`` support sets per (class, shot) — synthesis runs once per support set — and
each episode takes all its classes' support sets from one trial ``t`` (:func:`.sampling.sample_episodes`),
so episodes are nested in the ``T`` trials. Every episode of one shot is scored with each of ``R``
backbones trained with their own seeds. An accuracy (or a gain: method minus real-only, paired by
episode and replicate) is the mean over the ``R x E`` table of per-episode values; its 95% interval
combines two sources of variance:

* **support sets** — a cluster bootstrap over trials (:func:`trial_bootstrap`): each of ``B``
  resamples draws ``T`` trials with replacement, and an episode counts as many times as its trial
  was drawn (episodes of undrawn trials drop out). ``se_support`` is the std of the resampled means
  of the replicate-averaged values, times sqrt(T / (T - 1)) (a bootstrap over T clusters
  underestimates their variance by (T - 1) / T), with T - 1 degrees of freedom. One resampling per
  shot serves every method, head and gain, so gains are resampled with the accuracies they compare.
* **backbone replicates** — ``se_replicates`` = std of the ``R`` replicate means / sqrt(R). The
  replicates share episodes and support sets, so their spread is the backbone's (retraining) variance.

Half-width = t(0.975, df) * sqrt(se_support^2 + se_replicates^2), df by Welch-Satterthwaite from
``R - 1`` (replicates) and ``T - 1`` (trials): with 3 replicates and a dominant backbone term the
multiplier approaches 4.30 (Student t, 2 df), the honest price of 3 retrainings, where a bootstrap
over 3 replicates would pretend to know their spread; few trials likewise widen it. Query noise enters both terms, so the interval errs wide. Test classes are fixed, not
resampled (as in the usual few-shot interval). With ``R = 1`` it covers support sets and queries only;
with ``R = 1`` and a single trial nothing is resampled and the half-width is NaN, never 0."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from benchmarks.fewshot.sampling import Episodes


@dataclass(frozen=True)
class TrialBootstrap:
    weights: np.ndarray    # (resamples, E) how often each episode counts in each resample
    trials: int            # T: distinct trials (clusters) the episodes use


def trial_bootstrap(episodes: Episodes, resamples: int, rng: np.random.Generator) -> TrialBootstrap:
    """The trials the episodes use, drawn with replacement ``resamples`` times (module docstring)."""
    trials = np.asarray(episodes.trials)
    if not (trials == trials[:, :1]).all():
        raise ValueError("episodes mix support sets of several trials; the cluster bootstrap needs one trial "
                         "per episode (sample_episodes draws them so)")
    used, cluster = np.unique(trials[:, 0], return_inverse=True)
    counts = rng.multinomial(len(used), np.full(len(used), 1.0 / len(used)), size=resamples)
    return TrialBootstrap(counts[:, cluster].astype(np.float64), len(used))


def interval(values, boot: TrialBootstrap) -> dict:
    """Mean and 95% half-width of ``values`` ((R, E) per replicate and episode, or (E,)) under the
    resampling ``boot`` from :func:`trial_bootstrap` (module docstring)."""
    from scipy.stats import t as student_t

    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        raise ValueError("no episode values to summarise")
    w, T = boot.weights, boot.trials
    if w.shape[1] != v.shape[1]:
        raise ValueError(f"{w.shape[1]} bootstrap weights per resample for {v.shape[1]} episodes")
    R = v.shape[0]
    means = w @ v.mean(0) / w.sum(1)
    se_sup = float(means.std(ddof=1) * math.sqrt(T / (T - 1))) if T > 1 else 0.0
    se_rep = float(v.mean(1).std(ddof=1) / math.sqrt(R)) if R > 1 else 0.0
    se = math.hypot(se_sup, se_rep)
    parts = [(se_sup, T - 1), (se_rep, R - 1)]
    df = se ** 4 / sum(s ** 4 / d for s, d in parts if s > 0) if se > 0 else math.inf
    half = float(student_t.ppf(0.975, df) * se) if T > 1 or R > 1 else math.nan
    return {"mean": float(v.mean()), "ci95": half, "se_support": se_sup,
            "se_replicates": se_rep, "df": df, "replicates": R, "trials": T, "episodes": v.shape[1]}
