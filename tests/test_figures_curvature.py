"""figures.curvature draws from `hessian` results and curvature paths (issue #20, deliver 3).

Synthetic results hold diagonal Hessians with known spectra (tests/_curvature_fixtures.py),
so the figures' numbers are checked against exact values: densities on one common grid
integrate to 1 with first moment trace / n, bars and points are the stored values, the
labels are the checkpoints' readable names. Results of other analyses are refused with one
line naming the file; the CLI draws every figure without importing torch.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _curvature_fixtures import CHECKPOINTS, LAYERS, curvature_path, hessian
from _figure_fixtures import path_1d

from figures import curvature
from figures.__main__ import FIGURES, main
from runs.errors import UserError
from runs.results import open_result

ROOT = Path(__file__).resolve().parents[1]
LAYER_NAMES = [name for name, _ in LAYERS]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """hessian.h5 (own grids per checkpoint), shared.h5 (one grid), path.h5 (curvature path)."""
    root = tmp_path_factory.mktemp("curvature")
    hessian(root / "hessian.h5")
    hessian(root / "shared.h5", density_grid="-2:25:201")
    curvature_path(root / "path.h5")
    return root


@pytest.fixture(scope="module")
def result(folder):
    return open_result(folder / "hessian.h5")


def test_registered_with_its_producer():
    assert FIGURES["curvature"] is curvature
    from figures.sources import PRODUCERS
    assert "landscape.hessian" in PRODUCERS[curvature.ANALYSIS]


def test_density_kernel_is_landscape_curvatures():
    """The numpy kernel here equals landscape.curvature.density_on (which imports torch)."""
    from landscape.curvature import Quadrature, density_on
    rng = np.random.default_rng(0)
    nodes, weights = rng.normal(size=(3, 20)), rng.random((3, 20))
    weights /= weights.sum(1, keepdims=True)
    grid = np.linspace(-4, 4, 301)
    for sigma in (0.0, 0.3):
        np.testing.assert_allclose(curvature.density_on(nodes, weights, grid, sigma),
                                   density_on(Quadrature(nodes, weights), grid, sigma),
                                   rtol=1e-12)


def test_differing_grids_are_redrawn_on_one_common_grid(result):
    grids = result.metrics["density_eigenvalue"]
    assert not np.allclose(grids[0], grids[-1])  # the fixture's own grids differ
    grid, curves, recomputed = curvature.densities(result)
    assert recomputed and list(curves) == list(CHECKPOINTS)
    nodes = result.metrics["slq_node_value"]
    assert grid[0] < nodes.min() and grid[-1] > nodes.max()  # spans every checkpoint
    for i, density in enumerate(curves.values()):
        assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-9)
        mean = np.trapezoid(grid * density, grid)  # first moment = tr(H) / n (exact SLQ)
        n = result.metrics["param_count"][i]
        assert mean == pytest.approx(result.metrics["trace"][i] / n, abs=1e-6)


def test_one_shared_grid_draws_the_stored_densities(folder):
    shared = open_result(folder / "shared.h5")
    grid, curves, recomputed = curvature.densities(shared)
    assert not recomputed
    np.testing.assert_array_equal(grid, shared.metrics["density_eigenvalue"][0])
    np.testing.assert_array_equal(curves["teacher"], shared.metrics["density"][0])


def test_nan_padded_quadrature_is_ignored():
    nodes = np.array([[1.0, 2.0, np.nan], [1.0, 3.0, 0.0]])
    weights = np.array([[0.5, 0.5, np.nan], [0.5, 0.5, 0.0]])
    grid = curvature.common_grid([nodes], [weights], 11)
    assert grid[0] == pytest.approx(0.9) and grid[-1] == pytest.approx(3.1)  # not 0, not NaN
    density = curvature.density_on(nodes, weights, grid)
    assert np.isfinite(density).all() and np.trapezoid(density, grid) == pytest.approx(1)


def test_density_figure_one_log_axis_every_checkpoint(result):
    fig = curvature.build_density(result)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and "density" in ax.get_ylabel()
    assert "eigenvalue" in ax.get_xlabel()
    assert [line.get_label() for line in ax.get_lines()] == list(CHECKPOINTS)
    floor = ax.get_ylim()[0]
    peak = max(line.get_ydata().max() for line in ax.get_lines())
    assert floor == pytest.approx(curvature.FLOOR * peak)
    assert all(line.get_ydata().min() >= floor for line in ax.get_lines())
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert len({tuple(c) for c in colors.values()}) == len(CHECKPOINTS)  # all told apart
    text = fig._suptitle.get_text()
    assert text.startswith("toy: Hessian of the supervised loss, 64 train images") and \
        "/" not in text


def test_top_and_trace_are_the_stored_values(result):
    fig = curvature.build_top_trace(result)
    top, trace = fig.axes
    assert [t.get_text() for t in trace.get_xticklabels()] == list(CHECKPOINTS)
    assert "top eigenvalue" in top.get_ylabel() and "trace" in trace.get_ylabel()
    assert "standard error" in trace.get_xlabel()
    points = [c.lines[0].get_ydata()[0] for c in trace.containers]  # one errorbar each
    np.testing.assert_allclose(points, result.metrics["trace"], rtol=1e-6)
    bars = [c.lines[2][0].get_segments()[0][:, 1] for c in trace.containers]  # (low, high)
    np.testing.assert_allclose([b[1] - b[0] for b in bars], 2 * result.metrics["trace_se"],
                               rtol=1e-5)
    tops = [c.lines[0].get_ydata()[0] for c in top.containers]
    np.testing.assert_allclose(tops, result.metrics["eigenvalue"][:, 0], rtol=1e-6)


@pytest.mark.parametrize("per_parameter", [False, True])
def test_layer_bars_one_colour_per_checkpoint(result, per_parameter):
    fig = curvature.build_layers(result, per_parameter)
    traces, tops = fig.axes
    assert [t.get_text() for t in traces.get_yticklabels()] == LAYER_NAMES
    assert "layer" in traces.get_ylabel() and "trace" in traces.get_xlabel()
    assert ("per parameter" in traces.get_xlabel()) == per_parameter
    groups = traces.containers
    assert [g.get_label() for g in groups] == list(CHECKPOINTS)
    expected = result.metrics["layer_trace"] / (result.metrics["layer_size"]
                                                if per_parameter else 1)
    for group, row in zip(groups, expected):
        np.testing.assert_allclose([bar.get_width() for bar in group], row, rtol=1e-6)
    np.testing.assert_allclose([bar.get_width() for bar in tops.containers[-1]],
                               result.metrics["layer_top"][-1], rtol=1e-6)
    # the per-layer traces add up to the total (the fixture's blocks are exact)
    np.testing.assert_allclose(result.metrics["layer_trace"].sum(1), result.metrics["trace"],
                               rtol=1e-5)


def test_path_figure_draws_only_measured_points(tmp_path):
    data = open_result(curvature_path(tmp_path / "path.h5", k=3))
    assert curvature.is_curvature_path(data)
    fig = curvature.build_path(data)
    top, trace = fig.axes
    lines = [line for line in top.get_lines() if line.get_linestyle() != ":"]
    assert len(lines) == 3  # lambda_2, lambda_3 as grey ticks, then lambda_max
    drawn = np.asarray(lines[-1].get_ydata(), float)
    assert np.isnan(drawn[1::2]).all()  # not measured: a gap, no line across it
    np.testing.assert_allclose(drawn[::2], data.metrics["hessian_top"][::2, 0])
    assert "alpha" in top.get_xlabel() and "SE" in trace.get_ylabel()
    (bars,) = trace.containers
    np.testing.assert_allclose(bars.lines[0].get_ydata()[::2], data.metrics["hessian_trace"][::2])
    assert [t.get_text() for t in top.texts] == ["A", "B"]
    assert "(supervised loss, 256 train images)" in fig._suptitle.get_text()


def test_a_result_draws_what_its_measures_hold(tmp_path):
    data = open_result(hessian(tmp_path / "trace.h5", measures=("trace",)))
    assert curvature.kinds(data) == ["top-trace", "layers"]
    assert curvature.kinds(data, per_parameter=True) == ["top-trace", "layers-pp"]
    figs = curvature.build(data)
    assert [ax.get_ylabel() for ax in figs["top-trace"].axes] == [r"Hessian trace tr$(H)$"]
    assert len(figs["layers"].axes) == 1 and "trace" in figs["layers"].axes[0].get_xlabel()
    data = open_result(hessian(tmp_path / "top.h5", measures=("top", "layer-top")))
    assert curvature.kinds(data, per_parameter=True) == ["top-trace", "layers"]
    names = [p.name for p in curvature.draw(tmp_path / "top.h5", tmp_path / "out", True)]
    assert names == ["curvature-top-trace_top.pdf", "curvature-top-trace_top.png",
                     "curvature-layers_top.pdf", "curvature-layers_top.png"]


def test_an_unfinished_result_says_so(tmp_path):
    data = open_result(hessian(tmp_path / "hessian.h5", done=[0, 2]))
    fig = curvature.build_density(data)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [CHECKPOINTS[0],
                                                                      CHECKPOINTS[2]]
    paths = curvature.draw(tmp_path / "hessian.h5", tmp_path / "out")
    assert len(paths) == 6


def test_cli_draws_without_torch(folder, tmp_path):
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.argv = ['figures', 'curvature', '--results', sys.argv[1], "
            "'--out', sys.argv[2], '--per-parameter']\n"
            "try:\n    runpy.run_module('figures', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'figures imported torch'")
    done = subprocess.run([sys.executable, "-c", code, str(folder / "hessian.h5"), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"curvature-{kind}_hessian.{ext}" for kind in ("density", "top-trace", "layers-pp")
        for ext in ("pdf", "png"))


def test_a_folder_names_one_figure_per_file_and_kind(folder, tmp_path, monkeypatch):
    from matplotlib import pyplot as plt

    from figures import style
    names = []

    def record(fig, out_dir, name):
        names.append(name)
        plt.close(fig)
        return [Path(out_dir) / f"{name}.pdf"]

    monkeypatch.setattr(style, "save", record)
    curvature.draw(folder, tmp_path)
    assert sorted(names) == sorted([f"curvature-{kind}_{stem}" for stem in ("hessian", "shared")
                                    for kind in ("density", "top-trace", "layers")] +
                                   ["curvature-path_path"])


def test_one_file_draws_its_own_figures(folder, tmp_path):
    assert main(["curvature", "--results", str(folder / "path.h5"), "--out",
                 str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curvature-path_path.pdf",
                                                          "curvature-path_path.png"]


def test_another_analysis_is_refused_in_one_line(tmp_path, capsys):
    other = path_1d(tmp_path / "plain_path.h5")  # interpolate without Hessian metrics
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        curvature.draw(other, out)
    message = str(err.value)
    assert "\n" not in message and str(other) in message and "'hessian'" in message
    assert "hessian-top" in message and not out.exists()
    assert main(["curvature", "--results", str(other), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()


def test_an_empty_folder_names_the_stage(tmp_path):
    with pytest.raises(UserError, match=r"curvature \(python -m landscape.hessian\)"):
        curvature.draw(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_end_to_end_from_the_clis(tmp_path):
    """landscape.hessian and landscape.interpolate (hessian-* metrics) on two tiny convnets
    (a random init and a few SGD steps from another), then the figures from their files:
    the checkpoints keep their LABEL:= names, each grid the CLI chose is redrawn on one."""
    import torch
    import torch.nn.functional as F

    from runs.checkpoint import save_checkpoint
    from runs.data import load_splits
    from runs.gpu_loader import eval_loader
    from runs.models import create_model
    from tests.helpers import run_cli
    train, _ = load_splits("digits", "", 0, seed=0, stats="paper")
    x, y = next(eval_loader(train, "cpu", 128).epoch(0))
    nets = []
    for seed, steps in ((0, 0), (1, 8)):
        model = create_model("convnet", num_classes=10, width=0.0625, in_channels=1, seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        nets.append(str(save_checkpoint(tmp_path / f"net{seed}.pt", model, steps)))
    results = tmp_path / "results"
    code, err = run_cli("landscape.hessian", [
        f"random init:={nets[0]}", f"trained:={nets[1]}", "--dataset", "digits", "--samples",
        "16", "--top-k", "1", "--measures", "top", "trace", "density", "--slq-runs", "1",
        "--slq-steps", "8", "--trace-probes", "10:10", "--device", "cpu",
        "--out", str(results / "hessian.h5")])
    assert code == 0, err
    code, err = run_cli("landscape.interpolate", [
        *nets, "--grid", "0,0.5,1", "--dataset", "digits", "--train-samples", "16",
        "--test-samples", "16", "--bn-samples", "32", "--bn-batch-size", "32", "--metrics",
        "supervised", "hessian-top", "hessian-trace", "--hessian-samples", "16",
        "--hessian-probes", "10", "--hessian-tol", "0.5", "--hessian-at", "0,1",
        "--device", "cpu", "--out", str(results / "path.h5")])
    assert code == 0, err
    hessians, paths = curvature.find(results)
    assert len(hessians) == len(paths) == 1
    grid, curves, recomputed = curvature.densities(hessians[0])
    assert list(curves) == ["random init", "trained"] and recomputed
    for density in curves.values():
        assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-6)
    assert curvature.kinds(hessians[0]) == ["density", "top-trace", "layers"]
    alpha, top = curvature.path_values(paths[0], "hessian_top")
    assert np.isfinite(top[[0, 2], 0]).all() and np.isnan(top[1]).all()
    assert main(["curvature", "--results", str(results), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".pdf") == [
        "curvature-density_hessian.pdf", "curvature-layers_hessian.pdf",
        "curvature-path_path.pdf", "curvature-top-trace_hessian.pdf"]
