import sys

from benchmarks.fewshot.stages import main
from pipelines.hub import HubUnavailableError
from pipelines.io import ArtifactWriteError


def run() -> int:
    try:
        return main()
    except Exception as e:
        # an unreachable dataset or model id (models fail inside a generator, which wraps the error), a
        # full disk or a read-only output folder: one line, exit 2, finished artifacts kept
        cause = e if isinstance(e, (HubUnavailableError, ArtifactWriteError)) else e.__cause__
        if not isinstance(cause, (HubUnavailableError, ArtifactWriteError)):
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(run())
