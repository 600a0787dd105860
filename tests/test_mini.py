"""The miniature world (benchmarks/mini): data splits, tokenizer, metrics, and a reduced end-to-end
run of the same stage code (8x8 digits, few steps) that must reproduce the long-tail failure."""
from __future__ import annotations

import json
import time
from pathlib import Path

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

CI_DATA = DataConfig(source="sklearn_digits", image_size=16, tail_classes=[3, 8], val_classes=[5], imbalance=400.0,
                     n_train_tail=4, n_test=20, n_references=8, n_encoder=40, n_evaluator=40)


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
    assert train_counts[3] == train_counts[8] == train_counts[5] == 4 and train_counts[0] > 40
    w = data.draw_weights(labels[parts["train"]], CI_DATA)
    per_class = np.bincount(labels[parts["train"]], weights=w, minlength=10)
    assert per_class[0] / per_class[3] == pytest.approx(400.0)
    assert per_class[0] / per_class[5] == pytest.approx(400.0)  # the validation class is as rare as the tail
    assert w.sum() == pytest.approx(1.0)
    # seeded: same config, same split; another seed, another split
    assert np.array_equal(data.split_indices(labels, CI_DATA)["test"], parts["test"])
    other = DataConfig(**{**CI_DATA.__dict__, "seed": 1})
    assert not np.array_equal(data.split_indices(labels, other)["test"], parts["test"])


def test_corpus_pool_holds_the_corpus_first_and_no_balanced_split(digits):
    """Each class's pool: the corpus (train split) is its first n, and no image of it is in a balanced
    split; another draw of n from it is a long-tailed set drawn the same way (mini-lt's classifier set)."""
    _, labels = digits
    parts = data.split_indices(labels, CI_DATA)
    pools = data.corpus_pool(labels, CI_DATA)
    assert np.array_equal(np.concatenate([pool[:n] for pool, n in pools.values()]), parts["train"])
    balanced = set(np.concatenate([parts[s] for s in data.BALANCED_SPLITS]).tolist())
    for c, (pool, n) in pools.items():
        assert set(labels[pool].tolist()) == {c} and n == int((labels[parts["train"]] == c).sum())
        assert not balanced & set(pool.tolist())
        assert len(pool) == int((labels == c).sum()) - len(balanced & set(np.flatnonzero(labels == c).tolist()))


def test_committed_corpus_profile_is_graded_with_the_tail_digits_at_its_floor():
    """The committed mini corpus: counts fall exponentially over the class ranks to the rare (tail and
    validation) digits' floor, draw frequencies from 1 to 1/imbalance, and the scaled ImageNet-LT thresholds put at least
    two digits in each of many / medium / few, with two and five among the few."""
    from benchmarks.longtail.evaluation import GROUPS, shot_groups
    from benchmarks.longtail.mini import scaled_thresholds

    cfg = load_config(Path(__file__).parents[1] / "params.yaml").data
    _, labels = data.load_source(cfg.source)
    parts = data.split_indices(labels, cfg)
    counts = np.bincount(labels[parts["train"]], minlength=10)
    order = data.class_order(cfg, list(range(10)))
    assert order[-3:] == [7, 2, 5]     # the validation digit shares the tail digits' floor
    ranked = counts[order]
    levels = 10 - 3
    assert ranked.tolist() == [round(ranked[0] * (cfg.n_train_tail / ranked[0]) ** (min(r, levels) / levels)) for r in range(10)]
    assert all(a > b for a, b in zip(ranked[:8], ranked[1:8])) and set(ranked[-3:]) == {cfg.n_train_tail}
    many, few = scaled_thresholds(int(counts.min()), int(counts.max()))
    groups = shot_groups(counts, many, few)
    assert all((groups == g).sum() >= 2 for g in GROUPS), dict(zip(counts.tolist(), groups.tolist()))
    assert groups[2] == groups[5] == "few"
    w = data.draw_weights(labels[parts["train"]], cfg)
    rarity = np.bincount(labels[parts["train"]], weights=w, minlength=10)[order[0]] / \
        np.bincount(labels[parts["train"]], weights=w, minlength=10)[order]
    assert rarity[0] == 1 and all(a < b for a, b in zip(rarity[:8], rarity[1:8]))
    assert rarity[-3:].tolist() == pytest.approx([cfg.imbalance] * 3)


def test_scaled_thresholds_keep_the_imagenet_lt_cut_points_relative_positions():
    from benchmarks.longtail.mini import scaled_thresholds

    assert scaled_thresholds(5, 1280) == (100, 20)  # ImageNet-LT onto itself
    assert scaled_thresholds(5, 185) == (35, 13)    # cut points 35.2 and 12.3: many > 35, few < 13
    with pytest.raises(ValueError, match="fewest < most"):
        scaled_thresholds(5, 5)


def test_class_order_must_end_with_the_rare_classes(digits):
    _, labels = digits
    with pytest.raises(ValueError, match="must end with the tail and validation classes"):
        data.split_indices(labels, DataConfig(source="sklearn_digits", class_order=[2, 5, 0, 1, 3, 4, 6, 7, 8, 9]))
    with pytest.raises(ValueError, match="not an ordering"):
        data.split_indices(labels, DataConfig(source="sklearn_digits", class_order=[0, 2, 5]))


def test_encoder_trains_on_the_long_tailed_corpus_only(digits, tmp_path):
    """The CLIP-style encoder's training set is the corpus (train split, its draw weights): none of
    the held-out images (test, val, references, evaluator) and the tail digits as rare as for the
    diffusion model."""
    from benchmarks.mini import encoder
    from benchmarks.mini.config import MiniConfig

    cfg = MiniConfig(root=str(tmp_path), data=CI_DATA)
    data.build(CI_DATA, cfg.data_dir)
    images, labels, weights = encoder.training_set(cfg)
    seen = {bytes(x.numpy()) for x in images}
    train_x, train_y = data.load_split(cfg.data_dir, "train")
    assert torch.equal(labels, train_y) and seen == {bytes(x.numpy()) for x in train_x}
    for split in ("test", "val", "references", "evaluator"):
        held_out = {bytes(x.numpy()) for x in data.load_split(cfg.data_dir, split)[0]}
        assert not seen & held_out, f"the encoder would see {split} images"
    per_class = np.bincount(labels.numpy(), weights=weights.numpy(), minlength=10)
    assert per_class[0] / per_class[3] == pytest.approx(CI_DATA.imbalance)


def test_split_errors_name_the_problem(digits):
    _, labels = digits
    with pytest.raises(ValueError, match="tail_classes"):
        data.split_indices(labels, DataConfig(source="sklearn_digits", tail_classes=[12]))
    with pytest.raises(ValueError, match=r"classes \[2\] are both tail \(test\) and validation"):
        data.split_indices(labels, DataConfig(source="sklearn_digits", n_test=20, val_classes=[2]))
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


def test_fidelity():
    ev = _ByMeanEvaluator()
    imgs = torch.full((4, 3, 4, 4), 0.35)
    imgs[0] = 0.75
    assert metrics.fidelity(ev, imgs, 3) == pytest.approx(0.75)


def _digits01(label, n, offset=0):
    x, y = data.load_source("sklearn_digits")
    return data.to_unit(data.to_rgb(x[y == label][offset:offset + n], 16))


def test_copies_score_as_copies_and_real_images_do_not():
    """Issue 12: 10 copies of each of 5 references scored a diversity of 0.82 (mean pairwise distance);
    they must score near-copy share ~1 and diversity ~0, while new real images score neither."""
    ev = _ByMeanEvaluator()
    refs, heldout, new = _digits01(3, 5), _digits01(3, 40, offset=5), _digits01(3, 50, offset=45)
    g = torch.Generator().manual_seed(0)
    copies = refs.repeat(10, 1, 1, 1) + 1e-3 * torch.rand(50, 3, 16, 16, generator=g)
    pairwise = torch.cdist(ev.features(copies), ev.features(copies)).sum() / (50 * 49)
    real_pairwise = torch.cdist(ev.features(heldout), ev.features(heldout)).sum() / (40 * 39)
    assert pairwise / real_pairwise > 0.7          # what the old diversity saw: far-apart references
    mem = metrics.memorisation(ev, copies, refs, heldout, percentile=5.0, label=3)
    assert mem["near_copy_share"] == 1.0 and mem["near_copy"].all()
    assert mem["nearest_reference_cosine"] > 0.999 and mem["nearest_reference_pixel_rmse"] < 1e-3
    assert metrics.diversity(ev, copies, heldout) < 0.01
    assert mem["novel_fidelity"] == 0.0            # recognisable or not, a copy is not a new image
    fresh = metrics.memorisation(ev, new, refs, heldout, percentile=5.0)
    assert fresh["near_copy_share"] <= 0.1, fresh
    assert 0.7 < metrics.diversity(ev, new, heldout) < 1.3
    # the threshold is a low percentile of distinct held-out images' nearest-neighbour distances
    f = metrics.unit_features(ev, heldout)
    nn = metrics.nearest_distance(f, f, exclude_self=True)
    assert (nn < metrics.near_copy_threshold(f, 5.0)).double().mean() <= 0.05
    with pytest.raises(ValueError, match="percentile"):
        metrics.near_copy_threshold(f, 0.0)
    with pytest.raises(ValueError, match=">= 2 generated"):
        metrics.diversity(ev, copies[:1], heldout)


# ---------------------------------------------------------------- reduced world, end to end

NO_CHECKPOINTING = {"gradient_checkpointing": False, "checkpoint_decoder": False}  # tiny models: compute, not memory
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
    "claims": {"images_per_class": 8, "seeds": [0, 1], "num_inference_steps": 10, "batch_size": 16, "curve_images": 2,
               "grid_images": 4, "references_per_seed": 4,
               "methods": {"sd": {"guidance_scale": 5.0},
                           "seedselect": {"bootstrap": True, "bootstrap_iterations": 5, "iterations": 15,
                                          **NO_CHECKPOINTING},
                           "nao-seedselect": {"n_points": 6, "nao_solver": "default", "inversion_steps": 20,
                                              **NO_CHECKPOINTING}}},
    "select": {"grid": {"seedselect": {"guidance_scale": [5.0, 1.0], "lr_after": [0.1]}}, "images_per_class": 4},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    params = root / "params.yaml"
    claims = {**CI_PARAMS["claims"], "work_dir": str(root / "claims")}
    select = {**CI_PARAMS["select"], "work_dir": str(root / "select")}
    params.write_text(yaml.safe_dump({"mini": {**CI_PARAMS, "claims": claims, "select": select, "root": str(root / "data"),
                                               "results": str(root / "results")}}))
    seconds = {}
    for stage in ("data", "text", "vae", "diffusion", "encoder", "evaluator", "check", "select", "claims"):
        t = time.perf_counter()
        run_stage(stage, str(params))
        seconds[stage] = round(time.perf_counter() - t, 1)
    print("reduced mini world stage seconds:", seconds)
    return load_config(params)


def test_reduced_world_reproduces_the_long_tail_failure(world):
    plain = json.loads((world.results_dir / "plain.json").read_text())
    evaluator = json.loads((world.evaluator_dir / "training.json").read_text())
    assert evaluator["test_accuracy"] > 0.8, evaluator["test_accuracy"]
    # claim 1 (direction): plain sampling gets the frequent digits right far more often than the tail
    # ones; with the graded corpus the rarer non-tail digits fail too, so "head" here is the 4 most
    # frequent digits (plain.json's head mean is over every non-tail digit)
    order = data.manifest(world.data_dir)["class_order"]
    assert np.mean([plain["per_class"][n]["fidelity"] for n in order[:4]]) > 0.6, plain["per_class"]
    assert plain["head_fidelity_plain"] - plain["tail_fidelity_plain"] > 0.3, plain
    seen = json.loads((world.sd_dir / "training.json").read_text())["images_seen_per_class"]
    assert seen["three"] * 100 < seen["zero"], seen
    # a rerun writes the same bytes (no timing in the file), so mini_claims, which reads it, does not rerun
    from benchmarks.mini import check

    before = (world.results_dir / "plain.json").read_bytes()
    assert check.run(world)["seconds"] >= 0
    assert (world.results_dir / "plain.json").read_bytes() == before


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


# ---------------------------------------------------------------- claims 2-5: traces, budget, stage


def test_compute_accounting():
    from benchmarks.mini.claims import first_reaching, unet_evaluations, unit_seconds
    from pipelines.nao_seedselect import NaoSeedSelectSettings
    from pipelines.seedselect import SeedSelectSettings

    assert first_reaching([0.0, 0.25, 0.75, 0.5], 0.75) == 2
    assert first_reaching([0.5, 0.5], 0.75) is None
    # k + 1 renders of 20 steps; two UNet evaluations per step with guidance; NAO adds its inversions
    assert unet_evaluations(SeedSelectSettings(guidance_scale=7.5), 30) == 31 * 20 * 2
    assert unet_evaluations(SeedSelectSettings(guidance_scale=1.0), 0) == 20
    assert unet_evaluations(NaoSeedSelectSettings(), 5, inversions_per_image=50 * 5 / 50) == 6 * 20 + 5
    # 2 images, 10 s in all of which 6 s optimisation (3 s each): 2 s one-off per image + 3 s pro rata
    unit = {"images": torch.zeros(2, 3, 4, 4), "record": {"seconds": 10.0, "optimise_seconds": [3.0, 3.0]}}
    assert unit_seconds(unit, 4, 4) == pytest.approx(2 + 3)
    assert unit_seconds(unit, 0, 4) == pytest.approx(2 + 3 / 5)


def test_a_claim_whose_figure_misses_its_target_is_not_met():
    from benchmarks.mini.claims import claim_status

    good = {"head_minus_tail_fidelity_plain": 0.9, "tail_novel_fidelity_seedselect_minus_plain": 0.6,
            "compute_ratio_unet_nao_over_seedselect": 0.2, "compute_ratio_seconds_nao_over_seedselect": 0.1,
            "tail_diversity_seedselect": 0.7, "tail_near_copy_share_seedselect": 0.0,
            "tail_diversity_nao_seedselect": 0.6, "tail_near_copy_share_nao_seedselect": 0.05}

    def met(m):
        return {(c["claim"], c["figure"]): c["met"] for c in claim_status(m)}

    assert all(met(good).values()) and len(met(good)) == 5
    misses = {"head_minus_tail_fidelity_plain": 0.29, "tail_novel_fidelity_seedselect_minus_plain": 0.2,
              "compute_ratio_seconds_nao_over_seedselect": 0.3,  # fewer UNet evaluations but more seconds
              "tail_near_copy_share_nao_seedselect": 0.11,       # diverse, but copies
              "tail_diversity_seedselect": 0.49}
    for key, value in misses.items():
        status = met({**good, key: value})
        assert list(status.values()).count(False) == 1, (key, status)
    undefined = met({**good, "compute_ratio_unet_nao_over_seedselect": None})   # never reached the target
    assert [k for k, v in undefined.items() if not v] == [("3", next(k[1] for k in undefined if k[0] == "3"))]


def test_trace_holds_the_best_so_far_image_also_after_an_early_stop():
    from benchmarks.mini.trace import _TraceMixin
    from pipelines.seedselect import SeedSelectPipeline, SeedSelectSettings, Target
    from pipelines.testing import tiny_components

    # seed 0 improves once, then rises 4 times (> patience 3): stops at iteration 5; seed 1 keeps improving
    script = {0: [5.0, 4.0, 6.0, 7.0, 8.0, 9.0], 1: [5.0, 4.0, 3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6]}

    class Scripted(SeedSelectPipeline):
        def compute_losses(self, seeds, targets, settings, iteration):
            out = super().compute_losses(seeds, targets, settings, iteration)
            active = [0, 1] if len(seeds) == 2 else [1]
            # scripted values, the real loss's gradient: the seeds move, so every frame is a new image
            total = out["total"]
            out["total"] = total - total.detach() + torch.tensor([script[i][iteration] for i in active])
            return out

    class Traced(_TraceMixin, Scripted):
        pass

    comps = tiny_components()
    pipe = Traced.from_components(comps)
    s = SeedSelectSettings(num_inference_steps=3, iterations=8, last_k_weights=(0.25, 0.75), early_stop_patience=3)
    emb = torch.zeros(comps.text_encoder.config.max_position_embeddings, comps.text_encoder.config.hidden_size)
    target = Target(torch.nn.functional.normalize(torch.ones(1, comps.image_encoder.config.projection_dim), dim=-1),
                    0, torch.zeros(pipe.latent_shape), emb)
    seeds = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    r0, r1 = pipe.optimize(seeds, [target, target], s, progress=False)
    assert r0.stop_reason == "early_stop" and len(r0.history) == 6 and r1.stop_reason == "iterations"
    for r in (r0, r1):
        assert r.extras["trace"].shape == (9, 3, pipe.image_size, pipe.image_size)
        assert r.extras["trace"].dtype == torch.uint8
        final = torch.from_numpy(np.array(r.image.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(r.extras["trace"][-1], final), "the last frame is the returned (best) image"
    t0 = r0.extras["trace"]
    assert all(torch.equal(t0[k], t0[1]) for k in range(1, 9)), "seed 0's best stays iteration 1's image"
    assert not torch.equal(t0[0], t0[1])
    t1 = r1.extras["trace"]
    assert all(not torch.equal(t1[k], t1[k - 1]) for k in range(1, 9)), "seed 1 improves every iteration"


def test_reduced_world_seedselect_and_nao_fix_the_tail(world):
    m = json.loads((world.results_dir / "metrics.json").read_text())
    # claim 2 (direction): seed selection from a few references makes the tail classes plain sampling misses
    assert m["tail_fidelity_seedselect"] - m["tail_fidelity_plain"] > 0.25, m
    assert m["tail_fidelity_nao_seedselect"] - m["tail_fidelity_plain"] > 0.25, m
    assert m["head_minus_tail_fidelity_plain"] > 0.3  # claim 1 is carried over from the check stage
    for k in ("plain", "seedselect", "nao_seedselect"):
        assert 0 < m[f"tail_diversity_{k}"] < 3, k
        assert 0 <= m[f"tail_near_copy_share_{k}"] <= 1 and m[f"tail_novel_fidelity_{k}"] <= m[f"tail_fidelity_{k}"]
    result = json.loads((world.results_dir / "claims.json").read_text())
    budget = result["budget"]
    assert budget["seedselect_budget"] == 15 and budget["nao_budget"] == 5
    assert len(budget["seedselect_novel_curve_per_seed"]) == 2 and len(budget["seedselect_novel_curve_per_seed"][0]) == 16
    assert len(budget["nao_iterations_to_seedselect_final"]) == 2
    # compute: SeedSelect at the chosen guidance, NAO at guidance 1 plus 20 inversion steps x 4 references / 8 images
    ss = result["methods"]["seedselect"]["settings"]
    assert budget["seedselect_unet_evaluations"][-1] == 16 * 10 * (2 if ss["guidance_scale"] > 1 else 1)
    assert budget["nao_seedselect_unet_evaluations"] == [(k + 1) * 10 + 20 * 4 / 8 for k in range(6)]
    assert all(b > a for a, b in zip(budget["seedselect_seconds_per_seed"][0], budget["seedselect_seconds_per_seed"][0][1:]))
    ratio = m["compute_ratio_unet_nao_over_seedselect"]
    assert (ratio is None) == ("ratio_undefined_because" in budget)
    claim3 = next(c for c in result["claims"] if c["claim"] == "3")
    assert claim3["met"] == (ratio is not None and ratio <= 0.25 and m["compute_ratio_seconds_nao_over_seedselect"] <= 0.25)
    # the settings came from the validation class, and are the ones the claims ran
    selection = json.loads((world.results_dir / "selection.json").read_text())
    assert selection["val_classes"] == ["five"] and len(selection["candidates"]) == 2
    assert {k: ss[k] for k in selection["chosen"]["seedselect"]} == selection["chosen"]["seedselect"]
    best = max(selection["candidates"], key=lambda r: r["novel_fidelity"])
    assert selection["chosen"]["seedselect"] == best["values"]
    # a rerun (its finished units reused) writes the same bytes, so the stages that apply the choice do not rerun
    before = (world.results_dir / "selection.json").read_bytes()
    from benchmarks.mini import select

    assert select.run(world)["seconds"] >= 0
    assert (world.results_dir / "selection.json").read_bytes() == before
    # replicates draw their own references from the pool
    for name, per_seed in result["references"].items():
        assert per_seed["0"] != per_seed["1"] and len(per_seed["0"]) == 4, name
    # bootstrap: z* ran at most the full budget, every other image at most 5 iterations
    assert 0 < result["methods"]["seedselect"]["updates_per_image"] <= (15 + 7 * 5) / 8
    assert result["methods"]["nao-seedselect"]["updates_per_image"] <= 5
    readme = (world.results_dir / "README.md").read_text()
    assert "| 2 | tail novel fidelity SeedSelect − plain |" in readme and "| NAO-SeedSelect |" in readme
    assert "validation** digits five" in readme
    from PIL import Image

    for name in ("three", "eight"):
        grid = Image.open(world.results_dir / "grids" / f"{name}.png")
        assert grid.height == 4 * (16 * 2 + 2)  # references + 3 methods, 16 px images shown at 2x


def test_other_references_change_nao_seedselects_images(world):
    from benchmarks.mini import claims

    run = claims.ClaimsRun(world, selected={})
    label = world.data.tail_classes[0]
    s = run.settings("nao-seedselect")
    before = run._nao_seedselect(label, 0, 4, s)["images"]
    names = [r.name for r in run.references(label, 0)]
    run.pool[label] = [r for r in run.pool[label] if r.name not in names[:2]]   # two references no longer there
    assert [r.name for r in run.references(label, 0)] != names
    after = run._nao_seedselect(label, 0, 4, s)["images"]
    assert not torch.equal(before, after)


def test_claims_rerun_reuses_finished_units_and_a_changed_setting_makes_new_ones(world, monkeypatch):
    import copy

    from benchmarks.mini import claims

    work = world.claims.work_dir
    units = sorted(p.name for p in Path(work).glob("*.safetensors"))
    assert len(units) == 4 * 2 * 2  # (sd, seedselect, nao, curve) x 2 tail classes x 2 seeds
    metrics_before = (world.results_dir / "metrics.json").read_text()

    def regenerate(*args, **kwargs):
        raise AssertionError("regenerated a unit")

    for name in ("_sd", "_seedselect", "_nao_seedselect"):
        monkeypatch.setattr(claims.ClaimsRun, name, regenerate)
    claims.run(world)
    assert sorted(p.name for p in Path(work).glob("*.safetensors")) == units
    assert (world.results_dir / "metrics.json").read_text() == metrics_before
    changed = copy.deepcopy(world)
    changed.claims.methods["sd"] = {"guidance_scale": 4.0}
    with pytest.raises(AssertionError, match="regenerated a unit"):
        claims.run(changed)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_claims_damaged_unit_is_redone_the_same(world, monkeypatch, caplog, how):
    from benchmarks.mini import claims
    from pipelines.io import _split_safetensors

    unit = sorted(Path(world.claims.work_dir).glob("sd-*.safetensors"))[0]
    blob = unit.read_bytes()
    metrics_before = (world.results_dir / "metrics.json").read_text()
    mid = len(blob) // 2
    unit.write_bytes(blob[:mid] if how == "truncate" else blob[:mid] + b"\xff" * 8 + blob[mid + 8:])

    def regenerate(*args, **kwargs):
        raise AssertionError("regenerated an undamaged unit")

    for name in ("_seedselect", "_nao_seedselect"):
        monkeypatch.setattr(claims.ClaimsRun, name, regenerate)
    claims.run(world)
    assert any(unit.name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert _split_safetensors(unit.read_bytes())[1] == _split_safetensors(blob)[1]  # same images (timings differ)
    assert (world.results_dir / "metrics.json").read_text() == metrics_before


def test_claims_unit_names_change_with_references_and_generation_code(world, monkeypatch):
    from benchmarks.mini import claims

    run = claims.ClaimsRun(world)
    label = world.data.tail_classes[0]
    settings = run.settings("sd")
    name = run.unit_path("sd", label, 0, 8, settings)
    assert run.unit_path("sd", label, 0, 8, settings) == name                   # deterministic
    assert run.unit_path("sd", label, 1, 8, settings) != name                   # seed
    run.pool[label] = run.pool[world.data.tail_classes[1]]
    assert run.unit_path("sd", label, 0, 8, settings) != name                   # other reference images
    monkeypatch.setattr(claims, "UNIT_VERSION", claims.UNIT_VERSION + 1)
    assert claims.code_fingerprint() != run.code                                # generation code


def test_claims_bad_settings_name_the_problem(world, tmp_path):
    import copy

    from benchmarks.mini import claims

    cfg = copy.deepcopy(world)
    cfg.claims.methods = {"sd": {}, "seedselct": {}}
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['seedselct'\]"):
        claims.run(cfg)
    cfg.claims.methods = {"seedselect": {}}
    with pytest.raises(ValueError, match="plain baseline 'sd'"):
        claims.run(cfg)
    cfg.claims.methods = {"sd": {}, "nao-seedselect": {}}
    with pytest.raises(ValueError, match="list both or neither"):
        claims.run(cfg)
    cfg.claims.methods = {"sd": {}, "dct": {"lr": 0.02}}
    with pytest.raises(ValueError, match="dct needs `classifier`"):
        claims.run(cfg)
    cfg.claims.methods = {"sd": {}}
    cfg.claims.references_per_seed = 9
    with pytest.raises(ValueError, match="references_per_seed = 9 needs >= 2 and at most the reference pool"):
        claims.ClaimsRun(cfg)
    cfg.results = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="mini_check"):
        claims.run(cfg)


def test_select_bad_settings_name_the_problem(world):
    import copy

    from benchmarks.mini import select

    cfg = copy.deepcopy(world)
    cfg.select.grid = {"dct": {"lr": [0.01]}}
    with pytest.raises(ValueError, match=r"cannot select settings of \['dct'\]"):
        select.run(cfg)
    cfg.data.val_classes = []
    with pytest.raises(ValueError, match="val_classes is empty"):
        select.run(cfg)


def test_committed_params_build_every_claims_method():
    """A typo in params.yaml's mini.claims.methods fails here, not ten minutes into dvc repro."""
    from benchmarks.mini.claims import LABELS, method_settings
    from pipelines.registry import get_method

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    assert set(cfg.claims.methods) <= set(LABELS) and "sd" in cfg.claims.methods
    for method in cfg.claims.methods:   # built as the stage builds them: unknown keys raise
        assert isinstance(method_settings(cfg.claims, method), get_method(method).settings_cls)
    assert cfg.claims.images_per_class >= 50 and len(cfg.claims.seeds) >= 3  # the minimum
    # replicates can resample references; settings are chosen on classes the claims never score
    assert cfg.data.n_references > cfg.claims.references_per_seed
    assert cfg.data.val_classes and not set(cfg.data.val_classes) & set(cfg.data.tail_classes)
    assert set(cfg.select.grid) <= set(cfg.claims.methods)
