"""A quick probe of claims 2-3 of issue 5 (not yet a DVC stage): tail-class fidelity of plain SD,
SeedSelect and NAO-SeedSelect on the trained mini world, from each tail class's reference images,
scored by the independent evaluator. Small by design (few images, one seed): indicative figures,
not the benchmark's (≥ 50 images, 3 seeds, CI95, diversity).

``python -m benchmarks.mini.tail_probe [--params params.yaml] [--images 8] [--out FILE]``"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from pipelines.generate import generate_concept
from pipelines.io import write_json

from .config import load_config
from .evaluator import load_evaluator

METHODS = {"sd": {}, "seedselect": {"iterations": 30}, "nao-seedselect": {}}


def run(params: str, images: int, steps: int, out_dir: str, seed: int = 0) -> dict:
    cfg = load_config(params)
    evaluator = load_evaluator(cfg.evaluator_dir)
    result = {}
    for method, overrides in METHODS.items():
        for label in cfg.data.tail_classes:
            name = cfg.class_names[label]
            records = generate_concept(
                method, name, cfg.data_dir / "references" / name, f"{out_dir}/{method}-{name}", images,
                {"prompt_template": cfg.data.prompt_template, "num_inference_steps": steps, **overrides}, seed=seed,
                model=cfg.sd_dir, image_encoder=cfg.clip_dir, device="cpu", progress=False)
            x = torch.stack([torch.from_numpy(np.asarray(Image.open(r.path).convert("RGB"))).permute(2, 0, 1)
                             for r in records]).float() / 255
            result[f"{method}/{name}"] = {
                "fidelity": (evaluator.predict(x) == label).float().mean().item(),
                "optimisation_iterations_per_image": float(np.mean([max(len(r.get("losses", [])) - 1, 0)
                                                                    for r in records])),
                # from the per-image records, so images reused from an earlier run keep their cost
                "generation_seconds": round(sum(r.get("seconds", 0.0) for r in records), 1)}
            print(method, name, result[f"{method}/{name}"], flush=True)
    return {"images_per_class": images, "steps": steps, "seed": seed, "results": result}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mini.tail_probe", description=__doc__)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work", default="data/mini/tail_probe", help="generated images (resumable)")
    p.add_argument("--out", default="results/mini/tail_probe.json")
    args = p.parse_args(argv)
    report = run(args.params, args.images, args.steps, args.work)
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
