"""Where and in what precision a command computes: `--device` and `--precision`.

    device = resolve_device("auto")        # CUDA when present, else CPU; checked, not trusted
    bf16 = use_bf16(device, "auto")        # bf16 autocast on CUDA, fp32 on CPU
    with autocast(device, bf16): ...       # a no-op context when bf16 is off
"""

import contextlib

import torch

from runs.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else CPU; anything else is checked, not trusted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: cannot parse {name!r}; valid: auto, cpu, cuda, cuda:N") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    return device


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA by default; fp32 on CPU (bf16 there is slow and changes bits)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
