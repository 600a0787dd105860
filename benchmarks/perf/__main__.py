from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import benchmarks.perf as perf_pkg
from pipelines.io import write_text


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(perf_pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in {"-h", "--help"}:
        print(f"usage: python -m benchmarks.perf {{{','.join(names + ['all'])}}} [options]")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        results = {n: _run_one(n, []) for n in names}
        print(json.dumps(results, indent=2))
        return 0
    if name not in names:
        print(f"unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    _run_one(name, rest, echo=True)
    return 0


def _run_one(name: str, argv: list[str], echo: bool = False) -> dict:
    module = importlib.import_module(f"benchmarks.perf.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.perf {name}", description=module.__doc__)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    result = {"benchmark": name, **module.run(args)}
    text = json.dumps(result, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    if echo:
        print(text)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
