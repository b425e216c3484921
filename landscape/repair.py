"""REPAIR: renormalise an interpolated network's channels (Jordan et al. 2023).

Between two aligned networks the interpolated one's hidden channels lose variance ("variance
collapse"), which raises the barrier. REPAIR measures, on a fixed set of images, the mean and
standard deviation of every conv/linear output channel (after its norm where one follows) in
A and in B, and rescales and shifts the interpolated network's channels so that each has the
statistics (1 - alpha) * A's + alpha * B's:

    fixed = repair(mid, a, b_aligned, alpha, images)

Every such output is a per-channel affine function of its layer's (weight, bias): a conv or
linear with a bias, a BatchNorm in eval mode (running statistics as they are), a GroupNorm.
So out' = s (out - mean) + target_mean with s = target_std / std is reached exactly by
weight' = s weight, bias' = s (bias - mean) + target_mean. One forward in eval mode does all
layers in order: each hook corrects its layer's parameters from the statistics it sees, with
every earlier layer already corrected, and passes the corrected output on. A conv without bias
and without a norm (resnets with norm="none") can only be rescaled: its std is matched, its
mean scales with it. Norms without affine parameters are left as they are.
"""

import copy

import torch
from torch import nn

from landscape.align import PermutationSpec, check_alignable
from runs.errors import UserError

EPS = 1e-8  # a channel with a smaller std (constant on the images) keeps its scale


def _moments(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) mean and population std of each channel of (B, C, ...) over the other axes."""
    flat = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)  # (C, M)
    return flat.mean(1), flat.std(1, correction=0)


@torch.no_grad()
def channel_stats(model: nn.Module, images: torch.Tensor, spec: PermutationSpec = None) -> dict:
    """site -> (mean, std) (C,) of every REPAIR site's output on `images`, eval mode."""
    spec = spec or check_alignable(model, model)
    stats, hooks = {}, []
    for site in spec.repair_sites:
        def hook(module, inputs, output, site=site):
            stats[site] = _moments(output)
        hooks.append(model.get_submodule(site).register_forward_hook(hook))
    was_training = model.training
    try:
        _encoder(model, spec).eval()(images)
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return stats


def _encoder(model: nn.Module, spec: PermutationSpec) -> nn.Module:
    return model.get_submodule(spec.encoder) if spec.encoder else model


def _fix(target: tuple[torch.Tensor, torch.Tensor]):
    """A forward hook setting its layer's weight and bias so that its output's channels have
    the target (mean, std) on this batch, and returning the output so corrected."""
    target_mean, target_std = target

    def hook(module, inputs, output):
        if getattr(module, "weight", None) is None:
            return output
        mean, std = _moments(output)
        scale = torch.where(std > EPS, target_std / std.clamp_min(EPS), torch.ones_like(std))
        view = (-1,) + (1,) * (output.ndim - 2)  # broadcast (C,) over (B, C, ...)
        module.weight.mul_(scale.view(-1, *[1] * (module.weight.ndim - 1)).to(module.weight))
        if getattr(module, "bias", None) is None:
            return output * scale.view(view).to(output)
        shift = target_mean - scale * mean  # out' = scale * out + shift
        module.bias.mul_(scale.to(module.bias)).add_(shift.to(module.bias))
        return output * scale.view(view).to(output) + shift.view(view).to(output)
    return hook


@torch.no_grad()
def repair(model: nn.Module, a: nn.Module, b: nn.Module, alpha: float, images: torch.Tensor,
           spec: PermutationSpec = None) -> nn.Module:
    """A copy of `model` (a network between A and B, B aligned to A) whose every conv/linear
    output channel (after its norm) has, on `images` (N, C, H, W) in eval mode, the mean and
    std (1 - alpha) A's + alpha B's. model, a and b are untouched."""
    spec = spec or check_alignable(a, model)
    check_alignable(a, b)
    alpha = float(alpha)
    if not torch.isfinite(torch.tensor(alpha)):
        raise UserError(f"repair: alpha must be a finite number, got {alpha}")
    if not torch.is_tensor(images) or len(images) < 2:
        raise UserError("repair needs images: a tensor (N, C, H, W) of N >= 2 training images")
    stats_a, stats_b = channel_stats(a, images, spec), channel_stats(b, images, spec)
    out = copy.deepcopy(model)
    hooks = []
    for site in spec.repair_sites:
        (mean_a, std_a), (mean_b, std_b) = stats_a[site], stats_b[site]
        target = torch.lerp(mean_a, mean_b, alpha), torch.lerp(std_a, std_b, alpha).clamp_min(0)
        hooks.append(out.get_submodule(site).register_forward_hook(_fix(target)))
    try:
        _encoder(out, spec).eval()(images)
    finally:
        for handle in hooks:
            handle.remove()
    return out.train(model.training)
