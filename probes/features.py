"""Frozen features for the probes: encoder outputs and raw pixels, plus the input checks.

Images arrive as uint8 (N, C, H, W) on any device (airbench style: the whole split can live on
the GPU); each batch is converted to float on the compute device, so only one float batch
exists at a time. Features come back float32 (N, D) on the compute device, where the probes
want them.
"""

import torch

from runs.errors import UserError


def extract_features(encoder, images, mean, std, batch_size=512, device=None) -> torch.Tensor:
    """Encoder outputs (N, D) float32 for uint8 images (N, C, H, W).

    Each batch is scaled to [0, 1], normalised with the per-channel `mean` and `std` (C values
    each, in [0, 1] units), and passed through `encoder` in eval mode under no_grad; every
    submodule's previous train/eval mode is restored afterwards. device: where to compute,
    default the encoder's parameters' device (the images' device for a parameter-free encoder);
    the encoder is never moved. On CUDA the batch is channels_last and the forward runs under
    bf16 autocast; the output is cast to float32. Outputs with more than 2 dims are flattened.
    """
    _check_images(images)
    if device is None:
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else images.device
    device = torch.device(device)
    mean = _per_channel(mean, "mean", images.shape[1], device)  # (1, C, 1, 1)
    std = _per_channel(std, "std", images.shape[1], device)  # (1, C, 1, 1)
    cuda = device.type == "cuda"
    modes = [(module, module.training) for module in encoder.modules()]  # restored per module
    encoder.eval()
    out = []
    try:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device, non_blocking=True)  # (B, C, H, W)
                x = x.float().div_(255).sub_(mean).div_(std)  # (B, C, H, W) normalised
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)  # faster convs in bf16
                out.append(encoder(x).flatten(1).float())  # (B, D)
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(out)


def pixel_features(images) -> torch.Tensor:
    """Raw pixels as features (the paper's "input" row): (N, C*H*W) float32 in [0, 1].

    Just /255 and a flatten, on the images' device: no per-channel mean/std, so the k-NN
    distance is the plain pixel distance. The train-standardised variant of each probe covers
    normalised inputs (per-pixel standardisation subsumes per-channel normalisation).
    """
    _check_images(images)
    return images.flatten(1).float().div_(255)  # (N, C*H*W)


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
    """UserError unless `images` is a non-empty uint8 (N, C, H, W) tensor."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images)
        raise UserError(f"images must be a uint8 tensor (N, C, H, W), got {got}")
    if len(images) == 0:
        raise UserError("images: got an empty batch (N = 0)")


def _per_channel(values, what, channels, device):
    """Per-channel statistics as a (1, C, 1, 1) float32 tensor on `device`."""
    values = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if values.numel() != channels:
        raise UserError(f"{what} has {values.numel()} values but the images have {channels} "
                        f"channels")
    if what == "std" and not (values > 0).all():
        raise UserError(f"std must be > 0 in every channel, got {values.tolist()}")
    return values.view(1, -1, 1, 1)
