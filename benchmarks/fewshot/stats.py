"""Intervals for few-shot accuracies that resample what the design shares.

Episodes reuse ``T`` support sets per (class, shot) — synthesis runs once per support set — and
each episode takes all its classes' support sets from one trial ``t`` (:func:`.sampling.sample_episodes`),
so episodes are nested in the ``T`` trials. Every episode of one shot is scored with each of ``R``
backbones trained with their own seeds. An accuracy (or a gain: method minus real-only, paired by
episode and replicate) is the mean over the ``R x E`` table of per-episode values; its 95% interval
combines two sources of variance:

* **support sets** — a cluster bootstrap over trials (:func:`trial_bootstrap_weights`): each of
  ``B`` resamples draws ``T`` trials with replacement, and an episode counts as many times as its
  trial was drawn (episodes of undrawn trials drop out). ``se_support`` is the std of the resampled
  means of the replicate-averaged values. One set of weights per shot serves every method, head
  and gain, so gains are resampled together with the accuracies they compare.
* **backbone replicates** — ``se_replicates`` = std of the ``R`` replicate means / sqrt(R). The
  replicates share episodes and support sets, so their spread is the backbone's (retraining) variance.

Half-width = t(0.975, df) * sqrt(se_support^2 + se_replicates^2), df by Welch-Satterthwaite with
``R - 1`` degrees of freedom for the replicate term and an unbounded one for the bootstrap term:
with 3 replicates and a dominant backbone term the multiplier approaches 4.30 (Student t, 2 df), the
honest price of 3 retrainings; a bootstrap over 3 replicates would instead pretend to know their
spread. Query noise enters both terms, so the interval errs wide. Test classes are fixed, not
resampled (as in the usual few-shot interval). With ``R = 1`` it covers support sets and queries only."""
from __future__ import annotations

import math

import numpy as np

from benchmarks.fewshot.sampling import Episodes


def trial_bootstrap_weights(episodes: Episodes, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, E) episode multiplicities: the trials the episodes use, drawn with replacement."""
    trials = np.asarray(episodes.trials)
    if not (trials == trials[:, :1]).all():
        raise ValueError("episodes mix support sets of several trials; the cluster bootstrap needs one trial "
                         "per episode (sample_episodes draws them so)")
    used, cluster = np.unique(trials[:, 0], return_inverse=True)
    counts = rng.multinomial(len(used), np.full(len(used), 1.0 / len(used)), size=resamples)
    return counts[:, cluster].astype(np.float64)


def interval(values, weights: np.ndarray) -> dict:
    """Mean and 95% half-width of ``values`` ((R, E) per replicate and episode, or (E,)) under
    ``weights`` from :func:`trial_bootstrap_weights` (module docstring)."""
    from scipy.stats import t as student_t

    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        raise ValueError("no episode values to summarise")
    if weights.shape[1] != v.shape[1]:
        raise ValueError(f"{weights.shape[1]} bootstrap weights per resample for {v.shape[1]} episodes")
    R = v.shape[0]
    boot = weights @ v.mean(0) / weights.sum(1)
    se_support = float(boot.std(ddof=1))
    se_rep = float(v.mean(1).std(ddof=1) / math.sqrt(R)) if R > 1 else 0.0
    se = math.hypot(se_support, se_rep)
    df = math.inf if se_rep == 0 else se ** 4 / (se_rep ** 4 / (R - 1))
    return {"mean": float(v.mean()), "ci95": float(student_t.ppf(0.975, df) * se), "se_support": se_support,
            "se_replicates": se_rep, "replicates": R, "episodes": v.shape[1]}
