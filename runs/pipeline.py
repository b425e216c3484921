"""`python -m runs.pipeline`: the whole study in one command. The code lives in
runs.studies.pipeline (presets in runs/studies/presets/)."""

from runs.studies.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
