"""Programs over every package: the top layer of `runs`.

    pipeline.py   the whole study in one command (`python -m runs.pipeline`), presets/ its data
    reproduce.py  the paper's first effect at CPU scale (`python -m runs.reproduce`)
    crashtest.py  kill the long commands at random moments, compare the results
                  (`python -m runs.crashtest`)
    bench/        the hot paths against plain references (`python -m runs.bench`)

The only part of `runs` that uses probes, landscape and tickets as a client, and always
through imports inside functions: importing a study imports no analysis, and nothing in the
base or the engines imports a study. The commands keep their names through thin doors at the
top of `runs/` (runs/pipeline.py, runs/bench.py, ...).
"""
