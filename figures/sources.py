"""Find result files by analysis; explain what is missing and which stage makes it.

Figures read HDF5 results only (through runs.results, which imports no torch).
"""

from pathlib import Path

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


def load(root, analysis: str, figure: str, where=None) -> list[ResultData]:
    """Every result of `analysis` under root (a folder, or one file that must be one).

    `where(result) -> bool` narrows the selection (e.g. 2-D interpolation only).
    """
    files = result_files(root)
    if Path(root).is_file():
        found = open_result(files[0])
        if found.analysis != analysis:
            raise UserError(f"{root} holds analysis {found.analysis!r}; figure {figure} needs "
                            f"{analysis!r} results (made by the {PRODUCERS[analysis]} stage)")
        picked = [found]
    else:
        picked = [r for r in (_try_open(p) for p in files)
                  if r is not None and r.analysis == analysis]
    picked = [r for r in picked if where is None or where(r)]
    if not picked:
        raise UserError(f"figure {figure}: no {analysis!r} results under {root}; run the "
                        f"{PRODUCERS[analysis]} stage first")
    return picked


def _try_open(path: Path) -> ResultData | None:
    """Skip files that are not results (other HDF5, half-written temp files)."""
    try:
        return open_result(path)
    except UserError:
        return None
