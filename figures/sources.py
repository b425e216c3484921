"""Find result files by analysis; explain what is missing and which stage makes it.

Figures read HDF5 results only (through runs.results, which imports no torch).
"""

from pathlib import Path

import numpy as np

from figures import honest
from runs.errors import UserError
from runs.results import ResultData, open_result

# Which command (pipeline stage) writes each analysis.
PRODUCERS = {
    "probe": "probe (python -m probes.evaluate)",
    "distill": "distill (python -m runs.distill)",
    "interpolate": "interpolate (python -m landscape.interpolate)",
    "border": "border (python -m landscape.border)",
    "imp": "imp (python -m tickets.imp)",
    "hessian": "curvature (python -m landscape.hessian)",
    "curve": "curve (python -m landscape.curve)",
    "layerwise": "layerwise (python -m landscape.layerwise)",
}


def result_files(root) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.h5") if ".shard" not in p.name)


def store_roots(root, store=None) -> list[Path]:
    """Where distillation results live besides `root`: `store` when given, else the results
    folder's sibling `store/` (the pipeline's OUT/results beside OUT/store), if it exists;
    `load` searches the sibling only when `root` itself holds no distill result.
    runs.distill writes STORE/distill_<hash>/seed_<s>/distill.h5 into the store, not into
    the results folder."""
    if store:
        return [Path(store)]
    root = Path(root)
    sibling = (root.parent if root.is_dir() else root.parent.parent) / "store"
    if root.is_dir() and sibling.is_dir() and root.resolve() not in sibling.resolve().parents \
            and sibling.resolve() != root.resolve():
        return [sibling]
    return []


def load(root, analysis: str, figure: str, where=None, need: str = "",
         store=None) -> list[ResultData]:
    """Every result of `analysis` under root (a folder, or one file that must be one).

    `where(result) -> bool` narrows the selection (e.g. 2-D interpolation only); `need`
    names what it asks for in the error when nothing passes (e.g. "2-D plane"). Distill
    results are also looked for in the store (`store`, or root's sibling `store/`).
    Results with no cell done yet are skipped with a warning on stderr; partly done ones
    are kept (the figures note "N of M cells done").
    """
    found = _load(root, analysis, figure, where, need, store)
    kept = [r for r in found if honest.cells_done(r)[0] > 0]
    for result in found:
        if honest.cells_done(result)[0] == 0:
            honest.warn(f"figure {figure}: skipped {result.path}: no cell done yet")
    if not kept:
        raise UserError(f"figure {figure}: no {analysis!r} result under {root} has a finished "
                        f"cell yet; let the {PRODUCERS[analysis]} stage finish")
    return kept


def _load(root, analysis, figure, where, need, store) -> list[ResultData]:
    files = result_files(root)
    wanted = f"{need} {analysis!r}" if need else repr(analysis)
    if Path(root).is_file():
        found = open_result(files[0])
        if found.analysis != analysis or (where is not None and not where(found)):
            holds = f"analysis {found.analysis!r}" if found.analysis != analysis else \
                f"{analysis!r} results that are not {need or 'usable here'}"
            raise UserError(f"{root} holds {holds}; figure {figure} needs {wanted} results "
                            f"(made by the {PRODUCERS[analysis]} stage)")
        return [found]

    def keep(r) -> bool:
        return r is not None and r.analysis == analysis and (where is None or where(r))

    picked = [r for r in (_try_open(p) for p in files) if keep(r)]
    if analysis == "distill" and (store or not picked):  # the sibling store: only as fallback
        seen = {p.resolve() for p in files}
        for extra in store_roots(root, store):
            picked += [r for r in (_try_open(p) for p in result_files(extra)
                                   if p.resolve() not in seen) if keep(r)]
    if not picked:
        looked = "" if analysis != "distill" else \
            " or in " + (", ".join(str(p) for p in store_roots(root, store)) or
                         "a store (give --store STORE)")
        raise UserError(f"figure {figure}: no {wanted} results under {root}{looked}; run the "
                        f"{PRODUCERS[analysis]} stage first")
    return picked


def _try_open(path: Path) -> ResultData | None:
    """Skip files that are not results (other HDF5, half-written temp files)."""
    try:
        return open_result(path)
    except UserError:
        return None


def pick(result: ResultData, name: str, dims: tuple[str, ...], **labels) -> np.ndarray:
    """A metric as a float array over `dims` (in that order), other axes picked by label.

        pick(res, "error", ("pair", "alpha"), start="random", split="test")
    """
    values, have = np.asarray(result.metrics[name], dtype=float), result.specs[name].dims
    index = []
    for dim in have:
        if dim in labels:
            found = [str(v) for v in result.coords[dim]]
            if str(labels[dim]) not in found:
                raise UserError(f"{result.path}: {name} has no {dim} {labels[dim]!r}; "
                                f"found {', '.join(found)}")
            index.append(found.index(str(labels[dim])))
        else:
            index.append(slice(None))
    kept = [d for d in have if d not in labels]
    if sorted(kept) != sorted(dims):
        raise UserError(f"{result.path}: {name} has dims {have}; a figure needs {dims} "
                        f"after picking {sorted(labels)}")
    return np.moveaxis(values[tuple(index)], [kept.index(d) for d in dims], range(len(dims)))


def has(result: ResultData, name: str) -> bool:
    """The result holds metric `name` with at least one finished value."""
    return name in result.metrics and bool(np.isfinite(result.metrics[name]).any())


def figure_names(results: list[ResultData], figure: str) -> list[str]:
    """One output name per result file, for figures drawn one per file: FIGURE_STEM (the
    file name without .h5, its folder prefixed where two files share a name), or just STEM
    where it already starts with the figure's name (border.h5 -> border, not border_border).
    """
    stems = [Path(r.path).stem for r in results]
    stems = [f"{Path(r.path).parent.name}_{n}" if stems.count(n) > 1 else n
             for r, n in zip(results, stems)]
    return [n if n == figure or n.startswith(f"{figure}_") else f"{figure}_{n}"
            for n in stems]


def save_each(results: list[ResultData], figure: str, build, out_dir) -> list:
    """Draw and save one figure per result file (names from `figure_names`)."""
    from figures import style
    paths = []
    for result, name in zip(results, figure_names(results, figure)):
        fig = build(result)
        honest.note_incomplete(fig, [result])
        paths += style.save(fig, out_dir, name)
    return paths
