"""Trained curves (landscape.curve, Garipov et al. 2018): exact endpoints, a curve below a
known barrier, resume of a killed training, reuse of a finished one, one-line bad input.

Fixture with a known barrier: a small MLP trained on digits and a copy of it with its
hidden units permuted (the same function, so the same loss at both ends); the straight line
between them averages unrelated units and crosses a clear barrier, a trained bend finds a
way around it."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from helpers import run_cli

import landscape
from landscape.curve import CurveGeometry, curve_point, main
from runs.checkpoint import save_checkpoint
from runs.engines.train import TrainConfig, train
from runs.models import create_model
from runs.refs import load_model
from runs.results import open_result

MLP = TrainConfig(model="mlp", width=0.125, model_options=("image_size=8",), dataset="digits",
                  batch_size=64, num_steps=300, lr=0.1, flip=False, crop_padding=0,
                  schedule="cosine", input_stats="dataset", eval_every=0)
FAST = ["--device", "cpu", "--grid", "0:1:11", "--bn-samples", "256", "--bn-batch-size", "128"]


def permuted(model, seed: int):
    """The same MLP function with both hidden layers' units permuted."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    first, second = out.encoder[1], out.encoder[3]
    p1 = torch.randperm(first.out_features, generator=gen)
    p2 = torch.randperm(second.out_features, generator=gen)
    with torch.no_grad():
        first.weight.copy_(first.weight[p1])
        first.bias.copy_(first.bias[p1])
        second.weight.copy_(second.weight[p2][:, p1])
        second.bias.copy_(second.bias[p2])
        out.fc.weight.copy_(out.fc.weight[:, p2])
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A (a trained run) and B (A permuted, a checkpoint file), and a store."""
    store = tmp_path_factory.mktemp("curve_store")
    run = train(MLP, store, device="cpu")
    a = f"{run.path}@last"
    b = store / "b.pt"
    save_checkpoint(b, permuted(load_model(a).model, 1), 0)
    wide = store / "wide.pt"
    save_checkpoint(wide, create_model("mlp", num_classes=10, width=0.25, in_channels=1,
                                       image_size=8), 0)
    return {"A": a, "B": str(b), "wide": str(wide), "store": store}


def random_params(seed):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_curve_ends_are_exactly_a_and_b(kind):
    a, bend, b = random_params(0), random_params(1), random_params(2)
    for t, end in ((0.0, a), (1.0, b)):
        for name, value in curve_point(kind, a, bend, b, t).items():
            assert torch.equal(value, end[name]), (kind, t, name)
    geometry = CurveGeometry(kind, a, bend, b, [{}, {}])
    points = geometry.params_at(np.array([[0.0], [0.5], [1.0]]))
    for name in a:
        assert torch.equal(points[name][0], a[name]) and torch.equal(points[name][2], b[name])
        scalar = curve_point(kind, a, bend, b, 0.5)[name]
        torch.testing.assert_close(points[name][1], scalar, rtol=0, atol=1e-6)
    if kind == "polychain":  # the bend is the point at t = 1/2
        assert all(torch.equal(points[n][1], bend[n]) for n in a)


def test_midpoint_bend_is_the_straight_line():
    a, b = random_params(0), random_params(2)
    bend = {k: (a[k] + b[k]) / 2 for k in a}
    for t in (0.1, 0.3, 0.7):
        for name, value in curve_point("bezier", a, bend, b, t).items():
            torch.testing.assert_close(value, (1 - t) * a[name] + t * b[name])


def test_trained_curve_goes_below_the_line_barrier(pair, tmp_path):
    out = tmp_path / "curve.h5"
    argv = [pair["A"], pair["B"], "--steps", "300", "--store", str(pair["store"]),
            "--out", str(out), *FAST]
    assert main(argv) == 0
    data = open_result(str(out), "curve")
    path = list(data.coords["path"])
    curve, line = path.index("curve"), path.index("line")
    loss = data.metrics["loss"]  # (path, t, split)
    assert loss[line, :, 0].max() > loss[line, 0, 0] + 0.3  # the fixture's known barrier
    assert loss[curve, :, 0].max() < loss[line, :, 0].max()
    barrier = data.metrics["loss_barrier_mean"]  # (path, split)
    assert barrier[curve, 0] < 0.5 * barrier[line, 0]
    # both paths start at A and end at B: the same points, the same numbers
    np.testing.assert_array_equal(loss[curve, [0, -1]], loss[line, [0, -1]])
    assert data.attrs["kind"] == "bezier" and data.attrs["bend"].endswith("step_0000300.pt")
    bend = load_model(f"{pair['store'] / data.attrs['bend'].split('/ckpt')[0]}@last").model
    a, b = load_model(pair["A"]).model, load_model(pair["B"]).model
    assert not torch.equal(bend.fc.weight, (a.fc.weight + b.fc.weight) / 2)  # it trained
    init = load_model(f"{pair['store'] / data.attrs['bend'].split('/ckpt')[0]}@0").model
    torch.testing.assert_close(init.fc.weight, (a.fc.weight + b.fc.weight) / 2, rtol=0, atol=0)


def test_killed_training_resumes_and_a_finished_curve_is_reused(pair, tmp_path):
    from landscape.curve import CurveConfig, CurveScan, curve
    cfg = CurveConfig(a=pair["A"], b=pair["B"], kind="polychain", batch_size=64)
    scan = CurveScan(grid="0,0.5,1", bn_samples=256)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    curve(cfg, scan, "40", str(whole), str(tmp_path / "w.h5"), "cpu")
    out = tmp_path / "k.h5"
    curve(cfg, scan, "40", str(killed), str(out), "cpu", stop_at=25)  # killed mid-epoch 2
    assert not out.exists()
    curve(cfg, scan, "40", str(killed), str(out), "cpu")
    ref = [p for p in whole.glob("curve_*/seed_0")][0]
    got = [p for p in killed.glob("curve_*/seed_0")][0]
    assert ref.name == got.name and ref.parent.name == got.parent.name  # named by content
    first, again = (load_model(f"{p}@last").model.state_dict() for p in (ref, got))
    assert all(torch.equal(first[k], again[k]) for k in first)  # bitwise, as uninterrupted
    final = got / "ckpt" / "step_0000040.pt"
    stamp = final.stat().st_mtime_ns
    curve(cfg, scan, "40", str(killed), str(tmp_path / "k2.h5"), "cpu")
    assert final.stat().st_mtime_ns == stamp  # not retrained
    np.testing.assert_array_equal(open_result(str(out)).metrics["loss"],
                                  open_result(str(tmp_path / "k2.h5")).metrics["loss"])


@pytest.mark.parametrize("args, culprit", [
    (["--kind", "spiral"], "invalid choice: 'spiral'"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--grid", "0.2:1:5"], "endpoints alpha = 0 and 1"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
])
def test_bad_inputs_exit_2_with_one_line(pair, tmp_path, args, culprit):
    argv = [pair["A"], pair["B"], "--store", str(tmp_path / "s"), "--out",
            str(tmp_path / "x.h5"), *FAST, *args]
    code, err = run_cli(main, argv)
    assert code == 2 and "error: " in err[-1] and culprit in err[-1]
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "s").exists()


def test_different_architectures_name_the_first_mismatched_parameter(pair, tmp_path):
    argv = [pair["A"], pair["wide"], "--store", str(tmp_path / "s"), "--out",
            str(tmp_path / "x.h5"), *FAST]
    code, err = run_cli(main, argv)
    assert code == 2 and "different architectures: parameter 'encoder.1.weight'" in err[-1]
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "s").exists()


def test_api_twin_matches_the_layout(pair):
    from runs.data import load_dataset
    a = load_model(pair["A"]).model
    b = permuted(a, 1)
    before = copy.deepcopy(a.state_dict())
    train_data = load_dataset("digits", split="train")
    ds, bend = landscape.trained_curve(a, b, train_data, [0, 0.5, 1], kind="polychain",
                                       steps=20, batch_size=64, device="cpu",
                                       return_bend=True, bn_samples=64)
    assert dict(ds.sizes) == {"path": 2, "t": 3, "split": 2}
    assert set(ds.data_vars) >= {"loss", "error", "error_barrier", "loss_barrier_mean"}
    assert ds.attrs["analysis"] == "curve" and ds.attrs["kind"] == "polychain"
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # unchanged
    assert float(ds["loss"].sel(path="curve", t=0.0)[0]) == float(
        ds["loss"].sel(path="line", t=0.0)[0])
    assert dataclasses.is_dataclass(type(bend)) is False
