"""Bad input, every command: one row per case, each through the command's `main(argv)`.

Every row must end with exit status 2 and a last stderr line `error: ...` that names the
culprit (flag, value or file), and must leave every existing file as it was (bytes and
mtime) and write no new one. Rows that argparse itself refuses (an invalid choice, a
missing value) end with argparse's `PROG: error: ...` line, also status 2.

The rows here are the cases the per-module tests did not have; those live beside their
module and are listed in README.md ("What happens when things go wrong"):
test_train.py::test_cli_bad_flags_exit_2_and_touch_nothing, test_distill.py::
test_cli_bad_flags_exit_2_with_one_line, test_landscape_scan.py::
test_bad_inputs_exit_2_with_one_line and ::test_border_bad_inputs_exit_2,
test_tickets_imp.py::test_bad_input_exits_2_before_training, test_probe_cli.py,
test_results.py, test_data.py, test_checkpoint.py, test_refs.py.

After the table: a full disk while writing (checkpoints, result cells, result files,
metrics), simulated by failing the write with ENOSPC and, where user namespaces allow it,
on a real 1 MiB tmpfs; and two processes writing one result file or one run.
"""

import dataclasses
import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import run_cli

from runs.checkpoint import read_checkpoint, save_checkpoint
from runs.engines.distill import DistillConfig, distill
from runs.engines.train import TrainConfig, train
from runs.models import create_model
from runs.results import WriteLock, open_result
from runs.store import Run, run_path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "convnet", "--width", "0.125", "--dataset", "toy", "--batch-size", "32",
        "--device", "cpu"]
HEAD = ["--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "8"]
EVAL = ["--bn-samples", "64", "--bn-batch-size", "32", "--device", "cpu"]
TRAIN = ("runs.train", *TINY, "--steps", "2", "--store", "{store}")
DISTILL = ("runs.distill", *TINY, *HEAD, "--steps", "2", "--store", "{store}")
INTERPOLATE = ("landscape.interpolate", "{A}", "{B}", "--grid", "0:1:3", *EVAL, "--out",
               "{out}")
BORDER = ("landscape.border", "random", *TINY, "--steps", "2", "--grid", "0:1:3", *EVAL[:4],
          "--store", "{store}", "--out", "{out}")
IMP = ("tickets.imp", *TINY, "--steps", "2", "--levels", "1", "--store", "{store}", "--out",
       "{out}")
PROBE = ("probes.evaluate", "--dataset", "toy", "--probes", "knn", "--seeds", "0", "--device",
         "cpu", "--out", "{out}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the world


def broken_copy(source: Path, target: Path, change) -> str:
    """A copy of a checkpoint with `change(state)` applied to its model state."""
    payload = read_checkpoint(source)
    change(payload["model"]["state"])
    torch.save(payload, target)
    return str(target)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Files every row may point at: runs, broken checkpoints, foreign and broken results,
    broken dataset roots, a bad preset. Rows write only under their own tmp_path."""
    root = tmp_path_factory.mktemp("world")
    store = root / "store"
    cfg = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=4,
                      lr=0.05)
    runs = [train(dataclasses.replace(cfg, seed=s), store, device="cpu") for s in (0, 1)]
    student = distill(DistillConfig(model="convnet", width=0.125, dataset="toy", out_dim=64,
                                    hidden_dim=32, bottleneck_dim=8, batch_size=32,
                                    num_steps=2), store, device="cpu")
    last = runs[0].ckpt_path(4)
    files = {"A": f"{runs[0].path}@last", "B": f"{runs[1].path}@last",
             "Arun": str(runs[0].path), "S": str(student.path),
             "distill_h5": str(student.path / "distill.h5")}
    (root / "trunc.pt").write_bytes(last.read_bytes()[:1000])
    files["trunc"] = str(root / "trunc.pt")
    files["wide"] = str(save_checkpoint(root / "wide.pt",
                                        create_model("convnet", num_classes=4, width=0.25), 0))
    torch.save(create_model("resnet20", num_classes=4).state_dict(), root / "r20.pt")
    files["r20"] = str(root / "r20.pt")
    files["nan"] = broken_copy(last, root / "nan.pt",
                               lambda s: s["encoder.0.weight"].view(-1)[0].fill_(float("nan")))
    files["inf"] = broken_copy(last, root / "inf.pt",
                               lambda s: s["fc.bias"].view(-1)[0].fill_(float("inf")))
    files["huge"] = broken_copy(last, root / "huge.pt",  # finite weights, features overflow
                                lambda s: s["encoder.0.weight"].mul_(3e38))
    with h5py.File(root / "plain.h5", "w") as file:
        file["x"] = np.zeros(3)
    files["plain"] = str(root / "plain.h5")
    (root / "text.h5").write_text("not hdf5\n")
    files["text"] = str(root / "text.h5")
    shutil.copy(files["distill_h5"], root / "v0.h5")
    with h5py.File(root / "v0.h5", "r+") as file:
        file.attrs["schema"] = "results/0"
    files["v0"] = str(root / "v0.h5")
    data = Path(files["distill_h5"]).read_bytes()
    (root / "half.h5").write_bytes(data[:len(data) // 2])
    files["half"] = str(root / "half.h5")
    (root / "empty").mkdir()
    files["empty"] = str(root / "empty")
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    files["corrupt_npz"] = str(root / "corrupt.npz")
    np.savez(root / "lacking.npz", x_train=np.zeros((4, 8, 8), np.uint8))
    files["lacking_npz"] = str(root / "lacking.npz")
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # header, no data
    files["mnist"] = str(root / "mnist")
    (root / "preset.json").write_text(json.dumps({"distill": {"model": "convnet"},
                                                  "bogus": 1}))
    files["preset"] = str(root / "preset.json")
    for name, change in BROKEN_NPZ.items():
        files[name] = write_npz(root / f"{name}.npz", **change)
    files["root"] = root
    return files


def write_npz(path: Path, **change) -> str:
    """A small valid npz (4 classes of grey 8x8 images, 32 train, 8 test), `change` applied."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (32, 8, 8), dtype=np.uint8),
              "y_train": np.arange(32) % 4,
              "x_test": rng.integers(0, 256, (8, 8, 8), dtype=np.uint8),
              "y_test": np.arange(8) % 4}
    np.savez(path, **{**arrays, **change})
    return str(path)


# npz files each broken in one way that only shows once the arrays are read.
BROKEN_NPZ = {
    "npz_no_test": dict(x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64)),
    "npz_no_train": dict(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64)),
    "npz_test_label_-1": dict(y_test=np.array([0, 1, 2, 3, -1, 1, 2, 3])),
    "npz_train_label_-1": dict(y_train=np.r_[np.arange(31) % 4, -1]),
    "npz_constant": dict(x_train=np.full((32, 8, 8), 17, np.uint8)),
}


def snapshot(*roots) -> dict:
    """Every file under the roots with its bytes and mtime."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for root in roots
            for p in Path(root).rglob("*") if p.is_file()}


def call(module: str, argv: list[str]) -> tuple[int, list[str]]:
    """main(argv) of a command: its exit status (argparse's SystemExit too), stderr lines."""
    return run_cli(module, argv)


def fill(text: str, world: dict, tmp_path: Path) -> str:
    where = {"store": tmp_path / "store", "out": tmp_path / "out.h5", "figs": tmp_path / "figs"}
    return text.format(**{k: v for k, v in world.items() if k != "root"}, **where)


def assert_one_line_error(code, lines, culprit: str) -> str:
    assert code == 2, lines[-3:]
    last = lines[-1]
    assert last.startswith("error: ") or ": error: " in last, last
    assert culprit in last, last
    assert sum("error: " in line for line in lines) == 1, lines
    return last


# ---------------------------------------------------------------------------- the table

ROWS = {
    # unknown names
    "train unknown dataset": (TRAIN, ["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    "train unknown model": (TRAIN, ["--model", "resnet9"], "invalid choice: 'resnet9'"),
    "distill unknown probe dataset": (DISTILL, ["--probe-dataset", "nosuch"],
                                      "unknown dataset 'nosuch'"),
    "interpolate unknown bn mode": (INTERPOLATE, ["--bn-mode", "sometimes"],
                                    "invalid choice: 'sometimes'"),
    "interpolate unknown dataset option": (INTERPOLATE, ["--dataset", "toy", "--data-options",
                                                         "sidee=8"], "sidee"),
    "imp unknown prune scope": (IMP, ["--prune-scope", "biases"], "invalid choice: 'biases'"),
    "probe unknown dataset": (PROBE, ["pixels", "--dataset", "nosuch"],
                              "unknown dataset 'nosuch'"),
    "figures unknown figure": (("figures.__main__", "nosuch", "--results", "{distill_h5}", "--out",
                                "{figs}"), [], "unknown figure 'nosuch'"),
    "pipeline unknown preset": (("runs.pipeline", "--preset", "nosuch", "--out", "{figs}"), [],
                                "--preset 'nosuch'"),
    "pipeline unknown preset key": (("runs.pipeline", "--preset", "{preset}", "--out",
                                     "{figs}"), [], "unknown key(s) bogus"),
    # checkpoints: truncated, of another architecture, NaN or Inf inside
    "interpolate truncated checkpoint": (INTERPOLATE[:1] + ("{trunc}",) + INTERPOLATE[2:], [],
                                         "cannot read checkpoint {trunc}"),
    "probe truncated checkpoint": (PROBE, ["{trunc}"], "cannot read checkpoint {trunc}"),
    "train --init truncated checkpoint": (TRAIN, ["--init", "{trunc}"],
                                          "cannot read checkpoint {trunc}"),
    "border start truncated checkpoint": (BORDER[:1] + ("{trunc}",) + BORDER[2:], [],
                                          "cannot read checkpoint {trunc}"),
    "imp --rewind truncated checkpoint": (IMP, ["--rewind", "{trunc}"],
                                          "cannot read checkpoint {trunc}"),
    "train --rewind another architecture": (TRAIN, ["--rewind", "{wide}"],
                                            "--rewind {wide} is a convnet"),
    "probe state dict of another architecture": (PROBE, ["convnet={r20}"],
                                                 "{r20} does not fit model convnet"),
    "interpolate NaN weight": (INTERPOLATE[:1] + ("{nan}",) + INTERPOLATE[2:], [],
                               "{nan} holds NaN or Inf values in encoder.0.weight"),
    "interpolate Inf in the fc": (INTERPOLATE[:2] + ("{inf}",) + INTERPOLATE[3:], [],
                                  "{inf} holds NaN or Inf values in fc.bias"),
    "train --init NaN weight": (TRAIN, ["--init", "{nan}"], "{nan} holds NaN or Inf"),
    "train --rewind NaN weight": (TRAIN, ["--rewind", "{nan}"], "{nan} holds NaN or Inf"),
    "border start NaN weight": (BORDER[:1] + ("{nan}",) + BORDER[2:], [],
                                "{nan} holds NaN or Inf"),
    "probe NaN weight": (PROBE, ["{nan}"], "{nan}: features of nan (raw) contain NaN or Inf"),
    "probe features overflow to Inf": (PROBE, ["{huge}"],
                                       "{huge}: features of huge (raw) contain NaN or Inf"),
    # result files: not results, other analyses, other schema versions, broken
    "results show on a non-result HDF5": (("runs.results", "show", "{plain}"), [],
                                          "{plain} has schema None"),
    "results show on a non-HDF5 file": (("runs.results", "show", "{text}"), [],
                                        "not an HDF5 file: {text}"),
    "results show on an older schema": (("runs.results", "show", "{v0}"), [],
                                        "{v0} has schema 'results/0', expected 'results/1'"),
    "results merge with a non-result": (("runs.results", "merge", "{out}", "{distill_h5}",
                                         "{plain}"), [], "{plain} has schema None"),
    "figures given another analysis": (("figures.__main__", "probe-table", "--results",
                                        "{distill_h5}", "--out", "{figs}"), [],
                                       "{distill_h5} holds analysis 'distill'"),
    "figures given a non-HDF5 file": (("figures.__main__", "probe-table", "--results", "{text}",
                                       "--out", "{figs}"), [], "not an HDF5 file: {text}"),
    "interpolate onto another analysis' result": (
        INTERPOLATE[:-1] + ("{distill_h5}",), [],
        "{distill_h5} already exists and holds a different analysis"),
    "probe onto a truncated result": (PROBE[:-1] + ("{half}",), ["pixels"],
                                      "{half} exists but cannot be resumed"),
    # grid specs
    "interpolate empty grid": (INTERPOLATE, ["--grid="], "--grid: cannot parse ''"),
    "interpolate grid with NaN": (INTERPOLATE, ["--grid", "0:1:nan"],
                                  "--grid: cannot parse '0:1:nan'"),
    "interpolate grid with Inf": (INTERPOLATE, ["--grid", "0,inf"],
                                  "--grid: cannot parse '0,inf'"),
    "interpolate plane beta grid": (INTERPOLATE[:3] + ("{A}",) + INTERPOLATE[3:],
                                    ["--beta-grid", "x"], "--beta-grid: cannot parse 'x'"),
    "border empty grid": (BORDER, ["--grid="], "--grid: cannot parse ''"),
    "imp empty barrier grid": (IMP, ["--instability", "--barrier-grid="],
                               "--barrier-grid: cannot parse ''"),
    # sizes: zero or negative
    "train batch size 0": (TRAIN, ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    "train batch size -4": (TRAIN, ["--batch-size", "-4"], "--batch-size -4"),
    "train width 0": (TRAIN, ["--width", "0"], "width"),
    "train val size -1": (TRAIN, ["--val-size", "-1"], "--val-size -1"),
    "train warmup -1": (TRAIN, ["--warmup-steps", "-1"], "--warmup-steps -1"),
    "train eval every -1": (TRAIN, ["--eval-every", "-1"], "--eval-every -1"),
    "train crop padding -1": (TRAIN, ["--crop-padding", "-1"], "--crop-padding -1"),
    "distill batch size 0": (DISTILL, ["--batch-size", "0"], "--batch-size 0"),
    "distill out dim 0": (DISTILL, ["--out-dim", "0"], "--out-dim 0"),
    "distill hidden dim 0": (DISTILL, ["--hidden-dim", "0"], "--hidden-dim 0"),
    "distill bottleneck dim -1": (DISTILL, ["--bottleneck-dim", "-1"], "--bottleneck-dim -1"),
    "distill probe k 0": (DISTILL, ["--probe-k", "0"], "--probe-k 0"),
    "distill probe every -1": (DISTILL, ["--probe-every", "-1"], "--probe-every -1"),
    "interpolate bn batch size 0": (INTERPOLATE, ["--bn-batch-size", "0"],
                                    "--bn-batch-size 0"),
    "interpolate batch size 0": (INTERPOLATE, ["--batch-size", "0"], "--batch-size 0"),
    "interpolate bn samples -1": (INTERPOLATE, ["--bn-samples", "-1"], "--bn-samples -1"),
    "interpolate train samples -1": (INTERPOLATE, ["--train-samples", "-1"],
                                     "--train-samples -1"),
    "interpolate points per pass -1": (INTERPOLATE, ["--points-per-pass", "-1"],
                                       "--points-per-pass -1"),
    "interpolate knn k 0": (INTERPOLATE, ["--metrics", "knn", "--knn-k", "0"], "--knn-k 0"),
    "border children 0": (BORDER, ["--children", "0"], "--children 0"),
    "border eval batch size 0": (BORDER, ["--eval-batch-size", "0"], "--eval-batch-size 0"),
    "border points per pass -1": (BORDER, ["--points-per-pass", "-1"], "--points-per-pass -1"),
    "imp no seeds": (IMP, ["--seeds"], "--seeds"),
    "probe k 0": (PROBE, ["pixels", "--ks", "0"], "--ks"),
    "probe batch size 0": (PROBE, ["{A}", "--batch-size", "0"], "--batch-size 0"),
    "probe subset -1": (PROBE, ["pixels", "--subset", "-1"], "subset"),
    "probe size 0": (PROBE, ["pixels", "--size", "0"], "size"),
    # rates and factors outside their range
    "train lr -0.1": (TRAIN, ["--lr", "-0.1"], "--lr -0.1: must be a positive number"),
    "train lr 0": (TRAIN, ["--lr", "0"], "--lr 0.0"),
    "train lr NaN": (TRAIN, ["--lr", "nan"], "--lr nan"),
    "train lr Inf": (TRAIN, ["--lr", "inf"], "--lr inf"),
    "train momentum 1.5": (TRAIN, ["--momentum", "1.5"], "--momentum 1.5: must lie in [0, 1)"),
    "train weight decay -1": (TRAIN, ["--weight-decay", "-1"], "--weight-decay -1.0"),
    "train gamma 0": (TRAIN, ["--gamma", "0"], "--gamma 0.0"),
    "train milestone 1.5": (TRAIN, ["--milestones", "0.5", "1.5"], "--milestones 0.5 1.5"),
    "distill alpha 1.5": (DISTILL, ["--alpha", "1.5"], "--alpha 1.5: must lie in [0, 1]"),
    "distill alpha NaN": (DISTILL, ["--alpha", "nan"], "--alpha nan"),
    "distill center momentum 1.5": (DISTILL, ["--centering", "--center-momentum", "1.5"],
                                    "--center-momentum 1.5"),
    "distill teacher temperature 0": (DISTILL, ["--teacher-temp", "0"], "--teacher-temp 0.0"),
    "distill lr -1": (DISTILL, ["--lr", "-1"], "--lr -1.0"),
    "imp rate NaN": (IMP, ["--rate", "nan"], "--rate nan"),
    "imp rate 1": (IMP, ["--rate", "1"], "--rate 1"),
    # dataset roots with missing or corrupt files
    "train cifar10 root without files": (TRAIN, ["--dataset", "cifar10", "--data-root",
                                                 "{empty}"], "{empty}"),
    "train corrupt npz": (TRAIN, ["--dataset", "npz", "--data-root", "{corrupt_npz}"],
                          "corrupt file {corrupt_npz}"),
    "train npz lacking arrays": (TRAIN, ["--dataset", "npz", "--data-root", "{lacking_npz}"],
                                 "{lacking_npz} lacks"),
    "train corrupt mnist": (TRAIN, ["--dataset", "mnist", "--data-root", "{mnist}"],
                            "corrupt file {mnist}"),
    "probe cifar100 root without files": (PROBE, ["pixels", "--dataset", "cifar100",
                                                  "--data-root", "{empty}"], "{empty}"),
    "interpolate corrupt npz": (INTERPOLATE, ["--dataset", "npz", "--data-root",
                                              "{corrupt_npz}"], "{corrupt_npz}"),
    # data problems, named with the file and the array (issue 19): refused as the data loads
    **{f"{cmd} npz with 0 {split} images": (
        command, ["--dataset", "npz", "--data-root", f"{{npz_no_{split}}}"],
        f"{{npz_no_{split}}}:x_{split} holds 0 images")
       for cmd, command in (("train", TRAIN), ("distill", DISTILL))
       for split in ("train", "test")},
    **{f"{cmd} npz with label -1 in y_test": (
        command, ["--dataset", "npz", "--data-root", "{npz_test_label_-1}"],
        "{npz_test_label_-1}:y_test holds label -1 (image 4)")
       for cmd, command in (("train", TRAIN), ("distill", DISTILL),
                            ("interpolate", INTERPOLATE))},
    "train npz with label -1 in y_train": (
        TRAIN, ["--dataset", "npz", "--data-root", "{npz_train_label_-1}"],
        "{npz_train_label_-1} (train split) holds label -1 (image 31)"),
    **{f"{cmd} npz with constant images": (
        command, ["--dataset", "npz", "--data-root", "{npz_constant}"],
        "{npz_constant}:x_train is constant (every pixel of channel 0 is 17)")
       for cmd, command in (("train", TRAIN), ("distill", DISTILL))},
    "distill data option not a number": (DISTILL, ["--dataset", "noise", "--data-options",
                                                   "count=abc"], "--data-options count=abc"),
    "distill data option empty": (DISTILL, ["--dataset", "noise", "--data-options", "count="],
                                  "--data-options count=:"),
    "distill malformed noise shape": (DISTILL, ["--dataset", "noise", "--data-options",
                                                "shape=3,,32"], "--data-options shape=3,,32"),
    "distill digits fraction not a number": (DISTILL, ["--dataset", "digits", "--data-options",
                                                       "test_fraction=x"], "test_fraction=x"),
    "interpolate data option not a number": (INTERPOLATE, ["--dataset", "toy", "--data-options",
                                                           "side=x"], "--data-options side=x"),
    # sizes beyond a sane bound: refused with the number before anything is allocated
    "train width 1e5": (TRAIN, ["--width", "1e5"],
                        "--width 100000.0 (4 classes) would have 9.22e+14 parameters"),
    "distill width 1e5": (DISTILL, ["--width", "1e5"], "--width 100000.0"),
    "distill out dim 1e11": (DISTILL, ["--out-dim", "100000000000"],
                             "--out-dim 100000000000, --hidden-dim 32"),
    "distill hidden dim 1e10": (DISTILL, ["--hidden-dim", "10000000000"],
                                "--hidden-dim 10000000000"),
    "distill noise shape 1,30000,30000": (
        DISTILL, ["--dataset", "noise", "--data-options", "shape=1,30000,30000"],
        "noise: 50000 images of shape (1, 30000, 30000) would take 4.19e+04 GiB"),
    "distill toy side 100000": (DISTILL, ["--data-options", "side=100000"],
                                "lower --data-options side= or per_class="),
    "interpolate label of 300 characters": (
        INTERPOLATE[:1] + ("x" * 300 + ":={A}",) + INTERPOLATE[2:], [],
        "its LABEL before ':=' is 300 characters long; at most 200"),
    "interpolate knn k above the train set": (
        INTERPOLATE, ["--metrics", "knn", "--knn-k", "100000"],
        "--knn-k 100000: must be at most 256"),
    # seeds that torch and numpy cannot take (signed 64 bits)
    "train seed 2**64": (TRAIN, ["--seed", str(2 ** 64)],
                         f"--seed {2 ** 64}: seeds must be whole numbers in [0, {2 ** 63 - 1}]"),
    "train data seed -1": (TRAIN, ["--data-seed", "-1"], "--data-seed -1"),
    "distill seed 2**64": (DISTILL, ["--seed", str(2 ** 64)], f"--seed {2 ** 64}"),
    "distill teacher seed 2**64": (DISTILL, ["--teacher-seed", str(2 ** 64)],
                                   f"--teacher-seed {2 ** 64}"),
    "interpolate seed 2**64": (INTERPOLATE, ["--seed", str(2 ** 64)], f"--seed {2 ** 64}"),
    "border sample seed 2**64": (BORDER, ["--sample-seed", str(2 ** 64)],
                                 f"--sample-seed {2 ** 64}"),
}


# Found only once the scan runs, after its result file exists (empty: no cell done).
FOUND_MID_SCAN = ("probe NaN weight", "probe features overflow to Inf")


@pytest.mark.parametrize("row", ROWS, ids=list(ROWS))
def test_bad_input_exits_2_with_one_line_and_changes_no_file(world, tmp_path, row):
    command, extra, culprit = ROWS[row]
    module, *argv = (fill(a, world, tmp_path) for a in command)
    before = snapshot(world["root"], tmp_path)
    code, lines = call(module, argv + [fill(a, world, tmp_path) for a in extra])
    assert_one_line_error(code, lines, fill(culprit, world, tmp_path))
    after = snapshot(world["root"], tmp_path)
    if row in FOUND_MID_SCAN:
        new = set(after) - set(before)
        assert new == {tmp_path / "out.h5"} and not open_result(tmp_path / "out.h5").done.any()
        after = {path: after[path] for path in before}
    assert after == before


def test_a_nan_loss_names_the_step_and_keeps_the_good_checkpoint(tmp_path):
    """NaN in a loss, through the CLI (the engines' own tests cover where it is caught)."""
    code, lines = call("runs.train", [*TINY, "--steps", "4", "--lr", "1e30", "--store",
                                      str(tmp_path)])
    last = assert_one_line_error(code, lines, "loss is")
    kept = Path(last.split("last good checkpoint: ")[1].split(" ")[0].rstrip(";"))
    assert read_checkpoint(kept)["step"] < 4
    assert not Run(kept.parents[1]).done


def test_a_truncated_checkpoint_inside_a_run_is_named_on_resume(world, tmp_path):
    run = Path(shutil.copytree(world["Arun"], tmp_path / "store" / Path(world["Arun"]).parent
                               .name / "seed_0"))
    (run / "DONE").unlink()
    last = run / "ckpt" / "step_0000004.pt"
    last.write_bytes(last.read_bytes()[:500])
    before = snapshot(tmp_path)
    code, lines = call("runs.train", [*TINY, "--steps", "4", "--lr", "0.05", "--store",
                                      str(tmp_path / "store")])
    assert_one_line_error(code, lines, f"cannot read checkpoint {last}")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- a full disk


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_saving_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    argv = [*TINY, "--lr", "0.05", "--store", str(tmp_path)]
    assert call("runs.train", [*argv, "--steps", "16", "--save-at", "8"])[0] == 0
    run = Run(next(tmp_path.glob("train_*/seed_0")))
    ckpt = run.ckpt_path(16)
    ckpt.unlink()
    (run.path / "DONE").unlink()  # as if killed before the end: the re-run saves step 16
    before = snapshot(tmp_path)
    monkeypatch.setattr(torch, "save", disk_full)
    code, lines = call("runs.train", [*argv, "--steps", "16", "--save-at", "8"])
    last = assert_one_line_error(code, lines, f"while writing {ckpt}")
    assert last.startswith("error: No space left on device") and "re-run" in last
    for path, (data, mtime) in before.items():  # what was kept is kept, and opens
        if path.suffix == ".pt":
            assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
            read_checkpoint(path)
    assert not list(tmp_path.rglob("*.tmp"))  # the half-written file is gone
    monkeypatch.undo()
    assert call("runs.train", [*argv, "--steps", "16", "--save-at", "8"])[0] == 0
    assert run.done and ckpt.exists()


def test_full_disk_while_writing_a_result_cell_keeps_the_cells_done(world, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "out.h5"
    argv = [world["A"], world["B"], "--grid", "0:1:5", "--points-per-pass", "1", *EVAL,
            "--out", str(out)]
    flushes = []
    real_flush = h5py.File.flush

    def flush_then_fill_up(self):
        flushes.append(1)
        if len(flushes) > 2:  # two cells get written, then the disk is full
            disk_full()
        real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flush_then_fill_up)
    code, lines = call("landscape.interpolate", argv)
    assert_one_line_error(code, lines, f"No space left on device while writing {out}")
    monkeypatch.undo()
    data = open_result(out, "interpolate")  # the file opens; the cells before are done
    done = data.done.tolist()  # (the failing cell too, if closing the file saved it)
    assert done in ([True] * 2 + [False] * 3, [True] * 3 + [False] * 2)
    assert np.isfinite(data.metrics["loss"][data.done]).all()
    assert np.isnan(data.metrics["loss"][~data.done]).all()
    assert call("landscape.interpolate", argv)[0] == 0
    assert open_result(out).done.all()


def test_full_disk_while_creating_a_result_keeps_the_old_file(world, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    argv = [world["A"], world["B"], "--grid", "0:1:3", *EVAL, "--out", str(out)]
    assert call("landscape.interpolate", argv)[0] == 0
    before = snapshot(tmp_path)
    import runs.results
    monkeypatch.setattr(runs.results, "_write_datasets", disk_full)
    code, lines = call("landscape.interpolate", [*argv[:3], "0:1:5", *argv[4:],
                                                 "--overwrite"])
    assert_one_line_error(code, lines, f"No space left on device while writing {out}")
    assert snapshot(tmp_path) == before  # the old result stands; no temp file is left
    assert open_result(out).done.all()


def test_full_disk_while_logging_metrics_names_the_file(tmp_path, monkeypatch):
    import runs.store
    monkeypatch.setattr(runs.store.os, "fsync", disk_full)
    code, lines = call("runs.train", [*TINY, "--steps", "8", "--store", str(tmp_path)])
    run = Run(next(tmp_path.glob("train_*/seed_0")))
    assert_one_line_error(code, lines, f"while writing {run.path / 'metrics.jsonl'}")
    assert [read_checkpoint(run.ckpt_path(s))["step"] for s in run.steps()] == [0]


def unshare_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none "
                            "/mnt"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not unshare_available(), reason="needs unshare -rm to mount a tmpfs")
def test_a_real_full_disk_stops_training_with_one_line_and_files_that_open(tmp_path):
    """runs.train with its store on a 1 MiB tmpfs (a user namespace): the disk fills
    mid-run, the command says which file it could not write, and everything kept opens."""
    script = (f"mount -t tmpfs -o size=1m none {tmp_path} && cd {tmp_path} && "
              f"{sys.executable} -m runs.train {' '.join(TINY)} --width 0.25 --steps 40ep "
              f"--save-at " + " ".join(f"{e}ep" for e in range(1, 40)) +
              f" --store store; echo \"exit $?\"; {sys.executable} -c \"" +
              "import glob; from runs.checkpoint import read_checkpoint; "
              "[read_checkpoint(p) for p in glob.glob('store/*/*/ckpt/*.pt')]; "
              "print('opened', len(glob.glob('store/*/*/ckpt/*.pt')))\"")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                         text=True, env=env, timeout=300)
    lines = out.stdout.strip().splitlines()
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert "exit 2" in lines, out.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: No space left on device while "
                                                     "writing store/train_"), errors
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith("opened ") and int(lines[-1].split()[1]) >= 2


# ------------------------------------------------------------------- the machine refuses


def _hdf5_message(path, code: int, error: str) -> str:
    return (f"Unable to synchronously create file (unable to open file: name = '{path}', "
            f"errno = {code}, error message = '{error}', flags = 13, o_flags = 242)")


def _numpy_out_of_memory(path):
    try:
        np.empty((10 ** 7, 10 ** 7))  # 728 TiB: refused at once, nothing is touched
    except MemoryError as err:
        return err
    raise AssertionError("numpy allocated 728 TiB")


# What the OS or an allocator raised -> what the one line must say ({p}: the path named).
REFUSALS = {
    "disk full": (lambda p: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p),
                  "No space left on device while writing {p}"),
    "disk full in an HDF5 message": (
        lambda p: RuntimeError(f"Can't write data (file write failed: time = x, filename = "
                               f"'{p}', file descriptor = 5, errno = 28, error message = "
                               f"'No space left on device')"),
        "No space left on device while writing {p}"),
    "permission denied": (lambda p: PermissionError(errno.EACCES, "Permission denied", p),
                          "cannot write {p}: permission denied"),
    "permission denied in an HDF5 message": (
        lambda p: OSError(_hdf5_message(p, errno.EACCES, "Permission denied")),
        "cannot write {p}: permission denied"),
    "read-only file system": (lambda p: OSError(errno.EROFS, os.strerror(errno.EROFS), p),
                              "cannot write {p}: read-only file system"),
    "a file where a folder should be": (
        lambda p: NotADirectoryError(errno.ENOTDIR, "Not a directory", p),
        "{p}: Not a directory (a part of the path is a file, not a folder)"),
    "a folder deleted mid-run": (
        lambda p: FileNotFoundError(errno.ENOENT, "No such file or directory", p),
        "{p}: No such file or directory"),
    "numpy out of memory": (_numpy_out_of_memory, "out of memory (asked for 728 TiB)"),
    "torch CPU allocator": (
        lambda p: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                               "DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 3200000000000 bytes. Error code 12"),
        "out of memory (asked for 2.91 TiB)"),
    "CUDA out of memory": (lambda p: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 8 GiB total capacity)"),
        "out of memory (asked for 20.00 GiB)"),
    "a bare MemoryError": (lambda p: MemoryError(), "out of memory; lower the sizes"),
}
# A CLI and the function its main calls first: replaced by one that raises.
BODIES = {"runs.train": (TRAIN, "runs.engines.train", "load_data"),
          "runs.distill": (DISTILL, "runs.engines.distill", "load_data"),
          "landscape.interpolate": (INTERPOLATE, "landscape.interpolate", "prepare")}


@pytest.mark.parametrize("module", BODIES)
@pytest.mark.parametrize("refusal", REFUSALS)
def test_what_the_machine_refuses_is_one_line_and_exit_2(world, tmp_path, monkeypatch,
                                                         refusal, module):
    """A full disk, a forbidden or read-only path, a path in the way, memory running out:
    one `error:` line naming the file or the size asked for, exit 2, no traceback."""
    command, owner, body = BODIES[module]
    make, culprit = REFUSALS[refusal]
    path = str(tmp_path / "out" / "file.h5")

    def refused(*args, **kwargs):
        raise make(path)

    monkeypatch.setattr(importlib.import_module(owner), body, refused)
    before = snapshot(world["root"], tmp_path)
    code, lines = call(module, [fill(a, world, tmp_path) for a in command[1:]])
    assert_one_line_error(code, lines, culprit.format(p=path))
    assert not any("Traceback" in line for line in lines)
    assert snapshot(world["root"], tmp_path) == before


def test_anything_else_keeps_its_traceback(monkeypatch, tmp_path):
    """A bug is not dressed as bad input: an OSError naming no file, a ValueError, escape."""
    import runs.engines.train as engine
    for error in (ValueError("a bug"), OSError(errno.ENOENT, "No such file or directory")):
        def broken(cfg, error=error):
            raise error

        monkeypatch.setattr(engine, "load_data", broken)
        with pytest.raises(type(error)):
            call("runs.train", [*TINY, "--steps", "2", "--store", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.skipif(not unshare_available(), reason="needs unshare -rm to mount a tmpfs")
@pytest.mark.parametrize("command", ["runs.train", "runs.distill"])
def test_a_real_read_only_store_is_one_line(tmp_path, command):
    """--store on a read-only file system (a tmpfs mounted ro in a user namespace): one line
    naming the folder, exit 2, no traceback."""
    argv = [*TINY, *(HEAD if command == "runs.distill" else []), "--steps", "2"]
    script = (f"mount -t tmpfs -o ro,size=64k none {tmp_path} && {sys.executable} -m "
              f"{command} {' '.join(argv)} --store {tmp_path}/store; echo \"exit $?\"")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                         text=True, env=env, timeout=300, cwd=REPO)
    errors = [line for line in out.stderr.splitlines() if "error: " in line]
    assert out.stdout.strip().splitlines()[-1] == "exit 2", out.stderr[-2000:]
    assert errors == [f"error: cannot write {tmp_path}/store: read-only file system; choose a "
                      f"folder on a writable disk (--out, --store)"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_failing_pipeline_stage_prints_one_error_line(tmp_path, monkeypatch):
    """A stage's bad input ends the pipeline with ONE `error:` line, naming the stage and
    the stage's own complaint (not the stage's line, then `stage probe failed (exit 2)`)."""
    from runs.errors import UserError, cli
    from runs.studies import pipeline

    @cli
    def stage(argv=None):
        raise UserError("--batch-size 0: must be at least 1 image")

    monkeypatch.setattr(pipeline, "run_pipeline",
                        lambda *args, **kwargs: pipeline.call(stage, [], "probe"))
    code, lines = call("runs.pipeline", ["--preset", "demo", "--out", str(tmp_path / "out")])
    last = assert_one_line_error(code, lines, "stage probe")
    assert "--batch-size 0: must be at least 1 image" in last


# ---------------------------------------------------------------------------- two writers


def test_a_second_writer_of_a_result_file_is_refused(world, tmp_path):
    out = tmp_path / "out.h5"
    argv = [world["A"], world["B"], "--grid", "0:1:3", *EVAL, "--out", str(out)]
    assert call("landscape.interpolate", argv)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from runs.results import WriteLock; lock = WriteLock(sys.argv[1])"
        ".acquire(); print('locked', flush=True); sys.stdin.read(); lock.release()"),
        str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        code, lines = call("landscape.interpolate", [*argv, "--overwrite"])
        assert_one_line_error(code, lines, f"{out} is being written by another process "
                                           f"(pid {holder.pid})")
        assert snapshot(tmp_path) == before
        assert call("probes.evaluate", ["pixels", "--dataset", "toy", "--probes", "knn",
                                        "--out", str(out), "--overwrite"])[0] == 2
        assert snapshot(tmp_path) == before
    finally:
        holder.communicate("", timeout=30)
    assert call("landscape.interpolate", [*argv, "--overwrite"])[0] == 0


def test_a_second_process_training_the_same_run_is_refused(tmp_path):
    argv = [*TINY, "--steps", "8", "--store", str(tmp_path)]
    cfg = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=8)
    run_dir = run_path(tmp_path, "train", cfg, seed=0)
    run_dir.parent.mkdir(parents=True)
    lock = WriteLock(run_dir).acquire()  # flock: a second open file, as another process
    try:
        code, lines = call("runs.train", argv)
        assert_one_line_error(code, lines, f"{run_dir} is being written by another process")
        assert not list(run_dir.rglob("*.pt")) and not list(run_dir.rglob("metrics.jsonl"))
    finally:
        lock.release()
    assert call("runs.train", argv)[0] == 0 and Run(run_dir).done


def test_a_second_distillation_of_the_same_run_is_refused(world, tmp_path):
    store = tmp_path / "store"
    argv = [*TINY, *HEAD, "--steps", "2", "--store", str(store)]
    assert call("runs.distill", argv)[0] == 0
    run = Run(next(store.glob("distill_*/seed_0")))
    (run.path / "DONE").unlink()
    before = snapshot(tmp_path)
    lock = WriteLock(run.path / "distill.h5").acquire()
    try:
        code, lines = call("runs.distill", argv)
        assert_one_line_error(code, lines, "distill.h5 is being written by another process")
    finally:
        lock.release()
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_two_processes_training_one_run_never_interleave(tmp_path):
    """Two real runs.train processes started together on one run: one trains, the other
    is refused or finds it done; metrics.jsonl holds each evaluation once, in order."""
    argv = [sys.executable, "-m", "runs.train", *TINY, "--steps", "30ep", "--store",
            str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), outs
    if codes == [0, 2]:
        refused = outs[[p.returncode for p in procs].index(2)][1].strip().splitlines()[-1]
        assert "is being written by another process" in refused
    run = Run(next(tmp_path.glob("train_*/seed_0")))
    steps = [record["step"] for record in run.metrics()]
    assert run.done and steps == sorted(set(steps)) and len(steps) == 30
