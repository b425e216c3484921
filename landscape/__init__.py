"""Loss landscapes: linear paths, planes, random directions and the border of linear basins.

    params.py     flatten, lerp, dot products, plane bases, filter-normalised directions
    geometry.py   grids; where a scan's points lie (line, plane, directions) as batches
    batchnorm.py  BN modes keep / interpolate / recalibrate, one model or many under vmap
    network.py    the network a scan moves (encoder + fc and/or DINO head), from references
    points.py     metrics at many points: one at a time (reference) or P per vmapped pass
    barrier.py    barriers along a path and t-intervals (pure numpy)
    interpolate.py, border.py   the CLIs (python -m landscape.interpolate / .border)

Imports `runs` and `probes`; `runs` never imports this package.
"""
