"""Speed and memory benchmarks. Each is a module ``benchmarks/perf/<name>.py`` defining
``add_arguments(parser)`` and ``run(args) -> dict``; ``python -m benchmarks.perf <name>`` prints the
dict as JSON (and writes it to ``--out`` if given). Benchmarks report figures, they never assert."""


def require_device(device: str) -> None:
    """Exit 2 with one line where a benchmark is asked for a CUDA device this machine lacks."""
    import sys

    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"device {device!r}: no CUDA device is available here; run it on a GPU machine or with --device cpu", file=sys.stderr)
        raise SystemExit(2)
