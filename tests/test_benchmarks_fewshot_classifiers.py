"""Classifier heads on cached features, hyper-parameter selection rules, the fine-tuning path."""
import numpy as np
import pytest
import torch
from fewshot_digits import single_torch_thread, digits_spec

from benchmarks.fewshot.backbones import create_backbone
from benchmarks.fewshot.classifiers import (episode_accuracies, finetune_accuracies, linear_logits, prototype_logits,
                                            select_hyperparameters)
from benchmarks.fewshot.registry import UnknownNameError
from benchmarks.fewshot.sampling import Episodes


def _blobs(E=4, N=3, S=5, M=6, D=16, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(E, N, 1, D, generator=g) * 2
    sup = centers + spread * torch.randn(E, N, S, D, generator=g)
    qry = centers + spread * torch.randn(E, N, M, D, generator=g)
    return sup, qry.reshape(E, N * M, D), torch.arange(N).repeat_interleave(M)


def test_prototype_head_is_cosine_nearest_centroid():
    sup, qry, y = _blobs()
    logits = prototype_logits(sup, qry)
    for e in range(sup.shape[0]):
        protos = sup[e].mean(1).numpy()
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        q = qry[e].numpy() / np.linalg.norm(qry[e].numpy(), axis=1, keepdims=True)
        assert np.allclose(logits[e].numpy(), q @ protos.T, atol=1e-5)
    assert (logits.argmax(-1) == y).float().mean() > 0.95


def test_linear_head_matches_sklearn_and_is_independent_per_episode():
    from sklearn.linear_model import LogisticRegression

    sup, qry, y = _blobs(spread=1.5)
    l2 = 0.1
    logits = linear_logits(sup, qry, l2=l2, max_iter=150)
    E, N, S, D = sup.shape
    for e in range(E):
        x = torch.nn.functional.normalize(sup[e].reshape(N * S, D), dim=-1).numpy()
        ref = LogisticRegression(C=1.0 / (l2 * N * S), tol=1e-10, max_iter=5000).fit(x, np.repeat(np.arange(N), S))
        q = torch.nn.functional.normalize(qry[e], dim=-1).numpy()
        assert np.allclose(torch.softmax(logits[e], -1).numpy(), ref.predict_proba(q), atol=2e-3)
    alone = linear_logits(sup[1:2], qry[1:2], l2=l2, max_iter=150)  # fitting one episode alone changes nothing
    assert torch.allclose(torch.softmax(alone[0], -1), torch.softmax(logits[1], -1), atol=2e-3)


def _episodes(split, classes, trials=None, E=2, N=3, K=2, Q=2):
    rows = np.arange(E * N * (K + Q)).reshape(E, N, K + Q)
    return Episodes("digits", split, N, K, Q, 0, classes, np.zeros((E, N), dtype=np.int64) if trials is None else trials,
                    rows[..., :K], rows[..., K:])


def test_episode_accuracies_with_and_without_synthetic_support():
    spec = digits_spec("unused")
    sup, qry, _ = _blobs(E=2, N=3, S=2, M=2, D=8, spread=0.05)
    # lay the blobs out as a feature table indexed by dataset row, in the order of _episodes' rows
    features = torch.cat([sup, qry.reshape(2, 3, 2, 8)], dim=2).reshape(-1, 8)
    eps = _episodes("val", [list(spec.classes["val"])] * 2)
    acc = episode_accuracies("prototype", features, eps)
    assert acc.shape == (2,) and (acc == 1.0).all()
    # synthetic images that sit on the wrong class pull the prototypes away
    wrong = {(c, 2, 0): -10 * sup[0, i].mean(0, keepdim=True).repeat(8, 1) for i, c in enumerate(spec.classes["val"])}
    assert episode_accuracies("prototype", features, eps, synthetic=wrong).mean() < 1.0
    with pytest.raises(KeyError, match="episode 0: no synthetic images for class 'four', 2-shot, trial 0"):
        episode_accuracies("prototype", features, eps, synthetic={})
    with pytest.raises(UnknownNameError, match="did you mean 'linear'"):
        episode_accuracies("linaer", features, eps)


def test_hyperparameters_can_only_be_selected_on_validation_classes():
    spec = digits_spec("unused")
    features = torch.randn(24, 8)
    val = _episodes("val", [list(spec.classes["val"])] * 2)
    best, table = select_hyperparameters(spec, "linear", [{"l2": 1e-3}, {"l2": 1.0}], features, val)
    assert best in ({"l2": 1e-3}, {"l2": 1.0}) and len(table) == 2 and "val_accuracy" in table[0]
    test = _episodes("test", [list(spec.classes["test"])] * 2)
    with pytest.raises(ValueError, match="validation classes only; got 'test' episodes"):
        select_hyperparameters(spec, "linear", [{"l2": 1.0}], features, test)
    disguised = _episodes("val", [list(spec.classes["test"])] * 2)
    with pytest.raises(ValueError, match="episode 0 contains class 'seven' of split 'test'"):
        select_hyperparameters(spec, "linear", [{"l2": 1.0}], features, disguised)


def test_backbone_by_name_and_finetune_path():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        create_backbone("resnet-18")
    model = create_backbone("test_resnet")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(12, 16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    from PIL import Image

    images = lambda r: Image.fromarray(pixels[r])  # noqa: E731
    eps = _episodes("test", [["seven", "eight", "nine"]], E=1, N=3, K=2, Q=2)
    a = finetune_accuracies(model, images, eps, image_size=16, steps=2, progress=False)
    b = finetune_accuracies(model, images, eps, image_size=16, steps=2, progress=False)
    assert a.shape == (1,) and 0.0 <= a[0] <= 1.0 and np.array_equal(a, b)


def test_linear_head_is_independent_of_chunking():
    """Each episode's Newton solve stops on its own test, so fitting episodes one at a time or 200 at
    a time gives exactly the same accuracies, and logits equal to float32 rounding (bitwise equal on
    the 2-core CPU machine: every episode takes the same arithmetic path)."""
    E, N, K, Q, D = 200, 3, 5, 5, 96   # the old shared L-BFGS gave 2 different accuracies here (l2=1)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(E, N, 1, D, generator=g)
    features = (centers + 2.5 * torch.randn(E, N, K + Q, D, generator=g)).reshape(-1, D)
    rows = np.arange(E * N * (K + Q)).reshape(E, N, K + Q)
    eps = Episodes("blobs", "test", N, K, Q, 0, [["a", "b", "c"]] * E, np.zeros((E, N), dtype=np.int64),
                   rows[..., :K], rows[..., K:])
    for l2 in (1e-3, 1.0):
        one = episode_accuracies("linear", features, eps, chunk=1, l2=l2)
        many = episode_accuracies("linear", features, eps, chunk=200, l2=l2)
        assert np.array_equal(one, many) and 0.4 < many.mean() < 0.95   # not a trivial problem
        sup, qry = features[rows[..., :K]], features[rows[..., K:]].reshape(E, N * Q, D)
        batched = linear_logits(sup, qry, l2=l2)
        alone = torch.cat([linear_logits(sup[e:e + 1], qry[e:e + 1], l2=l2) for e in range(E)])
        assert (batched - alone).abs().max() <= 1e-7 * batched.abs().max()
    with pytest.raises(RuntimeError, match="still moving after 1 Newton steps"):
        linear_logits(sup, qry, l2=1e-3, max_iter=1)
