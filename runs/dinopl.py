"""Checkpoints written by the paper's public code (GitHub safelix/dinopl, PyTorch Lightning).

    dinopl=RESULTS/DINO/ab12cd34/last.ckpt:student    the student encoder (default role)
    dinopl=RESULTS/DINO/ab12cd34/last.ckpt:teacher    the teacher encoder
    import_dinopl_head(path, "teacher")               the teacher's DINO head, as ours

Imported networks compute what they computed in the paper's code: the encoder and the head
they were TRAINED with (the VGG's max-pool embedding, the ResNets' projection shortcuts and
norm layers, the raw last head layer), so probes and landscapes of an imported run measure
the paper's networks. Their code has no license: this module was written from reading it,
nothing is copied. Files read (safelix/dinopl; commit, date):
    dinopl/core.py, dinopl/utils.py      85cc26123f07461cf51c74ffda0a847a157d3174  2022-12-03
    dinopl/modules/l2bottleneck.py       04338666595f209fddc6814330e210b32897ef44  2022-12-03
                                         f0fafe43f575a2635cf93ba87c45aacb0f531e76  2022-12-06
                                         9c88484b3cbf76e75d8d9254da9c3a1e1e92ac5a  2022-12-06
    dinopl/modules/linear.py, mlp.py     fe8f1b59a6236b9573631775af597b787430ebd4  2023-06-29
    models/vgg.py, resnet.py, vit.py, configuration.py, dinopl/core.py, l2bottleneck.py
                                         cd39e7801397d0d11004205e3847f67e660b93d4  2023-10-04

On-disk layout. A Lightning checkpoint (torch pickle): a dict with `state_dict`, `epoch`,
`global_step`, `pytorch-lightning_version`, `optimizer_states`, `loops`, `callbacks`, ...
Their LightningModule `DINO` holds two `DINOModel`s, `student` and `teacher`, each with `enc`
(the encoder, `fc` = Identity, so no classifier keys) and `head`; nothing else has weights:
    {role}.enc.conv1.weight, {role}.enc.layer1.0.bn1.running_mean, ...   ResNet (torchvision names)
    {role}.enc.features.{i}.weight / .bias                                VGG (conv, norm indices)
    {role}.enc.transformer.{k}.attention.qkv.weight, {role}.enc.cls_token, ...          ViT
    {role}.head.cent                                                      centering buffer
    {role}.head.mlp.layer{k}.lin.weight / .bias   (+ .bn.* with --mlp_bn) hidden Linear+GELU
    {role}.head.last_layer.lin1.weight / .bias                            L2 bottleneck Linear
    {role}.head.last_layer.lin2.weight                                    last layer (raw)
Earliest layout (85cc261): the bottleneck is `{role}.head.mlp.bottleneck.lin.*` and the last
layer `{role}.head.mlp.bottleneck.weightnorm.weight_g / weight_v` (torch weight norm, g filled
with 1 and frozen); `parametrizations.weight.original0/1` (newer torch) is read the same way.
`DINO` never calls `save_hyperparameters`: the run's configuration is the `config.json` that
dino.py writes into the checkpoint's directory (keys `enc`, `tiny_input`, `enc_norm_layer`,
`dataset`, `n_classes`, `hid_dims`, `l2bot_dim`, `l2bot_cfg`, `out_dim`, `mlp_bn`, `mlp_act`).
We read `hyper_parameters` when a checkpoint has them, else that `config.json`, else infer the
encoder from the keys (payload["config_source"] says which).

Encoders (strict: every key of the role's encoder is used, none is missing):
    resnet18/34/50 (CIFAR stem, --tiny_input): `enc.K` -> `encoder.K`, norm as configured
    resnet20/56: shortcut="projection" (their 1x1 conv + norm downsample), `enc.K` -> `encoder.K`
    vgg11..19, vgg11_bn..19_bn: pool="max" (their last 2x2 max-pool and flatten: a global max
        at 32x32 inputs); `enc.features.I.*` -> `encoder.J.*`, the I-th and J-th modules with
        weights taken in order (their norm "Identity" shifts their indices, ours has none)
    vit_tiny/small/base: impl="dinopl" (their one block applied 12 times), pool="cls", patch
        and image_size read off the tensors; `enc.transformer.K.*` (12 names of one shared
        block) -> `encoder.block.*`
Norm layers (--enc_norm_layer): BatchNorm -> norm="batch", LayerNorm (GroupNorm(1, C)) ->
"layer", GroupNorm8 -> "group", InstanceNorm (GroupNorm(C, C)) -> "instance", Identity ->
"none"; without a config, BatchNorm (running stats) and none are told apart by the keys, the
GroupNorm kinds are not (a UserError asks for the config.json).
Width and input channels are read off the tensors (their code has no width knob: 1.0).
Refused with a UserError: the ImageNet ResNet stem, vit_medium, convnet, mlp, flatten.
Their encoders have no classifier: we attach a fresh fc drawn from `seed`, sized by the
dataset (their metadata says 10 classes for CIFAR100 and 1000 for TinyImageNet; we use 100
and 200 and keep their number in the payload).

Head: see import_dinopl_head (last="raw" for the L2-bottleneck layout, "normed" for torch's
weight norm).

Reading runs no code from the file: weights-only torch.load plus lightning_globals(), the
classes a Lightning checkpoint legitimately pickles besides tensors and plain data (their
hyper_parameters' AttributeDict, argparse.Namespace, pathlib paths, numpy scalars, dtypes and
arrays, torch's TorchVersion), each rebuilt as inert data. Anything else (a custom callback's
class, an OmegaConf config, functools.partial) is refused naming it; `--trust-pickle FILE`
or the conversion in README ("Security") are the ways on.
"""

import argparse
import functools
import importlib
import json
import pathlib
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.torch_version

from runs.checkpoint import SHOW, load_state_strict, read_checkpoint
from runs.errors import UserError
from runs.models import Classifier, create_model
from runs.models.head import create_head

ROLES = ("student", "teacher")
RESNETS = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34",
           (3, 4, 6, 3, True): "resnet50", (3, 3, 3, 0, False): "resnet20",
           (9, 9, 9, 0, False): "resnet56"}  # blocks per stage (0: no layer4), bottleneck
VGGS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}  # conv layers -> name
VITS = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}  # dim -> name
SUPPORTED = (*RESNETS.values(), *VGGS.values(), *(f"{v}_bn" for v in VGGS.values()),
             *VITS.values())
REFUSED = {"vit_medium": "no vit_medium here (512-d, 8 heads)",
           **{n: "not one of the paper's encoders here" for n in ("convnet", "mlp", "flatten")}}
NORMS = {"BatchNorm": "batch", "LayerNorm": "layer", "GroupNorm8": "group",
         "InstanceNorm": "instance", "Identity": "none"}  # their --enc_norm_layer -> our norm
BASE_WIDTH = {"resnet": 64, "cifar_resnet": 16, "vgg": 64}  # stem channels at width 1
CLASSES = {"MNIST": 10, "CIFAR10": 10, "CIFAR100": 100, "STL10": 10, "TINYIMAGENET": 200}
LAST_CFG = "-/lb/fn/wn/l/-"  # their default L2-bottleneck config, the paper's head
# L2-bottleneck configs ours holds: bottleneck Linear with or without bias, feature norm
# (detached or not: the same forward), the last Linear without bias and nothing after it.
HEAD_CFGS = tuple(f"-/{lin}/{fn}/{wn}/l/-" for lin in ("lb", "l") for fn in ("fn", "fnd")
                  for wn in ("wn", "-"))


class AttributeDictStandIn:
    """Lightning's AttributeDict (their hyper_parameters: a dict with attribute access),
    unpickled as a plain dict: the weights-only reader fills plain dicts only."""

    def __new__(cls, *args):
        return {}


@functools.cache
def lightning_globals() -> tuple:
    """(stand-in, pickled name) pairs for torch.serialization.safe_globals: what a Lightning
    checkpoint holds besides tensors and plain data, each rebuilt as inert data (a pure path,
    a dict, a number), under the names old and new library versions pickle them with."""
    attribute_dicts = ("pytorch_lightning.utilities.parsing", "lightning.pytorch.utilities"
                       ".parsing", "lightning.fabric.utilities.data",
                       "lightning_fabric.utilities.data")
    paths = [(pure, f"{module}.{prefix}{kind}Path")
             for kind, pure in (("Posix", pathlib.PurePosixPath),
                                ("Windows", pathlib.PureWindowsPath))
             for module in ("pathlib", "pathlib._local") for prefix in ("", "Pure")]
    return (*[(AttributeDictStandIn, f"{m}.AttributeDict") for m in attribute_dicts],
            (argparse.Namespace, "argparse.Namespace"), *paths,
            (torch.torch_version.TorchVersion, "torch.torch_version.TorchVersion"),
            *numpy_globals())


def numpy_globals() -> list:
    """numpy scalars, dtypes and arrays under numpy 1's and 2's module names."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    out = [(getattr(multiarray, fn), f"{module}.{fn}") for fn in ("scalar", "_reconstruct")
           for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    dtypes = [getattr(np.dtypes, n) for n in getattr(getattr(np, "dtypes", None), "__all__", ())]
    return [*out, (np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray"),
            *[(cls, f"numpy.dtypes.{cls.__name__}") for cls in dtypes]]


def listing(keys) -> str:
    """At most SHOW key names, then "(+N more)"."""
    keys = list(keys)
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def read_lightning(path) -> dict:
    """The checkpoint dict, or a UserError naming the file if it is not a Lightning one."""
    ckpt = read_checkpoint(path, allow=lightning_globals())
    is_lightning = isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and (
        "pytorch-lightning_version" in ckpt or "global_step" in ckpt)
    if not is_lightning:
        raise UserError(f"{path} is not a PyTorch Lightning checkpoint (no state_dict and "
                        f"pytorch-lightning_version); dinopl=FILE expects one written by "
                        f"safelix/dinopl")
    roles = [r for r in ROLES if any(k.startswith(f"{r}.enc.") for k in ckpt["state_dict"])]
    if not roles:
        raise UserError(f"{path} is a Lightning checkpoint but not a dinopl one: no keys "
                        f"under student.enc. or teacher.enc.")
    return ckpt


def choose_role(parts: tuple[str, ...], path) -> str:
    roles = [p for p in parts if p in ROLES]
    if len(roles) > 1:
        raise UserError(f"dinopl={path}: name one of :student or :teacher, not both")
    return roles[0] if roles else "student"


def sub_state(state: dict, prefix: str) -> dict:
    """Keys under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def run_config(ckpt: dict, path) -> tuple[dict, str]:
    """Their configuration and where it came from: hyper_parameters, config.json or neither.

    Either counts only if it names the encoder (`enc`): a config.json of another tool that
    happens to lie beside the file is ignored.
    """
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, argparse.Namespace):
        hparams = vars(hparams)
    if isinstance(hparams, dict) and "enc" in hparams:
        return dict(hparams), "hyper_parameters"
    beside = Path(path).with_name("config.json")
    if beside.is_file():
        try:
            config = json.loads(beside.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {beside} (the config of {path}): {err}") from None
        if isinstance(config, dict) and "enc" in config:
            return config, str(beside)
    return {}, "inferred from state_dict keys"


# ---- the encoder -----------------------------------------------------------------------------

def family(name: str) -> str:
    """resnet (18/34/50), cifar_resnet (20/56), vgg (with or without _bn) or vit."""
    if name in ("resnet20", "resnet56"):
        return "cifar_resnet"
    return next(f for f in ("resnet", "vgg", "vit") if name.startswith(f))


def infer_encoder(enc: dict) -> str | None:
    """The registry name the encoder's keys describe (None when nothing we know)."""
    if "conv1.weight" in enc and "layer1.0.conv1.weight" in enc:
        stages = [{k.split(".")[1] for k in enc if k.startswith(f"layer{i}.")}
                  for i in range(1, 5)]
        bottleneck = any(".conv3." in k for k in enc)
        return RESNETS.get((*map(len, stages), bottleneck))
    if "cls_token" in enc and "embedder.proj.weight" in enc:
        return VITS.get(enc["embedder.proj.weight"].shape[0])
    convs = [k for k, v in enc.items() if re.fullmatch(r"features\.\d+\.weight", k)
             and v.ndim == 4]
    if convs:
        name = VGGS.get(len(convs))
        bn = any(k.endswith("running_mean") for k in enc)
        return f"{name}_bn" if name and bn else name
    return None


def infer_norm(enc: dict, name: str) -> str | None:
    """The norm layer the keys show: batch (running stats), none (no norm weights) or None
    (affine weights without running stats: a GroupNorm kind the keys cannot name)."""
    if any(k.endswith("running_mean") for k in enc):
        return "batch"
    if family(name) == "vgg":
        affine = [k for k, v in enc.items() if k.startswith("features.") and v.ndim == 1
                  and k.endswith(".weight")]
        return None if affine else "none"
    return None if "bn1.weight" in enc else "none"


def encoder_arch(config: dict, enc: dict, path) -> tuple[str, dict]:
    """(our registry name, factory options) of their encoder; a UserError otherwise."""
    name = config.get("enc") or infer_encoder(enc)
    if name not in SUPPORTED:
        what = repr(name) if name else "of unknown layout"
        why = f" ({REFUSED[name]})" if name in REFUSED else ""
        raise UserError(f"{path}: encoder {what} cannot be imported{why}; supported: "
                        f"{', '.join(SUPPORTED)}")
    kind = family(name)
    stem = enc.get("conv1.weight")
    if kind == "resnet" and stem is not None and stem.shape[-1] != 3:
        raise UserError(f"{path}: {name} has the ImageNet stem ({stem.shape[-1]}x"
                        f"{stem.shape[-1]} conv + max-pool); only the CIFAR stem "
                        f"(--tiny_input) is supported")
    if kind == "vit":
        return name, vit_options(enc, path)
    norm = encoder_norm(config, enc, name, path)
    options = {"pool": "max"} if kind == "vgg" else {}
    if kind == "cifar_resnet":
        options["shortcut"] = "projection"
    if not name.endswith("_bn"):
        options["norm"] = norm
    elif norm != "batch":
        raise UserError(f"{path}: {name} has BatchNorm, but its keys show norm {norm!r}")
    return name, options


def encoder_norm(config: dict, enc: dict, name: str, path) -> str:
    """Our `norm` for their --enc_norm_layer (or the one the keys show)."""
    theirs = config.get("enc_norm_layer")
    if theirs is not None:
        if theirs not in NORMS:
            raise UserError(f"{path}: encoder norm layer {theirs!r} is not supported; "
                            f"valid: {', '.join(NORMS)}")
        return NORMS[theirs]
    if config.get("enc"):  # their default: BatchNorm in ResNets, none in VGGs (but vgg*_bn)
        return "none" if family(name) == "vgg" and not name.endswith("_bn") else "batch"
    norm = infer_norm(enc, name)
    if norm is None:
        raise UserError(f"{path}: the encoder has norm weights without running statistics "
                        f"(LayerNorm, GroupNorm8 or InstanceNorm: the keys cannot tell); put "
                        f"the run's config.json (enc_norm_layer) beside the checkpoint")
    return norm


def vit_options(enc: dict, path) -> dict:
    """Patch size and image size of their ViT, read off the patch conv and position table."""
    patch = enc["embedder.proj.weight"].shape[-1]
    tokens = enc["pos_embed"].shape[1] - 1  # (1, 1 + patches, dim)
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise UserError(f"{path}: ViT with {tokens} patches is not square; not supported")
    return {"patch": patch, "image_size": side * patch, "pool": "cls", "impl": "dinopl"}


def model_size(name: str, enc: dict) -> dict:
    """width and in_channels of our model, read off their first layer."""
    kind = family(name)
    if kind == "vit":
        proj = enc["embedder.proj.weight"]  # (dim, C, patch, patch)
        dim = proj.shape[0]
        return {"width": dim / {v: k for k, v in VITS.items()}[name],
                "in_channels": proj.shape[1]}
    first = enc["conv1.weight" if "resnet" in kind else first_conv(enc)]  # (C_out, C_in, k, k)
    return {"width": first.shape[0] / BASE_WIDTH[kind], "in_channels": first.shape[1]}


def first_conv(enc: dict) -> str:
    index = min(int(k.split(".")[1]) for k in enc if re.fullmatch(r"features\.\d+\.weight", k))
    return f"features.{index}.weight"


_VIT_BLOCK = re.compile(r"^transformer\.\d+\.")


def key_map(name: str, enc: dict, own: dict) -> dict:
    """Their encoder key -> our Classifier key (`own`: our model's state), by family."""
    kind = family(name)
    if kind in ("resnet", "cifar_resnet"):
        return {k: k if k.startswith("fc.") else f"encoder.{k}" for k in enc}
    if kind == "vit":  # their 12 names of one shared block -> our one block
        return {k: "encoder." + _VIT_BLOCK.sub("block.", k) for k in enc}
    theirs = sorted({int(m[1]) for k in enc if (m := re.match(r"features\.(\d+)\.", k))})
    ours = sorted({int(m[1]) for k in own if (m := re.match(r"encoder\.(\d+)\.", k))})
    index = dict(zip(theirs, ours))  # the k-th module with state of each, in order
    out = {}
    for key in enc:
        match = re.fullmatch(r"features\.(\d+)\.(\w+)", key)
        if key.startswith("fc."):
            out[key] = key
        elif match and int(match[1]) in index:
            out[key] = f"encoder.{index[int(match[1])]}.{match[2]}"
    return out


def map_encoder(name: str, enc: dict, own: dict, role: str, path) -> dict:
    """Their encoder state under our keys (`own`: the model's state); every key must fit."""
    keys = key_map(name, enc, own)
    mapped, homeless = {}, []
    for key, value in enc.items():
        ours = keys.get(key)
        if ours not in own:
            homeless.append(f"{role}.enc.{key}")
        elif ours in mapped and not torch.equal(mapped[ours], value):
            raise UserError(f"{path}: {role}.enc.{key} differs from the other copies of the "
                            f"ViT block their code shares across depths")
        else:
            mapped[ours] = value
    if homeless:
        raise UserError(f"{path}: {role} encoder keys with no place in our {name}: "
                        f"{listing(homeless)}")
    theirs_of = {v: k for k, v in keys.items()}
    missing = [f"{role}.enc.{theirs_of.get(k, k.removeprefix('encoder.'))}" for k in own
               if k.startswith("encoder.") and k not in mapped]
    if missing:
        raise UserError(f"{path}: {role} encoder lacks keys of {name}: {listing(missing)}")
    return mapped


def check_depth(model: Classifier, enc: dict, name: str, path) -> None:
    """Their ViT's depth (names of its shared block) must be ours: 12."""
    if family(name) != "vit":
        return
    depth = len({k.split(".")[1] for k in enc if _VIT_BLOCK.match(k)})
    if depth != model.encoder.depth:
        raise UserError(f"{path}: ViT with {depth} transformer layers; our {name} has "
                        f"{model.encoder.depth}")


def check_groups(model: Classifier, options: dict, path) -> None:
    """Their GroupNorm8 is GroupNorm(C // 8, C): ours must have the same groups."""
    if options.get("norm") != "group":
        return
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.GroupNorm) and \
                module.num_groups != module.num_channels // 8:
            raise UserError(f"{path}: GroupNorm8 over {module.num_channels} channels has "
                            f"{module.num_channels // 8} groups in their code, ours "
                            f"{module.num_groups}; not representable")


def num_classes(config: dict, enc: dict) -> int:
    """Classes for the fc: their fc if any, else the dataset's true count, else theirs, else 10."""
    if "fc.weight" in enc:
        return enc["fc.weight"].shape[0]
    dataset = str(config.get("dataset", "")).upper()
    return CLASSES.get(dataset) or config.get("n_classes") or config.get("ds_classes") or 10


def import_dinopl(path, parts: tuple[str, ...] = (), seed: int = 0) -> tuple[Classifier, dict]:
    """Our Classifier carrying the student's (or `:teacher`'s) encoder, and a payload.

    The network is the one their code trained (see the module doc: max-pool VGG, projection
    shortcuts, their norm layers). The fc is drawn fresh from `seed` (their encoders have
    none). Weights load strictly: a missing, extra or mis-shaped key is a UserError naming
    the file and their key names.
    """
    ckpt = read_lightning(path)
    role = choose_role(tuple(parts), path)
    enc = sub_state(ckpt["state_dict"], f"{role}.enc.")
    if not enc:
        raise UserError(f"{path} holds no {role} encoder (no keys under {role}.enc.)")
    config, source = run_config(ckpt, path)
    name, options = encoder_arch(config, enc, path)
    model = create_model(name, num_classes=num_classes(config, enc), seed=seed,
                         **model_size(name, enc), **options)
    check_groups(model, options, path)
    check_depth(model, enc, name, path)
    state = map_encoder(name, enc, model.state_dict(), role, path)
    fresh_fc = "fc.weight" not in state
    if fresh_fc:
        state.update({f"fc.{k}": v for k, v in model.fc.state_dict().items()})
    load_state_strict(model, state, f"{path} ({role} encoder)")
    payload = {"source": "dinopl", "role": role, "arch": name, "options": options,
               "config": config, "config_source": source, "epoch": ckpt.get("epoch"),
               "global_step": ckpt.get("global_step"),
               "lightning_version": ckpt.get("pytorch-lightning_version"),
               "fresh_fc": fresh_fc, "num_classes": model.fc.out_features,
               "their_num_classes": config.get("n_classes"),
               "cent": ckpt["state_dict"].get(f"{role}.head.cent")}
    return model, payload


# ---- the DINO head ---------------------------------------------------------------------------

_HIDDEN = re.compile(r"mlp\.layer(\d+)\.(lin|bn)\.(\w+)")
# (bottleneck Linear, last layer, `last` of ours) inside `{role}.head.`, newest first
_BOTTLENECKS = (("last_layer.lin1.", "last_layer.lin2.", "raw"),
                ("mlp.bottleneck.lin.", "mlp.bottleneck.weightnorm.", "normed"))
_WEIGHT_NORM = (("weight_g", "weight_v"),
                ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def check_head_config(config: dict, path) -> None:
    if config.get("mlp_bn"):
        raise UserError(f"{path}: head with BatchNorm (--mlp_bn) is not supported; ours has none")
    if str(config.get("mlp_act", "GELU")).lower() != "gelu":
        raise UserError(f"{path}: head activation {config['mlp_act']!r} is not supported; "
                        f"ours is GELU")
    cfg = config.get("l2bot_cfg", LAST_CFG)
    if cfg not in HEAD_CFGS:
        raise UserError(f"{path}: L2-bottleneck config {cfg!r} is not supported; "
                        f"valid: {', '.join(HEAD_CFGS)}")


def hidden_layers(head: dict, used: set, path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of the MLP's hidden Linear layers, in order."""
    layers: dict[int, dict] = {}
    for key, value in head.items():
        match = _HIDDEN.fullmatch(key)
        if not match:
            continue
        if match[2] == "bn":
            raise UserError(f"{path}: head has BatchNorm ({key}); ours has none")
        layers.setdefault(int(match[1]), {})[match[3]] = value
        used.add(key)
    if sorted(layers) != [0, 1] or any(set(v) != {"weight", "bias"} for v in layers.values()):
        raise UserError(f"{path}: head MLP must have 2 hidden Linear layers with bias "
                        f"(ours does); found layers {sorted(layers)}")
    return [(layers[i]["weight"], layers[i]["bias"]) for i in (0, 1)]


def last_weight(head: dict, prefix: str, used: set, path) -> torch.Tensor:
    """The last layer's stored weight (see import_dinopl_head)."""
    if prefix + "bias" in head:
        raise UserError(f"{path}: last head layer has a bias ({prefix}bias); ours has none")
    if prefix + "weight" in head:
        used.add(prefix + "weight")
        return head[prefix + "weight"]
    for g_key, v_key in _WEIGHT_NORM:
        if prefix + g_key in head and prefix + v_key in head:
            used.update({prefix + g_key, prefix + v_key})
            gain, direction = head[prefix + g_key], head[prefix + v_key]  # (out, 1), (out, in)
            if not torch.allclose(gain.abs(), torch.ones_like(gain)):
                warnings.warn(f"{path}: weight-norm gains differ from 1; the imported head "
                              f"keeps each row's direction, not its length", stacklevel=3)
            return gain * direction / direction.norm(dim=1, keepdim=True)
    raise UserError(f"{path}: no last head layer weight under {prefix}")


def head_state(head: dict, path) -> tuple[dict, str]:
    """(their head under our DINOHead keys, the `last` their forward used); every key but
    `cent` must be used."""
    used = {"cent"}
    (w0, b0), (w1, b1) = hidden_layers(head, used, path)
    found = [entry for entry in _BOTTLENECKS if entry[0] + "weight" in head]
    if not found:
        raise UserError(f"{path}: head has no L2 bottleneck (last_layer.lin1 or "
                        f"mlp.bottleneck.lin); a last Linear with bias (l2bot_dim 0) is not "
                        f"supported")
    lin, last, kind = found[0]
    w2 = head[lin + "weight"]
    b2 = head.get(lin + "bias", torch.zeros(w2.shape[0], dtype=w2.dtype))  # cfg "l": no bias
    used.update({lin + "weight", lin + "bias"})
    state = {"mlp.0.weight": w0, "mlp.0.bias": b0, "mlp.2.weight": w1, "mlp.2.bias": b1,
             "mlp.4.weight": w2, "mlp.4.bias": b2,
             "last.weight": last_weight(head, last, used, path)}
    extra = sorted(set(head) - used)
    if extra:
        raise UserError(f"{path}: head keys with no place in our DINO head: {listing(extra)}")
    return state, kind


def import_dinopl_head(path, role: str = "student", seed: int = 0, last: str = None):
    """Their `role`'s DINO head as ours, computing what their forward computed.

    mlp.layer0.lin -> mlp.0, mlp.layer1.lin -> mlp.2, bottleneck Linear -> mlp.4: bit-equal.
    Last layer:
    - `last_layer.lin2.weight` (the L2Bottleneck layout, every checkpoint since 2022-12-06):
      their Linear computes the row-normalised weight and then multiplies by the RAW one
      (9c88484, fe8f1b59: `F.linear(input, self.weight, ...)`), so the head is imported with
      last="raw", the weight bit-equal: output = normalize(bottleneck) @ lin2.weight.T.
      Exception: the same layout written between 04338666 and 9c88484 (2022-12-03 to 06)
      used the normalised weight; pass last="normed" for such a file (the keys cannot tell).
    - `weight_g`/`weight_v` (85cc261, torch's weight norm: its forward hook computes
      g * v / ||v|| and the Linear multiplies by it; g filled with 1 and frozen) or
      `parametrizations.weight.original0/1`: last="normed", the stored weight g * v / ||v||
      (unit rows at g = 1); other gains warn (the rows' directions are kept).
    Not carried: their centering buffer `cent` and temperatures (apply them outside; `cent`
    is in import_dinopl's payload).
    """
    if role not in ROLES:
        raise UserError(f"unknown dinopl role {role!r}; valid: {', '.join(ROLES)}")
    ckpt = read_lightning(path)
    head = sub_state(ckpt["state_dict"], f"{role}.head.")
    if not head:
        raise UserError(f"{path} holds no {role} head (no keys under {role}.head.)")
    config, _ = run_config(ckpt, path)
    check_head_config(config, path)
    state, kind = head_state(head, path)
    hidden, embed = state["mlp.0.weight"].shape  # (hidden, embed_dim)
    if state["mlp.2.weight"].shape != (hidden, hidden):
        raise UserError(f"{path}: hidden layers of unequal width "
                        f"{tuple(state['mlp.2.weight'].shape)}; ours are square")
    module = create_head(in_dim=embed, out_dim=state["last.weight"].shape[0], hidden_dim=hidden,
                         bottleneck_dim=state["mlp.4.weight"].shape[0], seed=seed,
                         last=last or kind)
    return load_state_strict(module, state, f"{path} ({role} head)")
