"""Adaptive barrier search: `barrier.refine_peak` on synthetic curves (accuracy, cost against
a uniform grid, determinism) and `landscape.interpolate --refine` end to end on tiny
convnets (refined points equal a direct scan there, a killed refinement resumes to the
same file, one-line errors)."""

import numpy as np
import pytest
import torch

from landscape.barrier import mean_barrier, refine_peak
from landscape.interpolate import InterpolateConfig, main, scan
from runs.checkpoint import save_checkpoint
from runs.errors import UserError
from runs.models import create_model
from runs.results import open_result
from tests.helpers import run_cli

CENTRE, WIDTH = 1 / np.e, 0.01  # a narrow bump, 1 % of the path wide, on no simple grid


def bump(alpha):
    """A sharp barrier of height 1 at CENTRE (a Gaussian of std WIDTH)."""
    return np.exp(-0.5 * ((np.asarray(alpha, np.float64) - CENTRE) / WIDTH) ** 2)


def uniform_points_for(error: float, limit: int = 20000) -> int:
    """The fewest points of a uniform 0..1 grid whose maximum of `bump` is within `error`
    of the peak (every grid size tried in turn: the first that reaches it)."""
    for count in range(2, limit):
        if 1 - bump(np.linspace(0, 1, count)).max() <= error:
            return count
    raise AssertionError("no uniform grid below the limit reaches that accuracy")


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_refinement_finds_a_sharp_peak_with_fewer_points_than_a_uniform_grid(tol):
    grid = np.linspace(0, 1, 25)
    calls = []
    found = refine_peak(lambda a: calls.append(a) or float(bump(a)), grid, bump(grid), tol,
                        max_points=100)
    assert 1 - found.peak <= tol  # the peak value to TOL
    assert found.peak == pytest.approx(float(bump(found.peak_alpha)))
    assert len(calls) == len(found.alphas) < 100  # stopped by TOL, not by the cap
    spent = len(grid) + len(found.alphas)  # every evaluation, the grid's included
    # the first uniform grid as accurate as the search (with the bump where it is) ...
    uniform = uniform_points_for(1 - found.peak)
    assert spent < uniform, (spent, uniform)
    # ... and the one accurate to TOL wherever the bump sits (spacing h: bump(h / 2) >= 1 - tol)
    spacing = 2 * WIDTH * np.sqrt(-2 * np.log1p(-tol))
    assert spent < np.ceil(1 / spacing) + 1
    assert 1 - bump(grid).max() > 0.2  # the grid alone misses the barrier by a fifth
    # the barrier over grid + refined points is the true one to TOL (ends are ~0 here)
    xs = np.concatenate([grid, found.alphas])
    order = np.argsort(xs)
    ys = np.concatenate([bump(grid), found.values])[order]
    assert mean_barrier(ys, xs[order]) == pytest.approx(1.0, abs=tol)


def test_refinement_is_deterministic_so_a_replay_reuses_stored_points():
    grid = np.linspace(0, 1, 11)
    first = refine_peak(bump, grid, bump(grid), 1e-3, 40)
    stored = dict(zip(first.alphas[:5].tolist(), first.values[:5].tolist()))  # killed at 5
    fresh = []

    def replay(alpha):  # what a resumed scan's f does: stored values, else measure
        if alpha in stored:
            return stored[alpha]
        fresh.append(alpha)
        return float(bump(alpha))
    second = refine_peak(replay, grid, bump(grid), 1e-3, 40)
    np.testing.assert_array_equal(second.alphas, first.alphas)
    assert fresh == first.alphas[5:].tolist() and second.peak == first.peak


def test_max_points_caps_the_search_and_points_stay_inside_the_path():
    grid = np.linspace(-0.5, 1.5, 9)  # beyond [0, 1]: a barrier ignores those points
    found = refine_peak(bump, grid, bump(grid), 1e-12, 3)
    assert len(found.alphas) == 3
    assert ((found.alphas > 0) & (found.alphas < 1)).all()
    assert len(set(found.alphas.tolist()) | set(grid.tolist())) == len(grid) + 3  # all new


def test_a_flat_curve_takes_one_round():
    grid = np.linspace(0, 1, 5)
    found = refine_peak(lambda a: 0.5, grid, np.full(5, 0.5), 1e-3, 50)
    assert found.rounds == 1 and found.peak == 0.5


@pytest.mark.parametrize("tol", [0.0, -1e-3, float("nan")])
def test_non_positive_tolerance_is_a_user_error(tol):
    with pytest.raises(UserError, match="--refine"):
        refine_peak(bump, [0, 1], [0, 0], tol, 5)


# --- landscape.interpolate --refine ---------------------------------------------------------

FAST = ["--device", "cpu", "--bn-samples", "64", "--bn-batch-size", "32", "--dataset",
        "toy", "--data-options", "side=8", "--train-samples", "64", "--test-samples", "64"]


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two tiny untrained convnets (toy: 3 x 8 x 8, 4 classes) as checkpoint files."""
    root = tmp_path_factory.mktemp("refine_nets")
    return [str(save_checkpoint(root / f"net{s}.pt", create_model(
        "convnet", num_classes=4, width=0.125, in_channels=3, seed=s), 0)) for s in (0, 1)]


def config(nets, **fields) -> InterpolateConfig:
    base = dict(refs=tuple(nets), grid="0:1:5", dataset="toy", data_options=("side=8",),
                bn_samples=64, bn_batch_size=32, train_samples=64, test_samples=64,
                metrics=("supervised",), refine=1e-4, refine_max=6)
    return InterpolateConfig(**{**base, **fields})


def test_cli_refines_the_path_and_refined_points_match_a_direct_scan(nets, tmp_path):
    path = tmp_path / "refined.h5"
    code, err = run_cli(main, [*nets, "--grid", "0:1:5", "--metrics", "supervised",
                               "--refine", "1e-4", "--refine-max", "6", "--out", str(path),
                               *FAST])
    assert code == 0, err
    data = open_result(str(path), "interpolate")
    count = int(data.metrics["refine_points"])
    alphas = data.metrics["refined_alpha"]
    assert 1 <= count <= 6 and np.isfinite(alphas[:count]).all()
    assert np.isnan(alphas[count:]).all()  # padded
    assert ((alphas[:count] > 0) & (alphas[:count] < 1)).all()
    assert not np.isin(alphas[:count], data.coords["alpha"]).any()  # new points only
    # an oracle: the same points measured as an ordinary grid give the same values
    direct = open_result(scan(config(nets, grid=",".join(repr(float(a)) for a in
                                                        alphas[:count]), refine=None),
                              tmp_path / "direct.h5", device="cpu"))
    for name in ("loss", "error"):  # the direct grid keeps the order taken
        np.testing.assert_allclose(data.metrics[f"refined_{name}"][:count],
                                   direct.metrics[name], rtol=1e-5, atol=1e-6)
    # the refined barrier is at least the grid's (more points can only raise a maximum)
    grid_barrier = mean_barrier(data.metrics["error"].T, data.coords["alpha"])
    assert (data.metrics["refined_error_barrier"] >= grid_barrier - 1e-7).all()


def test_killed_refinement_resumes_to_the_same_result(nets, tmp_path):
    cfg = config(nets)
    whole = open_result(scan(cfg, tmp_path / "whole.h5", device="cpu"))
    assert int(whole.metrics["refine_points"]) >= 2  # the kill below lands mid-search
    path = tmp_path / "killed.h5"
    scan(cfg, path, device="cpu", stop_after=5 + 1)  # the grid, then one refined point
    killed = open_result(str(path))
    assert np.isnan(killed.metrics["refine_points"])
    assert np.isfinite(killed.metrics["refined_alpha"]).sum() == 1
    resumed = open_result(scan(cfg, path, device="cpu"))
    for name in whole.metrics:
        np.testing.assert_array_equal(resumed.metrics[name], whole.metrics[name], name)


@pytest.mark.parametrize("flags, culprit", [
    (["--refine", "0"], "--refine"),
    (["--refine", "-0.01"], "--refine"),
    (["--refine", "0.01", "--refine-max", "0"], "--refine-max"),
    (["--refine", "0.01", "--metrics", "norm"], "--refine"),
])
def test_bad_refine_flags_exit_2_with_one_line(nets, tmp_path, flags, culprit):
    out = tmp_path / "bad.h5"
    code, err = run_cli(main, [*nets, "--out", str(out), *FAST, *flags])
    errors = [line for line in err if line.startswith("error: ")]  # after the echoed command
    assert code == 2 and len(errors) == 1 and culprit in errors[0], err
    assert err[-1] == errors[0]
    assert not out.exists()


def test_refine_refuses_a_plane(nets, tmp_path):
    with pytest.raises(UserError, match="--refine"):
        scan(config([*nets, nets[0]]), tmp_path / "plane.h5", device="cpu")


def test_the_python_door_refines_in_memory_and_round_trips_through_save(tmp_path):
    from landscape import api
    from runs.results import read_dataset, save
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    a, b = (create_model("convnet", num_classes=4, width=0.125, in_channels=3, seed=s)
            for s in (0, 1))
    options = dict(test=(x, y), metrics=("supervised",), device="cpu", bn_samples=32,
                   bn_batch_size=16)
    ds = api.path(a, b, (x, y), np.linspace(0, 1, 5), refine=1e-4, refine_max=4, **options)
    count = int(ds["refine_points"])
    assert ds["refined_loss"].dims == ("refine", "split") and ds.sizes["refine"] == 4
    taken = ds["refined_alpha"].values[:count]
    direct = api.path(a, b, (x, y), taken, **options)  # the oracle: a plain grid there
    np.testing.assert_allclose(ds["refined_loss"].values[:count], direct["loss"].values,
                               rtol=1e-5)
    save(ds, tmp_path / "saved.h5")  # a refined result writes as the CLI's file
    again = read_dataset(str(tmp_path / "saved.h5"))
    assert int(again["refine_points"]) == count
    np.testing.assert_array_equal(again["refined_alpha"].values, ds["refined_alpha"].values)
