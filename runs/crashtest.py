"""`python -m runs.crashtest`: the crash harness. The code lives in runs.studies.crashtest."""

from runs.studies.crashtest import main

if __name__ == "__main__":
    raise SystemExit(main())
