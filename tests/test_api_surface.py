"""The public API surface: every function the docs name is exported, no API name shadows a
module, and every command still runs as `python -m` without importing itself twice."""

import subprocess
import sys

import pytest

API = {"runs": ("load", "run_train", "run_train_many", "run_distill", "save"),
       "probes": ("embed", "knn", "linear", "evaluate_model"),
       "landscape": ("path", "plane", "directions", "barriers", "spectrum", "trained_curve",
                     "layer_barriers"),
       "tickets": ("magnitude_masks", "apply_masks", "run_imp")}
COMMANDS = ("runs.train", "runs.distill", "runs.pipeline", "runs.bench", "runs.results",
            "probes.evaluate", "landscape.interpolate", "landscape.border", "landscape.hessian",
            "landscape.curve", "landscape.layerwise", "tickets.imp")


def test_every_api_function_is_exported_and_documented():
    import importlib
    for package, names in API.items():
        module = importlib.import_module(package)
        for name in names:
            function = getattr(module, name)
            assert callable(function) and function.__doc__, f"{package}.{name}"


def test_api_functions_shadow_no_module():
    """`import probes.nearest as m` must give the module even after `probes.knn` (the
    function) was used; the CLI modules stay modules."""
    code = ("import probes, landscape, tickets, runs\n"
            "probes.knn; probes.linear; landscape.path; landscape.spectrum; tickets.run_imp\n"
            "landscape.trained_curve; landscape.layer_barriers\n"
            "import probes.nearest as a, probes.logistic as b, probes.evaluate as c\n"
            "import landscape.interpolate as d, tickets.imp as e, runs.train as f\n"
            "import landscape.hessian as g, landscape.curve as h, landscape.layerwise as i\n"
            "assert all(callable(m.main) for m in (c, d, e, f, g, h, i))\n"
            "assert callable(a.knn_accuracy) and callable(b.linear_probe_lbfgs)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_command_runs_without_importing_itself_twice(command):
    done = subprocess.run([sys.executable, "-W", "error", "-m", command, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
