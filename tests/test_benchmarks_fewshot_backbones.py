"""Backbones by name and the feature cache."""
import torch

from benchmarks.fewshot.backbones import cached_features


def test_feature_cache_reuses_only_matching_keys(tmp_path):
    calls = []

    def compute(n):
        calls.append(n)
        return torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)

    a = cached_features(tmp_path / "f.safetensors", ["1", "2"], lambda: compute(2))
    b = cached_features(tmp_path / "f.safetensors", ["1", "2"], lambda: compute(2))
    assert torch.equal(a, b) and calls == [2]
    cached_features(tmp_path / "f.safetensors", ["1", "2", "3"], lambda: compute(3))
    assert calls == [2, 3]
