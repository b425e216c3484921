"""landscape.border --align weights|activations: every pair of children measured as trained
and after aligning the second child to the first (landscape.align), side by side as metrics
M and M_aligned. Stand-ins for landscape.align pin the layout and the bookkeeping (an
identity alignment must reproduce the plain numbers bit for bit; an "alignment" that returns
the first child must give a flat path); the real module, where present, is checked on a tiny
case."""

import copy
import dataclasses
import sys
import types

import numpy as np
import pytest
import torch

from landscape import border as border_module
from landscape.barrier import NAMES
from landscape.points import images
from runs.engines.train import TrainConfig, load_data, train
from runs.errors import UserError
from runs.results import open_result
from runs.store import find_run

TRAIN = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=8,
                    lr=0.05)
BORDER = ["random", "--children", "2", "--model", "convnet", "--width", "0.125", "--dataset",
          "toy", "--batch-size", "32", "--lr", "0.05", "--steps", "4", "--grid", "0:1:3",
          "--bn-samples", "64", "--bn-batch-size", "32", "--device", "cpu"]
GRID = np.linspace(0, 1, 3)


def standin(monkeypatch, moved=lambda a, b: copy.deepcopy(b), supported=True,
            changed=1) -> dict:
    """Install a stand-in landscape.align (contract A): `align` returns moved(a, b) and
    says `changed` permutations moved; calls are recorded. supported=False:
    permutation_spec refuses every architecture."""
    calls = []

    def align(a, b, method="weights", images=None, seed=0):
        calls.append({"method": method, "images": images, "seed": seed})
        return moved(a, b), {"method": method, "changed": changed}

    def permutation_spec(model):
        if not supported:
            raise UserError(f"{type(model).__name__}: no alignment; supported: mlp")
        return None

    module = types.ModuleType("landscape.align")
    module.align, module.permutation_spec = align, permutation_spec
    module.METHODS = ("weights", "activations")
    monkeypatch.setitem(sys.modules, "landscape.align", module)
    return {"calls": calls}


def argv(tmp_path, *flags) -> list[str]:
    return [*BORDER, *flags, "--store", str(tmp_path / "store"), "--out",
            str(tmp_path / "border.h5")]


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    store = tmp_path_factory.mktemp("align_store")
    return [find_run(train(dataclasses.replace(TRAIN, data_seed=s), store,
                           device="cpu").path) for s in (0, 1)]


def curves(children, **fields):
    cfg = border_module.BorderConfig(grid="0:1:3", bn_samples=64, bn_batch_size=32, **fields)
    splits = load_data(TRAIN)
    data = border_module.measured_data(cfg, splits, "cpu", 256)
    found = border_module.pair_curves(children, cfg, data, GRID, "cpu", False, 3,
                                      border_module.align_images(cfg, splits[0]))
    return border_module.start_values(found, GRID, border_module.Start("x"),
                                      {"path": "", "step": 0})


def test_an_identity_alignment_reproduces_the_plain_metrics_exactly(tmp_path, monkeypatch,
                                                                    capsys):
    seen = standin(monkeypatch)
    assert border_module.main(argv(tmp_path, "--align", "weights")) == 0
    data = open_result(tmp_path / "border.h5", "border")
    assert data.attrs["align"] == "weights" and data.config["border"]["align"] == "weights"
    for name in border_module.ALIGNED:
        assert data.specs[name + "_aligned"].dims == data.specs[name].dims
        np.testing.assert_array_equal(data.metrics[name + "_aligned"], data.metrics[name])
    assert [c["method"] for c in seen["calls"]] == ["weights"]  # one pair, weights: no images
    assert seen["calls"][0]["images"] is None
    out = capsys.readouterr().out
    assert "random (plain)" in out and "random (weights-aligned)" in out


def test_the_aligned_twin_measures_the_aligned_network(children, monkeypatch):
    """An alignment that returns the first child makes the aligned path a point: loss flat
    at the first child's value, every aligned barrier 0, the plain numbers untouched."""
    standin(monkeypatch, moved=lambda a, b: copy.deepcopy(a))
    values = curves(children, align="weights")
    plain = curves(children)
    np.testing.assert_allclose(values["loss_aligned"], np.broadcast_to(
        values["loss"][:, :1], values["loss"].shape), rtol=1e-5)
    for name in NAMES:
        np.testing.assert_allclose(values[name + "_aligned"], 0.0, atol=1e-5)
        np.testing.assert_array_equal(values[name], plain[name])
    assert not any(k.endswith("_aligned") for k in plain)


def test_an_alignment_that_moves_nothing_reuses_the_plain_curve(children, monkeypatch):
    """changed = 0 (every permutation the identity): the aligned path is the plain one, so
    it is not measured twice; the stand-in's module (which would give a flat path) is not
    evaluated."""
    standin(monkeypatch, moved=lambda a, b: copy.deepcopy(a), changed=0)
    values = curves(children, align="weights")
    for name in border_module.ALIGNED:
        np.testing.assert_array_equal(values[name + "_aligned"], values[name])


def test_activation_matching_sees_the_bn_images(children, monkeypatch):
    """--align activations correlates on the BN recalibration draw, normalised, on the CPU."""
    seen = standin(monkeypatch)
    cfg = border_module.BorderConfig(grid="0:1:3", bn_samples=64, bn_batch_size=32,
                                     align="activations")
    splits = load_data(TRAIN)
    data = border_module.measured_data(cfg, splits, "cpu", 256)
    border_module.pair_curves(children, cfg, data, GRID, "cpu", False, 3,
                              border_module.align_images(cfg, splits[0]))
    (call,) = seen["calls"]
    assert call["method"] == "activations" and call["images"].shape == (64, 3, 16, 16)
    assert torch.equal(call["images"], torch.cat(list(images(data.bn))))


def test_without_align_the_layout_is_unchanged_and_a_rerun_resumes(tmp_path, monkeypatch):
    """No --align: no twin, no `align` in config or attrs (results made before --align
    existed keep their config), and the re-run measures nothing; an aligned re-run of that
    result, or another method on an aligned one, is refused in one line."""
    standin(monkeypatch)
    assert border_module.main(argv(tmp_path)) == 0
    data = open_result(tmp_path / "border.h5", "border")
    assert not any(name.endswith("_aligned") for name in data.metrics)
    assert "align" not in data.config["border"] and "align" not in data.attrs
    monkeypatch.setattr(border_module, "pair_curves", refuse)
    assert border_module.main(argv(tmp_path)) == 0
    before = (tmp_path / "border.h5").stat().st_mtime_ns
    for flags in (["--align", "weights"],):
        code, lines = run(argv(tmp_path, *flags))
        assert code == 2 and lines[-1].startswith("error: ") and "align" in lines[-1]
    assert (tmp_path / "border.h5").stat().st_mtime_ns == before


def test_an_aligned_result_refuses_another_method(tmp_path, monkeypatch):
    standin(monkeypatch)
    assert border_module.main(argv(tmp_path, "--align", "weights")) == 0
    monkeypatch.setattr(border_module, "pair_curves", refuse)
    assert border_module.main(argv(tmp_path, "--align", "weights")) == 0  # resumes
    for flags in (["--align", "activations"], []):
        code, lines = run(argv(tmp_path, *flags))
        assert code == 2 and "config" in lines[-1] and "align" in lines[-1], lines


def refuse(*args, **kwargs):
    raise AssertionError("a finished start point was measured again")


def run(args) -> tuple[int, list[str]]:
    from helpers import run_cli
    return run_cli(border_module.main, args)


@pytest.mark.parametrize("flags, culprit", [
    (["--align", "sideways"], "invalid choice: 'sideways'"),
    (["--align", "weights"], "no alignment; supported: mlp"),
])
def test_bad_align_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, flags,
                                                            culprit):
    standin(monkeypatch, supported=False)
    code, lines = run(argv(tmp_path, *flags))
    assert code == 2 and culprit in lines[-1] and "error: " in lines[-1]
    assert not (tmp_path / "store").exists() and not (tmp_path / "border.h5").exists()


def test_the_python_door_checks_the_method_too():
    cfg = border_module.BorderConfig(align="sideways")
    with pytest.raises(UserError, match="--align sideways: valid: weights, activations"):
        border_module.check(cfg, [border_module.Start("random")])


# ---------------------------------------------------------------------- the real module


def test_the_methods_are_landscape_aligns():
    align = pytest.importorskip("landscape.align")
    assert tuple(align.METHODS) == border_module.ALIGN_METHODS


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_real_alignment_lowers_or_keeps_the_barriers(children, method):
    """Two children of one init, aligned for real: every aligned barrier finite, and the
    test loss barrier not above the plain one beyond noise (they share most units already:
    matching mostly keeps the identity)."""
    pytest.importorskip("landscape.align")
    values = curves(children, align=method)
    for name in NAMES:
        assert np.isfinite(values[name + "_aligned"]).all()
    plain, aligned = values["loss_barrier_mean"], values["loss_barrier_mean_aligned"]
    assert (aligned <= plain + 0.05 + 0.1 * np.abs(plain)).all(), (plain, aligned)


@pytest.fixture(scope="module")
def strangers(tmp_path_factory):
    """Two networks of different inits (and data orders): unit for unit unrelated."""
    store = tmp_path_factory.mktemp("strangers_store")
    return [find_run(train(dataclasses.replace(TRAIN, seed=s, data_seed=s), store,
                           device="cpu").path) for s in (0, 1)]


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_real_alignment_of_different_inits_lowers_the_barrier(strangers, method):
    """Networks from different inits meet unit for unit only after alignment: the aligned
    loss barrier is clearly below the plain one (0.25 nats -> 0.15 / 0.12 here)."""
    pytest.importorskip("landscape.align")
    values = curves(strangers, align=method)
    plain, aligned = values["loss_barrier_mean"], values["loss_barrier_mean_aligned"]
    assert (aligned < 0.8 * plain).all(), (plain, aligned)
