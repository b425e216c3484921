"""The network a scan moves through parameter space, and loading it from references.

A `Subject` is an encoder plus, as the metrics need them, the supervised fc (loss, error)
and the DINO head (distillation loss against a teacher). Only these parts are loaded,
checked and moved, so a student landscape moves encoder + head and never the student's
untrained fc.
"""

from dataclasses import dataclass

import torch
from torch import nn

from runs.checkpoint import check_finite, module_sha256
from runs.errors import UserError
from runs.models.adapt import Tapped, has_protocol
from runs.refs import load_head, load_model, parse_ref, split_label


class Subject(nn.Module):
    """images (B, C, H, W) -> {"embedding": (B, D), "logits": (B, classes), "head": (B, m)}.

    `logits` only with an fc, `head` only with a DINO head. parts: the outputs wanted
    (BN recalibration asks for the embedding only when the heads hold no BN).
    `net`: any other classifier instead of encoder + fc, its logits from its own forward and
    its embedding (only where it is a `Tapped`) read off the layer its caller named.
    """

    def __init__(self, encoder: nn.Module = None, fc: nn.Module = None, head: nn.Module = None,
                 net: nn.Module = None):
        super().__init__()
        self.encoder, self.fc, self.head, self.net = encoder, fc, head, net

    def forward(self, x: torch.Tensor, parts=("embedding", "logits", "head")) -> dict:
        if self.net is not None:
            if not isinstance(self.net, Tapped):
                return {"logits": self.net(x)}  # (B, classes)
            embedding, logits = self.net.both(x)  # (B, D), (B, classes)
            return {"embedding": embedding, "logits": logits}
        embedding = self.encoder(x)  # (B, D)
        out = {"embedding": embedding}
        if self.fc is not None and "logits" in parts:
            out["logits"] = self.fc(embedding)  # (B, classes)
        if self.head is not None and "head" in parts:
            out["head"] = self.head(embedding)  # (B, m)
        return out


@dataclass
class Anchor:
    """One checkpoint of a scan, loaded on the CPU."""
    ref: str
    subject: Subject
    record: dict  # provenance for the result's `inputs` (ref, path, step, sha256)
    spec: dict  # what must match between anchors: model spec without seed, head spec
    embed_dim: int  # the encoder's output width


def without_seed(spec: dict, drop=("seed",)) -> dict:
    return {k: v for k, v in spec.items() if k not in drop}


def load_anchor(ref: str, with_fc: bool, with_head: bool, num_classes: int = None,
                fc: nn.Module = None) -> Anchor:
    """The Subject a reference names: encoder, fc if `with_fc`, DINO head if `with_head`.

    fc: a trained fc to attach instead of the checkpoint's own (--fc); num_classes: the
    dataset's, checked against the fc used. Raises a UserError when the checkpoint's own fc
    is not a trained classifier (distillation checkpoints, `:encoder` references).
    """
    loaded = load_model(ref)
    model = loaded.model
    if with_fc and fc is None:
        check_classifier(ref, loaded, num_classes)
    head = load_head(ref, loaded.payload) if with_head else None
    own_fc = (fc if fc is not None else model.fc) if with_fc else None
    parts = {"encoder": model.encoder, "fc": own_fc, "head": head}
    check_finite(nn.ModuleDict({k: v for k, v in parts.items() if v is not None}), ref)
    subject = Subject(model.encoder, own_fc, head)
    spec = {"model": without_seed(model.spec, ("seed",) if with_fc else ("seed", "num_classes"))}
    if head is not None:
        spec["head"] = without_seed(head.spec)
    return Anchor(ref, subject, loaded.input_record(), spec, model.embed_dim)


def check_classifier(ref: str, loaded, num_classes: int = None) -> None:
    """UserError unless the reference's fc is a trained classifier for `num_classes`."""
    payload = loaded.payload or {}
    kind = (payload.get("extra") or {}).get("kind")
    source = split_label(ref)[1].split(":")[0]  # RUN@STEP, without a LABEL:= or :PART
    how = (f"fine-tune one (python -m runs.train --init {source}:encoder ...) and "
           f"scan those runs, pass --fc REF to attach the trained fc of a classifier run to "
           f"every point, or scan the distillation landscape instead (--metrics distill knn "
           f"norm --teacher RUN@last:teacher)")
    if kind == "distill" or payload.get("source") == "dinopl":
        raise UserError(f"{ref} is a distillation checkpoint: its fc was never trained, so "
                        f"supervised loss/error along a path would mean nothing; {how}")
    if "encoder" in parse_ref(ref).parts:
        raise UserError(f"{ref} keeps only the encoder (its fc is freshly drawn), so supervised "
                        f"loss/error would mean nothing; {how}")
    classes = loaded.model.fc.out_features
    if num_classes is not None and classes != num_classes:
        raise UserError(f"{ref} has an fc with {classes} outputs but the dataset has "
                        f"{num_classes} classes; {how}")


def load_fc(ref: str, num_classes: int) -> nn.Module:
    """The trained fc of a classifier checkpoint (--fc), checked to be one."""
    loaded = load_model(ref)
    check_classifier(ref, loaded, num_classes)
    return loaded.model.fc


def check_same_architecture(anchors: list[Anchor]) -> None:
    """UserError naming both references when two anchors are different networks."""
    first = anchors[0]
    for other in anchors[1:]:
        if other.spec != first.spec:
            raise UserError(f"{first.ref} and {other.ref} are different architectures "
                            f"({_describe(first.spec)} vs {_describe(other.spec)}); a path "
                            f"or plane needs checkpoints of one architecture")
        if differs := first_difference(_shapes(first.subject), _shapes(other.subject)):
            raise UserError(f"{first.ref} and {other.ref} are different architectures: "
                            f"{differs}; a path or plane needs networks of one architecture")


def _shapes(subject: Subject) -> dict:
    return {name: tuple(t.shape) for name, t in subject.state_dict().items()}


def first_difference(a: dict, b: dict) -> str:
    """'' when two name -> shape maps agree; else the first differing entry, both sides."""
    for name in dict.fromkeys([*a, *b]):
        if a.get(name) != b.get(name):
            left = a.get(name, "absent")
            right = b.get(name, "absent")
            return f"parameter {_short(name)!r} has shape {left} vs {right}"
    return ""


def _short(name: str) -> str:
    """A Subject's state name as the caller's module spells it (no 'net.net.' prefix)."""
    return name.removeprefix("net.net.").removeprefix("net.")


def _describe(spec: dict) -> str:
    parts = []
    for key, value in spec.items():
        args = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("name", "registry"))
        parts.append(f"{value.get('name', key)}({args})")
    return " + ".join(parts)


def check_images(anchor: Anchor, image_shape: tuple) -> None:
    """UserError unless the anchor's network takes images of `image_shape` (C, H, W)."""
    network = anchor.subject.encoder or anchor.subject
    was_training = network.training
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(2, *image_shape))
    except RuntimeError as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{anchor.ref} cannot take the data's images of shape "
                        f"{tuple(image_shape)}: {first}") from None
    finally:
        network.train(was_training)


def load_teacher(ref: str) -> Subject:
    """The teacher of a distillation landscape (e.g. RUN@last:teacher): encoder + DINO head,
    frozen, in eval mode (its BN keeps its own statistics, as during distillation)."""
    loaded = load_model(ref)
    teacher = Subject(loaded.model.encoder, None, load_head(ref, loaded.payload))
    return teacher.requires_grad_(False).eval()


def module_anchor(model: nn.Module, label: str, with_fc: bool, with_head: bool,
                  embed=None) -> Anchor:
    """The Anchor of an in-memory module (the Python API), labelled `label`.

    A registry-protocol module (encoder, fc, embed_dim; with `head` for distillation
    metrics, as `runs.load(ref, head=True)` gives) moves encoder + fc and/or head, as the
    CLI does; any other classifier moves whole, its embedding read off the layer `embed`
    names (or computed by embed(module, images)). The module itself is never changed.
    """
    encoder = getattr(model, "encoder", None)
    if with_head and (getattr(model, "head", None) is None or encoder is None):
        raise UserError(f"{label}: distill metrics need an encoder and a DINO head (e.g. "
                        f"runs.load('RUN@last', head=True)); {type(model).__name__} has none")
    if embed is None and has_protocol(model):
        subject = Subject(model.encoder, model.fc if with_fc else None,
                          model.head if with_head else None)
        embed_dim = model.embed_dim
    elif with_head:
        subject, embed_dim = Subject(encoder, None, model.head), None
    else:
        subject = Subject(net=Tapped(model, embed) if embed is not None else model)
        embed_dim = None
    record = {"ref": label, "path": "", "step": None, "sha256": module_sha256(subject)}
    return Anchor(label, subject, record, {}, embed_dim)
