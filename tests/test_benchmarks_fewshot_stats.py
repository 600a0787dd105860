"""Intervals: the support-set cluster bootstrap, paired gains, backbone replicates (synthetic data
with known structure)."""
import math

import numpy as np
import pytest

from benchmarks.fewshot.sampling import Episodes
from benchmarks.fewshot.stats import interval, trial_bootstrap

CLASSES = ["a", "b", "c", "d", "e"]


def _design(trials: int, E: int = 300, ways: int = 3, seed: int = 0) -> Episodes:
    """E episodes, each ``ways`` of 5 classes, their support sets from one of ``trials`` trials."""
    rng = np.random.default_rng(seed)
    classes = [list(rng.choice(CLASSES, ways, replace=False)) for _ in range(E)]
    tr = np.repeat(rng.integers(trials, size=(E, 1)), ways, axis=1)
    empty = np.zeros((E, ways, 0), dtype=np.int64)
    return Episodes("synthetic", "test", ways, 1, 0, seed, classes, tr, empty, empty)


def _accuracies(eps: Episodes, rng, support_sd=0.1, query_sd=0.05, effects=None):
    """Accuracy = 0.6 + mean over the episode's classes of its support set's effect + query noise."""
    effects = effects if effects is not None else {}
    out = np.empty(len(eps))
    for e, (cs, ts) in enumerate(zip(eps.classes, eps.trials)):
        out[e] = 0.6 + np.mean([effects.setdefault((c, int(t)), rng.normal(0, support_sd)) for c, t in zip(cs, ts)])
    return out + rng.normal(0, query_sd, len(eps))


def _weights(eps, seed=1, resamples=500):
    return trial_bootstrap(eps, resamples, np.random.default_rng(seed))


def test_weights_resample_trials():
    eps = _design(trials=4, E=50)
    boot = _weights(eps, resamples=200)
    w = boot.weights
    assert boot.trials == 4 and w.shape == (200, 50) and np.allclose(w, np.round(w)) and (w >= 0).all()
    assert np.allclose(w.sum(1) / 50, 1, atol=0.9) and (w.sum(1) > 0).all()
    for e in range(50):   # an episode counts as often as its trial was drawn
        assert np.array_equal(w[:, e], w[:, int(np.flatnonzero(eps.trials[:, 0] == eps.trials[e, 0])[0])])
    assert np.array_equal(w, _weights(eps, resamples=200).weights)            # seeded: same generator, same draws
    eps.trials[0, 1] = (eps.trials[0, 0] + 1) % 4
    with pytest.raises(ValueError, match="episodes mix support sets of several trials"):
        _weights(eps)


def test_interval_widens_when_episodes_share_few_support_sets():
    """Same number of episodes and the same noise; only the number of support sets per class
    differs. The naive 1.96*std/sqrt(E) barely moves, the cluster bootstrap widens, and with few
    support sets it is close to the true spread of the mean over redraws of the whole design."""
    rng = np.random.default_rng(2)
    out = {}
    for trials in (6, 300):
        eps = _design(trials)
        acc = _accuracies(eps, rng)
        out[trials] = (interval(acc, _weights(eps)), 1.96 * acc.std() / math.sqrt(len(acc)))
    (few, naive_few), (many, naive_many) = out[6], out[300]
    assert abs(naive_few - naive_many) < 0.3 * naive_many
    assert few["ci95"] > 3 * many["ci95"] and few["ci95"] > 3 * naive_few
    assert many["ci95"] == pytest.approx(naive_many, rel=0.35)          # fresh support sets: the usual interval
    eps = _design(6)
    true_se = np.std([_accuracies(eps, rng).mean() for _ in range(300)])   # new support effects and queries
    assert 0.6 * true_se < few["se_support"] < 1.5 * true_se
    assert few["ci95"] > 1.96 * true_se      # 6 trials: Student t with 5 df, wider than the normal interval


def test_paired_gain_is_narrower_than_unpaired():
    rng = np.random.default_rng(3)
    eps = _design(trials=6)
    effects: dict = {}
    real = _accuracies(eps, rng, effects=effects)
    method = real + 0.03 + rng.normal(0, 0.02, len(eps))              # same episodes: strongly correlated
    w = _weights(eps)
    a, b, gain = interval(method, w), interval(real, w), interval(method - real, w)
    unpaired = math.hypot(a["ci95"], b["ci95"])
    assert gain["ci95"] < 0.3 * unpaired
    assert gain["mean"] - gain["ci95"] < 0.03 < gain["mean"] + gain["ci95"]
    assert unpaired > 0.03 > gain["ci95"]     # unpaired, the gain would not be distinguishable from 0


def test_replicates_add_the_backbone_variance_with_student_t():
    rng = np.random.default_rng(4)
    eps = _design(trials=300)
    base = _accuracies(eps, rng, support_sd=0.0)
    w = _weights(eps)
    same = interval(np.stack([base, base, base]), w)
    assert same["se_replicates"] == 0 and same["ci95"] == pytest.approx(interval(base, w)["ci95"])
    offsets = np.array([-0.05, 0.0, 0.08])
    spread = interval(base + offsets[:, None], w)
    se_rep = offsets.std(ddof=1) / math.sqrt(3)
    assert spread["se_replicates"] == pytest.approx(se_rep)
    assert spread["mean"] == pytest.approx(base.mean() + offsets.mean())
    # Student t with Welch-Satterthwaite df: the backbone term dominates, so df is near 2 (t = 4.30)
    from scipy.stats import t

    se = math.hypot(se_rep, spread["se_support"])
    df = se ** 4 / (se_rep ** 4 / 2 + spread["se_support"] ** 4 / (spread["trials"] - 1))
    assert 2 < df < 2.5 and spread["ci95"] == pytest.approx(t.ppf(0.975, df) * se)
    assert spread["ci95"] > 3.9 * se_rep > 5 * same["ci95"]
    with pytest.raises(ValueError, match="300 bootstrap weights per resample for 5 episodes"):
        interval(base[:5], w)
    one = _design(trials=1, E=20)     # one backbone, one trial: nothing to resample, so no interval (not 0)
    assert math.isnan(interval(base[:20], _weights(one))["ci95"])
    assert interval(np.stack([base[:20], base[:20] + 0.01]), _weights(one))["ci95"] > 0
