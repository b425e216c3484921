"""Curvature of a ticket: the supervised loss Hessian over the weights its mask keeps.

A pruned network's weights are zero where its mask prunes them and stay zero in training
(`runs.engines.masking` masks their gradients), so the landscape a ticket moves in is the
loss restricted to its surviving weights. `ticket_operator` is that Hessian:
`landscape.curvature`'s operator over every parameter, restricted (`masked_operator`) to the
kept entries of the prunable tensors; parameters the mask does not name (biases and
BatchNorm under --prune-scope weights) stay in, unmasked. BatchNorm runs in eval mode with
the checkpoint's running statistics, as in `python -m landscape.hessian`.

    batches = curvature_batches(train, 256, device)      # a fixed seeded subset of train
    values = ticket_curvature(model, mask, batches, tol=0.05, what="store/.../step_72.pt")
    # {"hessian_top": float, "hessian_trace": float, "hessian_trace_se": float}

`python -m tickets.imp --curvature` records these for each level's trained network and for
its rewind point (tickets.imp.curvature).
"""

import torch
from torch import nn

from landscape.curvature import (
    check_finite_loss,
    hessian_operator,
    hutchinson,
    masked_operator,
    supervised_loss,
    top_eigen,
)
from landscape.points import take
from runs.data import ImageData
from runs.gpu_loader import eval_loader

SEED = 0  # the subset's draw, the Lanczos start and the probes: the same for every cell
EIGEN_TOL = 1e-4  # Lanczos stops when the top Ritz residual is under this x |eigenvalue|
MIN_PROBES, MAX_PROBES = 10, 1000  # Hutchinson: at least / at most this many probes
BATCH_SIZE = 256  # images per Hessian-vector product pass (the sum is exact at any size)
METRICS = ("hessian_top", "hessian_trace", "hessian_trace_se")


def settings(samples: int, tol: float) -> dict:
    """What a curvature value means, as a result's config records it."""
    return {"loss": "supervised", "split": "train", "samples": samples, "seed": SEED,
            "params": "all, the mask's pruned entries left out", "bn_mode": "checkpoint",
            "top_k": 1, "eigen_tol": EIGEN_TOL, "trace_tol": tol,
            "trace_probes": [MIN_PROBES, MAX_PROBES], "batch_size": BATCH_SIZE,
            "precision": "fp32"}


def curvature_batches(train: ImageData, samples: int, device,
                      seed: int = SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`samples` train images (0 = all) drawn with `seed`, normalised, un-augmented, on
    `device`: [(images (B, C, H, W), labels (B,)), ...], the same for every network."""
    images = take(train, samples, seed, "--curvature-samples")
    return list(eval_loader(images, device, BATCH_SIZE).epoch(0))


def surviving(module: nn.Module, names: list[str], mask: dict) -> torch.Tensor:
    """(n,) bool over the flat parameters `names` (in that order): the mask's entries for
    the tensors it names, True for every other parameter (biases, BatchNorm)."""
    params = dict(module.named_parameters())
    parts = [mask[name].reshape(-1).bool().cpu() if name in mask else
             torch.ones(params[name].numel(), dtype=torch.bool) for name in names]
    return torch.cat(parts)


def ticket_operator(module: nn.Module, mask: dict, batches: list):
    """The Hessian of the mean supervised loss over `batches`, restricted to the weights
    `mask` ({name: bool tensor}, {} = dense) keeps; its size is the kept count plus the
    parameters the mask does not name. The module is put in eval mode."""
    op = hessian_operator(module, supervised_loss, batches, params="all")
    return masked_operator(op, surviving(module, op.names, mask))


def ticket_curvature(module: nn.Module, mask: dict, batches: list, tol: float,
                     what: str) -> dict[str, float]:
    """Top eigenvalue and Hutchinson trace (with its standard error, stopped at relative
    SE `tol`) of `ticket_operator`; a UserError naming `what` if the loss is not finite."""
    op = ticket_operator(module, mask, batches)
    check_finite_loss(op, what)
    top = top_eigen(op, 1, EIGEN_TOL, seed=SEED, vectors=False)
    trace = hutchinson(op, tol, MIN_PROBES, MAX_PROBES, seed=SEED)
    return {"hessian_top": float(top.values[0]), "hessian_trace": trace.value,
            "hessian_trace_se": trace.se}
