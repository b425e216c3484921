"""BatchNorm after moving in parameter space: `keep`, `interpolate` or `recalibrate`.

A point between checkpoints has no BN statistics of its own. The three modes (DESIGN.md),
and on paths a fourth, `repair` (REPAIR, Jordan et al. 2023: landscape.align.repair):
- keep: the first checkpoint's running statistics, unchanged;
- interpolate: the statistics interpolated with the same weights as the parameters;
- recalibrate (default): reset, then the cumulative average of per-batch statistics over a
  fixed set of training images in train mode, no grad. That is exactly
  `torch.optim.swa_utils.update_bn` (momentum=None): running_mean = mean over batches of the
  batch means, running_var = mean over batches of the unbiased batch variances.

Two implementations of `recalibrate`, tested against each other and against update_bn:
- `recalibrate(model, batches)`: the reference, one model at a time, the real nn.BatchNorm
  modules updating their buffers in place;
- `BatchedBN`: many parameter sets at once under torch.func.vmap. In-place running-stat
  updates cannot run under vmap, so every BN layer of a copy of the network is swapped for
  `StatBatchNorm`, which takes its statistics as (batched) inputs and, while collecting,
  hands the batch statistics back as outputs of the vmapped call; the averages are
  accumulated outside vmap.
"""

import contextlib
import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from runs.errors import UserError, unknown

MODES = ("keep", "interpolate", "recalibrate")
# Paths only: REPAIR (Jordan et al. 2023; landscape.align.repair) rescales every channel of a
# point to the alpha-mix of the endpoints' channel statistics, so it needs two endpoints.
PATH_MODES = (*MODES, "repair")
STATS = ("running_mean", "running_var")


def check_mode(mode: str, modes=MODES) -> str:
    if mode not in modes:
        raise unknown("BatchNorm mode", mode, modes)
    return mode


def bn_layers(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(name, layer) of every BatchNorm layer, in module order."""
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)]
    for name, m in layers:
        if not m.track_running_stats:
            raise UserError(f"BatchNorm layer {name} keeps no running statistics "
                            f"(track_running_stats=False); BN modes do not apply to it")
    return layers


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[torch.Tensor], autocast=None) -> None:
    """In place: reset every BN layer, then cumulative statistics over `batches` (train mode).

    The same as torch.optim.swa_utils.update_bn(batches, model): momentum None during the
    pass, previous momenta and train/eval mode restored afterwards. `autocast`: a context
    manager factory for the forward (bf16 on CUDA), or None.
    """
    layers = [m for _, m in bn_layers(model)]
    if not layers:
        return
    momenta = {}
    for layer in layers:
        layer.reset_running_stats()
        momenta[layer], layer.momentum = layer.momentum, None
    was_training = model.training
    model.train()
    for x in batches:
        if autocast is None:
            model(x)
        else:
            with autocast():
                model(x)
    for layer in layers:
        layer.momentum = momenta[layer]
    model.train(was_training)


class StatBatchNorm(nn.Module):
    """A BatchNorm layer as a pure function of its inputs, safe under torch.func.vmap.

    Same parameter and buffer names as the layer it replaces, so one state dict fits both.
    sink None: eval-mode normalisation with `running_mean`/`running_var` (under
    functional_call these are the point's own, batched, statistics). sink a list:
    train-mode normalisation with the batch statistics, and (name, mean, unbiased var)
    appended to the sink for the caller to return out of vmap.
    """

    def __init__(self, layer: _BatchNorm, name: str):
        super().__init__()
        self.name, self.eps, self.sink = name, layer.eps, None
        self.weight, self.bias = layer.weight, layer.bias  # Parameters or None (affine=False)
        for key in (*STATS, "num_batches_tracked"):
            self.register_buffer(key, getattr(layer, key).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast (C,) over (B, C, ...)
        xf = x.float()  # statistics in fp32 also under bf16 autocast, as cuDNN does
        if self.sink is None:
            mean, var = self.running_mean, self.running_var
        else:
            dims = [0, *range(2, x.dim())]
            mean, var = xf.mean(dims), xf.var(dims, correction=0)  # (C,) biased: normalises
            count = x.numel() // x.shape[1]  # values per channel (vmap hides the point axis)
            self.sink.append((self.name, mean, var * count / max(count - 1, 1)))
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def swap_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every BatchNorm layer replaced by a StatBatchNorm."""
    twin = copy.deepcopy(model)
    for name, layer in bn_layers(twin):
        parent_name, _, child = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        setattr(parent, child, StatBatchNorm(layer, name))
    return twin


class BatchedBN:
    """Recalibrated BN statistics of P parameter sets at once (see the module docstring).

    twin: the network after `swap_batchnorm`; forward_kwargs: what to call it with during
    recalibration (e.g. {"parts": ("embedding",)} to skip heads without BN).
    """

    def __init__(self, twin: nn.Module, forward_kwargs: dict = None):
        self.twin = twin
        self.layers = [m for m in twin.modules() if isinstance(m, StatBatchNorm)]
        self.kwargs = forward_kwargs or {}
        self.order: list[str] = []  # layer names in call order, seen on the first call
        self._collect = vmap(self._stats, in_dims=(0, None))

    def _stats(self, params: dict, x: torch.Tensor):
        sink = []
        for layer in self.layers:
            layer.sink = sink
        try:
            functional_call(self.twin, params, (x,), self.kwargs)
        finally:
            for layer in self.layers:
                layer.sink = None
        self.order = [name for name, _, _ in sink]
        return [mean for _, mean, _ in sink], [var for _, _, var in sink]

    @torch.no_grad()
    def recalibrate(self, params: dict, batches: Iterable[torch.Tensor],
                    autocast=None) -> dict:
        """{"<layer>.running_mean": (P, C), "<layer>.running_var": (P, C)} for P points.

        params: name -> (P, *shape). A layer called n times per forward contributes n
        batches, as in update_bn.
        """
        sums, counts = {}, {}
        for x in batches:
            with autocast() if autocast else contextlib.nullcontext():
                means, variances = self._collect(params, x)  # lists of (P, C)
            for name, mean, var in zip(self.order, means, variances):
                if name in sums:
                    sums[name][0].add_(mean.double())
                    sums[name][1].add_(var.double())
                else:
                    sums[name] = [mean.double(), var.double()]
                counts[name] = counts.get(name, 0) + 1
        if not sums and self.layers:
            raise UserError("BatchNorm recalibration got no batches (--bn-samples 0 images?)")
        out = {}
        for name, (mean_sum, var_sum) in sums.items():
            out[f"{name}.running_mean"] = (mean_sum / counts[name]).float()
            out[f"{name}.running_var"] = (var_sum / counts[name]).float()
        return out




def interpolate_buffers(buffers: list[dict], weights: torch.Tensor) -> dict:
    """sum_k weights[:, k] buffers[k] for floating buffers: name -> (P, *shape).

    weights: (P, K) affine weights of the K anchors (rows sum to 1). Integer buffers (batch
    counts) come from the first anchor. Variances are clamped at 0: extrapolating past an
    anchor can make the mix negative, which BN would turn into NaN.
    """
    out = {}
    for name, first in buffers[0].items():
        if not first.is_floating_point():
            out[name] = first.expand(len(weights), *first.shape)
            continue
        stacked = torch.stack([b[name] for b in buffers])  # (K, *shape)
        w = weights.to(stacked.dtype).to(stacked.device)
        mixed = torch.einsum("pk,k...->p...", w, stacked)
        out[name] = mixed.clamp_min(0) if name.endswith("running_var") else mixed
    return out

