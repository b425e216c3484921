"""The Classifier wrapper, the registry and seeded construction."""

import torch
from torch import nn

from runs.errors import UserError
from runs.registry import Registry

MODELS = Registry("model")


class Classifier(nn.Module):
    """encoder (B, C, H, W) -> (B, embed_dim); fc (B, embed_dim) -> (B, num_classes)."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.embed_dim = embed_dim
        self.fc = nn.Linear(embed_dim, num_classes)
        self.spec: dict = {}  # registry name + constructor kwargs, filled by create_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def create_model(name: str, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 seed: int = 0, **kwargs) -> Classifier:
    """Build a registered model with weights drawn from `seed` (CPU RNG, global RNG untouched).

    The model lives on the CPU; move it with `.to(device)` (constructors never pick devices).
    """
    builder = MODELS.get(name)
    if num_classes < 1 or width <= 0 or in_channels < 1:
        raise UserError(f"model {name}: num_classes, width and in_channels must be positive "
                        f"(got {num_classes}, {width}, {in_channels})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(num_classes=num_classes, width=width, in_channels=in_channels, **kwargs)
    model.spec = dict(name=name, num_classes=num_classes, width=width,
                      in_channels=in_channels, seed=seed, **kwargs)
    return model


# Builders by spec["registry"]: checkpoints rebuild any stored module from its spec alone.
BUILDERS = {"model": create_model}


def build(spec: dict) -> nn.Module:
    """Rebuild a module from the spec that `create_model` (or another builder) recorded."""
    kwargs = dict(spec)
    builder = BUILDERS[kwargs.pop("registry", "model")]
    return builder(kwargs.pop("name"), **kwargs)


def model_spec(model: nn.Module) -> dict:
    """The registry name and kwargs that rebuild `model` (empty for foreign modules)."""
    return dict(getattr(model, "spec", {}))


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C) mean over space. A plain mean rather than adaptive pooling:
    it has a vmap batching rule (landscape points run under torch.func.vmap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier, at least 1."""
    return max(1, int(round(channels * width)))


def check_input_size(model: Classifier, channels: int, image_size: tuple[int, int]) -> None:
    """Fail before any training if the encoder cannot take (channels, H, W) images."""
    was_training = model.training
    probe = torch.zeros(2, channels, *image_size)
    try:
        model.eval()
        with torch.no_grad():
            out = model.encoder(probe.to(next(model.parameters()).device))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"model {model.spec.get('name', '?')} cannot take images of shape "
                        f"{(channels, *image_size)}: {first}") from None
    finally:
        model.train(was_training)
    if out.shape != (2, model.embed_dim):
        raise UserError(f"model {model.spec.get('name', '?')} gives embeddings of shape "
                        f"{tuple(out.shape[1:])} for images {(channels, *image_size)}, "
                        f"expected ({model.embed_dim},)")
