"""`python -m runs.reproduce`: the paper's first effect at CPU scale. The code lives in
runs.studies.reproduce."""

from runs.studies.reproduce import main

if __name__ == "__main__":
    raise SystemExit(main())
