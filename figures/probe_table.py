"""Probing table: pixels, teacher and student per dataset and architecture.

Grouped bars with error bars (std over runs and probe seeds), plus the same numbers as
Markdown and LaTeX tables; the paper's values are marked beside the reproduction when
`--paper` is given and the dataset/architecture is one of the paper's.

Two protocols (figures.protocols), chosen per run, probe and seed before pooling: the
honest one, each run's last epoch probed (NAME_<probe>.*), and the paper's, each run's best
epoch on the test set (NAME_<probe>_paper.*, labelled "best epoch on test, as the paper").
Where every run was probed at one epoch the two coincide and only the honest one is
written (unless --protocol paper asks for it).
"""

import json
from collections import defaultdict

import numpy as np

from figures import honest, protocols, style
from figures.labels import config_dataset
from figures.paper_values import reference
from figures.sources import load
from runs.errors import UserError

NAME = "probe-table"
ANALYSIS = "probe"
OPTIONS = ("probes", "paper", "protocol")  # the command-line options this figure takes
# config keys that may differ between the probe results pooled into one table: which
# checkpoints, seeds and probes ran, and the dataset (a row of its own) with its inputs
VARYING_OK = ("refs", "checkpoints", "seeds", "probes", "ks", "batch_size", "dataset",
              "data_root", "size", "channels", "train", "test")
ROLES = ("pixels", "teacher", "student", "noise-student", "supervised", "checkpoint")
SHORT = {"last": "last epoch", "paper": "best epoch on test, as the paper"}  # bar titles


def collect(results, probe: str, features: str = "raw", protocol: str = "last") -> dict:
    """{(dataset, model): {role: [accuracy %, ...]}}: one epoch chosen per run, probe and
    seed by `protocol` ("last" or "paper", see figures.protocols), pooled over runs and
    seeds."""
    table = defaultdict(lambda: defaultdict(list))
    for res in results:
        labels = [str(v) for v in res.coords["probe"]]
        if probe not in labels:
            continue
        p, f = labels.index(probe), [str(v) for v in res.coords["features"]].index(features)
        rows = json.loads(res.attrs.get("checkpoints", "[]"))
        picked, accuracy = protocols.select(res.metrics["accuracy"][:, p, f], rows, protocol)
        for i, values in zip(picked, accuracy):  # values: (seed,) of one run
            row = rows[i]
            key = (config_dataset(res.config), row["model"])
            table[key][row["role"]] += [100 * v for v in values if np.isfinite(v)]
    return _share_pixels(table)


def _share_pixels(table) -> dict:
    """The pixel row belongs to every architecture of its dataset."""
    pixels = {ds: roles["pixels"] for (ds, model), roles in table.items() if not model}
    out = {}
    for (ds, model), roles in table.items():
        if model:
            out[(ds, model)] = dict(roles, **({"pixels": pixels[ds]} if ds in pixels else {}))
    return out or {k: dict(v) for k, v in table.items()}


def roles_of(table: dict) -> list[str]:
    """The roles present, in ROLES order, then the others (e.g. `student (alpha=1.0)`)."""
    present = {r for v in table.values() for r in v}
    return [r for r in ROLES if r in present] + sorted(present - set(ROLES))


def cell(values) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def caption(probe: str, protocol: str = "last") -> str:
    """What a table shows: the probe, the protocol and the spread."""
    return (f"{probe} test accuracy (%), {protocols.PROTOCOLS[protocol]}; mean ± std over "
            f"runs and probe seeds")


def markdown(table: dict, probe: str, paper: bool = False, protocol: str = "last") -> str:
    roles = roles_of(table)
    lines = [caption(probe, protocol), "",
             f"| dataset | model | {' | '.join(roles)} |", "|---" * (len(roles) + 2) + "|"]
    for (ds, model), values in sorted(table.items()):
        row = [cell(values.get(r, [])) + (_paper(probe, ds, model, r) if paper else "")
               for r in roles]
        lines.append(f"| {ds} | {model} | {' | '.join(row)} |")
    return "\n".join(lines)


def latex(table: dict, probe: str = "", protocol: str = "last") -> str:
    roles = roles_of(table)
    lines = [f"% {caption(probe, protocol)}", r"\begin{tabular}{ll" + "r" * len(roles) + "}",
             r"\toprule", "dataset & model & " + " & ".join(roles) + r" \\", r"\midrule"]
    for (ds, model), values in sorted(table.items()):
        row = [cell(values.get(r, [])).replace("±", r"$\pm$") for r in roles]
        lines.append(f"{ds} & {model} & " + " & ".join(row) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def _paper(probe, ds, model, role) -> str:
    ref = reference(probe, ds, model, role)
    return "" if ref is None else f" (paper {ref:.2f})"


def bars(table: dict, probe: str, paper: bool, protocol: str = "last"):
    groups = sorted(table)
    roles = roles_of(table)
    fig, ax = style.figure(width=max(style.COLUMN, 1.1 * len(groups) + 1.2), height=2.4)
    width, colors = 0.8 / len(roles), style.role_colors(roles)
    for j, role in enumerate(roles):
        xs = np.arange(len(groups)) + (j - (len(roles) - 1) / 2) * width
        vals = [table[g].get(role, []) for g in groups]
        ax.bar(xs, [np.mean(v) if v else np.nan for v in vals], width,
               yerr=[np.std(v) if v else 0 for v in vals], capsize=2, label=role,
               color=colors[role])
        if paper:
            refs = [reference(probe, g[0], g[1], role) for g in groups]
            ax.scatter(xs, [np.nan if r is None else r for r in refs], marker="_", s=120,
                       color="black", zorder=3, label="paper" if j == 0 else None)
    ax.set_xticks(np.arange(len(groups)), [f"{ds}\n{model}" for ds, model in groups])
    ax.set_xlabel("dataset and architecture")
    ax.set_ylabel(f"{probe} test accuracy (%)")
    ax.set_title(SHORT[protocol], fontsize="small")
    ax.legend(frameon=False, fontsize="x-small", ncol=3, loc="upper center",
              bbox_to_anchor=(0.5, -0.3))  # below the axes: never over a bar
    return fig


def build(results, probe: str = "knn@20", paper: bool = False, protocol: str = "last"):
    """The bar figure of the probe results (returned unsaved)."""
    return bars(collect(results, probe, protocol=protocol), probe, paper, protocol)


def probes_in(results) -> list[str]:
    """Every probe label the results hold, k-NN at k=20 first (the paper's headline)."""
    labels = {str(v) for res in results for v in res.coords["probe"]}
    return sorted(labels, key=lambda label: (label != "knn@20", label))


def draw(results_dir, out_dir, probes=(), paper: bool = False, protocol: str = "both") -> list:
    """One bar figure and Markdown/LaTeX table per probe (`probes`: all in the results) and
    protocol ("last", "paper" or "both": see figures.protocols.chosen)."""
    results = load(results_dir, ANALYSIS, NAME)
    honest.refuse_mixed(results, VARYING_OK, NAME)
    chosen = protocols.chosen(protocol, [json.loads(r.attrs.get("checkpoints", "[]"))
                                         for r in results])
    known = probes_in(results)
    for probe in probes:
        if probe not in known:
            raise UserError(f"--probe: {probe!r} is not in the probe results under "
                            f"{results_dir}; valid choices: {', '.join(known)}")
    paths = []
    for probe in probes or known:
        for protocol in chosen:
            paths += _write(collect(results, probe, protocol=protocol), probe, paper, protocol,
                            out_dir)
    return paths


def _write(table: dict, probe: str, paper: bool, protocol: str, out_dir) -> list:
    """The bars (.pdf/.png) and tables (.md/.tex) of one probe and protocol."""
    if not table:
        return []
    stem = f"{NAME}_{_slug(probe)}" + ("_paper" if protocol == "paper" else "")
    paths = style.save(bars(table, probe, paper, protocol), out_dir, stem)
    for suffix, text in ((".md", markdown(table, probe, paper, protocol)),
                         (".tex", latex(table, probe, protocol))):
        path = out_dir / f"{stem}{suffix}"
        path.write_text(text + "\n")
        paths.append(path)
    return paths


def _slug(probe: str) -> str:
    return probe.replace("@", "").replace("-", "_")
