"""Frozen features for the probes: encoder outputs and raw pixels, plus the input checks.

Images arrive as uint8 pixels or as floats (already normalised, as a torchvision transform
leaves them), (N, C, H, W), on any device (airbench style: the whole split can live on the
GPU); each batch is converted to float on the compute device, so only one float batch exists
at a time. Features come back float32 (N, D) on the compute device, where the probes want
them.
"""

import torch
from torch import nn

from runs.datasets.base import pixel_stats
from runs.errors import UserError
from runs.gpu_loader import unit_scale
from runs.models.adapt import encoder_of


def extract_features(encoder, images, mean=None, std=None, batch_size=512,
                     device=None) -> torch.Tensor:
    """Encoder outputs (N, D) float32 for images (N, C, H, W).

    uint8 pixels are scaled to [0, 1] and normalised with the per-channel `mean` and `std`
    (C values each, in [0, 1] units; default: the statistics of these images). Float images
    are used as they are (already normalised): `mean` and `std` must then be None or the
    identity (0 and 1), so nothing is normalised twice. Each batch passes through `encoder`
    (an nn.Module) in eval mode under no_grad; every submodule's previous train/eval mode is
    restored afterwards. device: where to compute, default the encoder's parameters' device
    (the images' device for a parameter-free encoder); the encoder is never moved. On CUDA the
    batch is channels_last and the forward runs under bf16 autocast; the output is cast to
    float32. Outputs with more than 2 dims are flattened. Images the encoder cannot take are
    a one-line UserError naming their shape and what the first layer takes.
    """
    _check_images(images)
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be at least 1 image")
    if device is None:
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else images.device
    device = torch.device(device)
    mean, std = _normalisation(images, mean, std, device)  # (1, C, 1, 1) each
    cuda = device.type == "cuda"
    modes = [(module, module.training) for module in encoder.modules()]  # restored per module
    encoder.eval()
    out = []
    try:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device, non_blocking=True)  # (B, C, H, W)
                x = (unit_scale(x) - mean) / std  # (B, C, H, W) normalised, a new tensor
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)  # faster convs in bf16
                out.append(_forward(encoder, x).flatten(1).float())  # (B, D)
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(out)


class Embedding(nn.Module):
    """A model's embedding as a module: forward(images) -> (B, D), the model as a submodule
    (so `extract_features` sees its parameters and sets its train/eval mode)."""

    def __init__(self, model: nn.Module, embed=None):
        super().__init__()
        self.model = model
        self.fn = encoder_of(model, embed)  # UserError listing the layers on a bad name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


def _forward(encoder, x):
    """encoder(x), with a shape mismatch turned into a one-line UserError naming both."""
    try:
        return encoder(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        model = encoder.model if isinstance(encoder, Embedding) else encoder
        raise UserError(f"cannot run {type(model).__name__} on images of shape "
                        f"{tuple(x.shape[1:])}{_takes(model)}: {first}") from None


def _takes(model) -> str:
    """What the model's first layer takes, e.g. " (its first layer '0', Conv2d, takes
    1-channel images)"; "" when no layer says."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "in_channels", None), int):
            what = f"{module.in_channels}-channel images"
        elif isinstance(getattr(module, "in_features", None), int):
            what = f"{module.in_features} input features (C*H*W)"
        else:
            continue
        return f" (its first layer {name or 'itself'!r}, {type(module).__name__}, takes {what})"
    return ""


def pixel_features(images, mean=None, std=None) -> torch.Tensor:
    """Pixels as features (the paper's "input" row): (N, C*H*W) float32, on the images' device.

    uint8 pixels are scaled to [0, 1], normalised per channel with `mean` and `std` (C values
    each, [0, 1] units; default: these images' statistics), then flattened: what the paper's
    flatten encoder sees (its inputs are normalised with the dataset's statistics, not only
    /255), so the k-NN distance is the normalised-pixel distance. Float images are taken as
    already normalised and flattened as they are (mean and std must then stay None).
    """
    _check_images(images)
    mean, std = _normalisation(images, mean, std, images.device)  # (1, C, 1, 1) each
    return ((unit_scale(images) - mean) / std).flatten(1)  # (N, C*H*W)


def check_features(x, name, split) -> None:
    """UserError unless `x` is a 2-D (N, D) tensor of finite numbers."""
    if x.dim() != 2:
        raise UserError(f"{split} features of {name} must be 2-D (N, D), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise UserError(f"features of {name} contain NaN or Inf ({bad} values, {split} split)")


def check_labels(y, num_rows, name, split, device, num_classes=None) -> torch.Tensor:
    """`y` as a 1-D int64 tensor on `device`, one label per feature row, in [0, num_classes)."""
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dim() != 1:
        raise UserError(f"{split} labels of {name} must be a 1-D integer tensor, "
                        f"got {y.dtype} {tuple(y.shape)}")
    if len(y) != num_rows:
        raise UserError(f"{name}: {len(y)} {split} labels for {num_rows} {split} features")
    y = y.to(device, torch.int64)
    if len(y) and y.min() < 0:
        raise UserError(f"{split} labels of {name} must be >= 0, got {y.min().item()}")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise UserError(f"{split} labels of {name} go up to {y.max().item()} "
                        f"but num_classes={num_classes}")
    return y


def _check_images(images):
    """UserError unless `images` is a non-empty uint8 or float (N, C, H, W) tensor."""
    pixels = torch.is_tensor(images) and (images.dtype == torch.uint8 or
                                          images.is_floating_point())
    if not pixels or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else \
            type(images).__name__
        raise UserError(f"images must be a uint8 (pixels) or float (normalised) tensor "
                        f"(N, C, H, W), got {got}")
    if len(images) == 0:
        raise UserError("images: got an empty batch (N = 0)")


def _normalisation(images, mean, std, device):
    """(mean, std) as (1, C, 1, 1) float32 on `device`: the given values or the images' own
    statistics for uint8 pixels; the identity for float images (already normalised)."""
    channels = images.shape[1]
    if images.dtype != torch.uint8:
        for what, values, identity in (("mean", mean, 0.0), ("std", std, 1.0)):
            if values is not None and not bool((_per_channel(values, what, channels, device)
                                                == identity).all()):
                raise UserError(f"{what} normalises uint8 pixels; these images are "
                                f"{images.dtype}, taken as already normalised: pass uint8 "
                                f"pixels, or leave mean and std None")
        mean, std = (0.0,) * channels, (1.0,) * channels
    elif mean is None or std is None:
        stats = pixel_stats(images)  # (mean, std) per channel on [0, 1]
        mean = stats[0] if mean is None else mean
        std = stats[1] if std is None else std
    return (_per_channel(mean, "mean", channels, device),
            _per_channel(std, "std", channels, device))


def _per_channel(values, what, channels, device):
    """Per-channel statistics as a (1, C, 1, 1) float32 tensor on `device`."""
    values = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if values.numel() != channels:
        raise UserError(f"{what} has {values.numel()} values but the images have {channels} "
                        f"channels")
    if what == "std" and not (values > 0).all():
        raise UserError(f"std must be > 0 in every channel, got {values.tolist()}")
    return values.view(1, -1, 1, 1)
