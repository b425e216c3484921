"""`python -m runs.train`: supervised training. The code lives in runs.engines.train."""

from runs.engines.train import main

if __name__ == "__main__":
    raise SystemExit(main())
