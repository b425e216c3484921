"""Fixed sparsity masks applied during training: masked weights and their gradients stay 0.

Masks are computed elsewhere (`tickets`); here they are only applied. A mask is a dict
parameter name -> bool tensor of the parameter's shape, saved with `torch.save`. Applying is
a multiply of weights after each optimiser step and of gradients before it (foreach kernels,
no per-forward re-parametrisation), so a masked model runs at dense speed.
"""

from pathlib import Path

import torch
from torch import nn

from runs.errors import UserError


class Mask:
    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], source: str = "mask"):
        params = dict(model.named_parameters())
        unknown = [k for k in masks if k not in params]
        if unknown:
            raise UserError(f"{source}: names no parameter of the model: {', '.join(unknown[:4])}")
        shapes = [k for k, m in masks.items() if m.shape != params[k].shape]
        if shapes:
            raise UserError(f"{source}: shape differs from the model's for {', '.join(shapes[:4])}")
        self.names = sorted(masks)
        self.params = [params[k] for k in self.names]
        # In each parameter's own layout (channels_last on CUDA): foreach kernels take their
        # fast, fused path only when every pair of tensors has the same strides.
        self.masks = [torch.zeros_like(params[k]).copy_(masks[k]) for k in self.names]

    def apply_to_weights(self) -> None:
        with torch.no_grad():
            torch._foreach_mul_(self.params, self.masks)

    def apply_to_grads(self) -> None:
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            torch._foreach_mul_(grads, self.masks)

    def apply_to_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero per-parameter optimiser state (momentum) of masked weights, e.g. on rewind."""
        for param, mask in zip(self.params, self.masks):
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.mul_(mask)

    def density(self) -> float:
        kept = sum(int(m.sum()) for m in self.masks)
        return kept / max(sum(m.numel() for m in self.masks), 1)


def load_mask(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--mask: no mask file at {path}")
    from runs.checkpoint import read_checkpoint
    try:  # weights only; a refusal is one whole line naming the file and what it holds
        masks = read_checkpoint(path)
    except UserError as err:
        raise UserError(f"--mask: {err}") from None
    if not isinstance(masks, dict) or not all(torch.is_tensor(m) for m in masks.values()):
        raise UserError(f"--mask: {path} is not a dict of parameter name -> tensor")
    return {k: m.bool() for k, m in masks.items()}
