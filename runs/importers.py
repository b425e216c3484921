"""Weights from outside the toolkit: plain state dicts in torchvision's key layout.

`resnet18=weights.pt` loads a state dict whose keys are the encoder's own (`conv1.weight`,
`layer1.0.bn1.running_mean`, ...) plus optionally `fc.weight`/`fc.bias`, or this toolkit's
(`encoder.*`, `fc.*`). num_classes and in_channels are read off the tensors; a missing fc
is drawn fresh from the seed.

The network is the factory's default build (the paper's: VGG embeddings from the last
max-pool, ResNet20/56 with projection shortcuts) unless model_kwargs say otherwise; a
resnet20/56 file in the option-A layout (this toolkit's earlier nn.Sequential, no
`layer1.*` keys) is recognised by its keys and built with shortcut="A". A state dict cannot
record a VGG's pooling: an old average-pooled VGG file needs pool="avg" (from Python).
"""

from pathlib import Path

import torch

from runs.checkpoint import load_state_strict, read_checkpoint
from runs.errors import UserError
from runs.models import MODELS, create_model


def to_classifier_keys(state: dict) -> dict:
    """Prefix encoder keys with `encoder.` unless they already are ours; fc stays fc."""
    if any(k.startswith("encoder.") for k in state):
        return dict(state)
    return {(k if k.startswith("fc.") else f"encoder.{k}"): v for k, v in state.items()}


def import_state_dict(path: Path, arch: str, **model_kwargs):
    """A registered model `arch` carrying the weights of a plain state dict file."""
    MODELS.get(arch)  # unknown names fail here, listing the valid ones
    payload = read_checkpoint(path)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a plain state dict (name -> tensor)")
    state = to_classifier_keys(state)
    kwargs = dict(model_kwargs)
    if arch in ("resnet20", "resnet56") and not any(k.startswith("encoder.layer1.")
                                                    for k in state):
        kwargs.setdefault("shortcut", "A")  # the option-A nn.Sequential's keys
    if "fc.weight" in state:
        kwargs.setdefault("num_classes", state["fc.weight"].shape[0])
    first = next((v for v in state.values() if v.ndim == 4), None)  # the stem conv
    if first is not None:  # models without convs (mlp) keep the default in_channels
        kwargs.setdefault("in_channels", first.shape[1])
    model = create_model(arch, **kwargs)
    if "fc.weight" not in state:  # encoder-only file: keep the seeded fresh fc
        state.update({f"fc.{k}": v for k, v in model.fc.state_dict().items()})
    load_state_strict(model, state, str(path))
    return model, {"state_dict": state}
