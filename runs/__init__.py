"""Models, data, checkpoints, training and results I/O, in three layers.

    runs/           the base: errors, config, registry, store, checkpoint, results, data,
                    datasets/, gpu_loader, device, models/, refs, importers, dinopl, usercode,
                    launch; and api (runs.load, runs.run_train: the Python door, which calls
                    the engines)
    runs/engines/   the training engines: engine (what they share), train, distill,
                    distributed, masking. They import the base.
    runs/studies/   programs over every package: pipeline (+ presets/), reproduce, crashtest,
                    bench/. The only part of `runs` that uses probes, landscape and tickets,
                    always through imports inside functions.

The base and the engines import none of the siblings (probes, landscape, tickets, figures)
at import time; the analyses sit above them. Thin doors keep the commands' names:
runs/train.py, distill.py, pipeline.py, bench.py, crashtest.py and reproduce.py only import
their command's `main`, so `python -m runs.train` runs runs.engines.train.

    import runs
    model = runs.load("store/train_ab12cd34/seed_0@last")        # any checkpoint reference
    result = runs.run_train(model="convnet", data="digits", steps="2ep", width=0.25)
    seeds = runs.run_train_many(data="digits", steps="2ep", seeds=[0, 1, 2], parallel_runs=3)
    runs.save(dataset, "results/mine.h5")                          # a result Dataset to HDF5
"""

__version__ = "0.1.0"

# The Python API, imported on first use: `import runs` (and `import runs.results`, which the
# figures read without torch) stays free of torch. Names never shadow a CLI module
# (runs.train, runs.distill), so `python -m runs.train` keeps working.
_API = {"load": "runs.api", "run_train": "runs.api", "run_distill": "runs.api",
        "run_train_many": "runs.api",
        "RunResult": "runs.api", "save": "runs.results"}
__all__ = ["RunResult", "__version__", "load", "run_distill", "run_train", "run_train_many",
           "save"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'runs' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
