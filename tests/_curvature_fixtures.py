"""Small `hessian` and curvature-path results for the figure tests, laid out by the writers'
own `layout` (landscape.hessian, landscape.interpolate), filled with exact synthetic values.

Each checkpoint's Hessian is a diagonal matrix with a known spectrum, so every stored number
has an exact value: the top-k eigenvalues, the trace and per-layer traces (sums of the
diagonal blocks), and the quadrature (a full Lanczos run on a diagonal matrix from start v
has the eigenvalues as nodes and v_i^2 as weights). Densities go through
landscape.curvature's own `density_grid`/`density_on`, each on its own grid, as the CLI does.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from runs.results import create_result

CHECKPOINTS = ("teacher", "student", "supervised s0 ep1", "supervised s0 ep5",
               "supervised s0 ep15", "random init")
LAYERS = (("encoder.conv1", 20), ("encoder.bn1", 4), ("fc", 16))  # (module path, size)
TOP_K, PROBES, RUNS = 3, 12, 3
MEASURES = ("top", "trace", "density", "layer-top")


def spectrum(index: int) -> np.ndarray:
    """The diagonal of checkpoint `index`'s Hessian, (40,): a bulk near 0, a few outliers
    growing with the index, two negative directions."""
    rng = np.random.default_rng(index)
    bulk = 0.05 * rng.standard_normal(sum(size for _, size in LAYERS))
    bulk[[3, 30]] = 2.0 + 3.0 * index, 1.0 + index  # outliers in conv1 and fc
    bulk[[10, 35]] = -0.5, -0.2
    return bulk


def config(measures=MEASURES, density_grid: str = "auto"):
    from landscape.hessian import HessianConfig
    return HessianConfig(refs=CHECKPOINTS, dataset="toy", samples=64, top_k=TOP_K,
                         trace_probes=f"10:{PROBES}", slq_runs=RUNS, slq_steps=40,
                         density_grid=density_grid, measures=tuple(measures))


def layout(cfg) -> tuple[dict, dict, dict]:
    """(coords, metric specs, attrs) by landscape.hessian's own `layout`."""
    from landscape.hessian import layout
    subject = SimpleNamespace(net=None, encoder=1, fc=1)
    plan = SimpleNamespace(cfg=cfg, labels=list(CHECKPOINTS),
                           layers=[name for name, _ in LAYERS],
                           sizes=[sum(size for _, size in LAYERS)],
                           anchors=[SimpleNamespace(subject=subject)])
    return layout(plan)


def cell_values(index: int, bins: int, shared_grid=None) -> dict:
    """Every metric of checkpoint `index`, exact for its diagonal Hessian."""
    from landscape.curvature import Quadrature, density_grid, density_on
    diag = spectrum(index)
    rng = np.random.default_rng(100 + index)
    starts = rng.choice([-1.0, 1.0], size=(RUNS, diag.size)) / np.sqrt(diag.size)
    quad = Quadrature(np.tile(diag, (RUNS, 1)), starts ** 2)  # (runs, n) exact Lanczos
    grid = density_grid(quad, max(bins, 2)) if shared_grid is None else shared_grid
    bounds = np.cumsum([0] + [size for _, size in LAYERS])
    blocks = [diag[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    samples = np.full(PROBES, np.nan)
    samples[:10] = diag.sum() + 0.1 * rng.standard_normal(10)
    return {"loss": 0.5, "param_count": diag.size, "eigenvalue": np.sort(diag)[::-1][:TOP_K],
            "eigen_residual": np.full(TOP_K, 1e-6), "trace": diag.sum(),
            "trace_se": samples[:10].std(ddof=1) / np.sqrt(10), "trace_probes": 10,
            "trace_sample": samples, "layer_trace": [b.sum() for b in blocks],
            "layer_top": [b.max() for b in blocks], "layer_size": [b.size for b in blocks],
            "slq_node_value": quad.nodes, "slq_weight": quad.weights,
            "density": density_on(quad, grid), "density_eigenvalue": grid, "hvp_count": 123}


def hessian(path, done=None, measures=MEASURES, density_grid: str = "auto") -> Path:
    """A hessian result of CHECKPOINTS holding `measures`; `done`: the checkpoint indices
    written (all); density_grid: auto (a grid per checkpoint) or LO:HI:N (one for all)."""
    from landscape.hessian import fixed_grid
    cfg = config(measures, density_grid)
    coords, specs, attrs = layout(cfg)
    bins = len(coords.get("density_bin", []))
    with create_result(path, "hessian", coords, specs, ("checkpoint",), cfg, [], "cpu",
                       attrs) as result:
        for index in range(len(CHECKPOINTS)) if done is None else done:
            values = cell_values(index, bins, fixed_grid(density_grid))
            result.write((index,), **{name: values[name] for name in specs})
    return Path(path)


def curvature_path(path, k: int = 3, measured=(0, 2, 4, 6)) -> Path:
    """A 1-D interpolate path (7 points) laid out by landscape.interpolate's `layout`, with
    hessian-top (k eigenvalues) and hessian-trace at the `measured` points only (NaN
    elsewhere, as --hessian-at leaves them); anchors A, B at alpha 0 and 1."""
    from landscape.interpolate import InterpolateConfig, layout
    from landscape.point_curvature import Curvature
    from landscape.points import Measures
    metrics = ("supervised", "hessian-top", "hessian-trace")
    cfg = InterpolateConfig(refs=("A:=a.pt", "B:=b.pt"), metrics=metrics, dataset="toy",
                            hessian_k=k)
    alpha = np.linspace(-0.25, 1.25, 7)
    plan = SimpleNamespace(grids={"alpha": alpha}, align=None,
                           measures=Measures(metrics, curvature=Curvature(k=k)), cfg=cfg,
                           geometry=SimpleNamespace(kind="line", unit=1.0,
                                                    anchor_coords={"A": [0.0], "B": [1.0]}),
                           anchors=[SimpleNamespace(subject=SimpleNamespace(encoder=1, fc=1))])
    coords, specs, point_dims, attrs = layout(plan)
    with create_result(path, "interpolate", coords, specs, point_dims, cfg, [], "cpu",
                       attrs) as result:
        for i, a in enumerate(alpha):
            bump = 10 + 20 * np.exp(-8 * (a - 0.5) ** 2)  # sharpest between the anchors
            nan = np.nan if i not in measured else 0.0
            values = {"loss": [0.5, 0.6], "error": [0.1, 0.2],
                      "hessian_top": nan + bump / np.arange(1, k + 1),
                      "hessian_trace": nan + 5 * bump, "hessian_trace_se": nan + 2.0}
            result.write((i,), **values)
    return Path(path)
