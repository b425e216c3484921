"""Probe frozen embeddings: `python -m probes.evaluate REF... --dataset cifar10`.

For each checkpoint reference (or `pixels`, the paper's "input" row), extract the encoder's
embeddings of the train and test splits once, then run every requested probe on raw and
train-standardised features, for every seed. Results: one HDF5 file (analysis `probe`,
coords checkpoint x probe x features x seed, metric accuracy) and a table in the paper's
format (mean +- std over seeds). Resumable per checkpoint, shardable with --shard i/n.

The pixel row probes the pixels after the per-channel mean/std normalisation (the
--input-stats statistics), flattened: what the paper's flatten encoder sees, not /255.
RUN@epochs (or RUN@every) probes every saved epoch of a run, one row each; the summary then
gives both protocols per run, probe and seed: its LAST epoch (honest) and its BEST epoch on
the test set, as the paper reports (optimistic: the epoch is chosen on the numbers
reported). `python -m figures probe-table` draws both from the file.

The CLI only resolves references to modules: the result is filled by `probes.api.fill_probes`,
the code path of `probes.evaluate_model` (the same numbers from a notebook).
"""

import argparse
import sys
from collections.abc import Mapping

import numpy as np

from probes.api import FEATURES, PIXELS, PROBES, fill_probes, probe_all, probe_labels, probe_result
from runs.config import HelpFormatter, seed_arg
from runs.data import PAPER_STATS, STATS, load_dataset
from runs.device import resolve_device
from runs.errors import UserError, cli, echo_command
from runs.launch import LAUNCH_FIELDS, add_launcher_args, launch, launching

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


def describe(ref: str, info, input_stats: str = None) -> dict:
    """What a probed row is, for tables and figures: role (with the run's departures from
    the paper's recipe: "student (alpha=1.0, normed head)"), architecture, training data,
    and where it sits in its run ("run", "step", "epoch": the probe tables choose among a
    run's epochs with them). input_stats: the statistics probed with, where the choice
    changes this data's normalisation (None: not checked); a checkpoint trained with the
    others is named in a warning on stderr."""
    if ref == PIXELS:
        return {"ref": ref, "role": "pixels", "model": "", "trained_on": "", "run": "",
                "step": None, "epoch": None}
    from runs.recipe import fill_legacy
    from runs.refs import checkpoint_position, parse_ref
    loaded = load_checked(ref, info)
    kind = (loaded.payload.get("extra") or {}).get("kind", "") or \
        ("distill" if loaded.payload.get("source") == "dinopl" else "")  # the paper's runs
    config = fill_legacy(kind, loaded.config)  # an old run: what it was made with
    if input_stats is not None:
        check_input_stats(ref, config, input_stats)
    return {"ref": ref, "role": role_of(kind, config, "teacher" in parse_ref(ref).parts),
            "model": loaded.model.spec.get("name", ""),
            "trained_on": config.get("dataset", ""), **checkpoint_position(ref)}


def describe_all(refs, info, input_stats: str = None) -> list[dict]:
    """`describe` of every reference; the epochs of one run (RUN@epochs) share its role,
    model and checks, so only its first checkpoint is loaded here."""
    from runs.refs import checkpoint_position, parse_ref
    rows, seen = [], {}
    for ref in refs:
        place = {} if ref == PIXELS else checkpoint_position(ref)
        key = (place["run"], parse_ref(ref).parts) if place.get("run") else None
        if key is not None and key in seen:
            rows.append({**seen[key], "ref": ref, **place})
            continue
        rows.append(describe(ref, info, input_stats))
        if key is not None:
            seen[key] = rows[-1]
    return rows


def role_of(kind: str, config: dict, teacher: bool) -> str:
    """"teacher", "student", "noise-student" (the random-input control), "supervised" or
    "checkpoint" (kind: the checkpoint's engine); a student initialised away from its
    teacher, or any run off the paper's recipe, says how in brackets."""
    from runs.refs import at_teacher, recipe_notes
    role = "teacher" if teacher else \
        {"distill": "student", "train": "supervised"}.get(kind, "checkpoint")
    notes = recipe_notes(config)
    if role == "student" and config.get("dataset") == "noise":
        role = "noise-student"
    elif role == "student" and not at_teacher(config.get("alpha", 0.0)):
        notes.insert(0, f"alpha={config['alpha']}")  # not the paper's init
    return f"{role} ({', '.join(notes)})" if notes else role


def check_input_stats(ref: str, config: dict, chosen: str) -> None:
    """Warn on stderr when `ref`'s run was trained with other input statistics than the
    probe's `chosen` (a run from before the `input_stats` field used each dataset's own:
    "dataset"). Checkpoints without a config (imports, plain modules) are not checked."""
    trained = config.get("input_stats", "dataset") if config else chosen
    if trained != chosen:
        print(f"warning: {ref} was trained with input_stats={trained!r} but is probed with "
              f"--input-stats {chosen}: its inputs are normalised otherwise than in training",
              file=sys.stderr)


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
  python -m probes.evaluate pixels RUN@last:teacher RUN@epochs --dataset cifar10 \
      --data-root ~/data     # every epoch: last-epoch and best-epoch (paper) summaries
  python -m probes.evaluate store/distill_x/seed_0@last --dataset stl10 --data-root ~/data \
      --size 32 --probes knn       # transfer: probe a CIFAR-10 student on STL-10
  python -m probes.evaluate pixels store/distill_x/seed_0@last --dataset digits --device cpu"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m probes.evaluate", description=__doc__,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="checkpoint references (e.g. store/distill_x/seed_0@last; "
                        "RUN@epochs: every saved whole epoch of the run from epoch 1, "
                        "RUN@every: every saved checkpoint, one row each) or 'pixels': the "
                        "paper's input row, the pixels normalised per channel with the "
                        "--input-stats statistics, then flattened (what its flatten encoder "
                        "sees; not /255)")
    p.add_argument("--dataset", required=True, help="dataset probed (transfer: any other "
                   "than the one trained on)")
    p.add_argument("--data-root", default="", help="folder (or .npz) of the dataset")
    p.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    p.add_argument("--channels", type=int, default=None, help="convert images to 1 or 3 "
                   "channels")
    p.add_argument("--subset", type=int, default=0, help="train images per class; 0 = all")
    p.add_argument("--input-stats", default="paper", choices=STATS,
                   help="per-channel mean/std that normalise the inputs (encoders and pixel "
                        "row): 'paper', the paper's code's (CIFAR-10's for cifar10 and "
                        "cifar100, ImageNet's for tinyimagenet), or 'dataset', each "
                        "dataset's own train statistics (runs before the option); a "
                        "checkpoint trained with the other choice is named in a warning")
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
    p.add_argument("--seeds", nargs="+", type=seed_arg, default=[0, 1, 2],
                   help="seeds of the trained probes (k-NN is deterministic)")
    p.add_argument("--out", default="results/probe.h5", help="HDF5 result file; the printed "
                   "summary, where a run was probed at several epochs, gives each run's "
                   "LAST epoch (honest) and its BEST epoch on the test set, as the paper "
                   "reports (optimistic: chosen on the numbers reported), per probe and "
                   "seed; `python -m figures probe-table` draws both")
    p.add_argument("--overwrite", action="store_true", help="replace a result file of "
                   "another config")
    p.add_argument("--shard", default=None, help="i/n: probe only this shard's checkpoints")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    add_launcher_args(p)
    return p


def open_probe_result(args, device, shard, rows: list[dict], labels: list[str], refs=None):
    """The result file, its `checkpoint` rows named by `labels` (see runs.refs.ref_labels):
    the same references give the same labels, so a re-run resumes; the files' paths and
    sha256 (what identifies the inputs) are in `inputs`. refs: the references probed
    (RUN@epochs expanded; default args.refs), recorded as the config's `refs`."""
    from runs.refs import ref_record
    from runs.results import shard_path
    refs = list(args.refs if refs is None else refs)
    config = {k: v for k, v in vars(args).items()
              if k not in ("out", "overwrite", "shard", "device", "batch_size", *LAUNCH_FIELDS)}
    config["refs"] = refs
    path = shard_path(args.out, *shard) if shard else args.out
    inputs = [{**ref_record(ref), "label": label} for ref, label in zip(refs, labels)
              if ref != PIXELS]
    from runs.filehash import data_inputs  # data files by content: a resume checks them
    inputs += data_inputs(args.dataset, args.data_root)
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


def summaries(accs: np.ndarray, rows: list[dict], names, labels) -> str:
    """Both protocols' tables (figures.protocols), one row per run and role, where some run
    was probed at several epochs; "" otherwise (the per-checkpoint table says it all)."""
    from figures.protocols import PROTOCOLS, groups, select, several
    if not several(rows):
        return ""
    sizes = {group[-1]: len(group) for group in groups(rows)}
    parts = []
    for protocol, title in PROTOCOLS.items():
        picked, grid = select(accs, rows, protocol)  # (runs, probe, features, seed)
        best = protocol == "paper"
        run_names = [f"{names[i]} (best of {sizes[i]})" if best and sizes[i] > 1 else names[i]
                     for i in picked]
        parts += [f"\n{title}:", table(grid, run_names, labels)]
    return "\n".join(parts)


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
    stats = args.input_stats
    data = (load_dataset(args.dataset, split="train", subset=args.subset or None, stats=stats,
                         **kwargs),
            load_dataset(args.dataset, split="test", stats=stats, **kwargs))
    # Every reference is checked (and described) before a result file exists.
    from runs.refs import expand_refs, ref_labels
    refs = expand_refs(args.refs)  # RUN@epochs: one reference per saved epoch
    if len(set(refs)) != len(refs):
        raise UserError(f"a checkpoint is given twice: {' '.join(args.refs)}")
    names = ref_labels(refs, keep=(PIXELS,))  # the rows' names: LABEL:= or derived
    # The `checkpoints` rows name a checkpoint as its label (as probes.evaluate_model does);
    # its path is in `inputs`.
    # Where the data has no paper choice (digits, npz, ...) both choices normalise alike.
    checked = stats if args.dataset in PAPER_STATS else None
    rows = [{**row, "ref": name} for row, name in
            zip(describe_all(refs, data[0].info, checked), names)]
    models = LoadedModels(refs, names, data[0].info)
    with open_probe_result(args, device, shard, rows, names, refs) as result:
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
    if text := summaries(done.metrics["accuracy"], rows, names, labels):
        print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
