"""Find result files by analysis; explain what is missing and which stage makes it.

Figures read HDF5 results only (through runs.results, which imports no torch).
"""

from pathlib import Path

import numpy as np

from runs.errors import UserError
from runs.results import ResultData, open_result

# Which command (pipeline stage) writes each analysis.
PRODUCERS = {
    "probe": "probe (python -m probes.evaluate)",
    "distill": "distill (python -m runs.distill)",
    "interpolate": "interpolate (python -m landscape.interpolate)",
    "border": "border (python -m landscape.border)",
    "imp": "imp (python -m tickets.imp)",
}


def result_files(root) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.h5") if ".shard" not in p.name)


def load(root, analysis: str, figure: str, where=None, need: str = "") -> list[ResultData]:
    """Every result of `analysis` under root (a folder, or one file that must be one).

    `where(result) -> bool` narrows the selection (e.g. 2-D interpolation only); `need`
    names what it asks for in the error when nothing passes (e.g. "2-D plane").
    """
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
    picked = [r for r in (_try_open(p) for p in files)
              if r is not None and r.analysis == analysis and (where is None or where(r))]
    if not picked:
        raise UserError(f"figure {figure}: no {wanted} results under {root}; run the "
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
        paths += style.save(build(result), out_dir, name)
    return paths
