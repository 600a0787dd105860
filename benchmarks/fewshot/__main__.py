import sys

from benchmarks.fewshot.stages import main
from pipelines.hub import HubUnavailableError


def run() -> int:
    try:
        return main()
    except Exception as e:
        # an unreachable dataset or model id (models fail inside a generator, which wraps the error):
        # one line, exit 2
        hub_error = e if isinstance(e, HubUnavailableError) else e.__cause__
        if not isinstance(hub_error, HubUnavailableError):
            raise
        print(f"error: {hub_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(run())
