"""Probe frozen embeddings: `python -m probes.evaluate REF... --dataset cifar10`.

For each checkpoint reference (or `pixels`, the raw-pixel baseline), extract the encoder's
embeddings of the train and test splits once, then run every requested probe on raw and
train-standardised features, for every seed. Results: one HDF5 file (analysis `probe`,
coords checkpoint x probe x features x seed, metric accuracy) and a table in the paper's
format (mean +- std over seeds). Resumable per checkpoint, shardable with --shard i/n.

The CLI only resolves references to modules: the result is filled by `probes.api.fill_probes`,
the code path of `probes.evaluate_model` (the same numbers from a notebook).
"""

import argparse
from collections.abc import Mapping

import numpy as np

from probes.api import FEATURES, PIXELS, PROBES, fill_probes, probe_all, probe_labels, probe_result
from runs.config import HelpFormatter
from runs.data import load_dataset
from runs.device import resolve_device
from runs.errors import UserError, cli, echo_command
from runs.launch import LAUNCH_FIELDS, add_launcher_args, launch, launching
from runs.models.head import RECIPE_ALPHA

# probe_all, probe_labels, PROBES and FEATURES live in probes.api; named here for the CLI's
# callers (tests, figures' fixtures).
__all__ = ["FEATURES", "PROBES", "describe", "main", "parser", "probe_all", "probe_labels",
           "table"]

class LoadedModels(Mapping):
    """row label -> its reference's model, loaded (and checked against the data) when first
    asked for: `fill_probes` asks only for the rows a resumed or sharded scan still misses.
    `current`: the reference last asked for (errors name its file, not only its label)."""

    def __init__(self, refs, labels, info):
        self.refs, self.info = dict(zip(labels, refs)), info
        self.current = None

    def __getitem__(self, label):
        ref = self.refs[label]
        self.current = ref
        return PIXELS if ref == PIXELS else load_checked(ref, self.info).model

    def __iter__(self):
        return iter(self.refs)

    def __len__(self):
        return len(self.refs)


# The recipe's student starts at its teacher (alpha tiny, not 0: RECIPE_ALPHA); other alphas
# are rows apart.


def describe(ref: str, info) -> dict:
    """What a probed row is, for tables and figures: role, architecture, training data."""
    if ref == PIXELS:
        return {"ref": ref, "role": "pixels", "model": "", "trained_on": ""}
    loaded = load_checked(ref, info)
    kind = (loaded.payload.get("extra") or {}).get("kind", "")
    from runs.refs import parse_ref
    role = "teacher" if "teacher" in parse_ref(ref).parts else \
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


EPILOG = r"""examples:
  python -m probes.evaluate pixels RUN@init:teacher RUN@last --dataset cifar10 \
      --data-root ~/data --probes knn knn-cosine linear linear-lbfgs --seeds 0 1 2
  python -m probes.evaluate store/distill_x/seed_0@last --dataset stl10 --data-root ~/data \
      --size 32 --probes knn       # transfer: probe a CIFAR-10 student on STL-10
  python -m probes.evaluate pixels store/distill_x/seed_0@last --dataset digits --device cpu"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m probes.evaluate", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
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
                   help=f"probes to run; valid: {', '.join(PROBES.names())}. knn: the "
                   "paper's k-NN (squared L2, majority vote); knn-cosine: DINO's (cosine, "
                   "votes weighted by exp(sim/0.07)); linear: the paper's AdamW probe (10 "
                   "epochs), for reproducing its numbers on standardised features: a fixed "
                   "step budget, far from converged on the small-scale raw features of an "
                   "untrained network (demo teacher: 14%% raw vs 94%% converged); "
                   "linear-lbfgs: logistic regression run to convergence, L2 strength by "
                   "5-fold CV on train, the honest measure of linear capacity")
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


def open_probe_result(args, device, shard, rows: list[dict], labels: list[str]):
    """The result file, its `checkpoint` rows named by `labels` (see runs.refs.ref_labels):
    the same references give the same labels, so a re-run resumes; the files' paths and
    sha256 (what identifies the inputs) are in `inputs`."""
    from runs.refs import ref_record
    from runs.results import shard_path
    config = {k: v for k, v in vars(args).items()
              if k not in ("out", "overwrite", "shard", "device", "batch_size", *LAUNCH_FIELDS)}
    path = shard_path(args.out, *shard) if shard else args.out
    inputs = [{**ref_record(ref), "label": label} for ref, label in zip(args.refs, labels)
              if ref != PIXELS]
    return probe_result(path, labels, args.probes, args.ks, args.seeds, config, inputs,
                        device, rows, overwrite=args.overwrite, shard=shard)


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
    echo_command("probes.evaluate", argv)
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
    from runs.refs import ref_labels
    if len(set(args.refs)) != len(args.refs):
        raise UserError(f"a checkpoint is given twice: {' '.join(args.refs)}")
    names = ref_labels(args.refs, keep=(PIXELS,))  # the rows' names: LABEL:= or derived
    # The `checkpoints` rows name a checkpoint as its label (as probes.evaluate_model does);
    # its path is in `inputs`.
    rows = [{**describe(ref, data[0].info), "ref": name} for ref, name in zip(args.refs, names)]
    models = LoadedModels(args.refs, names, data[0].info)
    with open_probe_result(args, device, shard, rows, names) as result:
        try:
            fill_probes(result, models, data, args.probes, args.ks, args.seeds,
                        batch_size=args.batch_size, device=device)
        except UserError as err:  # name the reference too, not only its label
            if models.current in (None, PIXELS) or str(models.current) in str(err):
                raise
            raise UserError(f"{models.current}: {err}") from None
        path = result.path
    from runs.results import open_result
    done = open_result(path, "probe")
    print(table(done.metrics["accuracy"], names, labels))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
