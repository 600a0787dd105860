import sys

from benchmarks.fewshot.stages import main
from pipelines.io import ArtifactWriteError

if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ArtifactWriteError as e:  # disk full, read-only output: one line, finished artifacts kept
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
