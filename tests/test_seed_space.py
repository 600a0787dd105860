"""Seed-space geometry: the chi prior, closed-form interpolation/centroids, NAO paths/centroids."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipelines import seed_space as ss
from pipelines.seed_space import (NaoSettings, chi_log_prob, chi_mode, gaussian_centroid, gaussian_lerp, lerp,
                                  mean_centroid, nao_centroid, nao_interpolate, nao_path,
                                  normalized_euclidean_centroid, seed_log_prior, slerp,
                                  sphere_projection_centroid)

CHI_STD = 1 / math.sqrt(2)  # std of chi_d for large d


def seeds(k, shape=(4, 16, 16), seed=0, dtype=torch.float32):
    return torch.randn(k, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- chi prior
@pytest.mark.parametrize("d", [1, 2, 3, 64, 1024, 16384])
def test_chi_log_prob_matches_scipy(d):
    r = np.array([0.3, 1.0, math.sqrt(d) * 0.9, math.sqrt(d), math.sqrt(d) * 1.05])
    ours = chi_log_prob(torch.tensor(r), d).numpy()
    np.testing.assert_allclose(ours, stats.chi(d).logpdf(r), rtol=1e-9, atol=1e-8)


def test_chi_mode_is_the_maximum_and_its_value_at_d_16384():
    d = 16384
    m = chi_mode(d)
    around = chi_log_prob(torch.tensor([m - 0.01, m, m + 0.01]), d)
    assert around[1] > around[0] and around[1] > around[2]
    assert m == pytest.approx(127.996, abs=1e-3)
    assert chi_log_prob(m, d).item() == pytest.approx(-0.5724, abs=1e-3)  # the authors' reported optimum


def test_seed_log_prior_batched_equals_per_seed():
    z = seeds(3)
    batched = seed_log_prior(z, batched=True)
    single = torch.stack([seed_log_prior(s) for s in z])
    torch.testing.assert_close(batched, single)
    assert batched.dtype == torch.float64


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_chi_rejects_bad_dimension(bad):
    with pytest.raises(ValueError, match="dimension"):
        chi_log_prob(1.0, bad)


def test_chi_rejects_negative_norm():
    with pytest.raises(ValueError, match="non-negative"):
        chi_log_prob(torch.tensor([-1.0]), 10)


# ---------------------------------------------------------------- closed-form interpolation
@pytest.mark.parametrize("fn", [lerp, slerp, gaussian_lerp])
def test_interpolations_hit_endpoints_and_keep_shapes(fn):
    a, b = seeds(2)
    out = fn(a, b, torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == (3, *a.shape)
    torch.testing.assert_close(out[0], a)
    torch.testing.assert_close(out[-1], b)
    assert fn(a, b, 0.25).shape == a.shape


def test_lerp_leaves_the_shell_while_slerp_and_gaussian_lerp_stay_on_it():
    a, b = seeds(2, shape=(4, 32, 32))
    d = a.numel()
    shell = chi_mode(d)
    assert lerp(a, b, 0.5).norm() < 0.75 * shell
    assert abs(slerp(a, b, 0.5).norm() - shell) < 4 * CHI_STD * 2
    assert abs(gaussian_lerp(a, b, 0.5).norm() - shell) < 4 * CHI_STD * 2


def test_slerp_preserves_norm_for_equal_norm_seeds():
    a, b = seeds(2, dtype=torch.float64)
    b = b * a.norm() / b.norm()
    norms = slerp(a, b, torch.linspace(0, 1, 7)).reshape(7, -1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, a.norm().item()))


def test_interpolation_rejects_mismatched_shapes_and_nan():
    a = torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match="shapes differ"):
        slerp(a, torch.randn(4, 8, 9), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        lerp(a, torch.full_like(a, float("nan")), 0.5)


# ---------------------------------------------------------------- closed-form centroids
def test_centroid_baselines():
    z = seeds(5, shape=(4, 32, 32), dtype=torch.float64)
    flat = z.reshape(5, -1)
    d = flat.shape[1]
    torch.testing.assert_close(mean_centroid(z), z.mean(0))
    assert normalized_euclidean_centroid(z).norm().item() == pytest.approx(flat.norm(dim=1).mean().item())
    assert sphere_projection_centroid(z).norm().item() == pytest.approx(chi_mode(d))
    torch.testing.assert_close(gaussian_centroid(z), z.sum(0) / math.sqrt(5))
    w = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(gaussian_centroid(z, w), (3 * z[0] + z[1]) / math.sqrt(10))


def test_gaussian_centroid_rejects_bad_weights():
    with pytest.raises(ValueError, match="expected 3 weights"):
        gaussian_centroid(seeds(3), [1.0, 2.0])
    with pytest.raises(ValueError, match="not all zero"):
        gaussian_centroid(seeds(3), [0.0, 0.0, 0.0])


# ---------------------------------------------------------------- the NAO objective
def _torch_objective(starts, interior, ends, d, eps, centroid=None):
    """An independent autograd implementation of the authors' formula, to check the analytic one."""
    pts = torch.cat([starts[:, None], interior, ends[:, None]], dim=1)
    lengths = (pts[:, 1:] - pts[:, :-1]).norm(dim=-1)
    mids = (0.5 * (pts[:, 1:] + pts[:, :-1])).norm(dim=-1)
    loss = -(lengths * chi_log_prob(mids, d)).sum() + torch.relu(lengths - eps).sum()
    if centroid is not None:
        loss = loss - chi_log_prob(centroid.norm(), d)
    return loss


def test_analytic_gradient_matches_autograd():
    rng = torch.Generator().manual_seed(3)
    d, k, n, m = 300, 3, 9, 4
    starts = torch.randn(k, m, generator=rng, dtype=torch.float64) * 8
    interior = (torch.randn(k, n - 2, m, generator=rng, dtype=torch.float64) * 8).requires_grad_(True)
    centroid = (torch.randn(m, generator=rng, dtype=torch.float64) * 8).requires_grad_(True)
    eps = 3.0  # some segments above, some below the cap
    problem = ss._PathProblem(starts.numpy(), None, d, eps, 1.0)
    loss, g_int, g_c = problem.value_and_grad(interior.detach().numpy().copy(), centroid.detach().numpy().copy())
    ref = _torch_objective(starts, interior, centroid.expand(k, -1), d, eps, centroid)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(g_int, interior.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(g_c, centroid.grad.numpy(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- NAO paths
def test_nao_path_is_more_likely_than_lerp_and_keeps_endpoints():
    a, b = seeds(2, shape=(4, 32, 32))
    path = nao_path(a, b, generator=gen())
    assert path.points.shape == (50, *a.shape) and path.points.dtype == a.dtype
    torch.testing.assert_close(path.points[0], a)
    torch.testing.assert_close(path.points[-1], b)
    t = torch.linspace(0, 1, 50)
    nao_ll = seed_log_prior(path.points, batched=True).mean()
    lerp_ll = seed_log_prior(lerp(a, b, t), batched=True).mean()
    slerp_ll = seed_log_prior(slerp(a, b, t), batched=True).mean()
    assert nao_ll > lerp_ll + 100  # LERP's middle sags to ~0.71 sqrt(d)
    assert nao_ll > slerp_ll - 0.5  # and at least as good as the sphere of the endpoints
    assert path.record.iterations > 0 and math.isfinite(path.record.objective)


def test_nao_interpolation_at_t_returns_endpoints_and_is_on_the_path():
    a, b = seeds(2)
    path = nao_path(a, b, n_points=20, generator=gen())
    ends = path.at(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends[0], a)
    torch.testing.assert_close(ends[1], b)
    mid = nao_interpolate(a, b, 0.5, n_points=20, generator=gen())
    dists = (path.points.reshape(20, -1) - mid.reshape(1, -1)).norm(dim=1)
    seg = (path.points[1:] - path.points[:-1]).reshape(19, -1).norm(dim=1)
    assert dists.min() <= seg.max()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        path.at(1.5)


def test_nao_path_with_identical_endpoints_is_constant():
    a = seeds(1)[0]
    path = nao_path(a, a.clone(), n_points=10)
    assert torch.equal(path.points, a.expand(10, *a.shape))
    assert path.record.stop_reason == "identical endpoints"


def test_nao_path_is_reproducible_under_a_seeded_generator():
    a, b = seeds(2)
    p1 = nao_path(a, b, n_points=12, generator=gen(7)).points
    p2 = nao_path(a, b, n_points=12, generator=gen(7)).points
    assert torch.equal(p1, p2)


def test_subspace_solver_matches_full_space_solver():
    """The fast solver works in the span of the seeds. Solved in all of R^d, the optimum lands in
    that span too (the reduction is exact), with the same objective."""
    z = seeds(3, shape=(4, 16, 16), dtype=torch.float64)  # d = 1024
    tight = dict(ftol=1e-15, gtol=1e-12)
    sub = nao_centroid(z, n_points=8, generator=gen(), settings=NaoSettings(subspace=True, **tight))
    full = nao_centroid(z, n_points=8, generator=gen(), settings=NaoSettings(subspace=False, **tight))
    assert sub.record.objective == pytest.approx(full.record.objective, rel=1e-6)
    q, _ = torch.linalg.qr(z.reshape(3, -1).T)
    points = full.paths.reshape(-1, q.shape[0])
    off_span = (points - points @ q @ q.T).norm(dim=1)
    assert off_span.max() < 1e-3 * points.norm(dim=1).min()
    assert (sub.centroid - full.centroid).norm() < 1e-3 * full.centroid.norm()


def test_reference_adam_solver_runs_the_authors_rule():
    a, b = seeds(2, shape=(1, 4, 4), dtype=torch.float64)
    settings = NaoSettings.reference_interpolation(n_points=6, max_iterations=3000)
    path = nao_path(a, b, generator=gen(), settings=settings)
    fast = nao_path(a, b, n_points=6, generator=gen())
    assert settings.optimizer == "adam" and not settings.subspace and settings.lr == 0.01
    assert path.record.stop_reason.startswith("|Δloss| < 0.001 for 10")
    assert path.record.history[-1] < path.record.history[0]
    assert path.record.objective == pytest.approx(fast.record.objective, rel=2e-2)


# ---------------------------------------------------------------- NAO centroids
def test_nao_and_gaussian_centroids_sit_on_the_shell_but_the_mean_does_not():
    z = seeds(5, shape=(4, 32, 32))
    d = z[0].numel()
    shell = chi_mode(d)
    res = nao_centroid(z, generator=gen())
    assert abs(res.centroid.norm().item() - shell) < 3 * CHI_STD
    assert abs(gaussian_centroid(z).norm().item() - shell) < 4 * CHI_STD * 2
    assert mean_centroid(z).norm().item() < 0.5 * shell
    assert seed_log_prior(res.centroid) > seed_log_prior(mean_centroid(z)) + 1000
    # paths run from each seed (row 0) to the centroid (last row)
    assert res.paths.shape == (5, 50, *z.shape[1:])
    torch.testing.assert_close(res.paths[:, 0], z)
    torch.testing.assert_close(res.paths[:, -1], res.centroid.expand_as(z))


@pytest.mark.parametrize("init", ["gaussian", "mean"])
def test_nao_centroid_does_not_depend_on_seed_order(init):
    # (the authors' "slerp" start uses the first two seeds, so it is order-dependent by design)
    z = seeds(4, shape=(4, 16, 16), dtype=torch.float64)
    c1 = nao_centroid(z, n_points=20, generator=gen(), init=init).centroid
    c2 = nao_centroid(z[[2, 0, 3, 1]], n_points=20, generator=gen(), init=init).centroid
    assert (c1 - c2).norm() < 2e-3 * c1.norm()


def test_nao_centroid_input_errors():
    z = seeds(3)
    with pytest.raises(ValueError, match="at least 2 seeds, got 1"):
        nao_centroid(z[:1])
    with pytest.raises(ValueError, match=r"seed shapes differ: seed 0 is \(4, 16, 16\), seed 1 is \(4, 16, 8\)"):
        nao_centroid([z[0], z[1][..., :8]])
    bad = z.clone()
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="seed 2 contains non-finite"):
        nao_centroid(bad)
    with pytest.raises(ValueError, match="n_points must be at least 3"):
        nao_centroid(z, n_points=2)


def test_nao_centroid_accepts_a_list_and_returns_input_dtype():
    z = seeds(2, dtype=torch.float32)
    res = nao_centroid(list(z), n_points=10, generator=gen())
    assert res.centroid.dtype == torch.float32 and res.centroid.shape == z.shape[1:]
    assert set(res.record.to_dict()) == {"iterations", "objective", "stop_reason", "seconds"}
