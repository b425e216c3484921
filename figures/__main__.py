"""Draw paper-style figures from stored HDF5 results: `python -m figures NAME|all`.

Each figure reads result files only (never a model or a checkpoint): point --results at a
folder (searched recursively for *.h5) or at one file. Writes NAME.pdf and NAME.png (and
tables as .md/.tex where they apply) into --out.
"""

import argparse
import sys
from pathlib import Path

from figures import (
    alpha_locality,
    border_barriers,
    curvature,
    curve,
    data_size,
    distill_curves,
    imp_curves,
    layerwise,
    lmc,
    path_curves,
    plane,
    probe_table,
)
from runs.errors import UserError, cli, unknown

FIGURES = {m.NAME: m for m in (probe_table, distill_curves, alpha_locality, data_size, plane,
                                path_curves, lmc, border_barriers, curve, layerwise,
                                imp_curves, curvature)}


def register(module) -> None:
    """Add a figure module (NAME, ANALYSIS, draw(results_dir, out_dir))."""
    FIGURES[module.NAME] = module


def draw(name: str, results, out, **options) -> list[Path]:
    """Draw figure `name`; `options` (e.g. probes, paper) go to the figures that take them."""
    if name not in FIGURES:
        raise unknown("figure", name, [*FIGURES, "all"])
    module = FIGURES[name]
    taken = {k: v for k, v in options.items() if k in getattr(module, "OPTIONS", ())}
    return module.draw(Path(results), Path(out), **taken)


def draw_all(results, out, **options) -> tuple[list[Path], list[str]]:
    """Every figure whose results exist; the others are reported, not fatal."""
    paths, skipped = [], []
    for name in FIGURES:
        try:
            paths += draw(name, results, out, **options)
        except UserError as err:
            skipped.append(str(err))
    return paths, skipped


EPILOG = r"""examples:
  python -m figures all --results out/demo --out out/demo/figures
  python -m figures probe-table --results results/probe.h5 --probe knn@20 --paper
  python -m figures plane --results results --out figures_out
  python -m figures curvature --results results/hessian.h5 --per-parameter"""


def parser() -> argparse.ArgumentParser:
    from runs.config import HelpFormatter  # argparse only: figures stay torch-free
    p = argparse.ArgumentParser(prog="python -m figures", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("name", help=f"one of: {', '.join(FIGURES)}, or all")
    p.add_argument("--results", default="results", help="folder or file of HDF5 results")
    p.add_argument("--out", default="figures_out", help="folder for the figures")
    p.add_argument("--probe", action="append", default=[], dest="probes", metavar="LABEL",
                   help="probe-table: the probe to tabulate, e.g. knn@20 or linear-lbfgs "
                        "(repeatable; default every probe in the results)")
    p.add_argument("--paper", action="store_true",
                   help="probe-table: mark the paper's values beside the reproduction")
    p.add_argument("--protocol", default="both", choices=("last", "paper", "both"),
                   help="probe-table: which epoch of each run: 'last' (honest; "
                        "probe-table_<probe>.*), 'paper' (the best epoch on the test set, as "
                        "the paper reports; probe-table_<probe>_paper.*) or 'both' (the "
                        "paper's only where a run was probed at several epochs)")
    p.add_argument("--store", default=None,
                   help="distill-curves, alpha-locality, data-size: the store that holds the "
                        "distillation runs (STORE/distill_<hash>/seed_<s>/distill.h5) when "
                        "they are not under --results (default: the results folder's "
                        "sibling store/, if there is one)")
    p.add_argument("--per-parameter", action="store_true",
                   help="curvature: divide each layer's Hessian trace by its parameter count "
                        "(the mean diagonal entry of H; curvature-layers-pp_*)")
    return p


@cli
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    options = {"probes": args.probes, "paper": args.paper, "store": args.store,
               "protocol": args.protocol, "per_parameter": args.per_parameter}
    if args.name == "all":
        paths, skipped = draw_all(args.results, args.out, **options)
        for reason in skipped:
            print(f"skipped: {reason}", file=sys.stderr)
        if not paths:
            raise UserError(f"no figure could be drawn from {args.results}")
    else:
        paths = draw(args.name, args.results, args.out, **options)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
