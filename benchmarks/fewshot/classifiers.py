"""Few-shot classifier heads on cached features, vectorised across episodes.

``prototype`` (cosine nearest centroid) and ``linear`` (multinomial logistic regression, solved by
Newton's method per episode: each episode stops on its own convergence test, so its result does not
depend on which other episodes share its batch). ``finetune_accuracies`` is the slow path that
fine-tunes the whole backbone per episode. Hyper-parameters are selected by
:func:`select_hyperparameters`, which refuses any episode that is not made of validation classes.
Backbones and features: :mod:`.backbones`; intervals: :mod:`.stats`."""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.fewshot.backbones import image_transform
from benchmarks.fewshot.registry import BenchmarkSpec, unknown_error
from benchmarks.fewshot.sampling import Episodes


# --- per-episode heads on cached features --------------------------------------------------------

def prototype_logits(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity to class centroids. support (E, N, S, D), query (E, M, D) -> (E, M, N)."""
    protos = F.normalize(support.mean(2), dim=-1)
    return torch.einsum("emd,end->emn", F.normalize(query, dim=-1), protos)


def linear_logits(support: torch.Tensor, query: torch.Tensor, l2: float = 1e-2, max_iter: int = 100,
                  tol: float = 1e-10) -> torch.Tensor:
    """Multinomial logistic regression per episode on L2-normalised features: minimise, for every
    episode, mean cross-entropy over its support + ``l2``/2 ||W||^2 (bias not penalised).

    Solved exactly in a smaller space: the optimal W lies in the span of the episode's n support
    features (the loss gradient does; the penalty removes the rest), so it is written in an
    orthonormal basis of that span (QR); and softmax ignores a shift shared by all classes, which the
    penalty sets to zero, so class weights (and biases) are written in an orthonormal basis of the
    N-1 dimensional zero-sum subspace. Newton's method in float64 with a backtracking (Armijo) line
    search then solves each episode; each stops on its own test — its full Newton step (near the
    optimum: its distance to the optimum) changes no weight by more than ``tol`` * (1 + its largest
    weight) — and is then left alone, so its weights do not depend on which episodes share its batch.
    An episode still moving after ``max_iter`` Newton steps is an error, never a silent result."""
    E, N, S, D = support.shape
    x = F.normalize(support.reshape(E, N * S, D).double(), dim=-1)
    basis, r = torch.linalg.qr(x.transpose(1, 2))                  # x^T = basis @ r
    coords = torch.cat([r.transpose(1, 2), x.new_ones(E, N * S, 1)], dim=-1)   # (E, n, k+1), bias last
    zero_sum = torch.linalg.qr(torch.eye(N, dtype=x.dtype, device=x.device) - 1.0 / N)[0][:, :N - 1]   # (N, N-1)
    onehot = F.one_hot(torch.arange(N, device=x.device).repeat_interleave(S), N).double()
    # episodes are independent: solve them in groups whose Hessians stay cache-sized (8 MB: 2-3x faster for
    # 5-way episodes with 75 support images, where one Hessian is 0.7 MB; results cannot change)
    size = max(1, _NEWTON_BYTES // (8 * ((N - 1) * coords.shape[-1]) ** 2))
    theta = torch.cat([_newton_logistic(coords[i:i + size], onehot, zero_sum, l2, max_iter, tol)
                       for i in range(0, E, size)]) @ zero_sum.T                             # (E, k+1, N)
    q = F.normalize(query.double(), dim=-1) @ basis
    return (q @ theta[:, :-1] + theta[:, -1:]).float()


_NEWTON_BYTES = 8 * 2 ** 20


def _logistic_loss(coords, onehot, theta, l2):
    z = coords @ theta
    ce = (torch.logsumexp(z, -1) - (z * onehot).sum(-1)).mean(-1)
    return ce + 0.5 * l2 * (theta[:, :-1] ** 2).sum((1, 2))


def _newton_logistic(coords: torch.Tensor, onehot: torch.Tensor, classes: torch.Tensor, l2: float, max_iter: int,
                     tol: float) -> torch.Tensor:
    """(E, k+1, c) weights ``theta`` (last row: bias) minimising, per episode, :func:`_logistic_loss` of
    the logits ``coords @ theta @ classes.T`` (``classes``: (N, c) orthonormal columns)."""
    E, n, k1 = coords.shape
    c_dim = classes.shape[1]
    onehot = onehot.expand(E, n, -1)
    penalty = coords.new_full((k1, 1), l2)
    penalty[-1] = 0
    floor = penalty.reshape(1, k1).expand(c_dim, k1).reshape(-1)   # the penalty's curvature, (class, coordinate) order
    theta = coords.new_zeros(E, k1, c_dim)
    active = torch.arange(E, device=coords.device)

    def loss_of(c, oh, th):
        return _logistic_loss(c, oh, th @ classes.T, l2)

    for _ in range(max_iter):
        c, th, oh = coords[active], theta[active], onehot[active]
        m = len(active)
        p = torch.softmax(c @ th @ classes.T, -1)
        grad = c.transpose(1, 2) @ (p - oh) @ classes / n + penalty * th
        pc = p @ classes                                                           # (m, n, c)
        curv = torch.einsum("mik,kj,kl->mijl", p, classes, classes) - pc.unsqueeze(-1) * pc.unsqueeze(-2)
        blocks = coords.new_empty(m, c_dim, c_dim, k1, k1)   # Hessian, unknowns ordered (class, coordinate)
        for j in range(c_dim):     # block (j, l) = c^T diag(curv[:, j, l]) c / n: c^2 small bmm's, no (n, k, k) tensor
            for l in range(j, c_dim):
                blocks[:, j, l] = blocks[:, l, j] = (c.transpose(1, 2) * curv[:, None, :, j, l]) @ c / n
        hess = blocks.transpose(2, 3).reshape(m, c_dim * k1, c_dim * k1)
        hess.diagonal(dim1=1, dim2=2).add_(floor)
        chol = torch.linalg.cholesky_ex(hess)[0]
        step = -torch.cholesky_solve(grad.transpose(1, 2).reshape(m, -1, 1), chol).reshape(m, c_dim, k1).transpose(1, 2)
        slope = (grad * step).sum((1, 2))
        loss = loss_of(c, oh, th)
        slack = 1e-13 * (1 + loss)  # float64 rounding of the loss: near the optimum, take the full step
        t = coords.new_ones(m)
        for _halving in range(40):
            ok = loss_of(c, oh, th + t.view(-1, 1, 1) * step) <= loss + 1e-4 * t * slope + slack
            if ok.all():
                break
            t = torch.where(ok, t, t / 2)
        theta[active] = th + t.view(-1, 1, 1) * step
        done = step.abs().amax((1, 2)) <= tol * (1 + th.abs().amax((1, 2)))
        active = active[~done]
        if active.numel() == 0:
            return theta
    raise RuntimeError(f"linear head: {len(active)} of {E} episodes still moving after {max_iter} Newton steps "
                       f"(l2={l2:g}); raise max_iter")


HEADS: dict[str, Callable[..., torch.Tensor]] = {"prototype": prototype_logits, "linear": linear_logits}


def get_head(name: str) -> Callable[..., torch.Tensor]:
    if name not in HEADS:
        raise unknown_error("unknown classifier head", name, sorted(HEADS))
    return HEADS[name]


def episode_tensors(features: torch.Tensor, episodes: Episodes, synthetic: dict | None = None,
                    select: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support (E, N, K[+M], D), query (E, N*Q, D) and query labels (E, N*Q) of ``episodes[select]``.

    ``synthetic`` maps (class, shot, trial) -> (M, D) features of the images made for that support set;
    they join the real support of their class."""
    sup = features[torch.as_tensor(episodes.support[select])]
    qry = features[torch.as_tensor(episodes.query[select])]
    E, N, Q, D = qry.shape
    if synthetic is not None:
        first = select.start or 0
        extra = []
        for e, (classes, trials) in enumerate(zip(episodes.classes[select], episodes.trials[select])):
            row = []
            for c, t in zip(classes, trials):
                key = (c, episodes.shot, int(t))
                if key not in synthetic:
                    raise KeyError(f"episode {first + e}: no synthetic images for class {c!r}, {episodes.shot}-shot, trial {int(t)}")
                row.append(synthetic[key])
            sizes = {r.shape[0] for r in row}
            if len(sizes) != 1:
                raise ValueError(f"episode {first + e}: classes have different numbers of synthetic images {sorted(sizes)}")
            extra.append(torch.stack(row))
        sup = torch.cat([sup, torch.stack(extra)], dim=2)
    labels = torch.arange(N).repeat_interleave(Q).expand(E, N * Q)
    return sup, qry.reshape(E, N * Q, D), labels


def episode_accuracies(head: str, features: torch.Tensor, episodes: Episodes, synthetic: dict | None = None,
                       chunk: int = 200, progress: bool = False, **hyper) -> np.ndarray:
    """Query accuracy of every episode (float64 array of length E)."""
    fn = get_head(head)
    accs = []
    for start in tqdm(range(0, len(episodes), chunk), desc=f"{head} episodes", disable=not progress):
        sup, qry, labels = episode_tensors(features, episodes, synthetic, slice(start, start + chunk))
        pred = fn(sup, qry, **hyper).argmax(-1)
        accs.append((pred == labels).double().mean(-1).numpy())
    return np.concatenate(accs)


def select_hyperparameters(spec: BenchmarkSpec, head: str, grid: list[dict], features: torch.Tensor,
                           episodes: Episodes, synthetic: dict | None = None) -> tuple[dict, list[dict]]:
    """Best hyper-parameters of ``head`` by mean accuracy on validation episodes. Episodes that are
    not of the validation split, or contain any non-validation class, are refused."""
    if episodes.split != "val":
        raise ValueError(f"hyper-parameters are selected on validation classes only; got {episodes.split!r} episodes")
    val = set(spec.classes["val"])
    for e, classes in enumerate(episodes.classes):
        for c in classes:
            if c not in val:
                raise ValueError(f"hyper-parameters are selected on validation classes only; episode {e} "
                                 f"contains class {c!r} of split {spec.split_of(c)!r}")
    table = []
    for hp in grid or [{}]:
        table.append({**hp, "val_accuracy": float(episode_accuracies(head, features, episodes, synthetic, **hp).mean())})
    best = max(range(len(table)), key=lambda i: table[i]["val_accuracy"])  # first of equals: grid order decides
    return dict((grid or [{}])[best]), table


# --- the slow path: fine-tune the backbone per episode ------------------------------------------

def finetune_accuracies(backbone: torch.nn.Module, images: Callable[[int], Image.Image], episodes: Episodes,
                        image_size: int, synthetic: dict | None = None, steps: int = 100, lr: float = 1e-3,
                        seed: int = 0, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """Per episode: copy the backbone, add a linear head, train both with Adam on the support (+ the
    synthetic images of each support set, ``synthetic``: (class, shot, trial) -> list of PIL images or
    paths) for ``steps`` full-batch steps with flip/shift augmentation; accuracy on the queries."""
    accs = []
    plain = image_transform(image_size)
    for e in tqdm(range(len(episodes)), desc="fine-tuning episodes", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 100003 + e)
        torch.manual_seed(seed * 100003 + e)
        augment = image_transform(image_size, augment=True, generator=gen)
        sup_images, sup_labels = [], []
        for i, (c, t) in enumerate(zip(episodes.classes[e], episodes.trials[e])):
            extra = (synthetic or {}).get((c, episodes.shot, int(t)), [])
            if synthetic is not None and not extra:
                raise KeyError(f"episode {e}: no synthetic images for class {c!r}, {episodes.shot}-shot, trial {int(t)}")
            for im in [images(int(r)) for r in episodes.support[e, i]] + [_open(p) for p in extra]:
                sup_images.append(im)
                sup_labels.append(i)
        model = copy.deepcopy(backbone).to(device).train()
        head = torch.nn.Linear(model.num_features, episodes.ways).to(device)
        opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=lr)
        y = torch.tensor(sup_labels, device=device)
        for step in range(steps):
            x = torch.stack([augment(im) for im in sup_images]).to(device)
            loss = F.cross_entropy(head(model(x)), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning episode {e}: loss is {loss.item()} at step {step}")
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            q = episodes.query[e]
            x = torch.stack([plain(images(int(r))) for r in q.ravel()]).to(device)
            pred = head(model(x)).argmax(-1).cpu()
        accs.append((pred == torch.arange(episodes.ways).repeat_interleave(q.shape[1])).double().mean().item())
    return np.asarray(accs)


def _open(item) -> Image.Image:
    return item if isinstance(item, Image.Image) else Image.open(item).convert("RGB")
