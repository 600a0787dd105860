"""Long-tail classifier training throughput: images per second of ``train_classifier`` (the code the
long-tail ``train`` stage runs: JPEG decode, RandomResizedCrop + flip + ColorJitter in ``num_workers``
loader processes, bf16 autocast on CUDA, SGD) at the ImageNet-LT profile's defaults (ResNet-50,
224 px, batch 512, 1,000 classes), on seeded synthetic JPEGs of ImageNet's typical size (500x375).

* ``images_per_second``: steady state, from the difference between a 1-epoch and a
  ``1 + --epochs``-epoch run (model creation, worker start-up and kernel selection cancel out).
* ``gpu_images_per_second``: forward + backward + step on batches already on the device (no
  loading): the ceiling the loader is measured against.
* ``hours_per_imagenet_lt_run``: 90 epochs x 115,846 images at the steady-state rate.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.perf import require_device

IMAGENET_LT_TRAIN_IMAGES = 115_846


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=4096, help="synthetic training images (one epoch)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs beyond the first")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--source-size", type=int, nargs=2, default=[500, 375], help="JPEG width height")
    parser.add_argument("--device", default="cuda")


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Seeded JPEGs (quality 90) with smooth structure plus fine noise, so that they compress and
    decode roughly like photographs rather than like flat colour or pure noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        path = folder / f"{i:06d}.JPEG"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def _gpu_ceiling(cfg, classes: int, steps: int = 10) -> float:
    import torch

    from benchmarks.longtail.training import create_model

    device = cfg.resolved_device()
    torch.manual_seed(0)
    model = create_model(cfg, classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, classes, (cfg.batch_size,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.startswith("cuda"))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict:
    import torch

    from benchmarks.longtail.training import TrainConfig, train_classifier

    require_device(args.device)
    cfg = TrainConfig(model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                      num_workers=args.num_workers, device=args.device)
    cuda = cfg.resolved_device().startswith("cuda")
    labels = np.arange(args.images) % args.classes
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_images(Path(tmp), args.images, tuple(args.source_size))
        write_seconds = time.perf_counter() - t0
        mean_kib = float(np.mean([Path(p).stat().st_size for p in paths])) / 1024
        seconds = {}
        for epochs in (0, 1, 1 + args.epochs):  # 0: a 1-epoch warm-up run (first-call imports and set-up)
            t0 = time.perf_counter()
            train_classifier(paths, labels, args.classes, dataclasses.replace(cfg, epochs=max(epochs, 1)), "ce",
                             seed=0, progress=False)
            if cuda:
                torch.cuda.synchronize()
            seconds[epochs] = time.perf_counter() - t0
    steady = args.epochs * args.images / (seconds[1 + args.epochs] - seconds[1])
    return {
        "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "classes": args.classes, "amp_bf16": cfg.amp and cuda,
        "synthetic_images": args.images, "source_size": list(args.source_size), "mean_jpeg_kib": round(mean_kib, 1),
        "write_seconds": round(write_seconds, 1),
        "seconds_1_epoch": round(seconds[1], 2), f"seconds_{1 + args.epochs}_epochs": round(seconds[1 + args.epochs], 2),
        "images_per_second": round(steady, 1),
        "gpu_images_per_second": round(_gpu_ceiling(cfg, args.classes), 1),
        "hours_per_imagenet_lt_run": round(90 * IMAGENET_LT_TRAIN_IMAGES / steady / 3600, 2),
    }
