"""landscape.interpolate and landscape.border end to end on tiny CPU runs: endpoint metrics,
resume after a kill, shards, planes, random directions, student landscapes, one-line errors,
and the basin-border scan with its children reused on a re-run."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from landscape import border as border_module
from landscape.barrier import NAMES, barriers, mean_ci
from landscape.interpolate import InterpolateConfig, main, scan
from landscape.points import images
from runs.checkpoint import save_checkpoint
from runs.data import load_dataset
from runs.engines.distill import DistillConfig, distill
from runs.engines.train import TrainConfig, evaluate, load_data, train
from runs.errors import UserError
from runs.gpu_loader import eval_loader
from runs.models import create_model
from runs.refs import load_head, load_model
from runs.results import merge_results, open_result, shard_path

# toy 16x16: 256 train images, 8 steps of 32 per epoch.
TRAIN = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=8,
                    lr=0.05)
DISTILL = DistillConfig(model="convnet", width=0.125, dataset="toy", data_options=("side=8",),
                        teacher_seed=7, alpha=1.0, out_dim=64, hidden_dim=32, bottleneck_dim=8,
                        batch_size=32, num_steps=8)
FAST = ["--device", "cpu", "--bn-samples", "64", "--bn-batch-size", "32"]




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three supervised runs (seeds 0, 1, 2) and one distillation run, as references."""
    store = tmp_path_factory.mktemp("landscape_store")
    refs = [f"{train(dataclasses.replace(TRAIN, seed=s), store, device='cpu').path}@last"
            for s in range(3)]
    student = distill(DISTILL, store, device="cpu").path
    wide = store / "wide.pt"
    save_checkpoint(wide, create_model("convnet", num_classes=4, width=0.25), 0)
    return {"A": refs[0], "B": refs[1], "C": refs[2], "student": str(student),
            "wide": str(wide), "store": store}


def config(*refs, **fields) -> InterpolateConfig:
    base = dict(refs=tuple(refs), grid="0:1:5", bn_samples=64, bn_batch_size=32)
    return InterpolateConfig(**{**base, **fields})


def metric_at(data, name, **where):
    """A metric's values with the named coordinates picked by label."""
    values, dims = data.metrics[name], data.specs[name].dims
    index = tuple(list(data.coords[d]).index(where[d]) if d in where else slice(None)
                  for d in dims)
    return values[index]


def own_metrics(ref, bn_images=None) -> dict:
    """runs.engines.train.evaluate of a checkpoint on toy train and test; BN recalibrated first with
    update_bn when bn_images are given."""
    model = load_model(ref).model
    if bn_images is not None:
        update_bn(bn_images, model)
    train_split, _, test = load_data(TRAIN)
    out = {}
    for split, data in (("train", train_split), ("test", test)):
        result = evaluate(model, eval_loader(data, "cpu"))
        out[split] = (result["loss"], 1 - result["accuracy"])
    return out


# --- interpolate -----------------------------------------------------------------------------

def test_path_endpoints_reproduce_each_checkpoint(runs, tmp_path):
    """alpha 0 and 1 are A and B themselves: with `interpolate` both endpoints give the
    checkpoints' own metrics (runs.engines.train.evaluate); `keep` gives A's at alpha 0 (at 1 it
    would be B's weights under A's statistics); `recalibrate` gives each checkpoint after
    torch's update_bn on the same fixed images."""
    cfg = config(runs["A"], runs["B"], grid="0,0.5,1", bn_mode="interpolate")
    data = open_result(scan(cfg, tmp_path / "interp.h5", device="cpu"), "interpolate")
    kept = open_result(scan(dataclasses.replace(cfg, bn_mode="keep"), tmp_path / "keep.h5",
                            device="cpu"))
    recal = open_result(scan(dataclasses.replace(cfg, bn_mode="recalibrate"),
                             tmp_path / "recal.h5", device="cpu"))
    bn = list(images(_bn_loader(recal.config)))
    checks = [(data, 0.0, runs["A"], None), (data, 1.0, runs["B"], None),
              (kept, 0.0, runs["A"], None), (recal, 0.0, runs["A"], bn),
              (recal, 1.0, runs["B"], bn)]
    for result, alpha, ref, bn_images in checks:
        own = own_metrics(ref, bn_images)
        for split in ("train", "test"):
            loss = metric_at(result, "loss", alpha=alpha, split=split)
            error = metric_at(result, "error", alpha=alpha, split=split)
            assert loss == pytest.approx(own[split][0], rel=1e-5), (ref, alpha, split)
            assert error == pytest.approx(own[split][1], abs=1e-6), (ref, alpha, split)
    assert data.attrs["bn_mode"] == "interpolate" and recal.attrs["bn_mode"] == "recalibrate"
    assert [r["ref"] for r in data.attrs["inputs"]] == [runs["A"], runs["B"]]
    assert all(len(r["sha256"]) == 64 for r in data.attrs["inputs"])
    assert data.config["dataset"] == "toy"  # resolved from the checkpoint


def _bn_loader(cfg: dict):
    """The recalibration images a scan used (drawn from train with seed + 1)."""
    from landscape.points import take
    train_split, _, _ = load_data(TRAIN)
    return eval_loader(take(train_split, cfg["bn_samples"], cfg["seed"] + 1, ""), "cpu",
                       cfg["bn_batch_size"])


def test_killed_scan_resumes_to_the_same_file(runs, tmp_path):
    cfg = config(runs["A"], runs["B"], grid="-0.5:1.5:5", metrics=("supervised", "knn",
                                                                   "norm"))
    whole = open_result(scan(cfg, tmp_path / "whole.h5", device="cpu", points_per_pass=2))
    path = tmp_path / "killed.h5"
    scan(cfg, path, device="cpu", points_per_pass=2, stop_after=1)  # one pass, then "killed"
    partial = open_result(path)
    assert partial.done.tolist() == [True, True, False, False, False]
    assert np.isnan(partial.metrics["loss"][2:]).all()
    resumed = open_result(scan(cfg, path, device="cpu", points_per_pass=2))
    assert resumed.done.all() and resumed.config == whole.config
    for name, values in whole.metrics.items():
        np.testing.assert_array_equal(resumed.metrics[name], values, err_msg=name)


def test_shards_merge_into_the_whole_scan(runs, tmp_path):
    cfg = config(runs["A"], runs["B"], grid="0:1:3", metrics=("supervised",))
    whole = open_result(scan(cfg, tmp_path / "whole.h5", device="cpu"))
    out = tmp_path / "sharded.h5"
    parts = [scan(cfg, out, device="cpu", shard=f"{i}/2") for i in range(2)]
    assert parts == [shard_path(out, i, 2) for i in range(2)]
    merged = merge_results(out, parts)
    np.testing.assert_array_equal(merged.metrics["loss"], whole.metrics["loss"])


def test_plane_cli_records_anchors_and_opens_in_xarray(runs, tmp_path, capsys):
    out = tmp_path / "plane.h5"
    code = main([runs["A"], runs["B"], runs["C"], "--grid", "-0.5:1.5:3", "--beta-grid",
                 "0,1", "--basis", "orthonormal", "--points-per-pass", "3", "--out", str(out),
                 *FAST])
    assert code == 0
    data = open_result(out, "interpolate")
    assert data.point_dims == ("alpha", "beta") and data.done.all()
    anchors = data.attrs["anchor_coords"]
    assert '"B": [1.0, 0.0]' in anchors and data.attrs["plane_basis"] == "orthonormal"
    assert data.metrics["loss"].shape == (3, 2, 2)
    import xarray
    with xarray.open_dataset(out, engine="h5netcdf") as ds:
        assert ds["loss"].dims == ("alpha", "beta", "split")
    assert "points done" in capsys.readouterr().out


def test_random_directions_cli(runs, tmp_path):
    out = tmp_path / "dirs.h5"
    assert main([runs["A"], "--directions", "1", "--grid", "-1:1:3", "--metrics", "norm",
                 "--out", str(out), "--device", "cpu"]) == 0
    data = open_result(out)
    norms = data.metrics["param_norm"]
    assert data.attrs["geometry"] == "directions" and norms[0] != norms[1] != norms[2]
    encoder = load_model(runs["A"]).model.encoder  # norm alone scans the encoder only
    own = math.sqrt(sum(p.detach().double().pow(2).sum() for p in encoder.parameters()))
    assert norms[1] == pytest.approx(own, rel=1e-6)  # the centre is the checkpoint
    assert data.attrs["parts"] == "encoder"


def test_student_landscape_kl_vanishes_at_the_teacher(runs, tmp_path):
    """Plane (teacher, student init at alpha = 1, student end) of encoder + DINO head
    states, the paper's Fig. 5 plane."""
    run = runs["student"]
    cfg = config(f"{run}@init:teacher", f"{run}@init", f"{run}@last", grid="0,1",
                 metrics=("distill", "knn", "norm"), teacher=f"{run}@init:teacher",
                 bn_mode="keep", knn_k=5)
    data = open_result(scan(cfg, tmp_path / "student.h5", device="cpu"))
    assert data.config["data_options"] == ["side=8"]  # the distillation run's data
    assert data.attrs["parts"] == "encoder+head"
    kl = data.metrics["distill_kl"]  # (alpha, beta, split)
    np.testing.assert_allclose(kl[0, 0], 0, atol=1e-5)  # the teacher itself
    assert (kl[1, 0] > 1e-4).all() and (kl >= -1e-5).all()
    head = load_head(f"{run}@last")
    assert torch.equal(head.last.weight, load_head(f"{run}@last").last.weight)
    teacher_head = load_head(f"{run}@init:teacher")
    assert not torch.equal(teacher_head.last.weight, head.last.weight)


@pytest.mark.parametrize("args, culprit", [
    (["{A}", "{wide}"], "different architectures"),
    (["{A}", "{B}", "--grid", "0:1"], "e.g. 0:1:25"),
    (["{student}@last", "{student}@init"], "--fc REF"),
    (["{A}:encoder", "{B}"], "fc is freshly drawn"),
    (["{A}"], "--directions 1 or 2"),
    (["{A}", "{B}", "--metrics", "distill"], "--teacher"),
    (["{A}", "--directions", "1", "--bn-mode", "interpolate"], "two or more"),
    (["{A}", "{B}", "--metrics", "lossy"], "unknown metric 'lossy'"),
    (["{A}", "{B}", "--dataset", "digits"], "4 outputs but the dataset has 10 classes"),
    (["{A}", "{B}", "--metrics", "knn", "--dataset", "digits"], "images of shape (1, 8, 8)"),
    (["{A}", "{B}", "--metrics", "distill", "--teacher", "{student}@init:teacher"],
     "holds no DINO head"),
    (["{A}", "{B}", "--grid", "0:1:3", "--shard", "2/2"], "--shard expects i/n"),
])
def test_bad_inputs_exit_2_with_one_line(runs, tmp_path, capsys, args, culprit):
    argv = [a.format(**runs) for a in args] + ["--out", str(tmp_path / "x.h5"), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and culprit in err
    assert not (tmp_path / "x.h5").exists()


def test_fc_flag_attaches_a_trained_classifier(runs, tmp_path):
    """A distilled student's path under a supervised run's fc, the same fc at every point."""
    run = runs["student"]
    cfg = config(f"{run}@init", f"{run}@last", fc=runs["A"], grid="0,1",
                 metrics=("supervised",), bn_mode="interpolate")
    data = open_result(scan(cfg, tmp_path / "fc.h5", device="cpu"))
    assert data.attrs["parts"] == "encoder+fc" and data.done.all()
    assert data.attrs["inputs"][-1]["ref"] == runs["A"]
    model = load_model(f"{run}@last").model
    model.fc = load_model(runs["A"]).model.fc
    test = load_dataset("toy", split="test", side=8)
    own = evaluate(model, eval_loader(test, "cpu"))
    assert metric_at(data, "loss", alpha=1.0, split="test") == pytest.approx(own["loss"],
                                                                             rel=1e-5)


# --- border ----------------------------------------------------------------------------------

BORDER = ["--children", "2", "--model", "convnet", "--width", "0.125", "--dataset", "toy",
          "--batch-size", "32", "--lr", "0.05", "--steps", "4", "--grid", "0:1:3",
          "--bn-samples", "64", "--bn-batch-size", "32", "--device", "cpu"]


def snapshot(root) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.pt")}


def test_border_end_to_end_and_children_are_reused(runs, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "border.h5"
    argv = ["random", "--rewind-steps", runs["A"].removesuffix("@last"), "0",
            "--store", str(store), "--out", str(out), *BORDER]
    assert border_module.main(argv) == 0
    data = open_result(out, "border")
    assert list(data.coords["pair"]) == ["0-1"] and data.done.all()
    assert data.metrics["loss"].shape == (2, 1, 3, 2)  # (start, pair, alpha, split)
    again = barriers(np.moveaxis(data.metrics["loss"], 2, -1),
                     np.moveaxis(data.metrics["error"], 2, -1), data.coords["alpha"])
    for b, name in enumerate(NAMES):
        np.testing.assert_allclose(data.metrics[name], again[name], rtol=1e-5, atol=1e-6)
        ci = mean_ci(data.metrics[name], axis=1)  # one pair: mean = the value, CI undefined
        np.testing.assert_allclose(data.metrics["barrier_summary"][:, b, 0], ci["mean"],
                                   rtol=1e-6)
        assert np.isnan(data.metrics["barrier_summary"][:, b, 1:]).all()
    assert data.metrics["start_step"].tolist() == [0.0, 0.0]
    assert "random" in capsys.readouterr().out
    children = store.glob("train_*/seed_*")
    assert len(list(children)) == 4
    before = snapshot(store)
    out.unlink()
    assert border_module.main(argv) == 0  # re-run: children reused, not retrained
    assert snapshot(store) == before
    np.testing.assert_array_equal(open_result(out).metrics["loss"], data.metrics["loss"])


def test_identical_children_have_zero_barriers(runs):
    """The same checkpoint twice: every point of the path is that checkpoint."""
    from runs.store import find_run
    run = find_run(runs["A"].removesuffix("@last"))
    cfg = border_module.BorderConfig(grid="0:1:3", bn_samples=64, bn_batch_size=32)
    data = border_module.measured_data(cfg, load_data(TRAIN), "cpu", 256)
    curves = border_module.pair_curves([run, run], cfg, data, np.linspace(0, 1, 3), "cpu",
                                       False, per_pass=3)
    values = border_module.start_values(curves, np.linspace(0, 1, 3),
                                        border_module.Start("x"),
                                        {"path": "", "step": 8})
    for name in NAMES:
        np.testing.assert_array_equal(values[name], 0.0)
    assert values["start_step"] == 8 and np.isnan(values["start_epoch"])  # no run to ask


def test_start_point_generators(runs):
    run = runs["student"]
    starts = border_module.distill_starts(run)
    assert [s.label for s in starts] == [f"{run}@0:encoder", f"{run}@8:encoder"]
    assert all(s.alpha == 1.0 and s.init == s.label for s in starts)
    assert border_module.alpha_starts([run])[0].init == f"{run}@last:encoder"
    children = border_module.child_configs(starts[1], TRAIN, 3)
    assert [c.data_seed for c in children] == [0, 1, 2]
    assert {(c.init, c.model, c.width, c.seed) for c in children} == \
        {(f"{run}@8:encoder", "convnet", 0.125, TRAIN.seed)}  # same init, only data order
    parent = runs["A"].removesuffix("@last")
    rewound = border_module.child_configs(border_module.rewind_starts(parent, "0")[0], TRAIN, 2)
    assert rewound[0].rewind == f"{parent}@0" and rewound[1].num_steps == TRAIN.num_steps
    with pytest.raises(UserError, match="no checkpoint at step 3; saved: 0, 8"):
        border_module.rewind_starts(parent, "3")


@pytest.mark.parametrize("flags, culprit", [
    (["--children", "1"], "at least 2 children"),
    (["--grid", "0.2:0.8:4"], "alpha = 0 and 1"),
    ([], "no start points"),
])
def test_border_bad_inputs_exit_2(tmp_path, capsys, flags, culprit):
    starts = [] if culprit == "no start points" else ["random"]
    argv = [*starts, *BORDER, *flags, "--store", str(tmp_path / "s"), "--out",
            str(tmp_path / "b.h5")]
    assert border_module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and culprit in err
    assert not (tmp_path / "s").exists()


def test_alpha_sweep_distils_each_alpha_and_reuses_the_template(runs, tmp_path):
    store, out = runs["store"], tmp_path / "alphas.h5"
    argv = ["--alphas", runs["student"], "0.5,1", "--store", str(store), "--out", str(out),
            *BORDER]
    assert border_module.main(argv) == 0
    data = open_result(out, "border")
    assert data.metrics["start_alpha"].tolist() == [0.5, 1.0] and data.done.all()
    # alpha=1 is the template's own config: the existing run is the start, not a new one.
    assert data.attrs["inputs"][1]["path"].startswith(runs["student"])
    # Start points are named by readable labels, not paths (the paths are in `inputs`).
    assert list(data.coords["start"]) == ["student α=0.5 s0 ep1", "student α=1 s0 ep1"]
    assert len(list(store.glob("distill_*/seed_*"))) == 2


def test_alpha_sweep_needs_a_distillation_template(runs, tmp_path, capsys):
    argv = ["--alphas", runs["A"].removesuffix("@last"), "0.5", "--store", str(tmp_path),
            "--out", str(tmp_path / "x.h5"), *BORDER]
    assert border_module.main(argv) == 2
    assert "must be a distillation" in capsys.readouterr().err


def test_start_epoch_counts_in_the_saving_runs_epochs(runs, tmp_path):
    """A start inside a run reads as step / that run's steps per epoch; a loose file and
    the random init have none (NaN) and zero."""
    from runs.refs import ref_record
    from runs.store import find_run
    run = find_run(runs["student"])
    record = ref_record(f"{runs['student']}@last")
    per_epoch = run.config()["steps_per_epoch"]
    assert record["step"] == DISTILL.num_steps and per_epoch > 0
    assert border_module.start_epoch(record) == pytest.approx(DISTILL.num_steps / per_epoch)
    assert math.isnan(border_module.start_epoch(ref_record(runs["wide"])))
    random_start = border_module.start_record(border_module.Start("random"))
    assert border_module.start_epoch(random_start) != border_module.start_epoch(random_start)
