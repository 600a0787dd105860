"""Synthesis throughput with 1 and N processes sharing one manifest through claim files (issue 13):
images per hour and scaling efficiency (rate with N processes / (N x rate with 1)).

The workload is real: SeedSelect (fast preset: contrastive loss across the classes of a group,
bootstrap resampling) on the tiny random SD + CLIP of ``pipelines.testing``, ``--groups`` contrast
sets of ``--classes`` classes x ``--images`` images, one torch thread per process. Each process
count runs in a fresh folder; the wall time runs from launching the processes to the last one
exiting, so start-up (imports, model loading) is included. Target: efficiency >= 0.8 on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--groups", type=int, default=24, help="contrast sets (one generator call each)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--images", type=int, default=4, help="images per class and group")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)   # internal: run one process's share


def _manifest(root: Path, args) -> Path:
    import numpy as np
    from PIL import Image

    from benchmarks.fewshot.sampling import SupportSet
    from benchmarks.fewshot.synthesis import build_manifest, generation_identity, write_manifest
    from pipelines.testing import save_tiny_image_encoder, save_tiny_pipeline

    save_tiny_pipeline(root / "sd")
    save_tiny_image_encoder(root / "clip")
    rng = np.random.default_rng(0)
    supports = []
    for trial in range(args.groups):
        for c in range(args.classes):
            rows = tuple(range(1000 * trial + 10 * c, 1000 * trial + 10 * c + 3))
            for r in rows:
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{r:07d}.png")
            supports.append(SupportSet("scale", "test", f"class{c}", 3, trial, rows))
    settings = {"preset": "fast", "model": str(root / "sd"), "image_encoder": str(root / "clip"), "device": "cpu",
                "methods": {"seedselect": {"num_inference_steps": 4, "iterations": args.iterations,
                                           "bootstrap_iterations": max(1, args.iterations // 3), "batch_size": 4,
                                           "last_k_weights": [1.0]}}}
    (root / "settings.json").write_text(json.dumps(settings))
    rows = build_manifest(supports, ["seedselect"], args.images, root / "synthetic",
                          lambda s: [root / f"{r:07d}.png" for r in s.rows], lambda c: f"a photo of {c}", 0,
                          identity=lambda m: generation_identity(m, settings))
    return write_manifest(rows, root / "synthesis.csv")


def _work(manifest: Path) -> dict:
    import torch

    from benchmarks.fewshot.synthesis import get_generator, read_manifest, run_manifest
    from benchmarks.worksharing import ClaimBoard

    torch.set_num_threads(1)
    settings = json.loads((manifest.parent / "settings.json").read_text())
    report = run_manifest(read_manifest(manifest), resolve=lambda m: get_generator(m, settings), progress=False,
                          board=ClaimBoard(manifest.parent / "claims"))
    return {"made": report.made, "groups": report.groups_run}


def run(args) -> dict:
    if args.worker:
        return _work(args.worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = {"device": "cpu", "cores": os.cpu_count(), "threads_per_process": 1, "groups": args.groups,
           "classes": args.classes, "images_per_class": args.images, "iterations": args.iterations}
    rates = {}
    for n in args.processes:
        with tempfile.TemporaryDirectory(prefix="perf-scale-") as tmp:
            manifest = _manifest(Path(tmp), args)
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.perf", "scale", "--worker", str(manifest)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(n)]
            results = []
            for p in procs:
                stdout, stderr = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"scale worker failed: {stderr[-2000:]}")
                results.append(json.loads(stdout[stdout.index("{"):]))
            seconds = time.perf_counter() - t0
        images = sum(r["made"] for r in results)
        expected = args.groups * args.classes * args.images
        if images != expected:
            raise RuntimeError(f"{n} processes made {images} images, expected {expected} (lost or duplicated work)")
        rates[n] = images / seconds * 3600
        out[f"processes_{n}"] = {"seconds": round(seconds, 2), "images_per_hour": round(rates[n]),
                                 "images_per_process": [r["made"] for r in results]}
    if 1 in rates:
        for n in rates:
            if n > 1:
                out[f"scaling_efficiency_{n}"] = round(rates[n] / (n * rates[1]), 3)
    return out
