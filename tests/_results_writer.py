"""A tiny scan used by tests/test_results.py, also run as a subprocess writer.

    python tests/_results_writer.py PATH STOP_AFTER {exit,kill,hold,close}

Writes the first STOP_AFTER missing cells (all if negative), prints how many it wrote, then
dies with os._exit(0) or SIGKILL (no close), holds the file open until stdin closes, or
closes cleanly.
"""

import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runs.results import MetricSpec, create_result  # noqa: E402

COORDS = {"pair": ["0-1", "0-2", "1-2"], "alpha": np.linspace(0.0, 1.0, 4),
          "example": np.arange(5), "split": ["train", "test"]}
METRICS = {"loss": MetricSpec(("pair", "alpha", "split"), "nats", "mean loss"),
           "example_loss": MetricSpec(("example", "pair", "alpha"), "nats", "per-example loss")}
POINT_DIMS = ("pair", "alpha")
CONFIG = {"num_alphas": 4, "pairs": "all", "seed": 0}


def open_scan(path, config=CONFIG, **kw):
    """The test scan's result file at `path`, created or resumed."""
    return create_result(path, "interpolate", COORDS, METRICS, POINT_DIMS, config, [], "cpu",
                         attrs={"bn_mode": "reset"}, **kw)


def values(cell) -> dict:
    """Deterministic metric values of a cell, shaped like each metric's non-point dims."""
    pair, alpha = cell
    base = pair + 0.25 * alpha
    return {"loss": np.array([base, base + 10.0]), "example_loss": base + np.arange(5) / 8}


def fill(result, cells) -> int:
    for cell in cells:
        result.write(cell, **values(cell))
    return len(cells)


def main(path, stop_after, how) -> None:
    result = open_scan(path)
    assert "torch" not in sys.modules, "runs.results must not import torch"
    todo = result.missing()
    print(fill(result, todo if stop_after < 0 else todo[:stop_after]), flush=True)
    if how == "exit":
        os._exit(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hold":
        sys.stdin.read()  # keep the file open (and locked) until the parent closes stdin
    result.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
