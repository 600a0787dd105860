"""The miniature world (benchmarks/mini): data splits, tokenizer, metrics, and a reduced end-to-end
run of the same stage code (8x8 digits, few steps) that must reproduce the long-tail failure."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import yaml

from benchmarks.mini import data, metrics
from benchmarks.mini.__main__ import run_stage
from benchmarks.mini.config import DataConfig, load_config

# ---------------------------------------------------------------- tokenizer


def test_tokenizer_matches_open_clip_ids():
    import open_clip

    from benchmarks.mini.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    ref = open_clip.tokenizer.SimpleTokenizer()
    assert len(tok) == 49408
    for text in ["a photo of the digit seven", "A close-up photo of a tiger_cat!!", "café 123"]:
        assert tok(text).input_ids == [ref.sot_token_id, *ref.encode(text), ref.eot_token_id]
    assert tok.pad_token_id == ref.eot_token_id  # SD 1.x pads with <|endoftext|>


# ---------------------------------------------------------------- data

CI_DATA = DataConfig(source="sklearn_digits", image_size=16, tail_classes=[3, 8], imbalance=400.0,
                     n_train_tail=4, n_test=20, n_references=5, n_encoder=40, n_evaluator=40)


@pytest.fixture(scope="module")
def digits():
    return data.load_source("sklearn_digits")


def test_splits_are_disjoint_balanced_and_long_tailed(digits):
    _, labels = digits
    parts = data.split_indices(labels, CI_DATA)
    all_idx = np.concatenate(list(parts.values()))
    assert len(all_idx) == len(set(all_idx.tolist())), "splits overlap"
    for split in ("test", "references", "encoder", "evaluator"):
        counts = np.bincount(labels[parts[split]], minlength=10)
        assert len(set(counts.tolist())) == 1, f"{split} is not balanced: {counts}"
    train_counts = np.bincount(labels[parts["train"]], minlength=10)
    assert train_counts[3] == train_counts[8] == 4 and train_counts[0] > 40
    w = data.draw_weights(labels[parts["train"]], CI_DATA)
    per_class = np.bincount(labels[parts["train"]], weights=w, minlength=10)
    assert per_class[0] / per_class[3] == pytest.approx(400.0)
    assert w.sum() == pytest.approx(1.0)
    # seeded: same config, same split; another seed, another split
    assert np.array_equal(data.split_indices(labels, CI_DATA)["test"], parts["test"])
    other = DataConfig(**{**CI_DATA.__dict__, "seed": 1})
    assert not np.array_equal(data.split_indices(labels, other)["test"], parts["test"])


def test_split_errors_name_the_problem(digits):
    _, labels = digits
    with pytest.raises(ValueError, match="tail_classes"):
        data.split_indices(labels, DataConfig(source="sklearn_digits", tail_classes=[12]))
    with pytest.raises(ValueError, match=r"class \d \(\w+\) has \d+ images, the split sizes need \d+"):
        data.split_indices(labels, DataConfig(source="sklearn_digits", n_test=500))
    with pytest.raises(ValueError, match="unknown mini data source"):
        data.load_source("imagenet")


def test_rgb_conversion_keeps_mnist_margin():
    x = np.zeros((1, 28, 28), np.float32)
    x[0, 10:18, 10:18] = 1.0
    rgb = data.to_rgb(x, 32)
    assert rgb.shape == (1, 3, 32, 32) and rgb.dtype == torch.uint8
    assert rgb[0, 0, 12:20, 12:20].min() == 255 and rgb[0, :, :2].max() == 0
    assert torch.equal(rgb[0, 0], rgb[0, 2])


# ---------------------------------------------------------------- metrics


class _ByMeanEvaluator:
    """Class = brightness bucket; features = the image itself (for testing the metrics)."""

    def predict(self, x):
        return (x.mean((1, 2, 3)) * 10).long().clamp(0, 9)

    def features(self, x):
        return x.flatten(1)


def test_fidelity_and_diversity():
    ev = _ByMeanEvaluator()
    imgs = torch.full((4, 3, 4, 4), 0.35)
    imgs[0] = 0.75
    assert metrics.fidelity(ev, imgs, 3) == pytest.approx(0.75)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(8, 3, 4, 4, generator=g)
    copies = real[:1].repeat(8, 1, 1, 1) + 1e-4 * torch.rand(8, 3, 4, 4, generator=g)
    assert metrics.diversity(ev, real, real) == pytest.approx(1.0)
    assert metrics.diversity(ev, copies, real) < 0.01
    with pytest.raises(ValueError, match=">= 2 images"):
        metrics.mean_pairwise_distance(torch.ones(1, 3))


def test_ci95():
    mean, half = metrics.ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    assert metrics.ci95([0.3]) == (0.3, 0.0)


# ---------------------------------------------------------------- reduced world, end to end

CI_PARAMS = {
    "threads": 1,
    "data": {**CI_DATA.__dict__},
    "vae": {"block_out_channels": [16, 32, 32], "norm_num_groups": 8, "steps": 150, "batch_size": 64,
            "lr": 0.003},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "diffusion": {"block_out_channels": [32, 32], "norm_num_groups": 8, "steps": 500, "batch_size": 64,
                  "lr": 0.002, "warmup_steps": 50, "ema_decay": 0.99},
    "encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "patch_size": 4, "projection_dim": 16, "steps": 60, "batch_size": 64},
    "evaluator": {"steps": 150, "batch_size": 64},
    "check": {"num_images_per_class": 20, "num_inference_steps": 10, "guidance_scale": 5.0, "seeds": [0, 1]},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"mini": {**CI_PARAMS, "root": str(root / "data"),
                                               "results": str(root / "results")}}))
    seconds = {}
    for stage in ("data", "text", "vae", "diffusion", "encoder", "evaluator", "check"):
        t = time.perf_counter()
        run_stage(stage, str(params))
        seconds[stage] = round(time.perf_counter() - t, 1)
    print("reduced mini world stage seconds:", seconds)
    return load_config(params)


def test_reduced_world_reproduces_the_long_tail_failure(world):
    plain = json.loads((world.results_dir / "plain.json").read_text())
    evaluator = json.loads((world.evaluator_dir / "training.json").read_text())
    assert evaluator["test_accuracy"] > 0.8, evaluator["test_accuracy"]
    # claim 1 (direction): plain sampling gets head classes right far more often than tail classes
    assert plain["head_fidelity_plain"] > 0.6, plain
    assert plain["head_fidelity_plain"] - plain["tail_fidelity_plain"] > 0.3, plain
    seen = json.loads((world.sd_dir / "training.json").read_text())["images_seen_per_class"]
    assert seen["three"] * 100 < seen["zero"], seen


def test_reduced_world_loads_with_the_real_model_classes(world):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from benchmarks.mini.evaluator import load_evaluator

    pipe = StableDiffusionPipeline.from_pretrained(world.sd_dir)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    sc = pipe.scheduler.config
    assert (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.num_train_timesteps, sc.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 4
    # classifier-free guidance path of the real pipeline, default size from the UNet config
    out = pipe("a photo of the digit one", num_inference_steps=2, guidance_scale=7.5, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    # scaled latents are roughly unit-variance, as SD's 0.18215 makes them
    x = data.to_unit(data.load_split(world.data_dir, "test")[0][:64]) * 2 - 1
    z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    assert 0.7 < z.std().item() < 1.4

    enc = CLIPVisionModelWithProjection.from_pretrained(world.clip_dir)
    proc = CLIPImageProcessor.from_pretrained(world.clip_dir)
    from PIL import Image

    ref = world.data_dir / "references" / "three" / "0.png"
    pix = proc(images=Image.open(ref), return_tensors="pt").pixel_values
    assert pix.shape == (1, 3, 16, 16)
    assert enc(pixel_values=pix).image_embeds.shape == (1, 16)
    ev = load_evaluator(world.evaluator_dir)
    assert ev.features(torch.rand(2, 3, 16, 16)).ndim == 2
