"""Speed and memory benchmarks. Each is a module ``benchmarks/perf/<name>.py`` defining
``add_arguments(parser)`` and ``run(args) -> dict``; ``python -m benchmarks.perf <name>`` prints the
dict as JSON (and writes it to ``--out`` if given). Benchmarks report figures, they never assert."""
