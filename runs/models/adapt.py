"""Any classifier as the toolkit sees one: an embedding and logits from one forward pass.

Registry models (and any module with `encoder`, `fc` and `embed_dim`) are used as they are.
For any other `nn.Module` the caller names the embedding:

    tapped = Tapped(net, "avgpool")               # the output of a layer, flattened: (B, D)
    tapped = Tapped(net, lambda m, x: m.features(x).flatten(1))  # embed(module, images)
    embedding, logits = tapped.both(x)            # one forward of `net` (a hook reads the layer)

A callable receives the network being evaluated (a copy at a point of a path, or the
original), never a closure over the caller's module, so it follows the parameters an
analysis moves.
"""

from collections.abc import Callable

import torch
from torch import nn

from runs.errors import UserError


def has_protocol(model: nn.Module) -> bool:
    """True for modules with `encoder` (images -> (B, D)), `fc` and `embed_dim`."""
    return all(hasattr(model, name) for name in ("encoder", "fc", "embed_dim"))


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def check_layer(model: nn.Module, layer: str, what: str = "embed") -> None:
    """UserError naming the module's layers when `layer` is not one of them."""
    names = layer_names(model)
    if layer not in names:
        listing = ", ".join(names) if names else "none (the module has no submodules)"
        raise UserError(f"{what}={layer!r}: {type(model).__name__} has no layer {layer!r}; "
                        f"its layers: {listing}")


class _Stop(Exception):
    """Raised by the embedding hook to skip the layers after it."""


class Tapped(nn.Module):
    """A classifier `net` whose embedding is read off layer `embed` or computed by
    `embed(net, images)`. forward(x) -> logits, as `net`."""

    def __init__(self, net: nn.Module, embed: str | Callable):
        super().__init__()
        if isinstance(embed, str):
            check_layer(net, embed)
        elif not callable(embed):
            raise UserError(f"embed: expected a layer name or a callable embed(model, images), "
                            f"got {type(embed).__name__}")
        self.net = net
        self.embed = embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (B, D), logits (B, K)) from one forward of `net` (two for a callable)."""
        if callable(self.embed):
            return self.embed(self.net, x).flatten(1), self.net(x)
        seen = []
        handle = self._layer().register_forward_hook(lambda m, i, out: seen.append(out))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return seen[-1].flatten(1), logits

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D): the layer's output, the layers after it skipped."""
        if callable(self.embed):
            return self.embed(self.net, x).flatten(1)
        seen = []

        def stop(module, inputs, out):
            seen.append(out)
            raise _Stop

        handle = self._layer().register_forward_hook(stop)
        try:
            self.net(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise UserError(f"embed={self.embed!r}: the layer never ran in "
                            f"{type(self.net).__name__}'s forward")
        return seen[-1].flatten(1)

    def _layer(self) -> nn.Module:
        return self.net.get_submodule(self.embed)


def encoder_of(model: nn.Module, embed=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> embeddings (B, D) of any model (see the module's doc).

    embed None: the model's own `encoder` (registry protocol); otherwise a layer name or a
    callable embed(model, images).
    """
    if embed is not None:
        return Tapped(model, embed).embedding
    if has_protocol(model):
        return model.encoder
    raise UserError(f"{type(model).__name__} has no `encoder`: name its embedding with "
                    f"embed='<layer>' (its layers: {', '.join(layer_names(model)) or 'none'}) "
                    f"or embed=callable(model, images)")
