"""The tickets Python API: prune any `nn.Module` in memory, or run an IMP sweep from Python.

    masks = magnitude_masks(model, 0.2)             # keep the 20 % largest |w|, globally
    apply_masks(model, masks)                       # zero the other 80 %, in place
    masks = magnitude_masks(model, 0.04, masks=masks)   # prune further: nested in the first
    ds = run_imp(model="convnet", data="digits", levels=2, steps="4ep", device="cpu")

`magnitude_masks` and `apply_masks` take any module (registry model or not) and use the
toolkit's rules: which parameters are prunable (`tickets.mask.prunable_names`), how many
weights survive (floor(N * density + 0.5) of the N prunable weights) and how ties break
(`tickets.prune.keep_largest`: the lower flat index is pruned first). `run_imp` is
`python -m tickets.imp` as a function: the same sweep (`tickets.imp.build_sweep`), filled
by the same `run_sweep`, returned as the xarray.Dataset the CLI's file opens as.
"""

import dataclasses
import math
import numbers

import torch
from torch import nn

from runs.config import from_dict
from runs.engines.train import TrainConfig
from runs.errors import UserError
from tickets.imp import SET_PER_LEVEL, ImpConfig, build_sweep, fill_result
from tickets.mask import Masks, dense_mask, num_kept, num_total, prunable_names
from tickets.prune import magnitude_prune

# ---------------------------------------------------------------------------- masks


def magnitude_masks(model: nn.Module, density: float, scope: str = "weights",
                    keep_output_dense: bool = False, masks: Masks = None) -> Masks:
    """One-shot global magnitude pruning: which prunable weights of `model` to keep.

    model: any nn.Module; its current weights are scored by |w|, over all prunable tensors
        together (global, not per layer). Nothing in the model changes (see `apply_masks`).
    density: fraction of the N prunable weights to keep, in (0, 1]: exactly
        floor(N * density + 0.5) weights survive (N counts every prunable weight, pruned or
        not, so density 0.8 then 0.64 are IMP's first two levels).
    scope: "weights" (conv and linear weights; biases and BatchNorm stay dense) or "all"
        (every parameter, as the lottery-ticket paper's code did).
    keep_output_dense: never prune the output layer (`fc`, else the last nn.Linear).
    masks: masks to prune further (same scope): only weights they keep may survive, so the
        result is nested in them; `density` must not exceed theirs.

    Returns {parameter name: bool tensor of its shape, True = kept}, in parameter order, on
    the weights' device; the format `apply_masks`, `tickets.mask.save_mask` and training
    with `TrainConfig.mask` take. Agrees with torch.nn.utils.prune.global_unstructured(...,
    L1Unstructured) up to ties in |w|, without re-parametrising the model.
    """
    density = _checked_density(density)
    names = prunable_names(model, scope, keep_output_dense)  # UserError lists the scopes
    if not names:
        raise UserError(f"magnitude_masks: {type(model).__name__} has no prunable parameters "
                        f"in scope {scope!r} (conv and linear weights; scope 'all' takes "
                        f"every parameter)")
    parent = dense_mask(model, names) if masks is None else \
        _parent_masks(model, masks, names, scope, keep_output_dense)
    total = num_total(parent)
    num_keep = math.floor(total * density + 0.5)
    if num_keep < 1:
        raise UserError(f"magnitude_masks: density {density} keeps no weight of the {total} "
                        f"prunable weights; give density >= {0.5 / total:.3g}")
    if num_keep > num_kept(parent):
        raise UserError(f"magnitude_masks: density {density} keeps {num_keep} of {total} "
                        f"weights, more than the given masks keep ({num_kept(parent)}, "
                        f"density {num_kept(parent) / total:.4g}); masks only shrink")
    params = dict(model.named_parameters())
    return magnitude_prune({name: params[name].detach() for name in names}, parent, num_keep)


def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Zero the weights `masks` prune (False entries), in place; returns `model`.

    A plain multiply, no re-parametrisation: the model stays an ordinary module (train it
    under the mask with `TrainConfig.mask`, which also masks gradients and momentum).
    masks: {parameter name: bool tensor of its shape}, as `magnitude_masks` returns; every
    name must be a parameter of `model` with that shape (checked before anything changes).
    """
    params = _checked_params(model, masks)
    with torch.no_grad():
        for name, mask in masks.items():
            param = params[name]
            param.masked_fill_(~mask.to(device=param.device, dtype=torch.bool), 0)
    return model


def _checked_density(density) -> float:
    ok = isinstance(density, numbers.Real) and not isinstance(density, bool) and \
        0 < float(density) <= 1  # False for NaN
    if not ok:
        raise UserError(f"magnitude_masks: density {density!r} must lie in (0, 1]: the "
                        f"fraction of prunable weights to keep, e.g. 0.2")
    return float(density)


def _checked_params(model: nn.Module, masks) -> dict[str, nn.Parameter]:
    """The model's parameters, after checking that every mask names one, with its shape."""
    if not isinstance(masks, dict) or not all(torch.is_tensor(m) for m in masks.values()):
        raise UserError("masks must be a dict {parameter name: bool tensor}, as "
                        "magnitude_masks returns")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise UserError(f"masks name {name!r}, which is no parameter of "
                            f"{type(model).__name__}; its prunable parameters: "
                            f"{', '.join(prunable_names(model))} (any parameter with "
                            f"scope 'all')")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise UserError(f"masks[{name!r}] has shape {tuple(mask.shape)} but the "
                            f"parameter {name} has shape {tuple(params[name].shape)}")
    return params


def _parent_masks(model, masks, names, scope, keep_output_dense) -> Masks:
    """The masks to prune further, checked against the model and put in parameter order."""
    _checked_params(model, masks)
    if set(masks) != set(names):
        lacking, extra = sorted(set(names) - set(masks)), sorted(set(masks) - set(names))
        raise UserError(f"magnitude_masks: the given masks do not cover the prunable "
                        f"parameters of scope {scope!r}, keep_output_dense="
                        f"{keep_output_dense} (missing: {', '.join(lacking) or 'none'}; "
                        f"not prunable: {', '.join(extra) or 'none'}); pass the scope the "
                        f"masks were made with")
    return {name: masks[name].bool() for name in names}


# ---------------------------------------------------------------------------- IMP


def option_names() -> list[str]:
    """The keyword options of `run_imp` beyond its named arguments: the fields of ImpConfig
    and TrainConfig a sweep does not set itself (the CLI's flags, as field names)."""
    named = {"model", "dataset", "levels", "rewind", "rate", "curvature"}
    imp = {f.name for f in dataclasses.fields(ImpConfig)}  # rewind_optimizer: ImpConfig's
    train = {f.name for f in dataclasses.fields(TrainConfig)} - set(SET_PER_LEVEL)
    return sorted((imp | train) - named)


def run_imp(model: str = "resnet18", data: str = "cifar10", levels: int = 10,
            rewind: str = "init@0", rate: float = 0.2, steps="160ep", seeds=(0,),
            store="store", device: str = "auto", precision: str = "auto",
            compile_model=False, save_at=(), out=None, overwrite: bool = False,
            curvature: bool = False, parallel_runs: int = 0, **train):
    """Iterative magnitude pruning with rewinding: `python -m tickets.imp` from Python.

    Same sweep, same store, same result: every level of every seed is an ordinary stored
    `runs.train` run (re-running skips finished levels, resumes an unfinished one, and
    shares runs with the CLI), masks are files in STORE/imp_<hash>/. See tickets.imp's
    module docstring for what each level trains.

    model: registry name of the network (`runs.models.MODELS`).
    data: registry name of the dataset (`runs.data.DATASETS`). A name only, not tensors:
        every level must be rebuilt from its stored config alone, so the data is given as
        config (`data_root`, `subset`, `val_size` below), as for `python -m tickets.imp`.
    levels, rewind, rate: as --levels, --rewind ("init@K", or a checkpoint reference the
        dense run starts from), --rate (level L keeps floor(N * (1 - rate)^L + 0.5)).
    steps: training length of every level, iterations or epochs ("160ep").
    seeds: init seeds, one IMP each. store: root folder of the run store.
    device, precision, compile_model: where and how fast it runs ("auto", "cpu", "cuda:N";
        "auto" | "fp32" | "bf16"; False or a torch.compile mode); not part of any result.
    save_at: extra checkpoints of the dense run (e.g. ("1ep", "2ep")), as --save-at.
    out: also write the HDF5 result file there, as the CLI does (and resume it if it holds
        this sweep); overwrite: replace a file written for another config.
    curvature: as --curvature: also the top eigenvalue and Hutchinson trace (+ SE) of the
        supervised train-loss Hessian over the surviving weights, of each level's trained
        network and its rewind point (metrics hessian_top, hessian_trace,
        hessian_trace_se over a coord curvature_at = trained, rewind); expensive.
        curvature_samples, curvature_tol: as --curvature-samples, --curvature-tol.
    parallel_runs: as --parallel-runs: each level's runs (every seed and branch) trained
        together, at most this many at once (0 = auto: by memory on CUDA, 1 on the CPU).
    **train: any other field of ImpConfig (prune_scope, prune_output, baselines,
        instability, barrier_grid, ...) or TrainConfig (width, batch_size, lr, val_size,
        data_root, flip, crop_padding, ...): see `option_names()`.

    Returns the `imp` result as an xarray.Dataset (coords branch x level x seed, metrics
    density, remaining_weights, test_accuracy, ...), equal to `xarray.open_dataset` of the
    file the CLI writes for the same settings.
    """
    if not isinstance(data, str):
        raise UserError(f"run_imp: data must be a registry dataset name (e.g. 'cifar10'), "
                        f"not {type(data).__name__}: every level is a stored runs.train run "
                        f"rebuilt from its config, so the data is named, with data_root, "
                        f"subset and val_size as options")
    imp, cfg = _configs(model, data, levels, rewind, rate, train, curvature)
    seeds = [seeds] if isinstance(seeds, numbers.Integral) else list(seeds)
    sweep = build_sweep(imp, cfg, store, steps, save_at, seeds, device, precision,
                        compile_model, parallel_runs)
    result = fill_result(sweep, seeds, out, overwrite)
    if out is None:
        return result.dataset()
    from runs.results import read_dataset
    return read_dataset(result.path, "imp")


def _configs(model, data, levels, rewind, rate, options: dict, curvature=False) -> tuple:
    """(ImpConfig, TrainConfig) from run_imp's arguments; unknown keys listed with the valid."""
    valid = option_names()
    if bad := sorted(set(options) - set(valid)):
        hint = " (the dataset is data=...)" if "dataset" in bad else ""
        raise UserError(f"run_imp: unknown option(s) {', '.join(bad)}{hint}; valid: "
                        f"{', '.join(valid)}")
    imp_names = {f.name for f in dataclasses.fields(ImpConfig)}
    options = {k: (v,) if isinstance(v, str) and k == "baselines" else v
               for k, v in options.items()}  # baselines="random" means ("random",)
    imp = from_dict(ImpConfig, {"levels": levels, "rewind": rewind, "rate": rate,
                                "curvature": curvature,
                                **{k: v for k, v in options.items() if k in imp_names}})
    cfg = from_dict(TrainConfig, {"model": model, "dataset": data,
                                  **{k: v for k, v in options.items() if k not in imp_names}})
    return imp, cfg
