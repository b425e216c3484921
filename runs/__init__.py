"""Base package: models, data, checkpoints, training and results I/O.

`runs` imports none of its siblings (probes, landscape, tickets, figures).

    import runs
    model = runs.load("store/train_ab12cd34/seed_0@last")        # any checkpoint reference
    result = runs.run_train(model="convnet", data="digits", steps="2ep", width=0.25)
    runs.save(dataset, "results/mine.h5")                          # a result Dataset to HDF5
"""

__version__ = "0.1.0"

# The Python API, imported on first use: `import runs` (and `import runs.results`, which the
# figures read without torch) stays free of torch. Names never shadow a CLI module
# (runs.train, runs.distill), so `python -m runs.train` keeps working.
_API = {"load": "runs.api", "run_train": "runs.api", "run_distill": "runs.api",
        "RunResult": "runs.api", "save": "runs.results"}
__all__ = ["RunResult", "__version__", "load", "run_distill", "run_train", "save"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'runs' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
