"""`python -m runs.bench`: the benchmark of the hot paths. The code lives in
runs.studies.bench (this command: runs.studies.bench.cli)."""

from runs.studies.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
