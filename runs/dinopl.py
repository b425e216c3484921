"""Checkpoints written by the paper's public code (GitHub safelix/dinopl, PyTorch Lightning).

    dinopl=RESULTS/DINO/ab12cd34/last.ckpt:student    the student encoder (default role)
    dinopl=RESULTS/DINO/ab12cd34/last.ckpt:teacher    the teacher encoder
    import_dinopl_head(path, "teacher")               the teacher's DINO head, as ours

Their code has no license: this module was written from reading it, nothing is copied.
Files read (safelix/dinopl, commit ids as the code index stores them):
    dinopl/core.py              d56e80a19936c1630cec1bdba55a9beca51014ff
    dinopl/modules/l2bottleneck.py  e8c392bd13c8684e8ff0ef5631bdaf9c32f7dd3f
    both also at an older commit  04338666595f209fddc6814330e210b32897ef44
    dinopl/modules/linear.py, mlp.py  fe8f1b59a6236b9573631775af597b787430ebd4
    models/resnet.py, models/vgg.py   b0b55278f6695d512914dc27554c9b369f96da10
    configuration.py            2fbaf2310505b778cfba121877dc4ef66822b590
    dino.py                     d504ed5b732d58341c170533466a761c277c3a48
plus an earlier, unpinned revision of dinopl/core.py whose head ends in `mlp.bottleneck`.

On-disk layout. A Lightning checkpoint (torch pickle): a dict with `state_dict`, `epoch`,
`global_step`, `pytorch-lightning_version`, `optimizer_states`, `loops`, `callbacks`, ...
Their LightningModule `DINO` holds two `DINOModel`s, `student` and `teacher`, each with `enc`
(the encoder, `fc` = Identity, so no classifier keys) and `head`; nothing else has weights:
    {role}.enc.conv1.weight, {role}.enc.layer1.0.bn1.running_mean, ...   ResNet (torchvision names)
    {role}.enc.features.{i}.weight / .bias                                VGG (conv indices)
    {role}.head.cent                                                      centering buffer
    {role}.head.mlp.layer{k}.lin.weight / .bias   (+ .bn.* with --mlp_bn) hidden Linear+GELU
    {role}.head.last_layer.lin1.weight / .bias                            L2 bottleneck Linear
    {role}.head.last_layer.lin2.weight                                    "weight-normalised" out
Earlier revision: the bottleneck is `{role}.head.mlp.bottleneck.lin.*` and the last layer
`{role}.head.mlp.bottleneck.weightnorm.weight_g / weight_v` (torch weight norm, g filled with 1
and frozen); `parametrizations.weight.original0/1` (newer torch) is read the same way.
`DINO` never calls `save_hyperparameters`: the run's configuration is the `config.json` that
dino.py writes into the checkpoint's directory (keys `enc`, `tiny_input`, `enc_norm_layer`,
`dataset`, `n_classes`, `hid_dims`, `l2bot_dim`, `l2bot_cfg`, `out_dim`, `mlp_bn`, `mlp_act`).
We read `hyper_parameters` when a checkpoint has them, else that `config.json`, else infer the
encoder from the keys (payload["config_source"] says which).

Encoder mapping (strict: every key of the role's encoder is used, none is missing):
    resnet18/34/50 with the CIFAR stem (--tiny_input): `{role}.enc.K` -> `encoder.K`
    vgg11/13/16/19 without BN: `{role}.enc.features.I.P` -> `encoder.I.P` (same indices: ours
        drops only the last max-pool, which has no weights, and adds global average pooling)
Width and input channels are read off the tensors (their code has no width knob: 1.0).
Not representable here, so refused with a UserError: their resnet20/56 (1x1-conv projection
shortcuts; ours are parameter-free), vgg*_bn, the ImageNet ResNet stem, other norm layers,
ViTs, convnet, mlp, flatten.
Behaviour that differs by design: their VGG ends in a max-pool and a flatten (the last 2x2 map
max-pooled to 1x1 at 32x32 inputs, so 512-d only there); ours averages globally, so VGG
embeddings differ from theirs although every weight is bit-equal. Their encoders have no
classifier: we attach a fresh fc drawn from `seed`, sized by the dataset (their metadata says
10 classes for CIFAR100 and 1000 for TinyImageNet; we use 100 and 200 and keep their number
in the payload).
"""

import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from runs.checkpoint import SHOW, load_state_strict, read_checkpoint
from runs.errors import UserError
from runs.models import Classifier, create_model
from runs.models.head import DINOHead, create_head

ROLES = ("student", "teacher")
RESNETS = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34",
           (3, 4, 6, 3, True): "resnet50"}  # blocks per stage, bottleneck blocks -> name
VGGS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}  # conv layers -> name
SUPPORTED = (*RESNETS.values(), *VGGS.values())
REFUSED = {  # their encoders whose layout ours cannot hold, with the reason
    **{n: "their CIFAR ResNets have 1x1-conv projection shortcuts, ours parameter-free ones"
       for n in ("resnet20", "resnet56")},
    **{f"vgg{d}_bn": "our VGGs have no BatchNorm" for d in (11, 13, 16, 19)},
}
CLASSES = {"MNIST": 10, "CIFAR10": 10, "CIFAR100": 100, "STL10": 10, "TINYIMAGENET": 200}
LAST_CFG = "-/lb/fn/wn/l/-"  # their default L2-bottleneck config, the paper's head
HEAD_CFGS = (LAST_CFG, "-/l/fn/wn/l/-", "-/lb/fnd/wn/l/-", "-/l/fnd/wn/l/-")  # ours can hold


def listing(keys) -> str:
    """At most SHOW key names, then "(+N more)"."""
    keys = list(keys)
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def read_lightning(path) -> dict:
    """The checkpoint dict, or a UserError naming the file if it is not a Lightning one."""
    ckpt = read_checkpoint(path, trusted=True)
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


def infer_encoder(enc: dict) -> str | None:
    """The registry name the encoder's keys describe (None when nothing we know)."""
    if "conv1.weight" in enc and "layer1.0.conv1.weight" in enc:
        stages = [{k.split(".")[1] for k in enc if k.startswith(f"layer{i}.")}
                  for i in range(1, 5)]
        bottleneck = any(".conv3." in k for k in enc)
        return RESNETS.get((*map(len, stages), bottleneck))
    convs = [k for k, v in enc.items() if re.fullmatch(r"features\.\d+\.weight", k)
             and v.ndim == 4]
    if convs and not any(k.endswith("running_mean") for k in enc):
        return VGGS.get(len(convs))
    return None


def encoder_arch(config: dict, enc: dict, path) -> str:
    """Our registry name for their encoder; a UserError lists what we support otherwise."""
    name = config.get("enc") or infer_encoder(enc)
    supported = ", ".join(SUPPORTED)
    if name not in SUPPORTED:
        what = repr(name) if name else "of unknown layout"
        why = f" ({REFUSED[name]})" if name in REFUSED else ""
        raise UserError(f"{path}: encoder {what} cannot be imported{why}; supported: "
                        f"{supported} (ResNets with the CIFAR stem, VGGs without BN)")
    if config.get("enc_norm_layer") not in (None, "BatchNorm"):
        raise UserError(f"{path}: encoder norm layer {config['enc_norm_layer']!r} is not "
                        f"supported; our {name} uses {'BatchNorm' if 'resnet' in name else 'none'}")
    stem = enc.get("conv1.weight")
    if name.startswith("resnet") and stem is not None and stem.shape[-1] != 3:
        raise UserError(f"{path}: {name} has the ImageNet stem ({stem.shape[-1]}x"
                        f"{stem.shape[-1]} conv + max-pool); only the CIFAR stem "
                        f"(--tiny_input) is supported")
    return name


def to_ours(arch: str, key: str) -> str | None:
    """Our Classifier key for one of their encoder keys (None: no place for it)."""
    if key.startswith("fc."):
        return key
    if arch.startswith("resnet"):
        return f"encoder.{key}"
    match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
    return f"encoder.{match[1]}.{match[2]}" if match else None


def to_theirs(arch: str, key: str, role: str) -> str:
    """Their state_dict key for one of our encoder keys (for error messages)."""
    inner = key[len("encoder."):]
    return f"{role}.enc.{inner}" if arch.startswith("resnet") else f"{role}.enc.features.{inner}"


def num_classes(config: dict, enc: dict) -> int:
    """Classes for the fc: their fc if any, else the dataset's true count, else theirs, else 10."""
    if "fc.weight" in enc:
        return enc["fc.weight"].shape[0]
    dataset = str(config.get("dataset", "")).upper()
    return CLASSES.get(dataset) or config.get("n_classes") or config.get("ds_classes") or 10


def map_encoder(arch: str, enc: dict, own: dict, role: str, path) -> dict:
    """Their encoder state under our keys (`own`: the model's state); every key must fit."""
    mapped, homeless = {}, []
    for key, value in enc.items():
        ours = to_ours(arch, key)
        if ours in own:
            mapped[ours] = value
        else:
            homeless.append(f"{role}.enc.{key}")
    if homeless:
        raise UserError(f"{path}: {role} encoder keys with no place in our {arch}: "
                        f"{listing(homeless)}")
    missing = [to_theirs(arch, k, role) for k in own if k.startswith("encoder.")
               and k not in mapped]
    if missing:
        raise UserError(f"{path}: {role} encoder lacks keys of {arch}: {listing(missing)}")
    return mapped


def import_dinopl(path, parts: tuple[str, ...] = (), seed: int = 0) -> tuple[Classifier, dict]:
    """Our Classifier carrying the student's (or `:teacher`'s) encoder, and a payload.

    The fc is drawn fresh from `seed` (their encoders have none). Weights load strictly: a
    missing, extra or mis-shaped key is a UserError naming the file and their key names.
    """
    ckpt = read_lightning(path)
    role = choose_role(tuple(parts), path)
    enc = sub_state(ckpt["state_dict"], f"{role}.enc.")
    if not enc:
        raise UserError(f"{path} holds no {role} encoder (no keys under {role}.enc.)")
    config, source = run_config(ckpt, path)
    arch = encoder_arch(config, enc, path)
    width_key = "conv1.weight" if arch.startswith("resnet") else "features.0.weight"
    if width_key not in enc:
        raise UserError(f"{path}: {role} encoder lacks {role}.enc.{width_key} ({arch})")
    first = enc[width_key]  # (C_out, C_in, k, k): width = C_out / 64 for every family here
    model = create_model(arch, num_classes=num_classes(config, enc), width=first.shape[0] / 64,
                         in_channels=first.shape[1], seed=seed)
    state = map_encoder(arch, enc, model.state_dict(), role, path)
    fresh_fc = "fc.weight" not in state
    if fresh_fc:
        state.update({f"fc.{k}": v for k, v in model.fc.state_dict().items()})
    load_state_strict(model, state, f"{path} ({role} encoder)")
    payload = {"source": "dinopl", "role": role, "arch": arch, "config": config,
               "config_source": source, "epoch": ckpt.get("epoch"),
               "global_step": ckpt.get("global_step"),
               "lightning_version": ckpt.get("pytorch-lightning_version"),
               "fresh_fc": fresh_fc, "num_classes": model.fc.out_features,
               "their_num_classes": config.get("n_classes"),
               "cent": ckpt["state_dict"].get(f"{role}.head.cent")}
    return model, payload


# ---- the DINO head ---------------------------------------------------------------------------

_HIDDEN = re.compile(r"mlp\.layer(\d+)\.(lin|bn)\.(\w+)")
# (bottleneck Linear, last layer) module prefixes inside `{role}.head.`, newest first
_BOTTLENECKS = (("last_layer.lin1.", "last_layer.lin2."),
                ("mlp.bottleneck.lin.", "mlp.bottleneck.weightnorm."))
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
    """The last layer's weight as their forward used it (see import_dinopl_head)."""
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


def head_state(head: dict, path) -> dict:
    """Their head tensors under our DINOHead keys; every key but `cent` must be used."""
    used = {"cent"}
    (w0, b0), (w1, b1) = hidden_layers(head, used, path)
    found = [pair for pair in _BOTTLENECKS if pair[0] + "weight" in head]
    if not found:
        raise UserError(f"{path}: head has no L2 bottleneck (last_layer.lin1 or "
                        f"mlp.bottleneck.lin); a plain last Linear is not supported")
    lin, last = found[0]
    w2 = head[lin + "weight"]
    b2 = head.get(lin + "bias", torch.zeros(w2.shape[0], dtype=w2.dtype))  # cfg "l": no bias
    used.update({lin + "weight", lin + "bias"})
    state = {"mlp.0.weight": w0, "mlp.0.bias": b0, "mlp.2.weight": w1, "mlp.2.bias": b1,
             "mlp.4.weight": w2, "mlp.4.bias": b2,
             "last.weight": last_weight(head, last, used, path)}
    extra = sorted(set(head) - used)
    if extra:
        raise UserError(f"{path}: head keys with no place in our DINO head: {listing(extra)}")
    return state


def import_dinopl_head(path, role: str = "student", seed: int = 0) -> DINOHead:
    """Their `role`'s DINO head as our DINOHead (MLP, L2 bottleneck, normalised last layer).

    mlp.layer0.lin -> mlp.0, mlp.layer1.lin -> mlp.2, bottleneck Linear -> mlp.4: bit-equal.
    Last layer, what is preserved:
    - `last_layer.lin2.weight` (L2Bottleneck era) is stored bit-equal in `last.weight`. Their
      custom Linear (dinopl/modules/linear.py, fe8f1b59) computed the row-normalised weight
      and then multiplied by the raw one, so their output i is ours times ||w_i||: every row's
      direction and everything before the last layer match; row lengths are not applied by
      ours (in the older 04338666 L2Bottleneck, which used the normalised weight, outputs
      match exactly).
    - `weight_g`/`weight_v` (or `parametrizations.weight.original0/1`): stored as their
      effective weight g * v / ||v|| (rows); our normalisation then gives sign(g) v / ||v||,
      equal to theirs wherever |g| = 1, which their code fixed (filled with 1, frozen); other
      gains warn.
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
    state = head_state(head, path)
    hidden, embed = state["mlp.0.weight"].shape  # (hidden, embed_dim)
    if state["mlp.2.weight"].shape != (hidden, hidden):
        raise UserError(f"{path}: hidden layers of unequal width "
                        f"{tuple(state['mlp.2.weight'].shape)}; ours are square")
    module = create_head(in_dim=embed, out_dim=state["last.weight"].shape[0], hidden_dim=hidden,
                         bottleneck_dim=state["mlp.4.weight"].shape[0], seed=seed)
    return load_state_strict(module, state, f"{path} ({role} head)")


def head_forward_theirs(head: DINOHead, embedding: torch.Tensor) -> torch.Tensor:
    """Their (fe8f1b59-era) projections from our imported head: the raw last weight, unnormalised.

    For comparisons with logged numbers of the public code; `head(embedding)` is the fixed one.
    """
    z = nn.functional.normalize(head.mlp(embedding), dim=-1)  # (B, bottleneck), unit norm
    return nn.functional.linear(z, head.last.weight)  # (B, out_dim)
