"""Sparsity masks of lottery tickets: which parameters are prunable, counts, nesting, files.

A mask is a dict parameter name -> bool tensor of the parameter's shape (True = kept), in
the model's parameter order: the format `runs.engines.masking` applies during training
(`TrainConfig.mask`). Only prunable parameters have an entry; every other parameter stays
dense.

    names = prunable_names(model, scope="weights", keep_output_dense=False)
    mask = dense_mask(model, names)            # all True: level 0
    num_kept(mask), density(mask)              # 9,760 of 9,760 weights, 1.0
    save_mask(path, mask); read_mask(path)     # atomic torch.save; strict load
"""

from pathlib import Path

import torch
from torch import nn

from runs.checkpoint import save_file
from runs.engines.masking import load_mask
from runs.errors import unknown
from runs.store import atomic_write

Masks = dict[str, torch.Tensor]  # parameter name -> bool tensor, True = kept

# "weights": the weight tensors of conv and linear layers (Frankle & Carbin's choice; BN
# affine parameters and biases stay dense). "all": every parameter, as the paper's code did.
SCOPES = ("weights", "all")
PRUNABLE_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)

# Whether the output layer (fc) is prunable: "auto" = the per-model convention below, or
# forced. open_lth's default hyper-parameters ignore fc.weight when pruning its VGGs and its
# LeNet (models/cifar_vgg.py, mnist_lenet.py: pruning_layers_to_ignore='fc.weight') and
# prune the fc of its ResNets; the paper's code (every parameter) prunes it everywhere.
PRUNE_OUTPUT = ("auto", "yes", "no")
DENSE_OUTPUT_MODELS = ("vgg", "mlp")  # registry-name prefixes whose fc "auto" keeps dense


def output_layer(model: nn.Module) -> str:
    """Module name of the output layer: `fc` of a registry model, else the last Linear."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "fc"
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear output layer")
    return linears[-1]


def prunable_names(model: nn.Module, scope: str = "weights",
                   keep_output_dense: bool = False) -> list[str]:
    """Parameter names that magnitude pruning may remove, in `named_parameters` order."""
    if scope not in SCOPES:
        raise unknown("prune scope", scope, SCOPES)
    if scope == "all":
        names = [name for name, _ in model.named_parameters()]
    else:
        names = [f"{mod_name}.weight" if mod_name else "weight"
                 for mod_name, module in model.named_modules()
                 if isinstance(module, PRUNABLE_LAYERS) and module.weight is not None]
        # The canonical order is the parameters' (it fixes the flat index ties break by).
        order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        names = sorted(names, key=order.__getitem__)
    if keep_output_dense:
        head = output_layer(model) + "."
        names = [name for name in names if not name.startswith(head)]
    return names


def prunes_output(model_name: str, scope: str = "weights", choice: str = "auto") -> bool:
    """Whether `--prune-output choice` prunes the fc of `model_name` under `scope`.

    auto: under scope "all" (the paper's code) yes; under "weights" open_lth's per-model
    choice: dense for VGG and the MLP (LeNet's role), pruned for ResNets and the convnet."""
    if choice not in PRUNE_OUTPUT:
        raise unknown("--prune-output choice", choice, PRUNE_OUTPUT)
    if choice != "auto":
        return choice == "yes"
    return scope == "all" or not model_name.startswith(DENSE_OUTPUT_MODELS)


def dense_mask(model: nn.Module, names) -> Masks:
    """All-True masks for `names` (on the CPU): the unpruned network of level 0."""
    params = dict(model.named_parameters())
    return {name: torch.ones(params[name].shape, dtype=torch.bool) for name in names}


def num_kept(mask: Masks) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


def num_total(mask: Masks) -> int:
    return int(sum(m.numel() for m in mask.values()))


def density(mask: Masks) -> float:
    """Fraction of the prunable weights kept."""
    return num_kept(mask) / max(num_total(mask), 1)


def is_nested(inner: Masks, outer: Masks) -> bool:
    """Whether `inner` keeps a subset of what `outer` keeps (same names and shapes)."""
    if list(inner) != list(outer):
        return False
    return all(i.shape == o.shape and not (i.bool() & ~o.bool().to(i.device)).any()
               for i, o in zip(inner.values(), outer.values()))


def save_mask(path, mask: Masks) -> Path:
    """Write a mask as bool CPU tensors, atomically (readers never see half a file)."""
    cpu = {name: m.detach().bool().cpu() for name, m in mask.items()}
    atomic_write(Path(path), lambda tmp: save_file(cpu, tmp))  # a full disk: OSError
    return Path(path)


def read_mask(path) -> Masks:
    """Read a mask file (UserError naming the file if it is missing or not a mask)."""
    return load_mask(path)
