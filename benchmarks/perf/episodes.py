"""Episode evaluation speed on cached features: episodes/second for N-way K-shot episodes (default
600 5-way 5-shot, 15 queries, 640-d features as a ResNet-12/18 gives) with each per-episode head,
vectorised across episodes. Target: >= 20 episodes/s on CPU. Features are random (only speed is
measured); episodes are sampled by the real sampler over a synthetic 20-class x 600-image split."""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.fewshot.classifiers import episode_accuracies
from benchmarks.fewshot.registry import BenchmarkSpec
from benchmarks.fewshot.sampling import draw_supports, sample_episodes


def add_arguments(parser) -> None:
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--synthetic", type=int, default=0, help="synthetic images added to each support set")
    parser.add_argument("--heads", default="prototype,linear")
    parser.add_argument("--chunk", type=int, default=200, help="episodes per vectorised batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    classes, per_class = 20, 600
    names = tuple(f"c{i:02d}" for i in range(classes))
    spec = BenchmarkSpec(name="perf", hf_id="none", classes={"train": (), "val": (), "test": names},
                         source_splits={}, images_per_class=per_class)
    index = {c: np.arange(i * per_class, (i + 1) * per_class) for i, c in enumerate(names)}
    t0 = time.perf_counter()
    supports = draw_supports(spec, index, "test", [args.shot], trials=5, seed=args.seed)
    episodes = sample_episodes(spec, index, supports, "test", args.ways, args.shot, args.queries, args.episodes, args.seed)
    sampling_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(args.seed)
    features = torch.randn(classes * per_class, args.dim, generator=g)
    synthetic = None
    if args.synthetic:
        synthetic = {s.key: torch.randn(args.synthetic, args.dim, generator=g) for s in supports}
    out = {"episodes": args.episodes, "ways": args.ways, "shot": args.shot, "queries": args.queries, "dim": args.dim,
           "synthetic_per_class": args.synthetic, "threads": torch.get_num_threads(),
           "sampling_episodes_per_s": round(args.episodes / sampling_s, 1), "heads": {}}
    for head in args.heads.split(","):
        episode_accuracies(head, features, episodes, synthetic, chunk=args.chunk)  # warm-up
        t0 = time.perf_counter()
        episode_accuracies(head, features, episodes, synthetic, chunk=args.chunk)
        dt = time.perf_counter() - t0
        out["heads"][head] = {"seconds": round(dt, 3), "episodes_per_s": round(args.episodes / dt, 1)}
    return out
