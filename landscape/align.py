"""Permutation alignment: weight matching and activation matching (Ainsworth et al. 2023).

Hidden units of a network can be permuted without changing its function. Two trained
networks may sit in one basin only up to such a permutation (Entezari et al. 2022); aligning
B to A first separates that symmetry from a real barrier.

    spec = permutation_spec(model)          # which axes of which tensors each permutation moves
    perm = weight_matching(a, b)            # {perm name: (n,) LongTensor}
    perm = activation_matching(a, b, images)
    b2 = apply_permutation(b, perm)         # a new module computing exactly b's function
    b2, info = align(a, b, method="weights" | "activations", images=None, seed=0)

A permutation `perm[p]` of n channels acts as B'[i] = B[perm[p][i]] on every axis it governs:
the producing layer's output rows and bias, the norm after it (weight, bias, running mean and
variance), the consumers' input columns (the next conv, the fc after the global pool, a DINO
head's first layer). A residual stream shares one permutation across the stem, every block's
output and the projection shortcut. Option-A shortcuts (zero padding) embed the previous
stream's channels in the middle of the wider one: that stream is governed by the previous
stream's permutation (at those positions) plus a new one over the padded positions. An axis is
therefore a list of segments (perm name, positions on the axis). GroupNorm with 1 < G < C
groups only permits permutations within each group: such a permutation carries `groups`.
"""

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet as tv

from landscape.network import first_difference
from runs.errors import UserError, unknown
from runs.models.base import GlobalAvgPool, GlobalMaxPool
from runs.models.head import DINOHead, LinearHead
from runs.models.resnet import CifarResNet, _CifarBlock, _PadShortcut

METHODS = ("weights", "activations")
SUPPORTED = ("convnet, mlp, vgg11/13/16/19 (any norm) and vgg*_bn, resnet20/56 (projection or "
             "A shortcuts, any norm), resnet18/34/50 (any norm), each with its fc and/or DINO "
             "head")
NORMS = (_BatchNorm, nn.GroupNorm)
PASS = (nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Dropout, GlobalAvgPool, GlobalMaxPool)
Segments = list  # [(perm name, (n,) LongTensor of the axis positions it governs)]


@dataclass
class PermutationSpec:
    """What every permutation of a network moves (see the module docstring)."""
    encoder: str  # the encoder's module name ('' when the model is the encoder)
    sizes: dict = field(default_factory=dict)  # perm -> channels n
    groups: dict = field(default_factory=dict)  # perm -> GroupNorm groups it stays within
    axes: dict = field(default_factory=dict)  # state key -> {axis: Segments}
    sites: list = field(default_factory=list)  # (module name, Segments): hidden activations
    repair_sites: list = field(default_factory=list)  # each conv/linear's output (its norm's)

    def touching(self, perm: str) -> list:
        """(state key, axis, positions) of every axis segment `perm` governs."""
        return [(key, axis, pos) for key, axes in self.axes.items()
                for axis, segs in axes.items() for name, pos in segs if name == perm]


class _Builder:
    """Collects a PermutationSpec while walking a network's layers in forward order."""

    def __init__(self, model: nn.Module, encoder: str):
        self.spec = PermutationSpec(encoder)
        self.keys = set(model.state_dict())

    def new(self, name: str, positions: torch.Tensor) -> Segments:
        self.spec.sizes[name], self.spec.groups[name] = len(positions), 1
        return [(name, positions)]

    def put(self, key: str, axis: int, segs: Segments) -> None:
        if segs and key in self.keys:
            self.spec.axes.setdefault(key, {})[axis] = segs

    def linear(self, name: str, module: nn.Module, seg_in: Segments) -> Segments:
        """A conv or linear layer `name`: new output channels; returns their segments."""
        out = self.new(name, torch.arange(module.weight.shape[0]))
        self.put(f"{name}.weight", 0, out)
        self.put(f"{name}.weight", 1, seg_in)
        self.put(f"{name}.bias", 0, out)
        self.spec.sites.append((name, out))
        self.spec.repair_sites.append(name)
        return out

    def consumer(self, name: str, seg_in: Segments) -> None:
        """A layer that reads the permuted channels but whose outputs stay as they are."""
        self.put(f"{name}.weight", 1, seg_in)

    def norm(self, name: str, module: nn.Module, segs: Segments) -> None:
        """The norm after the last linear: its per-channel tensors follow that layer's rows;
        it, not the layer, is where activations are read and REPAIR rescales."""
        if isinstance(module, nn.Identity):
            return
        if not isinstance(module, NORMS):
            raise _unsupported(f"layer {name} ({type(module).__name__})")
        if isinstance(module, nn.GroupNorm):
            self._within_groups(name, module, segs)
        for key in ("weight", "bias", "running_mean", "running_var"):
            self.put(f"{name}.{key}", 0, segs)
        self.spec.sites[-1] = (name, segs)
        self.spec.repair_sites[-1] = name

    def _within_groups(self, name: str, module: nn.GroupNorm, segs: Segments) -> None:
        groups, channels = module.num_groups, module.num_channels
        if groups in (1, channels):  # layer / instance norm: any permutation keeps it
            return
        if len(segs) != 1:
            raise UserError(f"layer {name}: GroupNorm with {groups} groups on a zero-padded "
                            f"(option-A) residual stream cannot be aligned; use norm batch, "
                            f"layer, instance or none, or shortcut=projection")
        perm = segs[0][0]
        if self.spec.groups[perm] not in (1, groups):
            raise UserError(f"layer {name}: permutation {perm} meets GroupNorms of "
                            f"{self.spec.groups[perm]} and {groups} groups; cannot align")
        self.spec.groups[perm] = groups


def _unsupported(what: str) -> UserError:
    return UserError(f"alignment does not support {what}; supported: {SUPPORTED}")


def _conv_norm(b: _Builder, prefix: str, conv: str, norm: str, block: nn.Module,
               seg_in: Segments) -> Segments:
    """block.<conv> then block.<norm>: the usual conv -> norm pair of a residual block."""
    out = b.linear(f"{prefix}.{conv}", getattr(block, conv), seg_in)
    b.norm(f"{prefix}.{norm}", getattr(block, norm), out)
    return out


def _sequential(b: _Builder, prefix: str, seq: nn.Sequential, segs: Segments) -> Segments:
    """convnet, mlp, VGG and option-A ResNets: layers in order; returns the output segments."""
    for index, module in seq.named_children():
        name = f"{prefix}.{index}" if prefix else index
        if isinstance(module, nn.Conv2d | nn.Linear):
            segs = b.linear(name, module, segs)
        elif isinstance(module, NORMS):
            b.norm(name, module, segs)
        elif isinstance(module, _CifarBlock):
            segs = _option_a_block(b, name, module, segs)
        elif isinstance(module, nn.Flatten) and not segs:
            continue  # flattening the input image: nothing permuted yet
        elif not isinstance(module, PASS):
            raise _unsupported(f"layer {name} ({type(module).__name__})")
    return segs


def _option_a_block(b: _Builder, name: str, block: _CifarBlock, segs: Segments) -> Segments:
    """conv1-bn1-relu-conv2-bn2 + shortcut; the stream widens by zero padding (option A)."""
    inner = _conv_norm(b, name, "conv1", "bn1", block, segs)
    out = segs
    if isinstance(block.shortcut, _PadShortcut):
        cin, cout = block.conv1.in_channels, block.conv2.out_channels
        offset = block.shortcut.extra // 2  # the input channels land at offset .. offset+cin
        out = [(perm, pos + offset) for perm, pos in segs]
        padded = torch.cat([torch.arange(offset), torch.arange(offset + cin, cout)])
        if len(padded):
            out = out + b.new(f"{name}.shortcut", padded)
    b.put(f"{name}.conv2.weight", 0, out)
    b.put(f"{name}.conv2.weight", 1, inner)
    b.spec.sites.append((f"{name}.conv2", out))
    b.spec.repair_sites.append(f"{name}.conv2")
    b.norm(f"{name}.bn2", block.bn2, out)
    b.spec.sites.append((name, out))  # the block's output: the stream after the sum and ReLU
    return out


def _resnet(b: _Builder, prefix: str, net: nn.Module) -> Segments:
    """torchvision-layout ResNets (resnet18/34/50 and the projection resnet20/56)."""
    stream = _conv_norm(b, prefix, "conv1", "bn1", net, [])
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in getattr(net, stage, nn.Sequential()).named_children():
            name = f"{prefix}.{stage}.{index}"
            if not isinstance(block, tv.BasicBlock | tv.Bottleneck):
                raise _unsupported(f"block {name} ({type(block).__name__})")
            stream = _residual_block(b, name, block, stream)
    return stream


def _residual_block(b: _Builder, name: str, block: nn.Module, stream: Segments) -> Segments:
    """A BasicBlock or Bottleneck: inner permutations of their own; the output shares the
    stream's permutation, or the projection's new one where the block has a downsample."""
    convs = ["conv1", "conv2"] + (["conv3"] if isinstance(block, tv.Bottleneck) else [])
    out = stream
    if block.downsample is not None:
        out = b.linear(f"{name}.downsample.0", block.downsample[0], stream)
        b.norm(f"{name}.downsample.1", block.downsample[1], out)
    segs = stream
    for conv in convs[:-1]:
        segs = _conv_norm(b, name, conv, conv.replace("conv", "bn"), block, segs)
    last, norm = convs[-1], convs[-1].replace("conv", "bn")
    b.put(f"{name}.{last}.weight", 0, out)
    b.put(f"{name}.{last}.weight", 1, segs)
    b.spec.sites.append((f"{name}.{last}", out))
    b.spec.repair_sites.append(f"{name}.{last}")
    b.norm(f"{name}.{norm}", getattr(block, norm), out)
    b.spec.sites.append((name, out))
    return out


def _holder(model: nn.Module, attr: str):
    """model.<attr>, or that of the classifier it wraps (Subject.net, DinoNet.model)."""
    for holder in (model, getattr(model, "net", None), getattr(model, "model", None)):
        found = getattr(holder, attr, None) if isinstance(holder, nn.Module) else None
        if isinstance(found, nn.Module):
            return found
    return None


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The permutations of a registry model (or a Subject / DinoNet around one); a
    UserError listing the supported architectures for any other."""
    names = {id(m): n for n, m in model.named_modules()}
    encoder = _holder(model, "encoder")
    if encoder is None or id(encoder) not in names:
        raise _unsupported(f"a {type(model).__name__} (no encoder)")
    b = _Builder(model, names[id(encoder)])
    prefix = names[id(encoder)]
    if isinstance(encoder, nn.Sequential):
        segs = _sequential(b, prefix, encoder, [])
    elif isinstance(encoder, tv.ResNet | CifarResNet):
        segs = _resnet(b, prefix, encoder)
    else:
        label = getattr(model, "spec", {}).get("name") or type(model).__name__
        raise _unsupported(f"model {label} (its encoder is a {type(encoder).__name__})")
    fc, head = _holder(model, "fc"), _holder(model, "head")
    if isinstance(fc, nn.Linear):
        b.consumer(names[id(fc)], segs)
    if isinstance(head, DINOHead):
        b.consumer(names[id(head.mlp[0])], segs)
    elif isinstance(head, LinearHead):
        b.consumer(names[id(head.last)], segs)
    elif head is not None:
        raise _unsupported(f"head {type(head).__name__}")
    return b.spec


# ------------------------------------------------------------------ applying permutations

def random_permutation(spec: PermutationSpec, seed: int = 0) -> dict:
    """A random permutation for every perm of `spec` (within groups where GroupNorm asks)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for perm, n in spec.sizes.items():
        size = n // spec.groups[perm]
        out[perm] = torch.cat([torch.randperm(size, generator=gen) + g * size
                               for g in range(spec.groups[perm])])
    return out


def identity(spec: PermutationSpec) -> dict:
    return {perm: torch.arange(n) for perm, n in spec.sizes.items()}


def inverse(perm: dict) -> dict:
    """The permutations undoing `perm`: apply_permutation(apply(b, perm), inverse(perm)) = b."""
    return {name: torch.argsort(p) for name, p in perm.items()}


def _index(size: int, segs: Segments, perm: dict, device) -> torch.Tensor:
    """(size,) the source position of every position of an axis: B'[i] = B[index[i]]."""
    index = torch.arange(size)
    for name, pos in segs:
        index[pos] = pos[perm[name]]
    return index.to(device)


def _permuted(tensor: torch.Tensor, axes: dict, perm: dict, skip: int = None) -> torch.Tensor:
    for axis, segs in axes.items():
        if axis != skip:
            tensor = tensor.index_select(axis, _index(tensor.shape[axis], segs, perm,
                                                      tensor.device))
    return tensor


def check_permutation(spec: PermutationSpec, perm: dict) -> None:
    """UserError unless `perm` holds one permutation of the right size for every perm."""
    if set(perm) != set(spec.sizes):
        missing = sorted(set(spec.sizes) ^ set(perm))
        raise UserError(f"permutation keys do not match the network's: {missing[:3]} "
                        f"missing or extra; valid: {', '.join(spec.sizes)}")
    for name, p in perm.items():
        n = spec.sizes[name]
        if p.shape != (n,) or not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
            raise UserError(f"permutation {name}: expected a permutation of 0..{n - 1}, got "
                            f"shape {tuple(p.shape)}")


def apply_permutation(model: nn.Module, perm: dict, spec: PermutationSpec = None) -> nn.Module:
    """A deep copy of `model` with its hidden units permuted: the same function exactly."""
    spec = spec or permutation_spec(model)
    check_permutation(spec, perm)
    perm = {name: p.cpu().long() for name, p in perm.items()}
    state = {key: _permuted(value, spec.axes.get(key, {}), perm)
             for key, value in model.state_dict().items()}
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out


# ------------------------------------------------------------------ weight matching

def _assign(score: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """(n,) the permutation maximising sum_i score[i, perm[i]], within `groups` blocks."""
    score = score.detach().cpu().double().numpy()
    size = len(score) // groups
    out = []
    for g in range(groups):
        block = score[g * size:(g + 1) * size, g * size:(g + 1) * size]
        out.append(torch.as_tensor(linear_sum_assignment(block, maximize=True)[1]) + g * size)
    return torch.cat(out).long()


def _parameters(model: nn.Module, spec: PermutationSpec) -> dict:
    """The permuted parameters (not buffers) in float64: what weight matching compares."""
    return {key: p.detach().double() for key, p in model.named_parameters() if key in spec.axes}


def matching_objective(a: nn.Module, b: nn.Module, spec: PermutationSpec = None) -> float:
    """sum over the permuted parameters of <W_a, W_b> (float64): weight matching's score."""
    spec = spec or permutation_spec(a)
    pa, pb = _parameters(a, spec), _parameters(b, spec)
    return float(sum((pa[key] * pb[key]).sum() for key in pa))


def _score(name: str, spec: PermutationSpec, pa: dict, pb: dict, perm: dict) -> torch.Tensor:
    """(n, n) score[i, j] = sum over the tensors `name` touches of <A's unit i, B's unit j>,
    B's other axes permuted as `perm` says: the objective's part that depends on `name`."""
    n = spec.sizes[name]
    score = 0
    for key, axis, pos in spec.touching(name):
        if key not in pa:  # a buffer: permuted, not matched
            continue
        rows_a = pa[key].index_select(axis, pos.to(pa[key].device))
        rows_b = _permuted(pb[key], spec.axes[key], perm, skip=axis)
        rows_b = rows_b.index_select(axis, pos.to(rows_b.device))
        score = score + rows_a.movedim(axis, 0).reshape(n, -1) @ \
            rows_b.movedim(axis, 0).reshape(n, -1).T  # (n, n)
    return score if torch.is_tensor(score) else torch.zeros(n, n, dtype=torch.float64)


def weight_matching(a: nn.Module, b: nn.Module, spec: PermutationSpec = None, seed: int = 0,
                    max_iter: int = 100, history: list = None) -> dict:
    """Permutations of B maximising sum <W_a, P(W_b)> (Ainsworth et al. 2023, Alg. 1).

    Coordinate descent: each sweep visits the permutations in a random order (from `seed`),
    each step solving one linear assignment with the others held; a step is taken only if it
    raises the objective, so the objective never decreases, and the search stops after a
    sweep that changes nothing (or `max_iter` sweeps). `history`: a list that receives the
    objective before the first step and after every step (float64).
    """
    perm, _ = _weight_matching(a, b, spec or check_alignable(a, b), seed, max_iter, history)
    return perm


def _weight_matching(a, b, spec, seed, max_iter, history) -> tuple[dict, int]:
    if int(max_iter) < 1:
        raise UserError(f"weight matching: max_iter must be at least 1, got {max_iter}")
    pa, pb = _parameters(a, spec), _parameters(b, spec)
    perm, names = identity(spec), sorted(spec.sizes)
    rng = np.random.default_rng(seed)
    total = float(sum((pa[key] * pb[key]).sum() for key in pa))
    history = [] if history is None else history
    history.append(total)
    sweeps, changed = 0, True
    while changed and sweeps < max_iter:
        sweeps, changed = sweeps + 1, False
        for i in rng.permutation(len(names)):
            name = names[i]
            score = _score(name, spec, pa, pb, perm)  # (n, n)
            found = _assign(score, spec.groups[name])
            rows = torch.arange(len(found))
            old, new = score[rows, perm[name]].sum(), score[rows, found].sum()
            if new > old + 1e-12 * max(1.0, abs(float(old))):
                perm[name], changed = found, True
                total += float(new - old)
            history.append(total)
    return perm, sweeps


# ------------------------------------------------------------------ activation matching

class _SiteMoments:
    """Running sums for the correlation between A's and B's channels of every permutation."""

    def __init__(self):
        self.count, self.sums = {}, {}

    def add(self, name: str, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """xa, xb: (n, M) the channels' values over M samples (images x positions)."""
        sums = (xa.sum(1), xb.sum(1), (xa * xa).sum(1), (xb * xb).sum(1), xa @ xb.T)
        if name in self.sums:
            self.sums[name] = [s + t for s, t in zip(self.sums[name], sums)]
        else:
            self.sums[name] = list(sums)
        self.count[name] = self.count.get(name, 0) + xa.shape[1]

    def correlation(self, name: str) -> torch.Tensor:
        """(n, n) Pearson correlation of A's channel i with B's channel j."""
        count = self.count[name]
        sa, sb, saa, sbb, sab = (s / count for s in self.sums[name])
        cov = sab - sa[:, None] * sb[None, :]
        std_a = (saa - sa ** 2).clamp_min(0).sqrt()
        std_b = (sbb - sb ** 2).clamp_min(0).sqrt()
        return cov / (std_a[:, None] * std_b[None, :] + 1e-12)


def _site_values(model: nn.Module, spec: PermutationSpec, images: torch.Tensor) -> dict:
    """perm -> (n, M) its channels' values at every site on `images`, sites concatenated."""
    values, hooks = {}, []

    def record(segs):
        def hook(module, inputs, output):  # copied now: an in-place ReLU may follow
            flat = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
            for name, pos in segs:
                values.setdefault(name, []).append(flat[pos.to(flat.device)])
        return hook

    for site, segs in spec.sites:
        hooks.append(model.get_submodule(site).register_forward_hook(record(segs)))
    try:
        _encoder(model, spec)(images)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(chunks, 1) for name, chunks in values.items()}


def _encoder(model: nn.Module, spec: PermutationSpec) -> nn.Module:
    return model.get_submodule(spec.encoder) if spec.encoder else model


@torch.no_grad()
def _correlations(a, b, images, spec, batch_size) -> dict:
    moments = _SiteMoments()
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        for chunk in images.split(batch_size):
            xa, xb = _site_values(a, spec, chunk), _site_values(b, spec, chunk)
            for name in xa:
                moments.add(name, xa[name], xb[name])
    finally:
        a.train(modes[0]), b.train(modes[1])
    return {name: moments.correlation(name) for name in spec.sizes}


def activation_matching(a: nn.Module, b: nn.Module, images: torch.Tensor,
                        spec: PermutationSpec = None, batch_size: int = 256) -> dict:
    """Permutations of B maximising the summed correlation of matched hidden activations.

    Activations (eval mode, on `images` (N, C, H, W)) are each conv/linear's output, after
    its norm where one follows (and, for a residual stream, every block's output too);
    one linear assignment per permutation on the Pearson correlations over images and
    positions.
    """
    spec = spec or check_alignable(a, b)
    _check_images(images)
    corr = _correlations(a, b, images, spec, batch_size)
    return {name: _assign(c, spec.groups[name]) for name, c in corr.items()}


def _check_images(images) -> None:
    if not torch.is_tensor(images) or images.ndim < 2 or len(images) < 2:
        raise UserError("activation matching needs images: a tensor (N, C, H, W) of N >= 2 "
                        "training images (align(..., images=...))")


# ------------------------------------------------------------------ the entry points

def check_alignable(a: nn.Module, b: nn.Module) -> PermutationSpec:
    """A's PermutationSpec; a UserError naming the first parameter whose shape differs
    (different architectures) or listing the supported architectures."""
    shapes = [{k: tuple(t.shape) for k, t in m.state_dict().items()} for m in (a, b)]
    if differs := first_difference(*shapes):
        raise UserError(f"cannot align two different architectures: {differs}")
    return permutation_spec(a)


def align(a: nn.Module, b: nn.Module, method: str = "weights", images: torch.Tensor = None,
          seed: int = 0, max_iter: int = 100) -> tuple[nn.Module, dict]:
    """B permuted to match A (a new module; a and b untouched), and what the search did.

    info: method; objective_before / objective_after (weights: sum <W_a, P(W_b)>;
    activations: the mean correlation of matched channels); iterations (sweeps; 1 for
    activations); changed (how many permutations are not the identity).
    """
    if method not in METHODS:
        raise unknown("alignment method", method, METHODS)
    spec = check_alignable(a, b)
    if method == "weights":
        history = []
        perm, sweeps = _weight_matching(a, b, spec, seed, max_iter, history)
        before, after = history[0], history[-1]
    else:
        _check_images(images)
        corr = _correlations(a, b, images, spec, 256)
        perm = {name: _assign(c, spec.groups[name]) for name, c in corr.items()}
        before, after = _mean_matched(corr, identity(spec)), _mean_matched(corr, perm)
        sweeps = 1
    changed = sum(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    info = {"method": method, "objective_before": before, "objective_after": after,
            "iterations": sweeps, "changed": int(changed)}
    return apply_permutation(b, perm, spec), info


def _mean_matched(corr: dict, perm: dict) -> float:
    values = [c[torch.arange(len(perm[name])), perm[name]] for name, c in corr.items()]
    return float(torch.cat(values).mean()) if values else 0.0
