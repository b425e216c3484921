"""Figures of connectivity beyond straight lines (issue #21): the border figure's aligned
series beside the plain one, loss and error along a trained curve against the line with
the barriers in the legend, per-layer barrier bars held at A and at B. Numbers drawn are
checked against the stored values and against hand-written references of the fixtures'
synthetic curves; every text is a readable name, never a path or a hash."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _figure_fixtures import LAYERS, STUDENT, SUPERVISED
from _figure_fixtures import border as make_border
from _figure_fixtures import curve as make_curve
from _figure_fixtures import layerwise as make_layerwise
from matplotlib.container import BarContainer, ErrorbarContainer

from figures import border_barriers, curve, honest, layerwise
from figures.__main__ import draw, main
from figures.sources import pick
from runs.errors import UserError
from runs.results import open_result

ROOT = Path(__file__).resolve().parents[1]
HASHES = (STUDENT.split("/")[1].split("_")[1], SUPERVISED.split("/")[1].split("_")[1])


def texts(fig) -> list[str]:
    """Every string a reader sees: titles, axis and tick labels, legends, notes."""
    found = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return [t for t in found if t.strip()]


def assert_readable(fig) -> None:
    for text in texts(fig):
        assert not any(h in text for h in HASHES) and "/" not in text, text
        assert ".h5" not in text and ".pt" not in text, text


def errorbars(ax) -> list:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


# ---------------------------------------------------------------------------- border


def test_border_without_alignment_draws_one_series(tmp_path):
    fig = border_barriers.build(open_result(make_border(tmp_path / "b.h5")))
    (bars,) = errorbars(fig.axes[0])
    assert not any("aligned" in t for t in texts(fig))
    assert np.allclose(bars.lines[0].get_xdata(), np.arange(4))  # on the ticks, as before


def test_border_draws_the_aligned_barriers_beside_the_plain_ones(tmp_path):
    """Aligned means right of the plain ones in the same colour, hollow and dashed; their
    bars are the clipped spread over the aligned pairs; the legend names the method."""
    result = open_result(make_border(tmp_path / "b.h5", align="weights"))
    fig = border_barriers.build(result)
    plain, aligned = errorbars(fig.axes[0])
    x_plain, x_aligned = plain.lines[0].get_xdata(), aligned.lines[0].get_xdata()
    assert np.all(x_plain < np.arange(4)) and np.all(np.arange(4) < x_aligned)
    assert plain.lines[0].get_color() == aligned.lines[0].get_color()
    assert aligned.lines[0].get_markerfacecolor() in ("white", (1, 1, 1, 1))
    assert aligned.lines[2][0].get_linestyle()[0][1] is not None  # dashed
    pairs = pick(result, "error_barrier_aligned", ("start", "pair"), split="test") * 100
    mean, low, high = honest.spread(pairs, 0, 100)
    assert np.allclose(aligned.lines[0].get_ydata(), mean)
    for segment, lo, hi in zip(aligned.lines[2][0].get_segments(), low, high):
        assert np.allclose(sorted(segment[:, 1]), [lo, hi])
    assert np.all(mean < plain.lines[0].get_ydata())  # the fixture: a third of the plain
    assert "aligned (weights)" in texts(fig)
    assert_readable(fig)


def test_border_aligned_loss_barrier_too(tmp_path):
    result = open_result(make_border(tmp_path / "b.h5", align="activations"))
    fig = border_barriers.build(result, barrier="loss_barrier_mean")
    assert len(errorbars(fig.axes[0])) == 2 and "aligned (activations)" in texts(fig)


# ---------------------------------------------------------------------------- curve


def lines(fig, panel: int) -> dict:
    return {line.get_label(): line for line in fig.axes[panel].lines
            if not line.get_label().startswith("_")}


@pytest.mark.parametrize("stored", [True, False])
def test_curve_draws_both_paths_with_their_barriers(tmp_path, stored):
    """Loss (nats) and error (%) against t for the curve and the line, train and test; the
    legend's barriers are the fixture's bump heights (line 0.4 error, curve 0.05; loss twice
    that), stored or recomputed from the curves."""
    result = open_result(make_curve(tmp_path / "c.h5", stored=stored))
    assert curve.barrier(result, "error_barrier", "error", "line", "test") == \
        pytest.approx(0.4, abs=1e-6)
    fig = curve.build(result)
    loss, error = lines(fig, 0), lines(fig, 1)
    assert sorted(error) == sorted([
        "trained Bezier curve, train: barrier 5 %", "trained Bezier curve, test: barrier 5 %",
        "straight line, train: barrier 40 %", "straight line, test: barrier 40 %"])
    assert "straight line, test: barrier 0.8 nats" in loss
    drawn = error["straight line, test: barrier 40 %"]
    assert np.allclose(drawn.get_xdata(), result.coords["t"])
    assert np.allclose(drawn.get_ydata(),
                       pick(result, "error", ("t",), path="line", split="test") * 100)
    assert "A: supervised s0" in texts(fig) and "B: supervised s1" in texts(fig)
    assert_readable(fig)


def test_curve_leaves_out_a_path_not_done_and_says_so(tmp_path, monkeypatch):
    from figures import style
    make_curve(tmp_path / "c.h5", kind="polychain", done=1)
    seen = []
    monkeypatch.setattr(style, "save", lambda fig, out, name: seen.append(texts(fig)) or [])
    draw("curve", tmp_path / "c.h5", tmp_path / "out")
    (shown,) = seen
    assert any(t.startswith("trained polygonal chain, test") for t in shown)
    assert not any(t.startswith("straight line") for t in shown)
    assert any("1 of 2 cells done" in t for t in shown)


def test_endpoint_labels_lose_run_folders_and_paths():
    assert curve.readable("supervised s0 ep1 train_49838c86") == "supervised s0 ep1"
    assert curve.readable("student α=1 s0 init") == "student α=1 s0 init"
    assert curve.readable("store/x/a.pt") == "a.pt"


# ---------------------------------------------------------------------------- layerwise


@pytest.mark.parametrize("stored", [True, False])
def test_layerwise_bars_per_layer_held_at_a_and_b(tmp_path, stored):
    """Layers top to bottom in network order, a bar held at A and one held at B per layer,
    lengths the fixture's barriers (5 % per layer depth, 30 % lower held at B; 0 where A
    and B agree), stored or recomputed from the curves."""
    result = open_result(make_layerwise(tmp_path / "l.h5", stored=stored))
    fig = layerwise.build(result)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(LAYERS)
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the first layer on top
    held_a, held_b = [c for c in ax.containers if isinstance(c, BarContainer)]
    want_a, want_b = np.array([5, 10, 15, 0]), np.array([3.5, 7, 10.5, 0])
    assert np.allclose([bar.get_width() for bar in held_a], want_a, atol=1e-4)
    assert np.allclose([bar.get_width() for bar in held_b], want_b, atol=1e-4)
    rows_a = [bar.get_y() + bar.get_height() / 2 for bar in held_a]
    rows_b = [bar.get_y() + bar.get_height() / 2 for bar in held_b]
    assert np.all(np.array(rows_a) < rows_b)  # side by side within a layer's row
    loss_a = [bar.get_width() for bar in fig.axes[1].containers[0]]
    assert np.allclose(loss_a, 2 * want_a / 100, atol=1e-5)
    legend = texts(fig)
    assert "others held at A (supervised s0)" in legend
    assert "others held at B (supervised s1)" in legend
    assert_readable(fig)


def test_layerwise_marks_layers_not_done(tmp_path):
    """5 of 8 cells done: layer 3 held at B and the last layer are not; each panel says so
    in their rows instead of drawing a bar of 0."""
    result = open_result(make_layerwise(tmp_path / "l.h5", done=5))
    fig = layerwise.build(result)
    assert texts(fig).count(" not done") == 2 * 3


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name, wrong", [("curve", "border"), ("layerwise", "curve"),
                                         ("border", "layerwise")])
def test_a_result_of_another_analysis_is_refused_in_one_line(tmp_path, capsys, name, wrong):
    makers = {"border": make_border, "curve": make_curve, "layerwise": make_layerwise}
    path = makers[wrong](tmp_path / f"{wrong}.h5")
    with pytest.raises(UserError, match=f"analysis '{wrong}'"):
        draw(name, path, tmp_path / "out")
    assert main([name, "--results", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]
    assert not (tmp_path / "out").exists()


def test_command_line_draws_curve_and_layerwise_without_torch(tmp_path):
    make_curve(tmp_path / "res" / "curve.h5")
    make_layerwise(tmp_path / "res" / "layerwise.h5")
    code = ("import sys\nfrom figures.__main__ import main\n"
            "for name in ('curve', 'layerwise'):\n"
            "    assert main([name, '--results', sys.argv[1], '--out', sys.argv[2]]) == 0\n"
            "assert 'torch' not in sys.modules, 'figures imported torch'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "res"),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "curve.pdf", "curve.png", "layerwise.pdf", "layerwise.png"]


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny supervised convnets differing in data order (checkpoints kept at 2 and 4)
    in a store: the endpoints of every command below."""
    import dataclasses

    from runs.engines.train import TrainConfig, train
    store = tmp_path_factory.mktemp("connectivity_store")
    cfg = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=8,
                      lr=0.05, save_at=(2, 4))
    runs = [train(dataclasses.replace(cfg, data_seed=s), store, device="cpu") for s in (0, 1)]
    return {"store": store, "runs": [str(run.path) for run in runs]}


EVAL = ["--device", "cpu", "--bn-samples", "64", "--bn-batch-size", "32"]


def assert_named(fig, store) -> None:
    """No store path, run folder (kind_hash) or file name in what a reader sees."""
    for text in texts(fig):
        assert str(store) not in text and "train_" not in text and "/" not in text, text


@pytest.mark.slow
def test_curve_figure_from_the_real_command(trained, tmp_path):
    from landscape.curve import main as curve_main
    a, b = (f"{run}@last" for run in trained["runs"])
    out = tmp_path / "curve.h5"
    assert curve_main([a, b, "--steps", "4", "--store", str(trained["store"]), "--out",
                       str(out), "--grid", "0:1:5", *EVAL]) == 0
    result = open_result(out)
    fig = curve.build(result)
    stored = pick(result, "error_barrier", ("path",), split="test") * 100
    paths = [str(p) for p in result.coords["path"]]
    for label, value in zip(paths, stored):
        name = curve.path_name(result, label)
        assert any(t == f"{name}, test: barrier {value:.3g} %" for t in lines(fig, 1)), name
    assert_named(fig, trained["store"])


@pytest.mark.slow
def test_layerwise_figure_from_the_real_command(trained, tmp_path):
    from landscape.layerwise import main as layerwise_main
    a, b = (f"{run}@last" for run in trained["runs"])
    out = tmp_path / "layerwise.h5"
    assert layerwise_main([a, b, "--out", str(out), "--grid", "0:1:3", *EVAL]) == 0
    result = open_result(out)
    fig = layerwise.build(result)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == \
        [str(n) for n in result.coords["layer"]]
    widths = [bar.get_width() for bar in ax.containers[0]]  # held at A
    want = pick(result, "error_barrier", ("layer", "held"), split="test")[:, 0] * 100
    assert np.allclose(widths, want, equal_nan=True)
    assert_named(fig, trained["store"])


@pytest.mark.slow
def test_border_figure_draws_the_real_aligned_series(trained, tmp_path):
    from landscape.border import main as border_main
    out = tmp_path / "border.h5"
    assert border_main(["--rewind-steps", trained["runs"][0], "2,4", "--children", "2",
                        "--grid", "0:1:3", "--align", "weights", "--store",
                        str(trained["store"]), "--out", str(out), *EVAL]) == 0
    (png,) = [p for p in draw("border", out, tmp_path / "fig") if p.suffix == ".png"]
    fig = border_barriers.build(open_result(out))
    plain, aligned = errorbars(fig.axes[0])
    want = pick(open_result(out), "error_barrier_aligned", ("start", "pair"), split="test")
    assert np.allclose(aligned.lines[0].get_ydata(), want.mean(1) * 100)
    assert "aligned (weights)" in texts(fig) and png.stat().st_size > 0
    assert_named(fig, trained["store"])
