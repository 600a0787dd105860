"""Generation pipelines on tiny random models: SeedSelect, DDIM inversion, NAO-SeedSelect, the CLI."""
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.imaging import clip_input_size, to_pil
from pipelines.loading import ddim_scheduler
from pipelines.prompts import encode_prompts
from pipelines.references import ReferenceEncodings, ReferenceImage, encode_references, load_reference_images
from pipelines.sampling import denoise, random_seeds
from pipelines.__main__ import main as cli
from pipelines.inversion import DDIMInversionPipeline
from pipelines.seedselect import (NonFiniteLossError, SeedSelectPipeline, SeedSelectSettings, Target,
                                  semantic_distance)
from pipelines.stable_diffusion import StableDiffusionSamplingPipeline
from pipelines.testing import (TinySizes, save_tiny_image_encoder, save_tiny_pipeline, tiny_components,
                               tiny_tokenizer)

# 2 shared cores: one thread avoids OpenMP spin contention (100x slower otherwise)
torch.set_num_threads(1)

FAST = dict(num_inference_steps=3, iterations=2, last_k_weights=(0.25, 0.75))


def noise_image(seed, size=(40, 50), mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture(scope="module")
def comps():
    return tiny_components()


@pytest.fixture(scope="module")
def seedselect(comps):
    return SeedSelectPipeline.from_components(comps)


@pytest.fixture(scope="module")
def encodings(seedselect):
    refs = [ReferenceImage(f"r{i}", noise_image(i)) for i in range(3)]
    return encode_references(seedselect, refs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_pipeline(root / "sd")
    save_tiny_image_encoder(root / "clip")
    refs = root / "refs"
    refs.mkdir()
    noise_image(0).save(refs / "a.png")
    noise_image(1, (17, 23), "L").save(refs / "grey_odd.png")        # grey, odd size: converted
    noise_image(2, (64, 30), "RGBA").save(refs / "alpha.png")         # alpha: composited on white
    noise_image(3).convert("P").save(refs / "palette.gif")
    (refs / "notes.txt").write_text("not an image")                   # ignored with a warning
    return root


def cli_args(folders, method, out, *extra):
    return ["generate", method, "--prompt", "tiger_cat", "--refs", str(folders / "refs"), "--out", str(out),
            "--model", str(folders / "sd"), "--image-encoder", str(folders / "clip"), "--device", "cpu",
            "--steps", "3", "--no-progress", *extra]


# ------------------------------------------------------------------------------- components
def test_tokenizer_is_the_real_clip_bpe():
    import open_clip

    text = "A photo of a Tiger-cat, hello!"
    ids = tiny_tokenizer()(text).input_ids
    assert ids == open_clip.tokenize([text])[0][: len(ids)].tolist()


def test_sizes_follow_the_configs():
    sizes = TinySizes(latent_size=4, vae_channels=(8, 16), clip_size=24)
    pipe = StableDiffusionSamplingPipeline.from_components(tiny_components(sizes))
    assert (pipe.image_size, pipe.latent_shape) == (8, (4, 4, 4))
    out = pipe("a cat", num_images_per_prompt=2, seed=0, settings=replace(pipe_settings(), num_inference_steps=2))
    assert [im.size for im in out.images] == [(8, 8)] * 2
    assert clip_input_size(pipe.image_processor) == (24, 24)


def pipe_settings():
    from pipelines.stable_diffusion import StableDiffusionSettings

    return StableDiffusionSettings()


def test_reference_cache_keyed_by_content(tmp_path, seedselect, monkeypatch):
    refs = [ReferenceImage(f"r{i}", noise_image(i)) for i in range(2)]
    first = encode_references(seedselect, refs, tmp_path)
    import pipelines.references

    monkeypatch.setattr(pipelines.references, "clip_embed", lambda *a, **k: pytest.fail("cache not used"))
    again = encode_references(seedselect, refs, tmp_path)
    assert torch.equal(first.clip, again.clip) and torch.equal(first.latents, again.latents)
    monkeypatch.undo()
    changed = [refs[0], ReferenceImage("r1", noise_image(7))]   # same name, new pixels
    other = encode_references(seedselect, changed, tmp_path)
    assert len(list(tmp_path.glob("refenc-*.safetensors"))) == 2
    assert not torch.allclose(other.clip[1], first.clip[1])
    assert torch.equal(other.clip[0], first.clip[0])


def test_load_reference_images_errors_and_conversions(tmp_path, folders):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_reference_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        load_reference_images(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    noise_image(0).save(bad / "ok.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_reference_images(bad)
    refs = load_reference_images(folders / "refs")
    assert sorted(r.name for r in refs) == ["a.png", "alpha.png", "grey_odd.png", "palette.gif"]
    assert all(r.image.mode == "RGB" for r in refs)


def test_lazy_reference_files_hold_no_pixels_and_are_the_same_references(tmp_path, folders, seedselect):
    """lazy=True: each file checked and hashed on loading, no decoded image kept, and the same hash,
    pixels, cached encodings and contrastive seeds as the eager references (negatives use them)."""
    from pipelines.references import ReferenceFile

    files = sorted(p for p in (folders / "refs").iterdir() if p.suffix != ".txt")  # grey, palette, alpha: converted
    eager, lazy = load_reference_images(files), load_reference_images(files, lazy=True)
    assert all(isinstance(r, ReferenceFile) for r in lazy) and [r.name for r in lazy] == [r.name for r in eager]
    assert [r.content_hash for r in lazy] == [r.content_hash for r in eager]
    assert all(a.image.tobytes() == b.image.tobytes() and b.image.mode == "RGB" for a, b in zip(eager, lazy))
    assert not any(isinstance(v, Image.Image) for r in lazy for v in vars(r).values())
    first = encode_references(seedselect, eager, tmp_path)
    again = encode_references(seedselect, lazy, tmp_path)   # the eager set's cache entry
    assert len(list(tmp_path.glob("refenc-*.safetensors"))) == 1 and torch.equal(first.clip, again.clip)
    kw = dict(num_inference_steps=2, iterations=1, last_k_weights=(1.0,), batch_size=2, progress=False)
    pushed = seedselect("a cat", _refs(0), 1, seed=3, negative_reference_images=[eager[:2]], **kw)
    assert torch.equal(seedselect("a cat", _refs(0), 1, seed=3, negative_reference_images=[lazy[:2]], **kw).seeds,
                       pushed.seeds)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_reference_images([files[0], broken], lazy=True)


# ------------------------------------------------------------------------------- SeedSelect
def test_reference_presets_are_the_authors_settings():
    from pipelines.registry import get_method

    s = get_method("SeedSelect").settings("reference")
    assert (s.num_inference_steps, s.guidance_scale, s.iterations, s.lr, s.lr_after, s.lr_switch_iteration,
            s.weight_decay, s.semantic_weight, s.appearance_weight, s.last_k_weights, s.batch_size, s.bootstrap,
            s.dtype) == (20, 7.5, 30, 0.1, 0.01, 3, 0.01, 10.0, 1.0, (0.05, 0.25, 0.70), 1, False, "fp32")
    n = get_method("NAO_SeedSelect").settings("reference")
    assert (n.iterations, n.lr, n.lr_after, n.lr_switch_iteration, n.guidance_scale, n.inversion_steps,
            n.n_points) == (5, 0.05, 0.005, 3, 1.0, 50, 50)
    assert get_method("sd").settings("fast", "cuda").dtype == "bf16"
    assert get_method("sd").settings("fast", "cpu").dtype == "fp32"
    sched = ddim_scheduler(tiny_components().scheduler.config)
    sched.set_timesteps(20)
    assert sched.timesteps[0] == 951 and sched.timesteps[-1] == 1


def test_semantic_distance_matches_hand_computation():
    e = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    cents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]])
    d0 = [1 - 0.6, 1 - 0.8, 1 - (-0.36 + 0.64)]      # seed 0 (unit (0.6, 0.8)) vs each class
    d1 = [0.0, 1.0, 1.6]
    expected = [-math.log(math.exp(-d0[1]) / sum(math.exp(-d) for d in d0)),
                -math.log(math.exp(-d1[2]) / sum(math.exp(-d) for d in d1))]
    got = semantic_distance(e, cents.expand(2, -1, -1), torch.tensor([1, 2]))
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    # one class: the plain cosine distance to the centroid
    one = semantic_distance(e, cents[:1].expand(2, -1, -1), torch.tensor([0, 0]))
    assert one.tolist() == pytest.approx([d0[0], d1[0]], rel=1e-6)


def test_centroid_of_unnormalised_embeddings():
    enc = ReferenceEncodings(clip=torch.tensor([[10.0, 0.0], [0.0, 1.0]]), latents=torch.zeros(2, 4, 2, 2))
    assert enc.clip_centroid().tolist() == pytest.approx([10 / math.sqrt(101), 1 / math.sqrt(101)])


def test_gradients_reach_the_seed_from_both_losses(seedselect, encodings):
    settings = SeedSelectSettings(**FAST)
    targets = seedselect.targets_for("a cat", encodings, 2)
    for term in ("semantic", "appearance"):
        z = random_seeds(seedselect.latent_shape, [0, 1]).requires_grad_()
        out = seedselect.compute_losses(z, targets, settings, 0)
        out[term].sum().backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum(dim=(1, 2, 3)).min() > 0, term
        assert out[term].dtype == torch.float32


def test_checkpointed_and_plain_gradients_agree_float64():
    comps = tiny_components(dtype=torch.float64)
    pipe = SeedSelectPipeline.from_components(comps)
    refs = [ReferenceImage(f"r{i}", noise_image(i)) for i in range(2)]
    targets = pipe.targets_for("a cat", encode_references(pipe, refs), 2)
    grads = []
    for ckpt in (False, True):
        settings = SeedSelectSettings(**{**FAST, "num_inference_steps": 4}, gradient_checkpointing=ckpt,
                                      checkpoint_decoder=ckpt)
        z = random_seeds(pipe.latent_shape, [3, 4], torch.float64).requires_grad_()
        pipe.compute_losses(z, targets, settings, 0)["total"].sum().backward()
        grads.append(z.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


class ScriptedLoss(SeedSelectPipeline):
    """Losses follow a script per seed (plus a tiny real term so the seeds move); records every call."""

    def compute_losses(self, seeds, targets, settings, iteration):
        self.seen.append((iteration, seeds.detach().clone(), len(seeds)))
        scripted = torch.tensor([self.script[t.label][iteration] for t in targets])
        total = scripted + 1e-3 * (seeds ** 2).flatten(1).mean(1)
        return {"total": total, "semantic": total, "appearance": total * 0, "images": seeds[:, :3].sigmoid()}


def test_early_stop_fires_per_seed_and_returns_the_best_seed(comps):
    pipe = ScriptedLoss.from_components(comps)
    pipe.seen = []
    pipe.script = [[5.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0],  # best at 1; 4th rise at iteration 5
                   [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]
    # the label only tells the script which seed is which
    targets = [Target(torch.zeros(2, 16), k, torch.zeros(4, 8, 8), torch.zeros(77, 32)) for k in range(2)]
    seeds = random_seeds(pipe.latent_shape, [0, 1])
    first, second = pipe.optimize(seeds, targets, SeedSelectSettings(iterations=8, early_stop_patience=3),
                                  progress=False)
    assert first.stop_reason == "early_stop" and len(first.history) == 6
    assert first.best_iteration == 1
    seed_at_1 = next(s for it, s, n in pipe.seen if it == 1)[0]
    torch.testing.assert_close(first.seed, seed_at_1)
    assert not torch.equal(first.seed, first.initial_seed)
    expected_image = to_pil(seed_at_1[None, :3].sigmoid())[0]
    assert np.array_equal(np.asarray(first.image), np.asarray(expected_image))
    # the other seed went on alone, and its final (never-updated) seed was evaluated too
    assert second.stop_reason == "iterations" and len(second.history) == 9 and second.best_iteration == 8
    assert [n for it, s, n in pipe.seen if it >= 6] == [1, 1, 1]


def test_classes_optimised_together_use_the_contrastive_loss(seedselect, encodings):
    other = ReferenceEncodings(clip=-encodings.clip, latents=-encodings.latents)
    contrast = seedselect.contrast_set(["a cat", "a dog"], [encodings, other], SeedSelectSettings())
    targets = [contrast.target(c) for c in (0, 1, 1)]
    assert [t.label for t in targets] == [0, 1, 1] and targets[0].clip_centroids.shape[0] == 2
    torch.testing.assert_close(targets[1].clip_centroids[1], other.clip_centroid())
    per_concept = seedselect.contrast_set(["a cat", "a dog"], [encodings, other],
                                          SeedSelectSettings(semantic_loss="per_concept"))
    assert per_concept.target(1).clip_centroids.shape[0] == 1 and per_concept.target(1).label == 0
    settings = SeedSelectSettings(**FAST)
    z = random_seeds(seedselect.latent_shape, [0, 1, 2])
    with torch.no_grad():
        joint = seedselect.compute_losses(z, targets, settings, 0)["semantic"]
        alone = seedselect.compute_losses(z, seedselect.targets_for("a cat", encodings, 3), settings, 0)["semantic"]
    # class 0 vs its opposite: the softmax term is log(1 + exp(d0 - d1)) != the plain distance d0
    assert torch.isfinite(joint).all() and not torch.allclose(joint[0], alone[0])
    results = seedselect.optimize(z, targets, settings, progress=False)
    assert len(results) == 3 and all(math.isfinite(r.best_loss) for r in results)


def _refs(seed, n=2):
    return [noise_image(seed + k) for k in range(n)]


def test_several_concepts_in_one_call_diffusers_style(seedselect):
    kw = dict(num_inference_steps=2, iterations=1, last_k_weights=(1.0,), batch_size=3, progress=False)
    out = seedselect(["a cat", "a dog"], [_refs(0), _refs(5)], 2, generator=torch.Generator().manual_seed(0), **kw)
    assert len(out.images) == 4 and all(isinstance(im, Image.Image) for im in out.images)
    assert [(r["concept"], r["index"], r["prompt"]) for r in out.records] == [
        (0, 0, "a cat"), (0, 1, "a cat"), (1, 0, "a dog"), (1, 1, "a dog")]
    assert out.seeds.shape == (4, *seedselect.latent_shape)
    again = seedselect(["a cat", "a dog"], [_refs(0), _refs(5)], 2, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out.seeds, again.seeds)
    # the contrastive loss makes a concept's images depend on the other concepts; per-concept does not
    alone = seedselect("a cat", _refs(0), 2, seed=out.records[0]["seed_int"], **kw)
    pair = seedselect(["a cat", "a dog"], [_refs(0), _refs(5)], 2, seed=out.records[0]["seed_int"],
                      semantic_loss="per_concept", **kw)
    torch.testing.assert_close(pair.seeds[:2], alone.seeds, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.seeds[:2], alone.seeds, rtol=1e-4, atol=1e-5)
    arrays = seedselect("a cat", _refs(0), 1, seed=0, output_type="np", **kw).images
    assert arrays.shape == (1, 32, 32, 3) and arrays.dtype == np.float32
    with pytest.raises(ValueError, match="2 prompts but 1 reference sets"):
        seedselect(["a cat", "a dog"], [_refs(0)], 1, seed=0, **kw)


def test_negative_concepts_enter_the_contrastive_loss_as_centroids(seedselect, encodings):
    other = ReferenceEncodings(clip=-encodings.clip, latents=-encodings.latents)
    target = seedselect.contrast_set(["a cat"], [encodings], SeedSelectSettings(), [other]).target(0)
    assert target.label == 0 and target.clip_centroids.shape[0] == 2   # one concept, yet contrastive
    pair = seedselect.contrast_set(["a cat", "a dog"], [encodings, other], SeedSelectSettings())
    torch.testing.assert_close(target.clip_centroids, pair.target(0).clip_centroids)
    with pytest.raises(ValueError, match="only the contrastive loss"):
        seedselect.contrast_set(["a cat"], [encodings], SeedSelectSettings(semantic_loss="per_concept"), [other])


def test_negative_reference_images_push_the_images_without_adding_any(seedselect):
    kw = dict(num_inference_steps=2, iterations=1, last_k_weights=(1.0,), batch_size=2, progress=False)
    alone = seedselect("a cat", _refs(0), 2, seed=3, **kw)
    pushed = seedselect("a cat", _refs(0), 2, seed=3, negative_reference_images=[_refs(5)], **kw)
    assert [r["prompt"] for r in pushed.records] == ["a cat"] * 2
    assert not torch.allclose(pushed.seeds, alone.seeds, rtol=1e-4, atol=1e-5)
    # a negative acts as a concept of the call that has no images to make
    both = seedselect(["a cat", "a dog"], [_refs(0), _refs(5)], seed=3, image_indices={0: [0, 1], 1: []}, **kw)
    torch.testing.assert_close(pushed.seeds, both.seeds, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="one reference set per negative"):
        seedselect("a cat", _refs(0), 1, seed=3, negative_reference_images="refs/", **kw)


def test_bootstrap_runs_per_concept_inside_a_multi_concept_batch(seedselect):
    kw = dict(num_inference_steps=2, iterations=2, last_k_weights=(1.0,), bootstrap=True, bootstrap_iterations=1,
              batch_size=4, progress=False)
    seen = []
    out = seedselect(["a cat", "a dog"], [_refs(0, 3), _refs(5, 3)], 3, seed=1, callback=seen.append, **kw)
    assert sorted((r.concept, r.index) for r in seen) == [(c, i) for c in (0, 1) for i in range(3)]
    updates = {(r["concept"], r["index"]): r["updates"] for r in out.records}
    assert updates[0, 0] == updates[1, 0] == 2 and updates[0, 1] == updates[1, 2] == 1  # z*: full budget
    assert not torch.equal(out.seeds[0], out.seeds[3])  # each concept has its own z*
    # resuming the dog's image 2 from its finished z* gives the image of the one-go run
    resumed = seedselect(["a cat", "a dog"], [_refs(0, 3), _refs(5, 3)], seed=1, image_indices={1: [2]},
                         z_star={1: out.seeds[3]}, **kw)
    torch.testing.assert_close(resumed.seeds[0], out.seeds[5], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_is_a_clear_error(seedselect, encodings):
    settings = SeedSelectSettings(**FAST)
    seeds = random_seeds(seedselect.latent_shape, [0])
    seeds[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="not finite at iteration 0"):
        seedselect.optimize(seeds, seedselect.targets_for("a cat", encodings, 1), settings, progress=False)


def test_bootstrap_seeds_are_distinct_and_reproducible(seedselect):
    settings = SeedSelectSettings(**FAST, bootstrap=True, bootstrap_iterations=1, batch_size=2)
    refs = [ReferenceImage(f"r{i}", noise_image(i)) for i in range(3)]
    runs = [seedselect("a cat", refs, 3, seed=5, settings=settings, progress=False) for _ in range(2)]
    assert torch.equal(runs[0].seeds, runs[1].seeds)
    z = runs[0].seeds
    assert not torch.equal(z[1], z[2]) and not torch.equal(z[0], z[1])
    # bootstrap samples differ per image and are seeded
    contrast = seedselect.contrast_set(["a cat"], [encode_references(seedselect, refs)], settings)
    t1 = [seedselect.bootstrap_target(contrast, 0, i, 5) for i in (1, 2)]
    t2 = [seedselect.bootstrap_target(contrast, 0, i, 5) for i in (1, 2)]
    assert torch.equal(t1[0].clip_centroids, t2[0].clip_centroids)
    assert not torch.equal(t1[0].clip_centroids, t1[1].clip_centroids)
    # resuming with z* gives the same bootstrap seed as the one-go run (up to batch-size round-off)
    resumed = seedselect("a cat", refs, seed=5, image_indices=[2], settings=settings, z_star={0: z[0]}, progress=False)
    torch.testing.assert_close(resumed.seeds[0], z[2], rtol=1e-4, atol=1e-5)


def test_bf16_models_keep_seeds_and_losses_fp32(encodings):
    pipe = SeedSelectPipeline.from_components(tiny_components(dtype=torch.bfloat16))
    targets = pipe.targets_for("a cat", encodings, 1)
    res = pipe.optimize(random_seeds(pipe.latent_shape, [0]), targets, SeedSelectSettings(**FAST), progress=False)
    assert res[0].seed.dtype == torch.float32 and math.isfinite(res[0].best_loss)


# ------------------------------------------------------------------------------- inversion
def test_invert_then_regenerate_reconstructs_the_latent():
    comps = tiny_components(dtype=torch.float64)
    with torch.no_grad():  # a smooth noise predictor, as a trained one is; a random one is very rough
        comps.unet.conv_out.weight.mul_(0.1)
    pipe = DDIMInversionPipeline.from_components(comps)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = encode_prompts(pipe, ["a cat"]).expand(2, -1, -1)
    errors = {}
    for steps in (10, 50):
        seeds = pipe.invert_latents(latents, "a cat", steps)
        with torch.no_grad():
            rec = denoise(pipe, seeds, cond, None, 1.0, steps)[-1]
        errors[steps] = ((rec - latents).norm() / latents.norm()).item()
    assert errors[50] < 0.05
    assert errors[50] < errors[10]
    # a seed that is not the inversion lands far away
    with torch.no_grad():
        other = denoise(pipe, torch.randn_like(seeds), cond, None, 1.0, 50)[-1]
    assert ((other - latents).norm() / latents.norm()).item() > 10 * errors[50]


# ------------------------------------------------------------------------------- CLI
def test_cli_end_to_end_in_a_fresh_process(folders, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = cli_args(folders, "SeedSelect", out, "--num-images", "2", "--iterations", "1", "--batch-size", "2",
                    "--set", "last_k_weights=0.3,0.7")
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted(out.glob("seedselect-*-0000?.json"))
    assert len(records) == 2
    rec = json.loads(records[0].read_text())
    assert rec["method"] == "seedselect" and rec["prompt"] == "tiger cat"
    assert rec["settings"]["last_k_weights"] == [0.3, 0.7] and len(rec["losses"]) == 2
    assert {"stop_reason", "best_iteration", "seconds", "model_id", "image_encoder_id"} <= set(rec)
    from safetensors.torch import load_file

    seeds = load_file(str(records[0].with_suffix(".safetensors")))
    assert seeds["seed"].shape == (4, 8, 8)
    assert Image.open(records[0].with_suffix(".png")).size == (32, 32)
    assert len(list(out.glob("seedselect-*.contact.png"))) == 1
    assert len(list(out.glob("seedselect-*.config.json"))) == 1


def test_cli_resumes_and_never_overwrites(folders, tmp_path):
    out = tmp_path / "out"
    args = cli_args(folders, "sd", out, "--num-images", "3")
    assert cli(args) == 0
    files = sorted(out.glob("sd-*-0000?.*"))
    assert len(files) == 9
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # an interrupted run: image 2's record never got written
    unfinished = next(f for f in files if f.name.endswith("00002.json"))
    unfinished.unlink()
    assert cli(args + ["--num-images", "4"]) == 0
    for f, stamp in stamps.items():
        if f != unfinished and not f.name.split("-")[-1].startswith("00002"):
            assert f.stat().st_mtime_ns == stamp, f"{f.name} was rewritten"
    assert len(sorted(out.glob("sd-*-0000?.json"))) == 4
    # the alias and a changed setting give a separate run next to it
    assert cli(cli_args(folders, "StableDiffusion", out, "--num-images", "1", "--guidance", "3")) == 0
    assert len(list(out.glob("sd-*.config.json"))) == 2


def test_cli_nao_seedselect(folders, tmp_path):
    out = tmp_path / "out"
    args = cli_args(folders, "NAO_SeedSelect", out, "--num-images", "3", "--iterations", "1", "--batch-size", "3",
                    "--set", "inversion_steps=4", "--set", "n_points=4", "--set", "last_k_weights=1")
    assert cli(args) == 0
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("nao-seedselect-*-0000?.json"))]
    assert [r["start_point"] for r in recs] == [{"path": 0, "point": 2}, {"path": 1, "point": 2},
                                                {"path": 2, "point": 2}]
    assert recs[0]["settings"]["guidance_scale"] == 1.0 and recs[0]["settings"]["lr"] == 0.05
    assert len(list((out / "cache").glob("inverted-*.safetensors"))) == 1
    assert len(list((out / "cache").glob("nao-*.safetensors"))) == 1


def test_nao_starts_spread_over_the_whole_paths():
    from pipelines.nao_seedselect import interior_points, spread_order, start_points

    assert sorted(spread_order(48)) == list(range(48)) and spread_order(1) == [0]
    # the authors' 5 references x 50-point paths, 50 images: 10 starts per path from end to end
    starts = start_points(5, 50)[:50]
    for path in range(5):
        points = sorted(p for k, p in starts if k == path)
        assert len(points) == 10 and points[0] <= 7 and points[-1] >= 42
        assert max(b - a for a, b in zip([0] + points, points + [49])) <= 7  # no long uncovered stretch
    paths = torch.arange(5 * 50, dtype=torch.float64).reshape(5, 50, 1)
    assert interior_points(paths)[:5, 0].tolist() == [paths[k, starts[k][1], 0].item() for k in range(5)]


def test_cli_several_concepts_contrasted_in_one_run(folders, tmp_path):
    out = tmp_path / "out"
    other = tmp_path / "other refs"
    other.mkdir()
    for k in range(2):
        noise_image(20 + k).save(other / f"o{k}.png")
    args = cli_args(folders, "seedselect", out, "--num-images", "2", "--iterations", "1", "--batch-size", "4",
                    "--set", "last_k_weights=1", "--prompt", "lynx", "--refs", str(other))
    assert cli(args) == 0
    tiger = [json.loads(p.read_text()) for p in sorted((out / "tiger_cat").glob("seedselect-*-0000?.json"))]
    lynx = [json.loads(p.read_text()) for p in sorted((out / "lynx").glob("seedselect-*-0000?.json"))]
    assert len(tiger) == len(lynx) == 2 and tiger[0]["run"] != lynx[0]["run"]
    assert [c["prompt"] for c in tiger[0]["contrast_set"]] == ["tiger cat", "lynx"]
    # the same two concepts from a CSV give the same runs (nothing redone); alone, another run
    csv_file = tmp_path / "concepts.csv"
    csv_file.write_text(f"prompt,refs\ntiger cat,{folders / 'refs'}\nlynx,other refs\n")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "contact" not in p.name}
    base = [a for a in cli_args(folders, "seedselect", out, "--num-images", "2", "--iterations", "1", "--batch-size",
                                "4", "--set", "last_k_weights=1")]
    k = base.index("--prompt")
    del base[k:k + 2]
    k = base.index("--refs")
    del base[k:k + 2]
    assert cli(base + ["--concepts", str(csv_file)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert cli(args[:args.index("--prompt", args.index("--prompt") + 1)]) == 0
    assert len(list(out.glob("seedselect-*-00000.json"))) == 1   # one concept: straight into --out
    assert cli(base + ["--concepts", str(tmp_path / "nope.csv")]) == 2
    # the lynx as a negative only: tiger images pushed from it, none of the lynx made
    pushed = tmp_path / "pushed"
    tiger_only = cli_args(folders, "seedselect", pushed, "--num-images", "1", "--iterations", "1", "--set",
                          "last_k_weights=1", "--negative-refs", str(other))
    assert cli(tiger_only) == 0
    (record,) = [json.loads(p.read_text()) for p in pushed.glob("seedselect-*-00000.json")]
    assert [sorted(c) for c in record["contrast_set"]] == [["prompt", "references"], ["negatives", "sha256"]]
    assert record["contrast_set"][1]["negatives"] == 1
    assert not (pushed / "lynx").exists()


def test_python_api_with_dict_settings(comps, tmp_path):
    from pipelines import generate_concept

    refs = [noise_image(0), noise_image(1, (20, 20), "L")]
    records = generate_concept("seedselect", "tiger cat", refs, tmp_path / "out", 2,
                               {"num_inference_steps": 2, "iterations": 1, "last_k_weights": (1.0,)}, 7,
                               components=comps, device="cpu", progress=False)
    assert [r["index"] for r in records] == [0, 1] and records[0]["settings"]["iterations"] == 1
    assert records[0]["seed"] == 7 and records[0].path.is_file()
    records[1].save(tmp_path / "copy.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "copy.png")), np.asarray(records[1].image()))
    with pytest.raises(ValueError, match="unknown setting"):
        generate_concept("seedselect", "x", refs, tmp_path / "o2", 1, {"learning_rate": 1}, components=comps)


def test_negatives_name_the_runs_and_only_a_contrastive_method_takes_them(comps, tmp_path):
    from pipelines import generate_concept

    kw = dict(seed=7, components=comps, device="cpu", progress=False)
    ss = {"num_inference_steps": 2, "iterations": 1, "last_k_weights": (1.0,)}
    plain = generate_concept("seedselect", "tiger cat", _refs(0), tmp_path / "ss", 1, ss, **kw)
    pushed = generate_concept("seedselect", "tiger cat", _refs(0), tmp_path / "ss", 1, ss, negatives=[_refs(5)], **kw)
    assert pushed[0]["run"] != plain[0]["run"] and "contrast_set" not in plain[0]
    negs = json.dumps([[r.content_hash for r in load_reference_images(_refs(5))]]).encode()
    assert pushed[0]["contrast_set"][-1] == {"negatives": 1, "sha256": hashlib.sha256(negs).hexdigest()}
    other = generate_concept("seedselect", "tiger cat", _refs(0), tmp_path / "ss", 1, ss, negatives=[_refs(6)], **kw)
    assert other[0]["run"] not in (plain[0]["run"], pushed[0]["run"])
    assert not np.array_equal(np.asarray(pushed[0].image()), np.asarray(plain[0].image()))
    # methods that contrast nothing refuse negatives rather than ignore them, before writing anything
    for method, settings in (("sd", {"num_inference_steps": 2}), ("seedselect", {**ss, "semantic_loss": "per_concept"})):
        with pytest.raises(ValueError, match="only a contrastive loss"):
            generate_concept(method, "tiger cat", _refs(0), tmp_path / method, 1, settings, negatives=[_refs(5)], **kw)
        assert not (tmp_path / method).exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "reference folder not found"),
    ("empty", "contains no images"),
    ("corrupt", "broken.png"),
    ("one_ref_nao", "at least 2 reference images"),
    ("nan", "not finite"),
    ("unknown_method", "unknown method"),
    ("bad_setting", "unknown setting"),
    ("negatives_for_sd", "only a contrastive loss"),
])
def test_cli_bad_input_is_a_clear_error(folders, tmp_path, capsys, case, message):
    refs = tmp_path / "refs"
    method, extra = "seedselect", ["--iterations", "1"]
    if case == "empty":
        refs.mkdir()
    elif case == "corrupt":
        refs.mkdir()
        noise_image(0).save(refs / "fine.png")
        (refs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif case in ("one_ref_nao", "nan", "unknown_method", "bad_setting", "negatives_for_sd"):
        refs.mkdir()
        noise_image(0).save(refs / "only.png")
        method = {"one_ref_nao": "nao-seedselect", "unknown_method": "seedsearch", "negatives_for_sd": "sd"}.get(case, method)
        if case == "negatives_for_sd":
            extra = ["--negative-refs", str(refs)]
        if case == "nan":
            extra += ["--set", "semantic_weight=nan"]
        if case == "bad_setting":
            extra += ["--set", "learning_rate=0.1"]
    args = cli_args(folders, method, tmp_path / "out", *extra)
    args[args.index("--refs") + 1] = str(refs)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err
    if case in ("missing", "corrupt"):
        assert str(refs) in err
