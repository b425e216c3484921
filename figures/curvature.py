"""Curvature (issue #20): Hessian spectra, top eigenvalue, trace and per-layer trace, drawn
from `hessian` results (python -m landscape.hessian) and from 1-D `interpolate` paths that
measured `--metrics hessian-top hessian-trace`.

Per `hessian` result file (one config: loss, split, samples, parameters), up to three
figures, as its --measures allow (a panel per measured quantity):
- `curvature-density_<file>`: the spectral densities (stochastic Lanczos quadrature) of
  every checkpoint on one axis, log density floored at FLOOR of the highest peak. Where the
  checkpoints' stored grids differ, every density is recomputed from its quadrature nodes
  and weights on one common grid (the same Gaussian kernel as landscape.curvature's
  `density_on`), so the curves are comparable and each integrates to 1 on that grid;
- `curvature-top-trace_<file>`: the top-k eigenvalues (lambda_max with its Ritz residual)
  and the Hutchinson trace with +-1 standard error, one column per checkpoint;
- `curvature-layers_<file>`: the trace and top eigenvalue of each layer's diagonal block,
  one bar per checkpoint in each layer's row (`--per-parameter`: the trace divided by the
  layer's parameter count, i.e. the mean diagonal entry of H; file curvature-layers-pp_*).
Per 1-D interpolate path holding them, `curvature-path_<file>`: lambda_max and the trace
(+-1 SE) along alpha at the points measured (--hessian-at), the anchors dotted. Each figure
draws one file, so one config (checkpoints of other settings are other files' figures).
Checkpoints not done yet are left out and the figure says "N of M cells done". Figures
never import torch: the kernel is numpy here.
"""

import math
import re
import textwrap

import numpy as np

from figures import honest, style
from figures.labels import config_dataset
from figures.path_curves import mark_anchors, xlabel
from figures.sources import PRODUCERS, figure_names, has, load, pick
from runs.errors import UserError

NAME = "curvature"
ANALYSIS = "hessian"
OPTIONS = ("per_parameter",)
PATH_METRICS = ("hessian_top", "hessian_trace")
PATH_NEED = "1-D path measured with --metrics hessian-top hessian-trace"
FLOOR = 1e-6  # the log-density axis starts at this fraction of the highest density drawn
MIN_POINTS = 401  # a common density grid has at least this many points
ROLES = ("random init", "noise student", "student", "teacher", "supervised")
TRACE_SE = "error bars: ±1 standard error (Hutchinson)"


# ---------------------------------------------------------------------------- densities


def density_on(nodes, weights, grid, sigma: float = 0.0) -> np.ndarray:
    """landscape.curvature.density_on from the stored quadrature, in numpy.

    nodes, weights: (runs, steps) Ritz values and squared first components (NaN or zero
    weight: unused); grid: (G,) eigenvalues; sigma: kernel width (0: two grid steps).
    Returns the (G,) density averaged over runs, normalised to integrate to 1 on the grid.
    """
    grid = np.asarray(grid, dtype=np.float64)
    nodes, weights = _usable(nodes, weights)
    sigma = sigma or 2 * float(np.diff(grid).mean())
    z = (grid[None, None, :] - nodes[..., None]) / sigma  # (runs, steps, G)
    kernel = np.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (weights[..., None] * kernel).sum(1).mean(0)  # (G,)
    area = np.trapezoid(density, grid)
    return density / area if area > 0 else density


def _usable(nodes, weights) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, weights) as float64 with unfinished entries given weight 0 at node 0."""
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    bad = ~(np.isfinite(nodes) & np.isfinite(weights))
    return np.where(bad, 0.0, nodes), np.where(bad, 0.0, weights)


def common_grid(node_sets, weight_sets, points: int, pad: float = 0.05) -> np.ndarray:
    """One eigenvalue grid spanning every weighted node of every checkpoint, widened by
    `pad` of the range each side (as landscape.curvature.density_grid does for one)."""
    used = [n[(w > 0) & np.isfinite(n) & np.isfinite(w)] for n, w in
            zip(node_sets, weight_sets)]
    values = np.concatenate([u.ravel() for u in used] + [np.zeros(0)])
    if not values.size:
        raise ValueError("no quadrature node with a positive weight")
    lo, hi = float(values.min()), float(values.max())
    width = max(hi - lo, 1e-12)
    return np.linspace(lo - pad * width, hi + pad * width, max(points, MIN_POINTS))


def done_checkpoints(result) -> list[int]:
    """Indices of the checkpoints whose cell is done."""
    done = np.ones(len(result.coords["checkpoint"]), bool) if result.done is None else \
        np.asarray(result.done, bool)
    return [int(i) for i in np.flatnonzero(done)]


def densities(result) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
    """(grid (G,), {checkpoint label: density (G,)}, recomputed) of the done checkpoints:
    the stored densities where all share one grid, else recomputed on a common grid."""
    labels = [str(c) for c in result.coords["checkpoint"]]
    kept = done_checkpoints(result)
    grids = np.asarray(result.metrics["density_eigenvalue"], float)[kept]  # (C, bins)
    if np.allclose(grids, grids[:1], rtol=1e-6, atol=0):
        stored = np.asarray(result.metrics["density"], float)[kept]
        return grids[0], {labels[i]: row for i, row in zip(kept, stored)}, False
    nodes = np.asarray(result.metrics["slq_node_value"], float)[kept]  # (C, runs, steps)
    weights = np.asarray(result.metrics["slq_weight"], float)[kept]
    grid = common_grid(nodes, weights, grids.shape[1])
    return grid, {labels[i]: density_on(n, w, grid)
                  for i, n, w in zip(kept, nodes, weights)}, True


# ---------------------------------------------------------------------------- colours


def role(label: str) -> str:
    """The role a checkpoint label starts with ('supervised s0 ep15' -> 'supervised')."""
    lower = label.lower()
    return next((r for r in ROLES if lower.startswith(r)), "checkpoint")


def checkpoint_colors(labels) -> dict:
    """A colour per checkpoint: its role's (style.role_colors); several of one role (e.g.
    supervised at several epochs) go from light to full in the order they were given."""
    roles = [role(label) for label in labels]
    base = {**style.role_colors(list(dict.fromkeys(roles))), "random init": style.PALETTE[7]}
    colors = {}
    for name in dict.fromkeys(roles):
        members = [label for label, r in zip(labels, roles) if r == name]
        shades = np.linspace(0.45, 1.0, len(members)) if len(members) > 1 else [1.0]
        for label, t in zip(members, shades):
            colors[label] = tuple(t * np.asarray(base[name][:3]) + (1 - t))
    return colors


# ---------------------------------------------------------------------------- titles


def title(result) -> str:
    """'cifar10: Hessian of the supervised loss, 512 train images, all parameters, BN
    checkpoint' (--samples 0: 'all train images')."""
    config = result.config
    loss = {"distill": "distillation"}.get(config.get("loss"), config.get("loss", ""))
    words = [f"Hessian of the {loss} loss" if loss else "Hessian"]
    if "samples" in config:
        words.append(f"{config['samples'] or 'all'} {config.get('split', '')} images")
    if config.get("params"):
        words.append(f"{config['params']} parameters")
    if result.attrs.get("bn_mode"):
        words.append(f"BN {result.attrs['bn_mode']}")
    dataset = config_dataset(config)
    return (f"{dataset}: " if dataset else "") + ", ".join(words)


def wrap(text: str, width: int = 90) -> str:
    """A long title over two or more lines."""
    return "\n".join(textwrap.wrap(text, width))


def ticks(ax, labels) -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="x-small")


# ---------------------------------------------------------------------------- hessian figures


def rows(result, name: str) -> np.ndarray:
    """Metric `name` of the done checkpoints, (C, ...) as float."""
    return np.asarray(result.metrics[name], float)[done_checkpoints(result)]


def done_labels(result) -> list[str]:
    labels = [str(c) for c in result.coords["checkpoint"]]
    return [labels[i] for i in done_checkpoints(result)]


def build_density(result):
    """The spectral densities of every done checkpoint on one log-density axis."""
    grid, curves, recomputed = densities(result)
    colors = checkpoint_colors(list(curves))
    peak = max((float(np.nanmax(d)) for d in curves.values()), default=1.0)
    floor = FLOOR * peak if peak > 0 else FLOOR
    fig, ax = style.figure(width=4.6, height=2.6, layout="constrained")
    for label, density in curves.items():
        ax.plot(grid, np.maximum(density, floor), color=colors[label], lw=1.1, label=label)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel(r"Hessian eigenvalue $\lambda$", fontsize="small")
    ax.set_ylabel(f"spectral density (log, floor {FLOOR:g} of peak)", fontsize="small")
    ax.legend(frameon=False, fontsize="xx-small", loc="center left", bbox_to_anchor=(1, 0.5))
    note = "\nthe densities recomputed from their SLQ nodes on one common grid" \
        if recomputed else ""
    fig.suptitle(wrap(title(result)) + note, fontsize="x-small")
    return fig


def draw_top(ax, result, names, colors) -> None:
    """lambda_max per checkpoint (its Ritz residual as error bar), the rest of the top k
    as grey ticks."""
    values, residual = rows(result, "eigenvalue"), rows(result, "eigen_residual")  # (C, k)
    x = np.arange(len(names))
    for j in range(1, values.shape[1]):
        ax.plot(x, values[:, j], "_", ms=8, color="grey",
                label=f"top-{values.shape[1]} eigenvalues" if j == 1 else None)
    for i, name in enumerate(names):
        ax.errorbar(x[i], values[i, 0], yerr=residual[i, 0], fmt="o", ms=5, capsize=2,
                    color=colors[name])
    ax.set_ylabel(r"top eigenvalue $\lambda_{max}$", fontsize="small")
    ax.set_xlabel("checkpoint (error bar: Ritz residual)", fontsize="small")
    if values.shape[1] > 1:
        ax.legend(frameon=False, fontsize="xx-small")


def draw_trace(ax, result, names, colors) -> None:
    """The Hutchinson trace per checkpoint, +-1 standard error."""
    trace, se = rows(result, "trace"), rows(result, "trace_se")  # (C,)
    for i, name in enumerate(names):
        ax.errorbar(i, trace[i], yerr=se[i], fmt="o", ms=5, capsize=3, color=colors[name])
    ax.set_ylabel(r"Hessian trace tr$(H)$", fontsize="small")
    ax.set_xlabel(f"checkpoint ({TRACE_SE})", fontsize="small")


def build_top_trace(result):
    """Top-k eigenvalues and the trace (the panels of those measured), a column per done
    checkpoint."""
    names = done_labels(result)
    colors = checkpoint_colors(names)
    panels = [draw for metric, draw in (("eigenvalue", draw_top), ("trace", draw_trace))
              if metric in result.metrics]
    fig, axes = style.figure(width=style.FULL if len(panels) > 1 else style.COLUMN + 0.5,
                             height=2.6, ncols=len(panels), squeeze=False,
                             layout="constrained")
    for ax, draw_panel in zip(axes[0], panels):
        draw_panel(ax, result, names, colors)
        ticks(ax, names)
    fig.suptitle(wrap(title(result), 130 if len(panels) > 1 else 60), fontsize="x-small")
    return fig


def layer_panels(result, per_parameter: bool = False) -> list[tuple[str, np.ndarray]]:
    """[(x label, values (C, L))] of the measured per-layer metrics of the done checkpoints:
    the trace (per_parameter: divided by each layer's parameter count), the top eigenvalue."""
    panels = []
    if "layer_trace" in result.metrics:
        trace = rows(result, "layer_trace")
        if per_parameter:
            panels.append(("trace per parameter tr$(H_l)/n_l$",
                           trace / rows(result, "layer_size")))
        else:
            panels.append(("layer trace tr$(H_l)$ (Hutchinson)", trace))
    if "layer_top" in result.metrics:
        panels.append((r"top eigenvalue of the layer's block $\lambda_{max}(H_l)$",
                       rows(result, "layer_top")))
    return panels


def build_layers(result, per_parameter: bool = False):
    """Per-layer trace and top eigenvalue: a row per layer (network order, top down), a bar
    per checkpoint in each row, one colour per checkpoint."""
    names, layers = done_labels(result), [str(x) for x in result.coords["layer"]]
    panels = layer_panels(result, per_parameter)
    colors = checkpoint_colors(names)
    height = min(1.0 + 0.12 * len(layers) * max(len(names), 2), 9.0)
    fig, axes = style.figure(width=style.FULL, height=height, ncols=len(panels), sharey=True,
                             squeeze=False, layout="constrained")
    rows_at, bar = np.arange(len(layers)), 0.8 / max(len(names), 1)
    for ax, (label, values) in zip(axes[0], panels):
        for i, name in enumerate(names):
            ax.barh(rows_at - 0.4 + bar * (i + 0.5), values[i], height=bar,
                    color=colors[name], label=name)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel(label, fontsize="small")
        ax.set_ylabel("layer (parameter group)", fontsize="small")
    axes[0][0].set_yticks(rows_at, layers, fontsize="xx-small")
    axes[0][0].invert_yaxis()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper",
               frameon=False, fontsize="xx-small")
    fig.suptitle(wrap(title(result), 130), fontsize="x-small")
    return fig


BUILDERS = {"density": build_density, "top-trace": build_top_trace, "layers": build_layers}


def kinds(result, per_parameter: bool = False) -> list[str]:
    """The figures a hessian result can give, as its --measures made it: density,
    top-trace, layers (layers-pp: per parameter, where layer traces were measured)."""
    out = []
    if has(result, "density"):
        out.append("density")
    if has(result, "eigenvalue") or has(result, "trace"):
        out.append("top-trace")
    if has(result, "layer_trace") or has(result, "layer_top"):
        out.append("layers-pp" if per_parameter and has(result, "layer_trace") else "layers")
    return out


def build(result, per_parameter: bool = False) -> dict:
    """{kind: figure} of one hessian result (unsaved), for the measures it holds."""
    return {kind: build_layers(result, per_parameter) if kind.startswith("layers")
            else BUILDERS[kind](result) for kind in kinds(result, per_parameter)}


# ---------------------------------------------------------------------------- along a path


def is_curvature_path(result) -> bool:
    """A 1-D interpolate result that measured the Hessian at some point."""
    return tuple(result.point_dims) == ("alpha",) and any(has(result, m) for m in PATH_METRICS)


def path_values(result, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(alpha (P,), values (P,) or (P, k)) of a path metric, NaN at the points not measured
    (--hessian-at): a line joins neighbouring measured points only, never across a gap."""
    alpha = np.asarray(result.coords["alpha"], float)
    dims = ("alpha", "eigen") if "eigen" in result.specs[metric].dims else ("alpha",)
    return alpha, pick(result, metric, dims)


def measured_on(result) -> str:
    """'supervised loss, 256 train images' from the metrics' long names (point_curvature's
    `describe`), or ''."""
    for metric in PATH_METRICS:
        if metric in result.specs:
            found = re.search(r"\(([^()]*)\)$", result.specs[metric].long_name)
            if found:
                return found[1]
    return ""


def build_path(result):
    """lambda_max (the rest of the top k in grey) and the trace (+-1 SE) along a 1-D path,
    the panels of the metrics measured, the anchors dotted."""
    panels = [m for m in PATH_METRICS if has(result, m)]
    fig, axes = style.figure(width=style.FULL if len(panels) > 1 else style.COLUMN + 0.5,
                             height=2.4, ncols=len(panels), squeeze=False,
                             layout="constrained")
    for ax, metric in zip(axes[0], panels):
        alpha, values = path_values(result, metric)
        if metric == "hessian_top":
            for j in range(1, values.shape[1]):
                ax.plot(alpha, values[:, j], "_", ms=6, color="grey",
                        label=f"top-{values.shape[1]} eigenvalues" if j == 1 else None)
            ax.plot(alpha, values[:, 0], marker="o", ms=3, color=style.PALETTE[0])
            ax.set_ylabel(r"top eigenvalue $\lambda_{max}$", fontsize="small")
        else:
            se = path_values(result, "hessian_trace_se")[1] if \
                has(result, "hessian_trace_se") else None
            ax.errorbar(alpha, values, yerr=se, marker="o", ms=3, capsize=2,
                        color=style.PALETTE[3])
            ax.set_ylabel(r"Hessian trace tr$(H)$" + (" (±1 SE)" if se is not None else ""),
                          fontsize="small")
        ax.set_xlabel(xlabel(result), fontsize="small")
        mark_anchors(ax, result)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize="x-small")
    what = measured_on(result)
    fig.suptitle(f"{config_dataset(result.config)}: Hessian along the path"
                 f"{f' ({what})' if what else ''}, BN {result.attrs.get('bn_mode', '')}",
                 fontsize="x-small")
    return fig


# ---------------------------------------------------------------------------- entry


def find(root) -> tuple[list, list]:
    """(hessian results, 1-D interpolate paths with Hessian metrics) under root; a one-line
    UserError naming root and what this figure needs when there is neither."""
    found = {}
    for key, analysis, where, need in ((ANALYSIS, ANALYSIS, None, ""),
                                       ("path", "interpolate", is_curvature_path, PATH_NEED)):
        try:
            found[key] = load(root, analysis, NAME, where=where, need=need)
        except UserError as err:
            found[key], found[f"{key}_error"] = [], str(err)
    if not found[ANALYSIS] and not found["path"]:
        raise UserError(f"{found[f'{ANALYSIS}_error']}; or a {PATH_NEED} 'interpolate' "
                        f"result (made by the {PRODUCERS['interpolate']} stage)")
    return found[ANALYSIS], found["path"]


def draw(results_dir, out_dir, per_parameter: bool = False) -> list:
    hessians, paths = find(results_dir)
    out = []
    for kind in ("density", "top-trace", "layers", "layers-pp"):
        for result, name in zip(hessians, figure_names(hessians, f"{NAME}-{kind}")):
            if kind in kinds(result, per_parameter):
                fig = build_layers(result, per_parameter) if kind.startswith("layers") \
                    else BUILDERS[kind](result)
                out += _save(fig, result, out_dir, name)
    for result, name in zip(paths, figure_names(paths, f"{NAME}-path")):
        out += _save(build_path(result), result, out_dir, name)
    return out


def _save(fig, result, out_dir, name) -> list:
    honest.note_incomplete(fig, [result])
    return style.save(fig, out_dir, name)
