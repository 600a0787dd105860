"""The CUDA paths the GPU profiles take (the ``fast`` preset's bf16 generation, bf16-autocast
classifier training), on the tiny models. Skipped without a CUDA device: CI has none, so run them on a
GPU machine (``python -m pytest tests/test_cuda.py``)."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.testing import tiny_components

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FAST = {  # the fast preset with short chains and runs
    "sd": {"num_inference_steps": 4},
    "seedselect": {"num_inference_steps": 4, "iterations": 3, "bootstrap_iterations": 2, "last_k_weights": (0.3, 0.7)},
    "nao-seedselect": {"num_inference_steps": 4, "iterations": 2, "last_k_weights": (0.3, 0.7)},
}


def _refs(seed: int, n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _pixels(record) -> np.ndarray:
    return np.asarray(record.image(), dtype=np.float32) / 255


@pytest.mark.parametrize("method", sorted(FAST))
def test_fast_preset_generates_in_bf16_on_cuda(method, tmp_path):
    from pipelines.generate import generate_concepts

    concepts = [("tiger cat", _refs(0)), ("lynx", _refs(1))]
    negatives = [_refs(2)] if method != "sd" else []
    records = generate_concepts(method, concepts, tmp_path / "cuda", 3, FAST[method], seed=5, preset="fast",
                                components=tiny_components(), device="cuda", progress=False, negatives=negatives)
    for record in (r for per_concept in records for r in per_concept):
        assert record["settings"]["dtype"] == "bf16"
        assert all(np.isfinite(step["total"]) for step in record.get("losses", []))
        pixels = _pixels(record)
        assert np.isfinite(pixels).all() and pixels.std() > 0.01  # an image, not a flat or NaN-filled square
    if method == "sd":
        # the same seeds in fp32 on the CPU: bf16 weights change the pixels a little, the scheduler's
        # fp32 arithmetic keeps them the same image
        cpu = generate_concepts(method, concepts, tmp_path / "cpu", 3, {**FAST[method], "dtype": "fp32"}, seed=5,
                                preset="fast", components=tiny_components(), device="cpu", progress=False)
        diffs = [float(np.abs(_pixels(a) - _pixels(b)).mean()) for ra, rb in zip(records, cpu) for a, b in zip(ra, rb)]
        print("sd bf16-cuda vs fp32-cpu mean |diff| per image:", [round(d, 4) for d in diffs])
        assert max(diffs) < 0.02


def test_dct_token_trains_and_generates_in_bf16_on_cuda():
    from pipelines.classifiers import ImageClassifier
    from pipelines.dct import DctPipeline, DctSettings

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        net[-1].bias[1] = -20.0  # never the target: both epochs run
    guide = ImageClassifier(net, ["a", "b", "c"], (32, 32), 32, (0.5,) * 3, (0.5,) * 3, source="tiny").to("cuda")
    pipe = DctPipeline.from_components(tiny_components().to(device="cuda", dtype=torch.bfloat16))
    settings = DctSettings(num_inference_steps=3, epoch_size=2, min_correct=2, max_epochs=2, patience=5,
                           guidance_scale=3.0, batch_size=2, dtype="bf16")
    token = pipe.train_token("b", guide, 1, settings, progress=False)
    assert token.record["epochs"] == 2 and all(np.isfinite(h["loss"]) for h in token.record["history"])
    assert torch.isfinite(token.embedding).all()
    images = pipe.generate_with_token("b", token, [0, 1], settings).images
    assert len(images) == 2


def test_longtail_training_uses_bf16_autocast_on_cuda(tmp_path):
    from benchmarks.longtail.training import TrainConfig, predict, train_classifier

    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    labels = np.arange(24) % 4
    cfg = TrainConfig(model="resnet18", image_size=32, epochs=2, batch_size=8, num_workers=2, device="cuda")
    model = train_classifier(paths, labels, 4, cfg, "logit-adjusted", seed=0, state_path=tmp_path / "state.pt",
                             progress=False)
    assert next(model.parameters()).is_cuda and (tmp_path / "state.pt").is_file()
    predicted = predict(model, paths, cfg, progress=False)
    assert predicted.shape == (24,) and set(predicted.tolist()) <= set(range(4))


def test_fewshot_backbone_trains_and_extracts_on_cuda_as_on_the_cpu():
    from benchmarks.fewshot.backbones import TrainConfig, create_backbone, extract_features, train_backbone

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)) for _ in range(16)]
    model = train_backbone(create_backbone("test_resnet"), images.__getitem__, range(16), [i % 4 for i in range(16)],
                           32, TrainConfig(epochs=1, batch_size=8), device="cuda", progress=False)
    assert next(model.parameters()).is_cuda
    on_cuda = extract_features(model, images.__getitem__, 16, 32, device="cuda", progress=False)
    on_cpu = extract_features(model, images.__getitem__, 16, 32, device="cpu", progress=False)
    assert torch.allclose(on_cuda, on_cpu, rtol=1e-2, atol=1e-3)  # cuDNN's TF32 convolutions allowed for
