"""The tickets Python API: magnitude masks of any nn.Module against torch.nn.utils.prune's
global L1 selection, exact kept counts, nesting, masks applied in place, bad input, and
run_imp returning the dataset the CLI's file holds (tiny CPU sweep on digits)."""

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import tickets
from runs.engines import train as train_module
from runs.errors import UserError
from runs.results import PROVENANCE
from tickets.api import _configs, option_names
from tickets.imp import main
from tickets.mask import is_nested, num_kept

xr = pytest.importorskip("xarray")

PRUNABLE = ["0.weight", "3.weight", "8.weight"]  # conv, conv, linear: scope "weights"


def small_net(seed: int = 0) -> nn.Sequential:
    """A plain module (not a registry model) with BatchNorm, biases and a Linear head."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():  # BN affine away from 1 / 0, so "left alone" can be seen
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def total(model, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def torch_oracle(model, names, num_prune: int) -> dict:
    """torch.nn.utils.prune's global L1 selection, on a copy (it re-parametrises)."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    targets = [(modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in names]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=num_prune)
    return {n: getattr(m, f"{attr}_mask").bool() for n, (m, attr) in zip(names, targets)}


# ---------------------------------------------------------------------------- masks


@pytest.mark.parametrize("scope", ["weights", "all"])
@pytest.mark.parametrize("density", [1.0, 0.8, 0.5, 0.2, 0.013])
def test_magnitude_masks_match_torch_global_l1(scope, density):
    model = small_net()
    names = PRUNABLE if scope == "weights" else [n for n, _ in model.named_parameters()]
    flat = torch.cat([dict(model.named_parameters())[n].detach().abs().flatten()
                      for n in names])
    assert flat.unique().numel() == flat.numel()  # no ties: the oracle's order is ours
    n_total = total(model, names)
    kept = math.floor(n_total * density + 0.5)
    masks = tickets.magnitude_masks(model, density, scope=scope)
    assert list(masks) == names and num_kept(masks) == kept
    assert all(m.dtype == torch.bool for m in masks.values())
    expected = torch_oracle(model, names, n_total - kept)
    for name in names:
        assert torch.equal(masks[name], expected[name]), name


def test_keep_output_dense_leaves_the_head_out():
    model = small_net()
    masks = tickets.magnitude_masks(model, 0.3, keep_output_dense=True)
    assert list(masks) == PRUNABLE[:2]
    assert num_kept(masks) == math.floor(total(model, PRUNABLE[:2]) * 0.3 + 0.5)


def test_masks_from_repeated_calls_are_nested_and_exact():
    model = small_net()
    n_total = total(model, PRUNABLE)
    first = tickets.magnitude_masks(model, 0.8)
    with torch.no_grad():  # as training between levels would: the magnitudes reorder
        for param in model.parameters():
            param.add_(torch.randn_like(param) * param.abs().mean())
    second = tickets.magnitude_masks(model, 0.64, masks=first)
    assert num_kept(first) == math.floor(n_total * 0.8 + 0.5)
    assert num_kept(second) == math.floor(n_total * 0.64 + 0.5)
    assert is_nested(second, first)
    fresh = tickets.magnitude_masks(model, 0.64)  # the same count from scratch: not nested,
    assert not is_nested(fresh, first)  # so nesting above comes from `masks`
    # Among the weights `first` kept, `second` keeps the largest |w|.
    params = dict(model.named_parameters())
    kept = torch.cat([params[n].detach().abs()[second[n]] for n in PRUNABLE])
    dropped = torch.cat([params[n].detach().abs()[first[n] & ~second[n]] for n in PRUNABLE])
    assert kept.min() > dropped.max()


def test_apply_masks_zeros_exactly_the_masked_weights():
    model = small_net()
    masks = tickets.magnitude_masks(model, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all((before[n] != 0).all() for n in PRUNABLE)
    assert tickets.apply_masks(model, masks) is model
    after = model.state_dict()
    for name, value in after.items():
        if name in masks:
            keep = masks[name]
            assert (value[~keep] == 0).all() and torch.equal(value[keep], before[name][keep])
        else:  # BN affine and buffers, biases: untouched
            assert torch.equal(value, before[name]), name
    assert not any(hasattr(m, "weight_mask") for m in model.modules())  # no re-param
    assert isinstance(model[0].weight, nn.Parameter)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_density_outside_the_range_is_a_user_error(density):
    with pytest.raises(UserError, match=r"density .*\(0, 1\]"):
        tickets.magnitude_masks(small_net(), density)


def test_unknown_scope_lists_the_valid_ones():
    with pytest.raises(UserError, match="'biases'.*valid: all, weights"):
        tickets.magnitude_masks(small_net(), 0.5, scope="biases")


def test_masks_that_keep_fewer_than_density_asks():
    model = small_net()
    masks = tickets.magnitude_masks(model, 0.5)
    with pytest.raises(UserError, match="more than the given masks keep"):
        tickets.magnitude_masks(model, 0.8, masks=masks)
    with pytest.raises(UserError, match="scope 'all'.*missing: 0.bias"):
        tickets.magnitude_masks(model, 0.2, scope="all", masks=masks)


def test_apply_masks_bad_name_lists_the_prunable_parameters():
    model = small_net()
    masks = {"9.weight": torch.ones(5, 8, dtype=torch.bool)}
    with pytest.raises(UserError, match="'9.weight'.*0.weight, 3.weight, 8.weight"):
        tickets.apply_masks(model, masks)


def test_apply_masks_bad_shape_names_both_shapes():
    model = small_net()
    before = model[0].weight.detach().clone()
    masks = {"0.weight": torch.zeros(4, 3, 3, 3, dtype=torch.bool),
             "8.weight": torch.zeros(8, 5, dtype=torch.bool)}
    with pytest.raises(UserError, match=r"8\.weight.*\(8, 5\).*\(5, 8\)"):
        tickets.apply_masks(model, masks)
    assert torch.equal(model[0].weight, before)  # checked before anything changed


def test_run_imp_rejects_unknown_options_and_in_memory_data(tmp_path):
    with pytest.raises(UserError, match="learning_rate; valid: .*batch_size.*lr.*prune_scope"):
        tickets.run_imp(model="convnet", data="digits", learning_rate=0.1, store=tmp_path)
    with pytest.raises(UserError, match=r"dataset \(the dataset is data=...\)"):
        tickets.run_imp(model="convnet", dataset="digits", store=tmp_path)
    with pytest.raises(UserError, match="registry dataset name"):
        tickets.run_imp(model="convnet", data=(torch.zeros(4, 1, 8, 8), torch.zeros(4)),
                        store=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing trained


def test_run_imp_takes_the_controls_as_options():
    names = option_names()
    controls = {"random_baseline", "reinit_from", "rewind_optimizer", "prune_output"}
    assert controls <= set(names)
    assert not {"start_step", "keep_output_dense"} & set(names)  # per level; renamed
    imp, cfg = _configs("convnet", "digits", 1, "init@0", 0.2, dict(
        rewind_optimizer="reset", reinit_from="0", random_baseline="global",
        prune_output="no", lr=0.05))
    assert (imp.rewind_optimizer, imp.reinit_from, imp.random_baseline, imp.prune_output) == \
        ("reset", "0", "global", "no")
    assert cfg.rewind_optimizer == "restore" and cfg.lr == 0.05  # the dense run's own


# ---------------------------------------------------------------------------- run_imp

# tests/test_tickets_imp.py's tiny settings (digits, convnet width 0.125, 18 steps per
# epoch), shortened: 1 level of 20 steps rewound to step 5, with the random baseline.
TRAIN = dict(width=0.125, batch_size=64, val_size=100, lr=0.05, crop_padding=0, flip=False)
SWEEP = dict(model="convnet", data="digits", levels=1, rewind="init@5", steps=20,
             baselines="random", device="cpu", seeds=(0,))
ARGV = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size", "64",
        "--val-size", "100", "--lr", "0.05", "--crop-padding", "0", "--no-flip",
        "--levels", "1", "--rewind", "init@5", "--steps", "20", "--baselines", "random",
        "--device", "cpu", "--seeds", "0"]


def comparable(ds):
    """The dataset without its provenance (time, git state, versions, device)."""
    ds = ds.load()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in (*PROVENANCE, "created_utc")}
    return ds


def test_run_imp_equals_the_cli_file(tmp_path, monkeypatch):
    store = tmp_path / "store"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["--store", str(store), "--out", str(tmp_path / "cli.h5"), *ARGV]) == 0
    # The same runs, masks and store as the CLI's: nothing trains again.
    monkeypatch.setattr(train_module, "train_step", lambda *a: pytest.fail("trained again"))
    ds = tickets.run_imp(**SWEEP, store=store, **TRAIN)
    assert ds.attrs["analysis"] == "imp" and ds["test_accuracy"].dims == ("branch", "level",
                                                                          "seed")
    assert list(ds["branch"].values) == ["ticket", "random"] and bool(ds["done"].all())
    assert np.isfinite(ds["test_accuracy"].values).all()
    with xr.open_dataset(tmp_path / "cli.h5", engine="h5netcdf") as cli:
        xr.testing.assert_identical(comparable(ds), comparable(cli))
        assert set(ds.attrs) == set(cli.attrs)
    # out=: the file the CLI writes, and the same dataset returned
    again = tickets.run_imp(**SWEEP, store=store, out=tmp_path / "api.h5", **TRAIN)
    xr.testing.assert_identical(comparable(again), comparable(ds))
    with xr.open_dataset(tmp_path / "api.h5", engine="h5netcdf") as api:
        xr.testing.assert_identical(comparable(api), comparable(ds))
