"""Normalisation layers by name, for the `norm` option of the conv encoders.

    batch     BatchNorm2d(C): statistics over (B, H, W) per channel, running buffers
    layer     GroupNorm(1, C): one group, statistics over (C, H, W) per image (the paper's
              code's "LayerNorm" for conv nets)
    group     GroupNorm(G, C) with groups of 8 channels, G = C // 8 (the paper's code's
              "GroupNorm8"); when 8 does not divide C (small widths), the largest G <= C // 8
              that divides C (at least 1)
    instance  GroupNorm(C, C): statistics over (H, W) per image and channel, with an affine
              (the paper's code's "InstanceNorm")
    none      Identity (no normalisation; no parameters)

GroupNorm rather than LayerNorm / InstanceNorm2d: the same function with per-channel affine
parameters, no buffers, and a vmap batching rule (landscape points run under torch.func.vmap).
"""

from typing import Literal

from torch import nn

from runs.errors import UserError

Norm = Literal["none", "batch", "layer", "group", "instance"]
NORMS = ("none", "batch", "layer", "group", "instance")
GROUP_SIZE = 8  # channels per group of norm="group"


def groups_of(channels: int) -> int:
    """Groups of norm="group": C // 8, lowered to a divisor of C (at least 1)."""
    groups = max(1, channels // GROUP_SIZE)
    while channels % groups:
        groups -= 1
    return groups


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The `norm` layer for `channels` feature maps; weight 1 and bias 0 where affine."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "group":
        return nn.GroupNorm(groups_of(channels), channels)
    if norm == "instance":
        return nn.GroupNorm(channels, channels)
    if norm == "none":
        return nn.Identity()
    raise UserError(f"norm={norm!r}: valid: {', '.join(NORMS)}")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise UserError(f"norm={norm!r}: valid: {', '.join(NORMS)}")
    return norm
