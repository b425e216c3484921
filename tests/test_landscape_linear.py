"""The `linear` and `linear-adamw` landscape metrics: at an anchor they equal probes' own
linear probes on that checkpoint's embeddings (same L2, same data); the L2 strength is chosen
once (5-fold CV at the first checkpoint) or fixed by --linear-l2, and recorded; the CLI, a
resumed scan and the figures take them."""

import numpy as np
import pytest
import torch

import landscape
from figures import path_curves, plane
from landscape.interpolate import InterpolateConfig, main, scan
from probes.api import split_features
from probes.logistic import L2_GRID, linear_probe_lbfgs, linear_probe_sgd, standardize
from runs.checkpoint import save_checkpoint
from runs.data import as_splits
from runs.models import create_model
from runs.results import open_result, save

FAST = ["--device", "cpu", "--bn-samples", "32", "--bn-batch-size", "32", "--dataset", "toy"]


def model(seed: int):
    return create_model("convnet", num_classes=4, width=0.125, seed=seed).eval()


@pytest.fixture(scope="module")
def toy():
    """The toy splits the scans measure (256 train, 128 test images) and A's, B's features."""
    train, test = as_splits("toy", None)
    feats = {seed: split_features(model(seed), (train, test), None, 512, torch.device("cpu"))
             for seed in (0, 1)}
    return train, test, feats


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("linear_ckpt")
    return {name: str(save_checkpoint(root / f"{name}.pt", model(seed), 0))
            for name, seed in (("A", 0), ("B", 1))}


def test_anchors_equal_probes_own_linear_probes(toy):
    """alpha 0 and 1 of an `interpolate` path are A and B (weights and BN buffers): the
    landscape's probes equal linear_probe_lbfgs at the recorded L2 and linear_probe_sgd (the
    paper's AdamW probe, seed 0) on probes' own embeddings of each checkpoint."""
    train, test, feats = toy
    ds = landscape.path(model(0), model(1), "toy", [0.0, 0.5, 1.0], bn_mode="interpolate",
                        metrics=("linear", "linear-adamw"), device="cpu")
    l2 = ds.attrs["linear_l2"]
    assert ds.attrs["linear_l2_choice"] == "5-fold CV at A" and l2 in L2_GRID
    own_cv = linear_probe_lbfgs(*interleave(feats[0], train, test), 4, seed=0)
    assert own_cv["l2"] == l2  # probes' own CV on A's embeddings picks the same strength
    for alpha, seed in ((0.0, 0), (1.0, 1)):
        args = interleave(feats[seed], train, test)
        lbfgs = linear_probe_lbfgs(*args, 4, l2_grid=(l2,))["accuracy"]
        adamw = linear_probe_sgd(*args, 4, seed=0)["accuracy"]
        cell = ds.sel(alpha=alpha)
        assert float(cell.linear_accuracy) == pytest.approx(lbfgs, abs=1e-6)
        assert float(cell.linear_adamw_accuracy) == pytest.approx(adamw, abs=1e-6)
    assert ds["linear_accuracy"].attrs["units"] == "fraction"


def test_fixed_l2_on_standardized_features(toy):
    train, test, feats = toy
    ds = landscape.path(model(0), model(1), "toy", [0.0, 1.0], bn_mode="interpolate",
                        metrics=("linear", "linear-adamw"), linear_l2="0.1",
                        linear_features="standardized", device="cpu", seed=3)
    assert ds.attrs["linear_l2"] == 0.1 and ds.attrs["linear_l2_choice"] == "--linear-l2"
    train_z, test_z = standardize(*feats[1])
    own = linear_probe_lbfgs(train_z, train.y, test_z, test.y, 4, l2_grid=(0.1,))["accuracy"]
    assert float(ds.sel(alpha=1.0).linear_accuracy) == pytest.approx(own, abs=1e-6)
    adamw = [linear_probe_sgd(train_z, train.y, test_z, test.y, 4, seed=s)["accuracy"]
             for s in (3, 0)]
    assert adamw[0] != adamw[1]  # 10 steps from a seeded init: the seed shows in the number
    assert float(ds.sel(alpha=1.0).linear_adamw_accuracy) == pytest.approx(adamw[0], abs=1e-6)
    assert "standardized" in ds["linear_accuracy"].attrs["long_name"]


def interleave(features, train, test) -> tuple:
    """(train_x, train_y, test_x, test_y) for the probes' functions."""
    return features[0], train.y, features[1], test.y


def test_cli_takes_linear_metrics_and_resumes(checkpoints, tmp_path, capsys):
    out = tmp_path / "linear.h5"
    argv = [checkpoints["A"], checkpoints["B"], "--grid", "0,0.5,1", "--metrics", "linear",
            "linear-adamw", "knn", "--train-samples", "64", "--test-samples", "32",
            "--knn-k", "5", "--out", str(out), *FAST]
    assert main(argv) == 0
    data = open_result(out, "interpolate")
    assert data.done.all() and data.attrs["linear_l2"] in L2_GRID
    for name in ("linear_accuracy", "linear_adamw_accuracy", "knn_accuracy"):
        assert ((data.metrics[name] >= 0) & (data.metrics[name] <= 1)).all(), name
    assert "linear_accuracy" in capsys.readouterr().out  # the summary table
    cfg = InterpolateConfig(refs=(checkpoints["A"], checkpoints["B"]), grid="0,0.5,1",
                            metrics=("linear",), train_samples=64, test_samples=32,
                            bn_samples=32, bn_batch_size=32, dataset="toy")
    killed = tmp_path / "killed.h5"
    scan(cfg, killed, device="cpu", stop_after=1)
    assert open_result(killed).done.tolist() == [True, False, False]
    resumed = open_result(scan(cfg, killed, device="cpu"))
    whole = open_result(scan(cfg, tmp_path / "whole.h5", device="cpu"))
    assert resumed.attrs["linear_l2"] == whole.attrs["linear_l2"]
    np.testing.assert_array_equal(resumed.metrics["linear_accuracy"],
                                  whole.metrics["linear_accuracy"])


@pytest.mark.parametrize("flag, culprit", [
    (["--linear-l2", "lots"], "--linear-l2 'lots'"),
    (["--linear-l2", "-1"], "--linear-l2 '-1'"),
    (["--linear-features", "whitened"], "--linear-features"),
])
def test_bad_linear_flags_exit_2(checkpoints, tmp_path, capsys, flag, culprit):
    out = tmp_path / "x.h5"
    try:
        code = main([checkpoints["A"], checkpoints["B"], "--metrics", "linear", *flag,
                     "--out", str(out), *FAST])
    except SystemExit as exit:  # argparse refuses a value outside --linear-features' choices
        code = exit.code
    assert code == 2 and culprit in capsys.readouterr().err
    assert not out.exists()


def test_figures_draw_the_linear_probe(tmp_path):
    """The plane gets a linear-probe panel, the 1-D figure a linear-probe panel."""
    a, b, c = model(0), model(1), model(2)
    two_d = landscape.plane(a, b, c, "toy", [0.0, 1.0], bn_mode="keep", linear_l2="1e-3",
                            metrics=("linear", "norm"), train_samples=64, test_samples=32,
                            device="cpu")
    one_d = landscape.path(a, b, "toy", [0.0, 1.0], bn_mode="keep", linear_l2="1e-3",
                           metrics=("linear", "linear-adamw"), train_samples=64,
                           test_samples=32, device="cpu")
    fig = plane.build(open_result(save(two_d, tmp_path / "plane.h5")))
    assert "linear probe" in [ax.get_title().split(" (")[0] for ax in fig.axes]
    fig = path_curves.build(open_result(save(one_d, tmp_path / "path.h5")))
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "linear-probe test accuracy (%)" in labels
    assert "AdamW linear-probe test accuracy (%)" in labels


def test_batched_points_equal_the_reference_path():
    """P points per vmapped pass (BN recalibrated functionally) then one probe per point:
    the same accuracies as one point at a time."""
    a, b = model(0), model(1)
    runs = [landscape.path(a, b, "toy", [0.0, 0.5, 1.0], metrics=("linear", "linear-adamw"),
                           bn_samples=64, device="cpu", points_per_pass=per_pass)
            for per_pass in (1, 3)]
    assert runs[0].attrs["linear_l2"] == runs[1].attrs["linear_l2"]
    for name in ("linear_accuracy", "linear_adamw_accuracy"):
        np.testing.assert_allclose(runs[1][name].values, runs[0][name].values, atol=1e-6)
