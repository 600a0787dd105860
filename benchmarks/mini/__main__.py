"""``python -m benchmarks.mini STAGE [--params params.yaml]``: one DVC stage of the mini world."""
from __future__ import annotations

import argparse
import json
import sys

from pipelines.io import ArtifactWriteError

from .common import set_threads
from .config import load_config

STAGES = ("data", "vae", "text", "diffusion", "encoder", "evaluator", "check", "select", "claims")


def run_stage(stage: str, params: str = "params.yaml") -> dict:
    cfg = load_config(params)
    set_threads(cfg.threads)
    if stage == "data":
        from . import data

        return data.build(cfg.data, cfg.data_dir)
    if stage == "vae":
        from . import vae

        return vae.train(cfg)
    if stage == "text":
        from . import text

        return text.build(cfg)
    if stage == "diffusion":
        from . import diffusion

        return diffusion.train(cfg)
    if stage == "encoder":
        from . import encoder

        return encoder.train(cfg)
    if stage == "evaluator":
        from . import evaluator

        return evaluator.train(cfg)
    if stage == "check":
        from . import check

        return check.run(cfg)
    if stage == "select":
        from . import select

        return select.run(cfg)
    if stage == "claims":
        from . import claims

        return claims.run(cfg)
    raise ValueError(f"unknown mini stage {stage!r}; expected one of {STAGES}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mini", description=__doc__)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    try:
        report = run_stage(args.stage, args.params)
    except ArtifactWriteError as e:  # disk full, read-only output: one line, finished artifacts kept
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({k: v for k, v in report.items() if k not in ("log", "per_class", "config")}, indent=2, default=str))


if __name__ == "__main__":
    main()
