"""landscape.interpolate --align and --bn-mode repair, through both doors: a network and a
permuted copy of itself lie on one flat path once aligned (and not before); REPAIR leaves the
endpoints as they are; one-line errors for what the modes cannot do."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape
from landscape.align import apply_permutation, permutation_spec, random_permutation
from landscape.interpolate import main
from runs.checkpoint import save_checkpoint
from runs.errors import UserError
from runs.models import create_model
from runs.results import open_result
from tests.helpers import run_cli, scaled_digits

ALPHAS = np.linspace(0, 1, 5)
FAST = dict(device="cpu", bn_samples=64, bn_batch_size=32)


@pytest.fixture(scope="module")
def digits():
    """Float images and labels: 120 train, 60 test (digits: 1 x 8 x 8, 10 classes)."""
    return scaled_digits()


@pytest.fixture(scope="module")
def pair(digits):
    """A briefly trained tiny convnet and a randomly permuted copy (the same function)."""
    (x, y), _ = digits
    model = create_model("convnet", num_classes=10, width=0.125, in_channels=1, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    perm = random_permutation(permutation_spec(model), seed=3)
    return model, apply_permutation(model, perm)


def path(pair, digits, **options):
    return landscape.path(*pair, digits[0], ALPHAS, test=digits[1], **{**FAST, **options})


def test_permuted_copy_computes_the_same_function(pair, digits):
    (x, _), _ = digits
    with torch.no_grad():
        torch.testing.assert_close(pair[0](x), pair[1](x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_aligned_path_to_a_permuted_copy_is_flat_and_the_unaligned_one_is_not(pair, digits,
                                                                             method):
    plain = path(pair, digits)
    aligned = path(pair, digits, align=method)
    ends = plain["loss"].sel(alpha=0.0)
    rise = float((plain["loss"] - ends).max())
    assert rise > 0.05  # the straight line to a permuted copy crosses a barrier
    assert float(landscape.barriers(plain)["loss_barrier_mean"].max()) > 0.05
    flat = aligned["loss"] - aligned["loss"].sel(alpha=0.0)
    assert float(abs(flat).max()) < 1e-4  # aligned: the same network all along
    found = landscape.barriers(aligned)
    assert float(abs(found["error_barrier"]).max()) < 1e-6
    record = json.loads(aligned.attrs["align"])  # root attrs as a file stores them
    assert record["method"] == method and record["B"]["changed"] > 0
    assert record["B"]["objective_after"] >= record["B"]["objective_before"]
    assert "align" not in plain.attrs


def test_align_runs_through_the_cli_and_records_itself(pair, digits, tmp_path):
    refs = [str(save_checkpoint(tmp_path / f"{n}.pt", m, 0)) for n, m in zip("ab", pair)]
    out = tmp_path / "aligned.h5"
    code, err = run_cli(main, [*refs, "--grid", "0:1:3", "--align", "weights", "--dataset",
                               "digits", "--test-samples", "60", "--train-samples", "120",
                               "--bn-samples", "64", "--device", "cpu", "--out", str(out)])
    assert code == 0, err
    data = open_result(str(out), "interpolate")
    assert data.config["align"] == "weights"
    assert json.loads(data.attrs["align"])["method"] == "weights"
    loss = data.metrics["loss"]  # (alpha, split)
    np.testing.assert_allclose(loss, np.broadcast_to(loss[0], loss.shape), atol=1e-4)


def test_repair_keeps_the_endpoints(digits):
    (x, y), _ = digits
    a = create_model("convnet", num_classes=10, width=0.125, in_channels=1, seed=0).eval()
    b = create_model("convnet", num_classes=10, width=0.125, in_channels=1, seed=1).eval()
    for model in (a, b):  # BN statistics of their own
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
    repaired = landscape.path(a, b, digits[0], ALPHAS, test=digits[1], bn_mode="repair",
                              **FAST)
    own = landscape.path(a, b, digits[0], ALPHAS, test=digits[1], bn_mode="interpolate",
                         **FAST)
    for alpha in (0.0, 1.0):  # interpolate at 0 and 1 is each network itself
        for name in ("loss", "error"):
            np.testing.assert_allclose(repaired[name].sel(alpha=alpha),
                                       own[name].sel(alpha=alpha), rtol=1e-4, atol=1e-5)
    middle = repaired["loss"].sel(alpha=0.5) - own["loss"].sel(alpha=0.5)
    assert float(abs(middle).max()) > 1e-4  # REPAIR did change the interior
    assert repaired.attrs["bn_mode"] == "repair"


def test_repair_refuses_many_points_per_pass_and_planes(pair, digits):
    with pytest.raises(UserError, match="--points-per-pass"):
        path(pair, digits, bn_mode="repair", points_per_pass=2)
    with pytest.raises(UserError, match="paths only"):
        landscape.plane(*pair, pair[0], digits[0], ALPHAS, test=digits[1], bn_mode="repair",
                        **FAST)


def test_align_on_random_directions_is_a_user_error(pair, digits):
    with pytest.raises(UserError, match="--align"):
        landscape.directions(pair[0], digits[0], ALPHAS, test=digits[1], align="weights",
                             **FAST)
