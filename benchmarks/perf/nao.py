"""NAO on CPU: wall time and quality of the centroid of K i.i.d. N(0, I) seeds and of one
interpolation path (reference workload: K = 5, d = 16384 = SD 2.1-base latents, 50-point paths).
With --reference also times the authors' solver (Adam lr 0.01 in R^d) on the interpolation."""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from benchmarks.params import load_section
from pipelines.seed_space import (NaoSettings, chi_mode, gaussian_centroid, lerp, mean_centroid, nao_centroid,
                                  nao_path, seed_log_prior, slerp)


@dataclass(frozen=True)
class NaoPerfParams:
    dim: int = 16384
    num_seeds: int = 5
    n_points: int = 50
    seed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help="read defaults from the perf.nao section of this params.yaml")
    for f in dataclasses.fields(NaoPerfParams):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--reference", action="store_true",
                        help="also run the authors' Adam solver in R^d on the interpolation (slow)")


def run(args: argparse.Namespace) -> dict:
    p = load_section(NaoPerfParams, "perf.nao", args.params) if args.params else NaoPerfParams()
    p = dataclasses.replace(p, **{k: v for k, v in vars(args).items() if k in NaoPerfParams.__annotations__ and v is not None})
    z = torch.randn(p.num_seeds, p.dim, generator=torch.Generator().manual_seed(p.seed))

    start = time.perf_counter()
    centroid = nao_centroid(z, n_points=p.n_points, generator=torch.Generator().manual_seed(p.seed + 1))
    centroid_s = time.perf_counter() - start

    start = time.perf_counter()
    path = nao_path(z[0], z[1], n_points=p.n_points, generator=torch.Generator().manual_seed(p.seed + 1))
    path_s = time.perf_counter() - start

    t = torch.linspace(0, 1, p.n_points)
    out = {
        "params": dataclasses.asdict(p),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "chi_mode": chi_mode(p.dim),
        "centroid": {
            "seconds": round(centroid_s, 4),
            **centroid.record.to_dict(),
            "norm": centroid.centroid.norm().item(),
            "log_chi": seed_log_prior(centroid.centroid).item(),
            "path_points_mean_log_chi": seed_log_prior(centroid.paths.reshape(-1, p.dim), batched=True).mean().item(),
            "baselines_log_chi": {
                "mean": seed_log_prior(mean_centroid(z)).item(),
                "gaussian_preserving": seed_log_prior(gaussian_centroid(z)).item(),
            },
        },
        "interpolation": {
            "seconds": round(path_s, 4),
            **path.record.to_dict(),
            "mean_log_chi": {
                "nao": seed_log_prior(path.points, batched=True).mean().item(),
                "slerp": seed_log_prior(slerp(z[0], z[1], t), batched=True).mean().item(),
                "lerp": seed_log_prior(lerp(z[0], z[1], t), batched=True).mean().item(),
            },
        },
    }
    if args.reference:
        start = time.perf_counter()
        ref = nao_path(z[0], z[1], generator=torch.Generator().manual_seed(p.seed + 1),
                       settings=NaoSettings.reference_interpolation(n_points=p.n_points))
        out["interpolation_reference_solver"] = {"seconds": round(time.perf_counter() - start, 3), **ref.record.to_dict()}
    return out
