"""Lottery tickets: masks, global magnitude pruning and iterative magnitude pruning (IMP).

The Python API (any `nn.Module` for masks; an IMP sweep returns the xarray.Dataset the CLI
writes):

    tickets.magnitude_masks(model, density, scope="weights", keep_output_dense=False,
                            masks=None)      # {name: bool tensor}, global |w|, exact count
    tickets.apply_masks(model, masks)        # zero the pruned weights in place
    tickets.run_imp(model="resnet20", data="cifar10", levels=10, rewind="init@0",
                    rate=0.2, steps="160ep", seeds=(0,), store="store", **options)

Modules:
    api.py     the functions above
    mask.py    which parameters are prunable; mask counts, nesting and files
    prune.py   kept counts per level; global magnitude and random pruning
    imp.py     the IMP sweep and its CLI (python -m tickets.imp); run_imp drives the same
    curvature.py  the Hessian over a ticket's surviving weights (imp --curvature)

Imports `runs` (and `landscape`'s public functions for --instability and --curvature). The
API is imported on first use, so `python -m tickets.imp` does not load its own module twice.
"""

API = ("magnitude_masks", "apply_masks", "run_imp")
__all__ = list(API)


def __getattr__(name: str):
    if name in API:
        from tickets import api
        return getattr(api, name)
    raise AttributeError(f"module 'tickets' has no attribute {name!r}")
