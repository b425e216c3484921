"""The probes as Python functions: any model in, labelled results out.

    import probes
    feats = probes.embed(net, images, embed="avgpool")          # (N, D) float32
    acc = probes.knn(train_x, train_y, test_x, test_y, k=20)    # fraction in [0, 1]
    acc = probes.linear(train_x, train_y, test_x, test_y)       # L-BFGS logistic regression
    ds = probes.evaluate_model({"mine": net, "pixels": "pixels"}, "digits", embed="avgpool")
    ds["accuracy"].sel(probe="knn@20", features="raw").mean("seed")

`evaluate_model` returns the xarray.Dataset that `python -m probes.evaluate` writes as HDF5
(analysis "probe", accuracy over checkpoint x probe x features x seed): the CLI resolves its
references to modules and fills its file through the same `fill_probes`, so the two doors give
the same numbers. `runs.results.save(ds, path)` writes the dataset as that file.
"""

import copy
import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from probes.features import Embedding, extract_features, pixel_features
from probes.logistic import linear_probe_lbfgs, linear_probe_sgd, standardize
from probes.nearest import knn_accuracies, knn_accuracy
from runs.errors import UserError, unknown
from runs.registry import Registry

PROBES = Registry("probe")
FEATURES = ("raw", "standardized")
PIXELS = "pixels"  # the raw-pixel row: a "model" that is the images themselves
LINEAR_METHODS = ("lbfgs", "paper")


# ---------------------------------------------------------------------------- the probes


@PROBES.register(name="knn")
def knn_l2(train_x, train_y, test_x, test_y, num_classes, ks, seed, name) -> dict:
    """Paper k-NN: squared L2 on the features, unweighted majority vote."""
    accs = knn_accuracies(train_x, train_y, test_x, test_y, ks=ks, metric="l2",
                          num_classes=num_classes, name=name)
    return {f"knn@{k}": acc for k, acc in accs.items()}


@PROBES.register(name="knn-cosine")
def knn_cosine(train_x, train_y, test_x, test_y, num_classes, ks, seed, name) -> dict:
    """DINO k-NN: cosine similarity, votes weighted by exp(sim / 0.07)."""
    accs = knn_accuracies(train_x, train_y, test_x, test_y, ks=ks, metric="cosine",
                          num_classes=num_classes, name=name)
    return {f"knn-cosine@{k}": acc for k, acc in accs.items()}


@PROBES.register(name="linear")
def linear_sgd(train_x, train_y, test_x, test_y, num_classes, ks, seed, name) -> dict:
    """Paper linear probe: Linear(d, C), AdamW lr 1e-3 wd 1e-2, 10 epochs, batch 256."""
    out = linear_probe_sgd(train_x, train_y, test_x, test_y, num_classes, seed=seed, name=name)
    return {"linear": out["accuracy"]}


@PROBES.register(name="linear-lbfgs")
def linear_lbfgs(train_x, train_y, test_x, test_y, num_classes, ks, seed, name) -> dict:
    """Converged full-batch logistic regression, L2 strength by 5-fold CV on train."""
    out = linear_probe_lbfgs(train_x, train_y, test_x, test_y, num_classes, seed=seed,
                             name=name)
    return {"linear-lbfgs": out["accuracy"]}


DETERMINISTIC = ("knn", "knn-cosine")  # same answer for every seed: computed once


def probe_labels(probes, ks) -> list[str]:
    """The result's `probe` coordinate: one label per (probe, k)."""
    labels = []
    for probe in probes:
        PROBES.get(probe)
        labels += [f"{probe}@{k}" for k in ks] if probe in DETERMINISTIC else [probe]
    return labels


def probe_all(train_x, train_y, test_x, test_y, num_classes, probes, ks, seeds,
              name="features") -> dict:
    """{(label, features, seed): accuracy} for every probe on raw and standardised features."""
    out = {}
    variants = {"raw": (train_x, test_x), "standardized": standardize(train_x, test_x)}
    for kind, (tr, te) in variants.items():
        for probe in probes:
            fn = PROBES.get(probe)
            for i, seed in enumerate(seeds):
                if probe in DETERMINISTIC and i > 0:
                    first = {lab: out[(lab, kind, seeds[0])] for lab in probe_labels([probe], ks)}
                    out.update({(lab, kind, seed): acc for lab, acc in first.items()})
                    continue
                accs = fn(tr, train_y, te, test_y, num_classes, ks, seed, f"{name} ({kind})")
                out.update({(lab, kind, seed): acc for lab, acc in accs.items()})
    return out


# ---------------------------------------------------------------------------- single numbers


def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 512, embed=None,
          mean=None, std=None, device=None) -> torch.Tensor:
    """The embeddings (N, D) float32 of `images` under `model`, in eval mode, without grad.

    model: any nn.Module. Registry models (attributes `encoder`, `fc`, `embed_dim`) use their
    encoder; for any other classifier name the embedding with `embed`: a layer name (its
    output, flattened; the layers after it are skipped) or a callable embed(model, images)
    -> (B, D). A wrong layer name is a UserError listing the module's layers.
    images: (N, C, H, W) uint8 pixels, normalised per channel with `mean` and `std` (C values
    each on the [0, 1] scale; default: the statistics of these images), or float images used
    as they are (already normalised; mean and std must then stay None).
    device: where to compute, default the model's device; a model elsewhere is copied there
    (the caller's module is never moved, and its train/eval modes are restored).
    Images whose channels or size the model cannot take are a one-line UserError.
    """
    device = _device(device) if device is not None else None
    encoder = Embedding(_placed(model, device), embed)
    return extract_features(encoder, images, mean, std, batch_size, device)


def knn(train_x, train_y, test_x, test_y, k: int = 20, metric: str = "l2") -> float:
    """Test accuracy in [0, 1] of the k-nearest-neighbour classifier on frozen features.

    train_x (N, D), test_x (M, D) float features (tensors or arrays); train_y, test_y integer
    labels. metric "l2": the paper's (squared Euclidean, majority vote; equals scikit-learn's
    KNeighborsClassifier); "cosine": DINO's (cosine similarity, votes weighted by
    exp(sim / 0.07)). Runs on train_x's device.
    """
    train_x, train_y, test_x, test_y = _tensors(train_x, train_y, test_x, test_y)
    return knn_accuracy(train_x, train_y, test_x, test_y, k=k, metric=metric)


def linear(train_x, train_y, test_x, test_y, method: str = "lbfgs", seed: int = 0,
           num_classes: int = None) -> float:
    """Test accuracy in [0, 1] of a linear probe trained on frozen features.

    method "lbfgs": full-batch multinomial logistic regression run to convergence, L2
    strength chosen by seeded stratified 5-fold CV on train (no tuning; warns when the choice
    is the grid's edge or a fit stops unconverged); "paper": the paper's Linear(D, C) trained
    with AdamW (lr 1e-3, wd 1e-2, 10 epochs, batch 256; needs standardised features, see
    `probes.logistic`). seed: the CV folds (lbfgs) or the init and data order (paper).
    num_classes: default max label + 1 over both splits.
    """
    if method not in LINEAR_METHODS:
        raise unknown("linear probe method", method, LINEAR_METHODS)
    train_x, train_y, test_x, test_y = _tensors(train_x, train_y, test_x, test_y)
    if num_classes is None:
        num_classes = 1 + max((int(y.max()) for y in (train_y, test_y) if y.numel()),
                              default=-1)
    fit = linear_probe_lbfgs if method == "lbfgs" else linear_probe_sgd
    return fit(train_x, train_y, test_x, test_y, num_classes, seed=seed)["accuracy"]


# ---------------------------------------------------------------------------- the table


def evaluate_model(models, train, test=None, probes=("knn", "linear"), ks=(20,),
                   seeds=(0, 1, 2), embed=None, batch_size: int = 512, device="auto"):
    """Every probe on every model's embeddings: the xarray.Dataset `probes.evaluate` writes.

    models: one nn.Module (labelled "model"), the string "pixels" (the raw-pixel row), or a
    dict label -> module or "pixels"; labels become the `checkpoint` coordinate.
    train, test: a registered dataset name (its train and test splits), a pair
    (images, labels), a torch Dataset or ImageData (see `runs.data.as_splits`; test defaults
    to the name's test split, or to the train data itself).
    probes: names from `PROBES` (knn, knn-cosine, linear, linear-lbfgs); ks: k of the k-NN
    probes; seeds: seeds of the trained probes (k-NN is deterministic: one value repeated).
    embed: the embedding of models outside the registry (see `embed`).
    Returns accuracy (checkpoint x probe x features x seed; features "raw" and
    "standardized", z-scored with train statistics), attrs as the CLI's file: `config`,
    `inputs` ({"ref", "path": "", "sha256" of the module's state, "step": None}) and the
    `checkpoints` rows.
    """
    from runs.data import as_splits
    named = _named_models(models)
    _check_options(probes, ks, seeds, batch_size)
    device = _device(device)
    data = as_splits(train, test)
    labels = list(named)
    config = {"checkpoints": labels, "probes": list(probes), "ks": list(ks),
              "seeds": list(seeds), "batch_size": batch_size, "embed": _embed_name(embed),
              "train": _data_record(data[0]), "test": _data_record(data[1])}
    inputs = [_module_record(label, model) for label, model in named.items()
              if not _is_pixels(model)]
    rows = [_row(label, model) for label, model in named.items()]
    result = probe_result(None, labels, probes, ks, seeds, config, inputs, device, rows)
    fill_probes(result, named, data, probes, ks, seeds, embed, batch_size, device)
    return result.dataset()


def probe_result(path, checkpoints, probes, ks, seeds, config, inputs, device, rows,
                 overwrite: bool = False, shard=None):
    """The probe result's layout, in memory (path None) or as a file (resumable, shardable).

    coords: checkpoint x probe x features x seed; metric `accuracy` (fraction); `done` per
    checkpoint; attrs: `checkpoints` (one row per checkpoint: ref, role, model, trained_on).
    """
    from runs.results import MetricSpec, new_result
    coords = {"checkpoint": list(checkpoints), "probe": probe_labels(probes, ks),
              "features": list(FEATURES), "seed": list(seeds)}
    metric = MetricSpec(("checkpoint", "probe", "features", "seed"), "fraction",
                        "probe accuracy on the test split")
    return new_result(path, "probe", coords, {"accuracy": metric}, ("checkpoint",), config,
                      inputs, str(device), attrs={"checkpoints": rows}, overwrite=overwrite,
                      shard=shard)


def fill_probes(result, models: Mapping, data, probes, ks, seeds, embed=None,
                batch_size: int = 512, device=None) -> None:
    """Compute every checkpoint row `result` still misses: the one code path of both doors.

    result: from `probe_result` (a file or memory). models: label -> nn.Module or "pixels",
    looked up only for the rows still missing, so a lazy mapping loads only what a resumed
    or sharded scan needs. data: (train, test) ImageData. Each row: embeddings of both splits
    once, then every probe on raw and standardised features for every seed.
    """
    from runs.progress import Progress
    train, test = data
    device = torch.device("cpu") if device is None else torch.device(device)
    labels = list(result.coords["probe"])
    train_y, test_y = train.y.to(device), test.y.to(device)
    names = [str(name) for name in result.coords["checkpoint"]]
    todo = result.missing()
    with Progress(len(todo), "probe", "checkpoint") as bar:
        for (index,) in todo:
            name = names[index]
            train_x, test_x = split_features(models[name], data, embed, batch_size, device)
            accs = probe_all(train_x, train_y, test_x, test_y, train.info.num_classes,
                             probes, ks, seeds, name=name)
            grid = np.array([[[accs[(lab, kind, seed)] for seed in seeds]
                              for kind in FEATURES] for lab in labels])  # (P, F, S)
            result.write((index,), accuracy=grid)
            bar.update(1)


def split_features(model, data, embed, batch_size, device) -> tuple:
    """(train features, test features) of one model, or of the pixels for "pixels" (the
    normalised pixels, flattened: the same inputs an encoder gets)."""
    train, test = data
    if _is_pixels(model):
        return tuple(pixel_features(d.x, d.info.mean, d.info.std).to(device)
                     for d in (train, test))
    encoder = Embedding(_placed(model, device), embed)
    return tuple(extract_features(encoder, d.x, d.info.mean, d.info.std, batch_size, device)
                 for d in (train, test))


# ---------------------------------------------------------------------------- helpers


def _placed(model, device) -> nn.Module:
    """`model` on `device`: itself, or a copy when it lives elsewhere (never moved)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model: expected an nn.Module, got {type(model).__name__}")
    if device is not None and _home(model) not in (None, device):
        model = copy.deepcopy(model).to(device)  # the caller's module stays where it is
    return model


def _home(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer; None for a stateless model."""
    tensor = next(model.parameters(), None)
    tensor = next(model.buffers(), None) if tensor is None else tensor
    return None if tensor is None else tensor.device


def _device(device) -> torch.device:
    """'auto', a name or a torch.device, checked; CUDA with its index (as parameters say)."""
    from runs.device import resolve_device
    device = resolve_device(str(device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _is_pixels(model) -> bool:
    return isinstance(model, str) and model == PIXELS


def _named_models(models) -> dict:
    """label -> nn.Module or "pixels", from one module, "pixels" or a dict."""
    if isinstance(models, nn.Module):
        return {"model": models}
    if _is_pixels(models):
        return {PIXELS: PIXELS}
    if not isinstance(models, Mapping) or not models:
        raise UserError(f"models: expected an nn.Module, {PIXELS!r} or a non-empty dict "
                        f"label -> module; got {type(models).__name__}")
    for label, model in models.items():
        if not isinstance(label, str) or not label:
            raise UserError(f"models: labels must be non-empty strings, got {label!r}")
        if not (isinstance(model, nn.Module) or _is_pixels(model)):
            raise UserError(f"models[{label!r}]: expected an nn.Module or {PIXELS!r}, "
                            f"got {type(model).__name__}")
    return dict(models)


def _check_options(probes, ks, seeds, batch_size) -> None:
    if isinstance(probes, str) or not probes:
        raise UserError(f"probes: expected a list of probe names, got {probes!r}; "
                        f"valid: {', '.join(PROBES.names())}")
    probe_labels(probes, [1])  # unknown names: UserError listing the valid ones
    if not ks or min(ks) < 1:
        raise UserError(f"ks must be positive k-NN neighbour counts, got {list(ks)}")
    if not seeds:
        raise UserError("seeds: give at least one seed")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be at least 1 image")


def _tensors(train_x, train_y, test_x, test_y) -> tuple:
    return tuple(torch.as_tensor(t) for t in (train_x, train_y, test_x, test_y))


def _module_record(label: str, model: nn.Module) -> dict:
    """An in-memory model's provenance: identified by the sha256 of its state."""
    from runs.checkpoint import module_sha256
    return {"ref": label, "path": "", "sha256": module_sha256(model), "step": None}


def _row(label: str, model) -> dict:
    """The `checkpoints` row of a model, as the CLI's `describe` writes it."""
    place = {"run": "", "step": None, "epoch": None}  # a module in memory: a run of its own
    if _is_pixels(model):
        return {"ref": label, "role": "pixels", "model": "", "trained_on": "", **place}
    spec = getattr(model, "spec", None)
    name = spec.get("name", "") if isinstance(spec, dict) else ""
    return {"ref": label, "role": "checkpoint", "model": name or type(model).__name__,
            "trained_on": "", **place}


def _embed_name(embed) -> str | None:
    if embed is None or isinstance(embed, str):
        return embed
    return getattr(embed, "__qualname__", type(embed).__name__)


def _data_record(data) -> dict:
    """A split's identity: its name, shape, the sha256 of its images and labels, and the
    per-channel mean/std that normalise it (with `stats`, where they come from)."""
    digest = hashlib.sha256()
    for tensor in (data.x, data.y):
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    info = data.info
    return {"name": info.name, "shape": list(data.x.shape), "dtype": str(data.x.dtype),
            "sha256": digest.hexdigest(), "stats": info.stats, "mean": list(info.mean),
            "std": list(info.std)}
