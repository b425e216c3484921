"""`python -m runs.distill`: random-teacher distillation. The code lives in
runs.engines.distill."""

from runs.engines.distill import main

if __name__ == "__main__":
    raise SystemExit(main())
