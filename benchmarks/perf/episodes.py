"""Episode evaluation speed on cached features: episodes/second for N-way K-shot episodes (default
600 5-way 5-shot, 15 queries, 640-d features as a ResNet-12/18 gives) with each per-episode head,
vectorised across episodes. Target: >= 20 episodes/s on CPU. Features are random (only speed is
measured); episodes come from the real sampler over a synthetic 20-class x 600-image split."""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.fewshot.classifiers import episode_accuracies
from benchmarks.fewshot.registry import BenchmarkSpec
from benchmarks.fewshot.sampling import draw_supports, sample_episodes
from benchmarks.params import load_section


@dataclass(frozen=True)
class EpisodesPerfParams:
    episodes: int = 600
    ways: int = 5
    shot: int = 5
    queries: int = 15
    dim: int = 640
    synthetic: int = 0        # synthetic images added to each support set
    chunk: int = 200          # episodes per vectorised batch
    threads: int = 0          # torch threads (0: torch's default)
    seed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help="read defaults from the perf.episodes section of this params.yaml")
    for f in dataclasses.fields(EpisodesPerfParams):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--heads", default="prototype,linear")


def run(args: argparse.Namespace) -> dict:
    p = load_section(EpisodesPerfParams, "perf.episodes", args.params) if args.params else EpisodesPerfParams()
    p = dataclasses.replace(p, **{k: v for k, v in vars(args).items() if k in EpisodesPerfParams.__annotations__ and v is not None})
    if p.threads:
        torch.set_num_threads(p.threads)
    classes, per_class = 20, 600
    names = tuple(f"c{i:02d}" for i in range(classes))
    spec = BenchmarkSpec(name="perf", hf_id="none", classes={"train": (), "val": (), "test": names},
                         source_splits={}, images_per_class=per_class)
    index = {c: np.arange(i * per_class, (i + 1) * per_class) for i, c in enumerate(names)}
    start = time.perf_counter()
    supports = draw_supports(spec, index, "test", [p.shot], trials=5, seed=p.seed)
    episodes = sample_episodes(spec, index, supports, "test", p.ways, p.shot, p.queries, p.episodes, p.seed)
    sampling_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(p.seed)
    features = torch.randn(classes * per_class, p.dim, generator=g)
    synthetic = {s.key: torch.randn(p.synthetic, p.dim, generator=g) for s in supports} if p.synthetic else None
    out = {"params": dataclasses.asdict(p), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "sampling_episodes_per_s": round(p.episodes / sampling_s, 1), "heads": {}}
    for head in args.heads.split(","):
        episode_accuracies(head, features, episodes, synthetic, chunk=p.chunk)  # warm-up
        start = time.perf_counter()
        episode_accuracies(head, features, episodes, synthetic, chunk=p.chunk)
        seconds = time.perf_counter() - start
        out["heads"][head] = {"seconds": round(seconds, 3), "episodes_per_s": round(p.episodes / seconds, 1)}
    return out
