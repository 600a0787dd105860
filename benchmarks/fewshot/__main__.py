import sys

from benchmarks.fewshot.stages import main
from pipelines.hub import HubUnavailableError


def run() -> int:
    try:
        return main()
    except HubUnavailableError as e:  # an unreachable dataset or model id: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(run())
