"""Loss landscapes: linear paths, planes, random directions and the border of linear basins.

The Python API (any `nn.Module`; each returns the xarray.Dataset the CLI writes):

    landscape.path(a, b, data, alphas, metrics=..., bn_mode=..., teacher=None)
    landscape.plane(a, b, c, data, alphas, betas, basis="lstsq" | "orthonormal")
    landscape.directions(model, data, grid, n=1 | 2, seed=0)
    landscape.barriers(ds)          # error and loss barriers of a path result
    landscape.spectrum(model, data, loss="supervised" | "distill", teacher=None, k=5)
    landscape.trained_curve(a, b, data, ts, kind="bezier" | "polychain", steps=100)
    landscape.layer_barriers(a, b, data, alphas, granularity="layer" | "block")

Modules:
    api.py        the functions above
    params.py     flatten, lerp, dot products, plane bases, filter-normalised directions
    geometry.py   grids; where a scan's points lie (line, plane, directions) as batches
    batchnorm.py  BN modes keep / interpolate / recalibrate, one model or many under vmap
    network.py    the network a scan moves (encoder + fc and/or DINO head, or any module)
    points.py     metrics at many points: one at a time (reference) or P per vmapped pass
    barrier.py    barriers along a path and t-intervals (pure numpy)
    curvature.py  Hessian-vector products, top eigenvalues, trace, spectral density
    interpolate.py, border.py, hessian.py   the CLIs (python -m landscape.interpolate, ...)

Imports `runs` and `probes`; `runs` never imports this package. The API is imported on
first use, so `python -m landscape.interpolate` does not load its own module twice.
"""

API = ("path", "plane", "directions", "barriers", "spectrum", "trained_curve",
       "layer_barriers")
__all__ = list(API)


def __getattr__(name: str):
    if name in API:
        from landscape import api
        return getattr(api, name)
    raise AttributeError(f"module 'landscape' has no attribute {name!r}")
