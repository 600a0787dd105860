"""SeedSelect cost on CPU with tiny random models (no network).

* ``iteration_over_sampling``: seconds of one SeedSelect iteration (differentiable DDIM chain with
  every UNet call checkpointed, last-k decodes + CLIP, backward, AdamW step) over one plain generation
  (no-grad DDIM chain + one decode), same steps, guidance and batch. The floor of
  forward + recompute + backward is ~4.
* ``peak_mem_ratio_50_over_10``: peak resident memory of a process doing one SeedSelect iteration
  with 50 vs 10 differentiable steps (one fresh subprocess per setting, peak RSS = VmHWM). The bench
  model is sized so that one step's activations are large next to the weights; the same ratio
  without checkpointing is printed for contrast, plus each run's growth above the loaded baseline.
  Children run with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``): glibc's dynamic
  threshold otherwise serves the recomputed activations of later steps from a fragmented heap that
  RSS never gives back, which measures the allocator rather than what the optimisation keeps alive;
  the checkpointed ratio under the default allocator is printed too (``..._default_malloc``).
* ``--preset-images N``: wall seconds and optimisation iterations per image of
  ``generate_concept("seedselect", ...)`` under the ``reference`` and ``fast`` presets.
* ``--sd21`` (GPU): the full SD 2.1-base + CLIP ViT-H/14 architectures with random weights at 512x512
  (random weights time the same as trained ones): per preset, seconds of one plain generation (S) and
  of one SeedSelect iteration without and with ``--negatives`` negative concepts, of one NAO-SeedSelect
  iteration and of a DDIM inversion, and peak GPU memory.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.perf import require_device

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps for the timing ratio")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent-size", type=int, default=24, help="bench latent size (images 4x larger)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    parser.add_argument("--memory-steps", type=int, nargs=2, default=[10, 50])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--preset-images", type=int, default=0,
                        help="also time generate_concept per image for the reference and fast presets "
                             "(test-size tiny models; 0, the default, skips: ~4 min for 4 images)")
    parser.add_argument("--sd21", action="store_true",
                        help="GPU: the full SD 2.1-base + CLIP ViT-H/14 architectures with random weights at 512x512; "
                             "seconds and peak GPU memory of a generation, a SeedSelect and a NAO-SeedSelect "
                             "iteration and a DDIM inversion, per preset")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--negatives", type=int, default=1000,
                        help="--sd21: negative concepts in the timed contrast set (ImageNet-LT: ~1,000 classes)")
    parser.add_argument("--presets", nargs="+", choices=("reference", "fast"), default=["reference", "fast"],
                        help="--sd21: the presets to time")
    parser.add_argument("--tiny", action="store_true", help="--sd21 on the test-size models (a CPU dry run)")


def _bench_sizes(latent_size: int):
    from pipelines.testing import TinySizes

    return TinySizes(latent_size=latent_size, unet_channels=(64, 128), vae_channels=(32, 64, 64), clip_size=64)


def _setup(latent_size: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    from pipelines.references import ReferenceEncodings
    from pipelines.seedselect import SeedSelectPipeline
    from pipelines.testing import tiny_components

    pipe = SeedSelectPipeline.from_components(tiny_components(_bench_sizes(latent_size)))
    g = torch.Generator().manual_seed(0)
    d = pipe.image_encoder.config.projection_dim
    enc = ReferenceEncodings(clip=torch.randn(3, d, generator=g), latents=torch.randn(3, *pipe.latent_shape, generator=g))
    return pipe, pipe.targets_for("a photo of a tiger cat", enc, 1)


def _iteration(pipe, targets, settings, seed, saved: list | None = None):
    """One optimisation iteration: forward, backward, AdamW step (what ``optimize`` does per iteration).

    With ``saved``, the bytes autograd keeps for the backward pass (distinct tensors saved outside the
    checkpointed regions) are appended to it."""
    import contextlib

    import torch

    opt = torch.optim.AdamW([seed], lr=settings.lr, weight_decay=settings.weight_decay)
    seen: dict[tuple, int] = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if saved is not None else contextlib.nullcontext()
    with hooks:
        out = pipe.compute_losses(seed[None], targets, settings, 0)
    if saved is not None:
        saved.append(sum(seen.values()))
    out["total"].sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _timing(args) -> dict:
    import torch

    from pipelines.imaging import decode_latents
    from pipelines.sampling import denoise, random_seeds
    from pipelines.seedselect import SeedSelectSettings

    pipe, targets = _setup(args.latent_size, args.threads)
    settings = SeedSelectSettings(num_inference_steps=args.steps)
    seed = torch.nn.Parameter(random_seeds(pipe.latent_shape, [0])[0])

    def sample():
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt("a photo of a tiger cat", 1, settings.guidance_scale)
            z0 = denoise(pipe, seed.detach()[None], cond, uncond, settings.guidance_scale, args.steps)[-1]
            decode_latents(pipe, z0)

    # alternate the two and keep each one's fastest run: on a shared CPU the minimum is the least noisy
    sample()
    _iteration(pipe, targets, settings, seed)  # warm-up
    t_sample, t_iter = math.inf, math.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sample()
        t1 = time.perf_counter()
        _iteration(pipe, targets, settings, seed)
        t2 = time.perf_counter()
        t_sample, t_iter = min(t_sample, t1 - t0), min(t_iter, t2 - t1)
    return {"sampling_seconds": round(t_sample, 4), "iteration_seconds": round(t_iter, 4),
            "iteration_over_sampling": round(t_iter / t_sample, 3), "steps": args.steps,
            "guidance_scale": settings.guidance_scale, "image_size": pipe.image_size,
            "latent_shape": list(pipe.latent_shape), "unet_params": sum(p.numel() for p in pipe.unet.parameters())}


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(latent_size: int, threads: int, steps: int, checkpoint: bool) -> None:
    """Subprocess body: load, note RSS, run one iteration, print RSS baseline and peak (MiB).

    The peak is VmHWM of this process's address space (reset by exec). ``ru_maxrss`` is not used: Linux
    carries it over from the parent at fork, so a child of a big parent reports the parent's peak."""
    import torch

    from pipelines.sampling import random_seeds
    from pipelines.seedselect import SeedSelectSettings

    pipe, targets = _setup(latent_size, threads)
    settings = SeedSelectSettings(num_inference_steps=steps, gradient_checkpointing=checkpoint,
                                  checkpoint_decoder=checkpoint)
    seed = torch.nn.Parameter(random_seeds(pipe.latent_shape, [0])[0])
    loaded, loaded_peak = _proc_status_mib("VmRSS"), _proc_status_mib("VmHWM")
    saved: list[int] = []
    _iteration(pipe, targets, settings, seed, saved)
    print(json.dumps({"loaded_mib": loaded, "loaded_peak_mib": loaded_peak, "peak_mib": _proc_status_mib("VmHWM"),
                      "saved_for_backward_mib": saved[0] / 2**20}))


def _peak(args, steps: int, checkpoint: bool, fixed_mmap_threshold: bool = True) -> dict:
    code = (f"from benchmarks.perf.seedselect import child; "
            f"child({args.latent_size}, {args.threads}, {steps}, {checkpoint})")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sd21_components(dtype, device):
    """SD 2.1-base and laion CLIP ViT-H/14 architectures (configs as published), random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from pipelines.loading import Components
    from pipelines.testing import tiny_scheduler, tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: CPU init of ~2 B parameters takes minutes
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
                                            projection_dim=512))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
            image_size=224, projection_dim=1024, hidden_act="gelu"))
    comps = Components(vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(), unet=unet, scheduler=tiny_scheduler(),
                       image_encoder=vision, image_processor=CLIPImageProcessor(), model_id="sd21-random",
                       image_encoder_id="vit-h-14-random")
    return comps.to(device=device, dtype=dtype)


def _sd21(args) -> dict:
    """Per preset (reference fp32, then fast bf16 on CUDA): seconds of one plain generation at batch 1
    and at SD's fast batch; of one SeedSelect iteration with one concept, with ``--negatives`` negative
    concepts in the contrast set, and with one concept again (run order alone); of one NAO-SeedSelect
    iteration (its own batch and guidance) and of a DDIM inversion (its steps) of 1 and 5 references;
    each with the peak GPU memory it reached. ``--tiny`` runs the same code on the test-size models."""
    import torch

    from pipelines.imaging import decode_latents
    from pipelines.inversion import DDIMInversionPipeline
    from pipelines.loading import resolve_dtype
    from pipelines.nao_seedselect import NaoSeedSelectPipeline
    from pipelines.references import ReferenceEncodings
    from pipelines.registry import get_method
    from pipelines.sampling import denoise, random_seeds
    from pipelines.seedselect import SeedSelectPipeline
    from pipelines.testing import tiny_components

    require_device(args.device)
    cuda = str(args.device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prompt = "a photo of a tiger cat"

    def timed(fn, repeats):
        fn()  # warm-up (kernel selection, allocator)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return {"seconds": round((time.perf_counter() - t0) / repeats, 3),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}

    t0 = time.perf_counter()
    comps = tiny_components() if args.tiny else sd21_components(torch.float32, args.device)
    comps = comps.to(device=args.device)
    out = {"device_name": torch.cuda.get_device_name() if cuda else str(args.device), "torch": torch.__version__,
           "models": "tiny" if args.tiny else "sd21-base-512 + vit-h-14 (random weights)",
           "build_seconds": round(time.perf_counter() - t0, 1), "repeats": args.repeats}
    sd_batch = get_method("sd").settings("fast", args.device).batch_size
    for preset in sorted(args.presets, key=("reference", "fast").index):  # fp32 first: casting to bf16 loses nothing
        settings = get_method("seedselect").settings(preset, args.device)
        pipe = SeedSelectPipeline.from_components(comps.to(dtype=resolve_dtype(settings.dtype)))
        cdt = pipe.compute_dtype
        row = {"dtype": settings.dtype, "steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
               "image_size": pipe.image_size}
        for batch in sorted({1, sd_batch}):
            z = random_seeds(pipe.latent_shape, range(batch), cdt).to(args.device)

            def sample():
                with torch.no_grad():
                    cond, uncond = pipe.encode_prompt(prompt, batch, settings.guidance_scale)
                    z0 = denoise(pipe, z, cond, uncond, settings.guidance_scale, settings.num_inference_steps)[-1]
                    decode_latents(pipe, z0)

            r = timed(sample, args.repeats)
            row[f"generation_batch_{batch}"] = {**r, "seconds_per_image": round(r["seconds"] / batch, 3)}
        g = torch.Generator().manual_seed(0)
        d = pipe.image_encoder.config.projection_dim

        def encodings(n):
            return ReferenceEncodings(clip=torch.randn(n, d, generator=g).to(args.device),
                                      latents=torch.randn(n, *pipe.latent_shape, generator=g).to(args.device, cdt))

        concept = encodings(3)

        def iteration_timing(pipe, settings, negatives: int) -> dict:
            contrast = pipe.contrast_set([prompt], [concept], settings, [encodings(1) for _ in range(negatives)])
            targets = [contrast.target(0)] * settings.batch_size
            seeds = torch.nn.Parameter(random_seeds(pipe.latent_shape, range(settings.batch_size), cdt).to(args.device))
            opt = torch.optim.AdamW([seeds], lr=settings.lr, weight_decay=settings.weight_decay)

            def iteration():
                pipe.compute_losses(seeds, targets, settings, 0)["total"].sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            r = timed(iteration, args.repeats)
            return {**r, "batch_size": settings.batch_size, "guidance_scale": settings.guidance_scale,
                    "seconds_per_seed": round(r["seconds"] / settings.batch_size, 3)}

        # without, with, and again without negatives: the repeat shows what run order alone changes
        for key, negatives in (("", 0), ("", args.negatives), ("_repeat", 0)):
            row[f"seedselect_iteration_negatives_{negatives}{key}"] = iteration_timing(pipe, settings, negatives)
        nao_settings = get_method("nao-seedselect").settings(preset, args.device)
        nao = NaoSeedSelectPipeline.from_components(comps)
        row["nao_seedselect_iteration"] = iteration_timing(nao, nao_settings, 0)
        inverter = DDIMInversionPipeline.from_components(comps)
        for batch in (1, 5):
            latents = encodings(batch).latents

            def invert():
                inverter.invert_latents(latents, prompt, nao_settings.inversion_steps)

            r = timed(invert, args.repeats)
            row[f"ddim_inversion_batch_{batch}"] = {**r, "steps": nao_settings.inversion_steps,
                                                    "seconds_per_image": round(r["seconds"] / batch, 3)}
        s_unit = row["generation_batch_1"]["seconds"]
        row["iteration_per_seed_over_S"] = round(row["seedselect_iteration_negatives_0"]["seconds_per_seed"] / s_unit, 2)
        out[preset] = row
        del pipe
        if cuda:
            torch.cuda.empty_cache()
    return {"sd21_base_512": out}


def _presets(args) -> dict:
    """Wall seconds per image of ``generate_concept('seedselect', ...)`` under each preset (CPU)."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from pipelines.generate import generate_concept
    from pipelines.testing import tiny_components

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    out = {}
    for preset in ("reference", "fast"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            records = generate_concept("seedselect", "tiger cat", refs, tmp, args.preset_images, preset=preset,
                                       components=tiny_components(), device="cpu", progress=False)
            seconds = time.perf_counter() - t0
        out[f"seconds_per_image_{preset}"] = round(seconds / args.preset_images, 3)
        out[f"iterations_per_image_{preset}"] = round(
            sum(len(r["losses"]) - 1 for r in records) / args.preset_images, 2)
    out["preset_images"] = args.preset_images
    return out


def run(args) -> dict:
    if args.sd21:
        return _sd21(args)
    result = _timing(args)
    if args.preset_images > 0:
        result.update(_presets(args))
    if not args.skip_memory:
        lo, hi = args.memory_steps
        mem = {}
        for ckpt in (True, False):
            a, b = _peak(args, lo, ckpt), _peak(args, hi, ckpt)
            tag = "" if ckpt else "_no_checkpointing"
            mem[f"peak_mem_ratio_{hi}_over_{lo}{tag}"] = round(b["peak_mib"] / a["peak_mib"], 3)
            mem[f"peak_mib_{lo}_steps{tag}"] = round(a["peak_mib"], 1)
            mem[f"peak_mib_{hi}_steps{tag}"] = round(b["peak_mib"], 1)
            mem[f"growth_over_loaded_mib_{lo}_steps{tag}"] = round(a["peak_mib"] - a["loaded_mib"], 1)
            mem[f"growth_over_loaded_mib_{hi}_steps{tag}"] = round(b["peak_mib"] - b["loaded_mib"], 1)
            mem[f"saved_for_backward_mib_{lo}_steps{tag}"] = round(a["saved_for_backward_mib"], 2)
            mem[f"saved_for_backward_mib_{hi}_steps{tag}"] = round(b["saved_for_backward_mib"], 2)
        a, b = _peak(args, lo, True, False), _peak(args, hi, True, False)
        mem[f"peak_mem_ratio_{hi}_over_{lo}_default_malloc"] = round(b["peak_mib"] / a["peak_mib"], 3)
        mem["malloc"] = "MALLOC_MMAP_THRESHOLD_=65536 unless named default_malloc"
        result.update(mem)
    return result
