"""Seed-space geometry: seeds as points in R^d, independent of any diffusion model.

For z ~ N(0, I_d) the norm ||z|| follows a chi distribution with d degrees of freedom, sharply
peaked at sqrt(d - 1) (~128 for SD 2.1-base latents, d = 4*64*64). Seeds off that shell give flat
or noisy images, so interpolation and averaging must respect the norm prior (NAO, Samuel et al.,
NeurIPS 2023). This module holds:

* the exact chi log-prior of a norm and its mode;
* LERP, SLERP and the Gaussian-preserving combination (Bodin et al., arXiv 2408.08558);
* NAO interpolation (a likelihood-weighted shortest path between two seeds) and the NAO centroid
  of K >= 2 seeds (K such paths meeting at a shared free point);
* centroid baselines: mean, normalised-Euclidean, sphere projection, Gaussian-preserving.

Every function takes seeds of any shape (flattened internally). NAO optimisations run under an
explicit generator and return a small :class:`OptimRecord`.

Why NAO here is fast: the objective is a length functional weighted by a function of the norm
alone (a rotationally symmetric metric). Its geodesics lie in the plane spanned by their endpoints
and the origin, and the centroid of K seeds lies in their span (moving it towards the span at
fixed norm shrinks every angle to the seeds, hence every path). So the optimum lives in the
K-dimensional span of the seeds, and we optimise *exactly the same objective* in orthonormal
coordinates of that span (distances and norms are preserved), with L-BFGS in float64. The
authors' algorithm (Adam, lr 0.01, in R^d) is available with ``NaoSettings.reference_*()`` and
agrees with the fast path (see tests/test_seed_space.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

TensorLike = torch.Tensor
SeedsLike = torch.Tensor | Sequence[torch.Tensor]

__all__ = [
    "chi_log_prob", "chi_mode", "seed_log_prior",
    "lerp", "slerp", "gaussian_lerp",
    "mean_centroid", "normalized_euclidean_centroid", "sphere_projection_centroid", "gaussian_centroid",
    "NaoSettings", "OptimRecord", "NaoPath", "NaoCentroid", "nao_path", "nao_interpolate", "nao_centroid",
]


# --------------------------------------------------------------------------------------------
# The chi prior of a seed's norm
# --------------------------------------------------------------------------------------------
def chi_log_prob(r: TensorLike | float, d: int) -> torch.Tensor:
    """Exact log-density of the chi distribution with ``d`` degrees of freedom at norm(s) ``r``.

    ``log f(r) = (d-1) log r - r^2/2 - ((d/2 - 1) log 2 + lgamma(d/2))``, evaluated in float64:
    for d = 16384 the first two terms are ~1e5 and cancel, which float32 cannot resolve.
    """
    d = _check_dim(d)
    r = torch.as_tensor(r, dtype=torch.float64)
    if torch.any(r < 0):
        raise ValueError("chi_log_prob: norms must be non-negative")
    return (d - 1) * torch.log(r) - 0.5 * r * r - _chi_log_normaliser(d)


def _chi_log_normaliser(d: int) -> float:
    return (d / 2 - 1) * math.log(2.0) + math.lgamma(d / 2)


def chi_mode(d: int) -> float:
    """Mode of the chi_d distribution, sqrt(d - 1): the radius of the high-likelihood shell."""
    return math.sqrt(_check_dim(d) - 1)


def seed_log_prior(z: TensorLike, batched: bool = False) -> torch.Tensor:
    """chi log-prior of the norm of seed ``z`` (``d = z.numel()``); with ``batched=True`` the first
    dimension indexes seeds and one value per seed is returned."""
    z = torch.as_tensor(z)
    flat = z.reshape(z.shape[0], -1) if batched else z.reshape(1, -1)
    values = chi_log_prob(flat.double().norm(dim=1), flat.shape[1])
    return values if batched else values[0]


def _check_dim(d: int) -> int:
    if isinstance(d, bool) or int(d) != d or d < 1:
        raise ValueError(f"dimension d must be a positive integer, got {d!r}")
    return int(d)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------
def _as_seed(x: TensorLike, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def _pair(a: TensorLike, b: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_seed(a, "seed a"), _as_seed(b, "seed b")
    if a.shape != b.shape:
        raise ValueError(f"seed shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _stack(seeds: SeedsLike, min_count: int, what: str) -> torch.Tensor:
    """Validate and stack seeds into (K, *shape)."""
    if isinstance(seeds, torch.Tensor):
        items = list(seeds.unbind(0)) if seeds.dim() > 0 else [seeds]
    else:
        items = list(seeds)
    if len(items) < min_count:
        raise ValueError(f"{what} needs at least {min_count} seeds, got {len(items)}")
    items = [_as_seed(s, f"seed {i}") for i, s in enumerate(items)]
    for i, s in enumerate(items[1:], start=1):
        if s.shape != items[0].shape:
            raise ValueError(f"seed shapes differ: seed 0 is {tuple(items[0].shape)}, seed {i} is {tuple(s.shape)}")
    dtype = items[0].dtype
    for s in items[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return torch.stack([s.to(dtype) for s in items])


def _times(t: float | Sequence[float] | torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Interpolation times as a (T, 1) column and whether the caller passed a scalar."""
    tt = torch.as_tensor(t, dtype=dtype)
    scalar = tt.dim() == 0
    tt = tt.reshape(-1)
    if not torch.isfinite(tt).all():
        raise ValueError("interpolation times must be finite")
    return tt[:, None], scalar


def _shape_out(flat: torch.Tensor, shape: torch.Size, scalar: bool) -> torch.Tensor:
    out = flat.reshape(flat.shape[0], *shape)
    return out[0] if scalar else out


# --------------------------------------------------------------------------------------------
# Closed-form interpolation
# --------------------------------------------------------------------------------------------
def lerp(a: TensorLike, b: TensorLike, t) -> torch.Tensor:
    """Linear interpolation ``(1-t) a + t b``; ``t`` a float (returns a seed) or 1-D (returns T seeds).
    Leaves the chi shell: the midpoint of two orthogonal shell seeds has norm ~0.71 sqrt(d)."""
    a, b = _pair(a, b)
    tt, scalar = _times(t, a.dtype)
    flat = (1 - tt) * a.reshape(1, -1) + tt * b.reshape(1, -1)
    return _shape_out(flat, a.shape, scalar)


def slerp(a: TensorLike, b: TensorLike, t, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of the raw vectors (the form the authors use): weights
    ``sin((1-t)θ)/sin θ`` and ``sin(tθ)/sin θ``, falling back to LERP for nearly parallel seeds."""
    a, b = _pair(a, b)
    tt, scalar = _times(t, a.dtype)
    fa, fb = a.reshape(1, -1), b.reshape(1, -1)
    na, nb = fa.norm(), fb.norm()
    if na == 0 or nb == 0:
        return lerp(a, b, t)
    dot = ((fa * fb).sum() / (na * nb)).clamp(-1.0, 1.0)
    if dot.abs() > dot_threshold:
        return lerp(a, b, t)
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    flat = torch.sin((1 - tt) * theta) / sin_theta * fa + torch.sin(tt * theta) / sin_theta * fb
    return _shape_out(flat, a.shape, scalar)


def gaussian_lerp(a: TensorLike, b: TensorLike, t) -> torch.Tensor:
    """Gaussian-preserving interpolation (Bodin et al.): ``((1-t) a + t b) / sqrt((1-t)^2 + t^2)``
    is again N(0, I) when a and b are independent N(0, I) seeds."""
    a, b = _pair(a, b)
    tt, scalar = _times(t, a.dtype)
    flat = ((1 - tt) * a.reshape(1, -1) + tt * b.reshape(1, -1)) / torch.sqrt((1 - tt) ** 2 + tt ** 2)
    return _shape_out(flat, a.shape, scalar)


# --------------------------------------------------------------------------------------------
# Closed-form centroids
# --------------------------------------------------------------------------------------------
def mean_centroid(seeds: SeedsLike) -> torch.Tensor:
    """Euclidean mean. For K independent shell seeds its norm is ~sqrt(d/K): far off the shell."""
    return _stack(seeds, 1, "mean centroid").mean(0)


def normalized_euclidean_centroid(seeds: SeedsLike) -> torch.Tensor:
    """Euclidean mean rescaled to the average norm of the seeds."""
    z = _stack(seeds, 1, "normalised-Euclidean centroid")
    flat = z.reshape(z.shape[0], -1)
    mean = flat.mean(0)
    return (mean * (flat.norm(dim=1).mean() / mean.norm().clamp_min(1e-12))).reshape(z.shape[1:])


def sphere_projection_centroid(seeds: SeedsLike) -> torch.Tensor:
    """Euclidean mean projected onto the chi shell, the sphere of radius ``chi_mode(d)``."""
    z = _stack(seeds, 1, "sphere-projection centroid")
    mean = z.mean(0)
    return mean * (chi_mode(mean.numel()) / mean.norm().clamp_min(1e-12))


def gaussian_centroid(seeds: SeedsLike, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian-preserving combination: ``sum_i w_i z_i / sqrt(sum_i w_i^2)`` (uniform weights by
    default), which is N(0, I) again for independent N(0, I) seeds."""
    z = _stack(seeds, 1, "Gaussian-preserving centroid")
    k = z.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=z.dtype) if weights is None else torch.as_tensor(weights, dtype=z.dtype)
    if w.shape != (k,):
        raise ValueError(f"expected {k} weights, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w * w).sum() == 0:
        raise ValueError("weights must be finite and not all zero")
    return torch.tensordot(w, z, dims=1) / torch.sqrt((w * w).sum())


# --------------------------------------------------------------------------------------------
# NAO: norm-aware paths and centroids
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NaoSettings:
    """Settings of a NAO optimisation. Defaults are the fast solver; ``reference_interpolation()``
    and ``reference_centroid()`` reproduce the authors' code (Adam lr 0.01 in R^d)."""

    n_points: int = 50                       # points per path, endpoints included
    eps: float | None = None                 # segment-length cap; None: 2 ||p1 - p2|| / n_points
    penalty_weight: float = 1.0              # lambda of the soft cap
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    max_iterations: int = 10_000
    # L-BFGS-B (fast default): stop when the relative decrease per iteration < ftol or |grad| < gtol
    ftol: float = 1e-12
    gtol: float = 1e-8
    # Adam (the authors' solver): lr, and stop once |Δloss| < tol for `patience` iterations in a row
    lr: float = 0.01
    tol: float = 1e-3
    patience: int = 10
    subspace: bool = True                    # optimise in the span of the seeds (exact, see module doc)
    init_noise: float = 0.01                 # uniform [0, init_noise) added to the chord initialisation
    # centroid start: the closed-form Gaussian-preserving combination (symmetric in the seeds, and
    # ~10x fewer iterations), "mean", or the authors' SLERP of the first two seeds, which depends
    # on seed order: it can end in another local optimum (1% apart for K=4, d=1024)
    init: Literal["slerp", "mean", "gaussian"] = "gaussian"

    def __post_init__(self) -> None:
        if self.n_points < 3:
            raise ValueError(f"n_points must be at least 3 (one free interior point), got {self.n_points}")
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected 'lbfgs' or 'adam'")
        if self.init not in ("slerp", "mean", "gaussian"):
            raise ValueError(f"unknown centroid init {self.init!r}; expected 'slerp', 'mean' or 'gaussian'")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.max_iterations < 1 or self.patience < 1 or not self.tol >= 0 or not self.lr > 0:
            raise ValueError("max_iterations, patience and lr must be positive and tol non-negative")

    @classmethod
    def reference_interpolation(cls, **overrides) -> "NaoSettings":
        """The authors' interpolation: Adam lr 0.01 in R^d, stop after 10 changes < 0.001."""
        return replace(cls(optimizer="adam", tol=1e-3, patience=10, subspace=False), **overrides)

    @classmethod
    def reference_centroid(cls, **overrides) -> "NaoSettings":
        """The authors' centroid: Adam lr 0.01 in R^d, stop after 5 changes < 0.01."""
        return replace(cls(optimizer="adam", tol=1e-2, patience=5, subspace=False, init="slerp"), **overrides)


@dataclass
class OptimRecord:
    """What an optimisation did: for logs and JSON records."""

    iterations: int
    objective: float
    stop_reason: str
    seconds: float
    history: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"iterations": self.iterations, "objective": self.objective,
                "stop_reason": self.stop_reason, "seconds": round(self.seconds, 6)}


@dataclass
class NaoPath:
    """A norm-aware path: ``points`` is (n_points, *shape), row 0 = a, last row = b."""

    points: torch.Tensor
    record: OptimRecord

    def at(self, t) -> torch.Tensor:
        """Point(s) at arc-length fraction ``t`` in [0, 1] along the path (exact endpoints at 0, 1)."""
        return _path_at(self.points, t)


@dataclass
class NaoCentroid:
    """A NAO centroid: ``centroid`` (*shape); ``paths`` (K, n_points, *shape) from seed k (row 0)
    to the centroid (last row)."""

    centroid: torch.Tensor
    paths: torch.Tensor
    record: OptimRecord


def nao_path(a: TensorLike, b: TensorLike, n_points: int | None = None, eps: float | None = None,
             generator: torch.Generator | None = None, settings: NaoSettings | None = None) -> NaoPath:
    """Norm-aware interpolation path between seeds ``a`` and ``b``.

    Minimises ``-sum_i |Δ_i| log f(|m_i|) + λ sum_i relu(|Δ_i| - ε)`` over the ``n_points - 2``
    interior points (``m_i`` the segment midpoints), starting from evenly spaced chord points plus
    uniform [0, 0.01) noise drawn from ``generator``.
    """
    settings = _settings(settings, n_points, eps)
    a, b = _pair(a, b)
    start = time.perf_counter()
    if torch.equal(a, b):
        points = a.reshape(1, *a.shape).expand(settings.n_points, *a.shape).clone()
        return NaoPath(points, OptimRecord(0, 0.0, "identical endpoints", time.perf_counter() - start))
    ends = torch.stack([a, b]).reshape(2, -1).double().cpu()
    eps_value = settings.eps if settings.eps is not None else 2 * (ends[0] - ends[1]).norm().item() / settings.n_points
    basis, coords = _frame(ends, settings.subspace)
    interior = _chord_init(coords[0], coords[1], settings, generator).numpy()
    fixed = coords.numpy()
    problem = _PathProblem(starts=fixed[0:1], ends=fixed[1:2], d=ends.shape[1], eps=eps_value,
                           lam=settings.penalty_weight)
    record = _optimise([interior], problem.value_and_grad, settings, start)
    full = torch.from_numpy(problem.full_points(interior, fixed[1:2])[0])
    points = _lift(full, basis).reshape(settings.n_points, *a.shape).to(a)
    return NaoPath(points, record)


def nao_interpolate(a: TensorLike, b: TensorLike, t, **kwargs) -> torch.Tensor:
    """NAO interpolation at arc-length fraction(s) ``t``: ``nao_path(a, b, **kwargs).at(t)``."""
    return nao_path(a, b, **kwargs).at(t)


def nao_centroid(seeds: SeedsLike, n_points: int | None = None, eps: float | None = None,
                 generator: torch.Generator | None = None, settings: NaoSettings | None = None,
                 init: Literal["slerp", "mean", "gaussian"] | None = None) -> NaoCentroid:
    """NAO centroid of K >= 2 seeds: one path from each seed to a shared free point c, all optimised
    jointly with ``-sum_k cost(p_k -> c) - log f(|c|) + λ sum_k penalty_k``.

    ``c`` starts at the Gaussian-preserving combination (default), SLERP(0.5) of the first two
    seeds (the authors' choice) or the mean; ε defaults to ``2 |p_1 - p_2| / n_points``.
    """
    settings = _settings(settings, n_points, eps)
    if init is not None:
        settings = replace(settings, init=init)
    z = _stack(seeds, 2, "NAO centroid")
    shape, k = z.shape[1:], z.shape[0]
    start = time.perf_counter()
    flat = z.reshape(k, -1).double().cpu()
    if settings.init == "slerp":
        c0 = slerp(flat[0], flat[1], 0.5)
    elif settings.init == "gaussian":
        c0 = gaussian_centroid(flat)
    else:
        c0 = flat.mean(0)
    if torch.all(c0 == 0):  # symmetric seeds: the authors nudge a zero start off the origin
        c0 = torch.rand(c0.shape, generator=generator, dtype=c0.dtype) / 100
    eps_value = settings.eps if settings.eps is not None else 2 * (flat[0] - flat[1]).norm().item() / settings.n_points
    basis, coords = _frame(torch.cat([flat, c0[None]]), settings.subspace)
    seed_coords, c_coords = coords[:k], coords[k]
    interior = torch.stack([_chord_init(seed_coords[i], c_coords, settings, generator) for i in range(k)]).numpy()
    centroid = c_coords.clone().numpy()
    problem = _PathProblem(starts=seed_coords.numpy(), ends=None, d=flat.shape[1], eps=eps_value,
                           lam=settings.penalty_weight)
    record = _optimise([interior, centroid], problem.value_and_grad, settings, start)
    full = torch.from_numpy(problem.full_points(interior, np.broadcast_to(centroid, (k, centroid.size))))
    paths = _lift(full.reshape(k * settings.n_points, -1), basis).reshape(k, settings.n_points, *shape)
    c = _lift(torch.from_numpy(centroid)[None], basis)[0].reshape(shape)
    return NaoCentroid(c.to(z), paths.to(z), record)


def _settings(settings: NaoSettings | None, n_points: int | None, eps: float | None) -> NaoSettings:
    settings = settings or NaoSettings()
    overrides = {k: v for k, v in {"n_points": n_points, "eps": eps}.items() if v is not None}
    return replace(settings, **overrides) if overrides else settings


def _frame(points: torch.Tensor, subspace: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Orthonormal coordinates of ``points`` (rows) in their span, or the identity frame.

    Householder QR gives points = coords @ basis.T exactly, also when the points are dependent."""
    if not subspace:
        return None, points
    q, r = torch.linalg.qr(points.T, mode="reduced")  # q: (d, m), r: (m, m)
    return q, r.T


def _lift(coords: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return coords if basis is None else coords @ basis.T


def _chord_init(a: torch.Tensor, b: torch.Tensor, settings: NaoSettings,
                generator: torch.Generator | None) -> torch.Tensor:
    """Interior points evenly spaced on the chord a -> b, plus uniform [0, init_noise) noise."""
    t = torch.linspace(0, 1, settings.n_points, dtype=a.dtype)[1:-1, None]
    points = a + t * (b - a)
    noise = torch.rand(points.shape, generator=generator, dtype=points.dtype) * settings.init_noise
    return points + noise


class _PathProblem:
    """The NAO objective over P paths, batched as (P, n, dim) float64 NumPy arrays, with its
    analytic gradient. NumPy, not torch autograd: on problems this small, autograd and intra-op
    threading cost 10-100x the arithmetic."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray | None, d: int, eps: float, lam: float) -> None:
        self.starts, self.ends, self.d, self.eps, self.lam = starts, ends, d, eps, lam
        self.log_norm = _chi_log_normaliser(d)

    def full_points(self, interior: np.ndarray, ends: np.ndarray) -> np.ndarray:
        interior = interior if interior.ndim == 3 else interior[None]
        return np.concatenate([self.starts[:, None], interior, ends[:, None]], axis=1)

    def log_f(self, r: np.ndarray) -> np.ndarray:
        return (self.d - 1) * np.log(r) - 0.5 * r * r - self.log_norm

    def value_and_grad(self, interior: np.ndarray, centroid: np.ndarray | None = None
                       ) -> tuple[float, np.ndarray, np.ndarray | None]:
        """Loss and its gradients w.r.t. the interior points and (centroid mode) the free end.

        loss = -sum |Δ| log f(|m|) + λ sum relu(|Δ| - ε)   [- log f(|c|) with a free end c]"""
        k = self.starts.shape[0]
        ends = self.ends if centroid is None else np.broadcast_to(centroid, (k, centroid.shape[-1]))
        x = self.full_points(interior, ends)
        steps = x[:, 1:] - x[:, :-1]
        lengths = np.sqrt((steps * steps).sum(-1))
        mids = 0.5 * (x[:, 1:] + x[:, :-1])
        radii = np.sqrt((mids * mids).sum(-1))
        log_f = self.log_f(radii)
        excess = lengths - self.eps
        loss = -(lengths * log_f).sum() + self.lam * np.maximum(excess, 0).sum()
        # d loss / d step and d loss / d midpoint, then onto the two points each one joins
        g_step = ((self.lam * (excess > 0) - log_f) / np.maximum(lengths, 1e-300))[..., None] * steps
        g_mid = (-0.5 * lengths * ((self.d - 1) / radii - radii) / np.maximum(radii, 1e-300))[..., None] * mids
        g = np.zeros_like(x)
        g[:, 1:] += g_step + g_mid
        g[:, :-1] += g_mid - g_step
        if centroid is None:
            return float(loss), g[:, 1:-1].reshape(interior.shape), None
        c_norm = float(np.sqrt(centroid @ centroid))
        loss = loss - self.log_f(np.float64(c_norm))
        g_centroid = g[:, -1].sum(0) - ((self.d - 1) / c_norm - c_norm) * centroid / c_norm
        return float(loss), g[:, 1:-1], g_centroid


def _optimise(params: list[np.ndarray], value_and_grad, settings: NaoSettings, start: float) -> OptimRecord:
    """Minimise ``value_and_grad(*params)``, updating ``params`` in place: L-BFGS (SciPy, robust
    line search), or Adam with the authors' rule: stop once |Δloss| < tol for ``patience``
    consecutive iterations."""
    if settings.optimizer == "lbfgs":
        return _lbfgs(params, value_and_grad, settings, start)
    tensors = [torch.from_numpy(p) for p in params]  # shares memory with params
    opt = torch.optim.Adam(tensors, lr=settings.lr)
    history: list[float] = []
    last, calm, reason = math.inf, 0, "max_iterations"
    for _ in range(settings.max_iterations):
        loss, *grads = value_and_grad(*params)
        _check_finite(loss)
        for t, g in zip(tensors, grads):  # the interpolation problem has no free end (g None)
            t.grad = None if g is None else torch.from_numpy(np.ascontiguousarray(g))
        opt.step()
        history.append(loss)
        calm = calm + 1 if abs(last - loss) < settings.tol else 0
        last = loss
        if calm >= settings.patience:
            reason = f"|Δloss| < {settings.tol:g} for {settings.patience} iterations"
            break
    return _finish(params, value_and_grad, history, reason, start)


def _lbfgs(params: list[np.ndarray], value_and_grad, settings: NaoSettings, start: float) -> OptimRecord:
    from scipy.optimize import minimize

    shapes, sizes = [p.shape for p in params], [p.size for p in params]
    splits = np.cumsum(sizes)[:-1]
    history: list[float] = []

    def unpack(x: np.ndarray) -> list[np.ndarray]:
        return [q.reshape(s) for q, s in zip(np.split(x, splits), shapes)]

    def fun(x: np.ndarray):
        loss, *grads = value_and_grad(*unpack(x))
        _check_finite(loss)
        return loss, np.concatenate([g.reshape(-1) for g in grads if g is not None])

    x0 = np.concatenate([p.reshape(-1) for p in params])
    # one BLAS thread: L-BFGS-B's vector operations are tiny and threads only contend
    with threadpool_limits(1):
        result = minimize(fun, x0, jac=True, method="L-BFGS-B",
                          callback=lambda intermediate_result: history.append(float(intermediate_result.fun)),
                          options={"maxiter": settings.max_iterations, "maxcor": 20, "ftol": settings.ftol,
                                   "gtol": settings.gtol})
    for p, q in zip(params, unpack(result.x)):
        p[...] = q
    reason = "L-BFGS-B: " + ("line search found no further decrease (converged to its precision)"
                             if result.status == 2 else str(result.message).lower())
    return _finish(params, value_and_grad, history, reason, start)


def _finish(params, value_and_grad, history: list[float], reason: str, start: float) -> OptimRecord:
    return OptimRecord(len(history), value_and_grad(*params)[0], reason, time.perf_counter() - start, history)


def _check_finite(loss: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError("NAO objective became non-finite (a path point reached norm 0?)")


def _path_at(points: torch.Tensor, t) -> torch.Tensor:
    flat = points.reshape(points.shape[0], -1)
    tt, scalar = _times(t, torch.float64)
    tt = tt[:, 0]
    if torch.any((tt < 0) | (tt > 1)):
        raise ValueError("path positions t must lie in [0, 1]")
    lengths = (flat[1:] - flat[:-1]).double().norm(dim=1)
    cum = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    if cum[-1] == 0:
        out = flat[:1].expand(tt.shape[0], -1)
        return _shape_out(out, points.shape[1:], scalar)
    s = tt * cum[-1]
    idx = torch.searchsorted(cum, s, right=True).clamp(1, flat.shape[0] - 1)
    seg = (cum[idx] - cum[idx - 1]).clamp_min(1e-300)
    w = ((s - cum[idx - 1]) / seg).clamp(0, 1).to(flat.dtype)[:, None]
    out = (1 - w) * flat[idx - 1] + w * flat[idx]
    out[tt == 0] = flat[0]
    out[tt == 1] = flat[-1]
    return _shape_out(out, points.shape[1:], scalar)
