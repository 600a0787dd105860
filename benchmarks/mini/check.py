"""Claim 1 of issue 5 on the trained world: plain text-to-image sampling (DDIM + classifier-free
guidance, the StableDiffusionPipeline loaded from its folder) scored per class by the evaluator.
Head classes should come out right, tail classes mostly wrong. Validation classes (rare like the tail,
kept for choosing settings) count as neither."""
from __future__ import annotations

from dataclasses import asdict

import torch
from tqdm import tqdm

from benchmarks.intervals import t_interval
from pipelines.io import save_image, write_json

from . import data
from .common import Timer
from .config import MiniConfig
from .evaluator import load_evaluator
from .metrics import diversity, fidelity


def load_pipeline(cfg: MiniConfig):
    from diffusers import StableDiffusionPipeline

    if not (cfg.sd_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"mini diffusion model not trained: {cfg.sd_dir} (run the mini_diffusion stage)")
    pipe = StableDiffusionPipeline.from_pretrained(cfg.sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_class(pipe, cfg: MiniConfig, label: int, n: int, seed: int) -> torch.Tensor:
    """``n`` plain samples of class ``label`` as (n, 3, S, S) in [0, 1]."""
    cc = cfg.check
    gen = torch.Generator().manual_seed(seed * 1000 + label)
    return pipe(cfg.prompt(label), num_images_per_prompt=n, num_inference_steps=cc.num_inference_steps,
                guidance_scale=cc.guidance_scale, generator=gen, output_type="pt").images


def grid(rows: list[torch.Tensor]):
    """PIL grid: one row per class."""
    from PIL import Image

    t = torch.stack(rows)  # (R, C, 3, H, W)
    r, c, _, h, w = t.shape
    img = t.permute(0, 3, 1, 4, 2).reshape(r * h, c * w, 3)
    return Image.fromarray((img.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def run(cfg: MiniConfig) -> dict:
    cc = cfg.check
    timer = Timer()
    pipe = load_pipeline(cfg)
    evaluator = load_evaluator(cfg.evaluator_dir)
    test_x, test_y = data.load_split(cfg.data_dir, "test")
    names, tail, val = cfg.class_names, set(cfg.data.tail_classes), set(cfg.data.val_classes)
    per_class = {n: {"fidelity": [], "diversity": []} for n in names}
    head_f, tail_f, rows = [], [], []
    for seed in cc.seeds:
        fh, ft = [], []
        for c in tqdm(range(len(names)), desc=f"plain sampling seed {seed}"):
            imgs = sample_class(pipe, cfg, c, cc.num_images_per_class, seed)
            f = fidelity(evaluator, imgs, c)
            per_class[names[c]]["fidelity"].append(f)
            per_class[names[c]]["diversity"].append(diversity(evaluator, imgs, data.to_unit(test_x[test_y == c])))
            if c not in val:
                (ft if c in tail else fh).append(f)
            if seed == cc.seeds[0]:
                rows.append(imgs[:10])
        head_f.append(sum(fh) / len(fh))
        tail_f.append(sum(ft) / len(ft))
    head, head_ci = t_interval(head_f)
    tail_, tail_ci = t_interval(tail_f)
    gap, gap_ci = t_interval([h - t for h, t in zip(head_f, tail_f)])
    result = {
        "config": asdict(cc),
        "head_fidelity_plain": head, "head_fidelity_plain_ci95": head_ci,
        "tail_fidelity_plain": tail_, "tail_fidelity_plain_ci95": tail_ci,
        "head_minus_tail_fidelity_plain": gap, "head_minus_tail_fidelity_plain_ci95": gap_ci,
        "tail_classes": [names[c] for c in sorted(tail)],
        "per_class": {n: {k: t_interval(v)[0] for k, v in d.items()} for n, d in per_class.items()},
        "per_seed": {"head_fidelity": head_f, "tail_fidelity": tail_f},
    }
    out = cfg.results_dir
    write_json(out / "plain.json", result)  # no timing: a rerun with the same figures leaves mini_claims up to date
    save_image(out / "plain_grid.png", grid(rows))
    return {**result, "seconds": timer.seconds}
