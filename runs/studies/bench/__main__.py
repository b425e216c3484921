"""`python -m runs.studies.bench` (the door `python -m runs.bench` runs the same `main`)."""

from runs.studies.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
