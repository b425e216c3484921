"""probes.evaluate end to end: the CLI, its result file and its bad-input errors."""

import numpy as np
import pytest
import torch
import xarray as xr

from probes.evaluate import main, probe_all, probe_labels
from probes.features import pixel_features
from probes.nearest import knn_accuracy
from runs.checkpoint import save_checkpoint
from runs.data import load_dataset
from runs.models import create_model
from runs.results import open_result


def test_pixel_baseline_on_digits_through_the_cli(tmp_path, capsys):
    out = tmp_path / "probe.h5"
    assert main(["pixels", "--dataset", "digits", "--probes", "knn", "linear-lbfgs",
                 "--ks", "5", "20", "--seeds", "0", "--subset", "40", "--out", str(out)]) == 0
    result = open_result(out, "probe")
    acc = result.metrics["accuracy"]  # (checkpoint, probe, features, seed)
    assert acc.shape == (1, 3, 2, 1) and result.done.all()
    train = load_dataset("digits", split="train", subset=40)
    test = load_dataset("digits", split="test")
    expect = knn_accuracy(pixel_features(train.x), train.y, pixel_features(test.x), test.y, k=20)
    assert acc[0, 1, 0, 0] == pytest.approx(expect)
    assert expect > 0.85  # pixels are a strong baseline on digits
    table = capsys.readouterr().out
    assert "| pixels |" in table and f"{100 * expect:.2f}" in table
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert list(ds["accuracy"].dims) == ["checkpoint", "probe", "features", "seed"]
    assert list(ds["probe"].values) == ["knn@5", "knn@20", "linear-lbfgs"]
    ds.close()


def test_checkpoint_probe_matches_direct_features_and_resumes(tmp_path, capsys):
    model = create_model("convnet", width=0.125, in_channels=1, num_classes=10, seed=3)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, step=0)
    out = tmp_path / "probe.h5"
    args = [str(ckpt), "pixels", "--dataset", "digits", "--probes", "knn", "--seeds", "0",
            "1", "--out", str(out)]
    assert main(args) == 0
    first = open_result(out, "probe")
    assert first.attrs["inputs"][0]["sha256"]  # provenance of the checkpoint
    # knn is deterministic: identical for every seed.
    assert np.array_equal(first.metrics["accuracy"][..., 0], first.metrics["accuracy"][..., 1])
    assert main(args) == 0  # everything done: nothing recomputed, same content
    assert np.array_equal(open_result(out, "probe").metrics["accuracy"],
                          first.metrics["accuracy"])


def test_transfer_needs_matching_channels(tmp_path, capsys):
    model = create_model("convnet", width=0.125, in_channels=3, seed=0)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, step=0)
    assert main([str(ckpt), "--dataset", "digits", "--out", str(tmp_path / "p.h5")]) == 2
    assert "--channels 3" in capsys.readouterr().err
    assert not (tmp_path / "p.h5").exists()  # bad input leaves no file behind
    assert main([str(ckpt), "--dataset", "digits", "--channels", "3", "--probes", "knn",
                 "--seeds", "0", "--out", str(tmp_path / "p.h5")]) == 0


def test_nan_features_name_the_checkpoint(tmp_path, capsys):
    model = create_model("convnet", width=0.125, in_channels=1, seed=0)
    with torch.no_grad():
        model.encoder[0].weight.fill_(float("nan"))
    ckpt = save_checkpoint(tmp_path / "broken.pt", model, step=0)
    out = tmp_path / "p.h5"
    assert main([str(ckpt), "--dataset", "digits", "--probes", "knn", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the echoed command line
    assert last.startswith("error: ") and "broken.pt" in last and "NaN" in last


def test_unknown_probe_lists_valid_ones(tmp_path, capsys):
    assert main(["pixels", "--dataset", "digits", "--probes", "svm",
                 "--out", str(tmp_path / "p.h5")]) == 2
    assert "unknown probe 'svm'; valid: knn, knn-cosine, linear, linear-lbfgs" in \
        capsys.readouterr().err


def test_probe_all_on_separable_features():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 10
    # The paper's probe takes 10 epochs of AdamW at lr 1e-3: enough steps need enough data.
    y = torch.arange(4000) % 3
    x = centers[y] + torch.randn(4000, 16, generator=gen)
    accs = probe_all(x[:3000], y[:3000], x[3000:], y[3000:], 3, ["knn", "linear"], [5], [0, 1])
    assert set(accs) == {(lab, f, s) for lab in probe_labels(["knn", "linear"], [5])
                         for f in ("raw", "standardized") for s in (0, 1)}
    assert min(accs.values()) >= 0.95


def test_label_count_mismatch_is_a_clear_error():
    from runs.errors import UserError
    x = torch.randn(10, 4)
    with pytest.raises(UserError, match="labels"):
        probe_all(x, torch.zeros(9, dtype=torch.long), x, torch.zeros(10, dtype=torch.long),
                  2, ["knn"], [3], [0])


RECIPE = {"model": "convnet", "dataset": "digits", "alpha": 0.0, "head": "dino_head",
          "head_last": "raw", "input_stats": "paper", "drop_last": False, "out_dim": 64}


@pytest.mark.parametrize("kind, config, role", [
    ("distill", {"dataset": "digits", "alpha": 1e-10}, "student"),  # the paper's IMP init
    ("distill", {"dataset": "digits", "alpha": 0.0}, "student"),  # its figures' init
    ("distill", {"dataset": "digits"}, "student"),
    ("distill", {"dataset": "noise", "alpha": 1e-10}, "noise-student"),
    ("distill", {"dataset": "digits", "alpha": 1.0}, "student (alpha=1.0)"),
    ("distill", RECIPE, "student"),  # scale settings (out_dim) are no departure
    ("distill", {**RECIPE, "head_last": "normed"}, "student (normed head)"),
    ("distill", {**RECIPE, "alpha": 1.0, "head_last": "normed"},
     "student (alpha=1.0, normed head)"),
    # A run from before the options: what it was made with (runs.recipe.LEGACY).
    ("distill", {"model": "convnet", "dataset": "digits", "alpha": 1e-10},
     "student (normed head, dataset stats, drop last)"),
    ("train", {"dataset": "digits"}, "supervised"),
    ("", {}, "checkpoint"),
])
def test_rows_say_what_was_probed(tmp_path, kind, config, role):
    """Students initialised away from the recipe's alpha, or trained off the paper's recipe,
    are not pooled with its students: their role says how."""
    from runs.engines.distill import DistillConfig
    assert DistillConfig().alpha == 0.0  # the recipe's (PAPER.md)
    from probes.evaluate import describe
    model = create_model("convnet", width=0.125, in_channels=1, num_classes=10, seed=3)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, step=0, config=config,
                           extra={"kind": kind} if kind else None)
    info = load_dataset("digits", split="test").info
    row = describe(str(ckpt), info)
    assert row["role"] == role and row["model"] == "convnet"
