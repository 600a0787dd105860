"""Discriminative Class Tokens on CPU with the tiny random models: seconds per training update
(one epoch of ``epoch_size`` images, each a full no-grad DDIM chain plus one differentiable last
step, decoder and classifier) and seconds per generated image, at the reference settings
(30 steps, guidance 7, 5 images per update)."""
from __future__ import annotations

import argparse
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=2, help="training updates to time")
    parser.add_argument("--images", type=int, default=8, help="images to generate and time")
    parser.add_argument("--steps", type=int, default=30)


def run(args: argparse.Namespace) -> dict:
    from pipelines.classifiers import ImageClassifier
    from pipelines.dct import DctPipeline, DctSettings
    from pipelines.testing import tiny_components

    torch.manual_seed(0)
    pipe = DctPipeline.from_components(tiny_components())
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, 10))
    with torch.no_grad():
        net[-1].bias[3] = -20.0  # never the target: every epoch runs (no early success)
    guide = ImageClassifier(net, [str(i) for i in range(10)], (32, 32), 32, (0.5,) * 3, (0.5,) * 3, source="tiny")
    settings = DctSettings(num_inference_steps=args.steps, max_epochs=args.epochs, patience=args.epochs + 1)

    start = time.perf_counter()
    token = pipe.train_token("three", guide, 3, settings, progress=False)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    pipe.generate_with_token("three", token, list(range(args.images)), settings)
    gen_s = time.perf_counter() - start
    return {
        "device": "cpu", "threads": torch.get_num_threads(), "model": "tiny random SD (pipelines.testing)",
        "steps": args.steps, "epoch_size": settings.epoch_size,
        "seconds_per_update": round(train_s / token.record["epochs"], 4),
        "seconds_per_training_image": round(train_s / token.record["epochs"] / settings.epoch_size, 4),
        "seconds_per_generated_image": round(gen_s / args.images, 4),
    }
