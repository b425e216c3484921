"""Probe frozen embeddings: `python -m probes.evaluate REF... --dataset cifar10`.

For each checkpoint reference (or `pixels`, the raw-pixel baseline), extract the encoder's
embeddings of the train and test splits once, then run every requested probe on raw and
train-standardised features, for every seed. Results: one HDF5 file (analysis `probe`,
coords checkpoint x probe x features x seed, metric accuracy) and a table in the paper's
format (mean +- std over seeds). Resumable per checkpoint, shardable with --shard i/n.
"""

import argparse
import sys

import numpy as np
import torch

from probes.features import extract_features, pixel_features
from probes.knn import knn_accuracies
from probes.linear import linear_probe_lbfgs, linear_probe_sgd, standardize
from runs.data import load_dataset
from runs.distill import DistillConfig
from runs.engine import resolve_device
from runs.errors import UserError, cli
from runs.launch import LAUNCH_FIELDS, add_launcher_args, launch, launching
from runs.registry import Registry

PROBES = Registry("probe")
FEATURES = ("raw", "standardized")
PIXELS = "pixels"


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
    """Full-batch logistic regression, L2 strength chosen on a split of train."""
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


def load_encoder(ref: str, info):
    """The encoder a reference names, checked against the dataset's images."""
    return load_checked(ref, info).model.encoder


# The recipe's student starts at its teacher (alpha tiny, not 0); other alphas are rows apart.
RECIPE_ALPHA = DistillConfig.alpha


def describe(ref: str, info) -> dict:
    """What a probed row is, for tables and figures: role, architecture, training data."""
    if ref == PIXELS:
        return {"ref": ref, "role": "pixels", "model": "", "trained_on": ""}
    loaded = load_checked(ref, info)
    kind = (loaded.payload.get("extra") or {}).get("kind", "")
    role = "teacher" if "teacher" in ref.rsplit("@", 1)[-1] else \
        {"distill": "student", "train": "supervised"}.get(kind, "checkpoint")
    if role == "student" and loaded.config.get("dataset") == "noise":
        role = "noise-student"  # the random-input control
    elif role == "student" and loaded.config.get("alpha", RECIPE_ALPHA) != RECIPE_ALPHA:
        role = f"student (alpha={loaded.config['alpha']})"  # not the recipe's init
    return {"ref": ref, "role": role, "model": loaded.model.spec.get("name", ""),
            "trained_on": loaded.config.get("dataset", "")}


def load_checked(ref: str, info):
    from runs.models.base import check_input_size
    from runs.refs import load_model
    loaded = load_model(ref)
    model = loaded.model
    want = model.spec.get("in_channels", info.channels)
    if want != info.channels:
        raise UserError(f"{ref} takes {want}-channel images, {info.name} has "
                        f"{info.channels}; pass --channels {want}")
    check_input_size(model, info.channels, info.image_size)
    return loaded


def embed(ref: str, data: tuple, device: torch.device, batch_size: int):
    """(train features, test features) of one checkpoint's encoder, or of `pixels`."""
    train, test = data
    if ref == PIXELS:
        return pixel_features(train.x).to(device), pixel_features(test.x).to(device)
    encoder = load_encoder(ref, train.info).to(device)
    feats = [extract_features(encoder, d.x, d.info.mean, d.info.std, batch_size, device)
             for d in (train, test)]
    return feats[0], feats[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m probes.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="checkpoint references (e.g. store/distill_x/seed_0@last) or "
                        "'pixels' for the raw-pixel baseline")
    p.add_argument("--dataset", required=True, help="dataset probed (transfer: any other "
                   "than the one trained on)")
    p.add_argument("--data-root", default="", help="folder (or .npz) of the dataset")
    p.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    p.add_argument("--channels", type=int, default=None, help="convert images to 1 or 3 "
                   "channels")
    p.add_argument("--subset", type=int, default=0, help="train images per class; 0 = all")
    p.add_argument("--probes", nargs="+", default=["knn", "linear"],
                   help=f"probes to run; valid: {', '.join(PROBES.names())}")
    p.add_argument("--ks", nargs="+", type=int, default=[20], help="k of the k-NN probes")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of the trained probes (k-NN is deterministic)")
    p.add_argument("--out", default="results/probe.h5", help="HDF5 result file")
    p.add_argument("--overwrite", action="store_true", help="replace a result file of "
                   "another config")
    p.add_argument("--shard", default=None, help="i/n: probe only this shard's checkpoints")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    add_launcher_args(p)
    return p


def open_probe_result(args, labels: list[str], device, shard, rows: list[dict]):
    from runs.results import MetricSpec, create_result, shard_path
    config = {k: v for k, v in vars(args).items()
              if k not in ("out", "overwrite", "shard", "device", "batch_size", *LAUNCH_FIELDS)}
    coords = {"checkpoint": args.refs, "probe": labels, "features": list(FEATURES),
              "seed": args.seeds}
    metric = MetricSpec(("checkpoint", "probe", "features", "seed"), "fraction",
                        "probe accuracy on the test split")
    path = shard_path(args.out, *shard) if shard else args.out
    from runs.refs import ref_record
    inputs = [ref_record(ref) for ref in args.refs if ref != PIXELS]
    return create_result(path, "probe", coords, {"accuracy": metric}, ("checkpoint",),
                         config, inputs, str(device), attrs={"checkpoints": rows},
                         overwrite=args.overwrite, shard=shard)


def run_probes(args, data, labels, result, device) -> None:
    from tqdm.auto import tqdm
    num_classes = data[0].info.num_classes
    for (index,) in tqdm(result.missing(), desc="probe", disable=None):
        ref = args.refs[index]
        train_x, test_x = embed(ref, data, device, args.batch_size)
        accs = probe_all(train_x, data[0].y.to(device), test_x, data[1].y.to(device),
                         num_classes, args.probes, args.ks, args.seeds, name=ref)
        grid = np.array([[[accs[(lab, kind, seed)] for seed in args.seeds]
                          for kind in FEATURES] for lab in labels])  # (P, F, S)
        result.write((index,), accuracy=grid)


def table(accs: np.ndarray, refs, labels, features=FEATURES) -> str:
    """Markdown table: one row per checkpoint, mean +- std over seeds in %, per probe."""
    head = [f"{lab} ({kind})" for lab in labels for kind in features]
    lines = ["| checkpoint | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for i, ref in enumerate(refs):
        cells = []
        for p in range(len(labels)):
            for f in range(len(features)):
                values = accs[i, p, f] * 100
                cells.append("n/a" if np.isnan(values).all() else
                             f"{np.nanmean(values):.2f} ± {np.nanstd(values):.2f}")
        lines.append(f"| {ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    print(f"probes.evaluate {' '.join(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
    if launching(args):
        return launch(main, argv, args, args.out)
    from runs.results import parse_shard
    shard = parse_shard(args.shard) if args.shard else None
    labels = probe_labels(args.probes, args.ks)
    if min(args.ks) < 1:
        raise UserError(f"--ks must be positive, got {args.ks}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1 image")
    device = resolve_device(args.device)
    kwargs = dict(root=args.data_root or None, size=args.size, channels=args.channels)
    data = (load_dataset(args.dataset, split="train", subset=args.subset or None, **kwargs),
            load_dataset(args.dataset, split="test", **kwargs))
    # Every reference is checked (and described) before a result file exists.
    rows = [describe(ref, data[0].info) for ref in args.refs]
    with open_probe_result(args, labels, device, shard, rows) as result:
        run_probes(args, data, labels, result, device)
        path = result.path
    from runs.results import open_result
    done = open_result(path, "probe")
    print(table(done.metrics["accuracy"], args.refs, labels))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
