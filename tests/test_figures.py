"""Every registered figure renders from small result files in the writers' own layouts:
PDF and PNG written, the PNG not blank, every axis labelled; `python -m figures all` draws
them all without importing torch; wrong or missing results fail with a message that names
the file and what the figure needs, or the stage that makes them."""

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from _figure_fixtures import all_results

from figures import style
from figures.__main__ import FIGURES, draw, main
from figures.sources import PRODUCERS
from runs.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# A result of another analysis for each figure's wrong-input check.
WRONG = {"probe": "border", "distill": "probe", "interpolate": "imp_init", "border": "plane",
         "imp": "path", "hessian": "path", "curve": "border", "layerwise": "curve"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """{"dir": folder holding every fixture, name: path}."""
    folder = tmp_path_factory.mktemp("results")
    return {"dir": folder, **all_results(folder)}


@pytest.fixture
def built(monkeypatch) -> list:
    """The figures draw() saves, captured before saving (their axes inspected)."""
    figures, save = [], style.save

    def capture(fig, out_dir, name):
        figures.append(([(ax.get_xlabel(), ax.get_ylabel(), ax.get_label(), ax.has_data())
                         for ax in fig.axes if ax.get_visible()], name))
        return save(fig, out_dir, name)

    monkeypatch.setattr(style, "save", capture)
    return figures


def assert_labelled(labels, name) -> None:
    assert any(data for *_, kind, data in labels if kind != "<colorbar>"), f"{name}: empty"
    for xlabel, ylabel, kind, _ in labels:
        if kind == "<colorbar>":  # a colour bar names its quantity along its long side
            assert xlabel or ylabel, f"{name}: unlabelled colour bar"
        else:
            assert xlabel.strip() and ylabel.strip(), f"{name}: axes {kind!r} unlabelled"


def assert_image(png: Path) -> None:
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200, png
    assert pixels[..., :3].std() > 0.05, f"{png} looks blank"


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_renders_labelled(name, results, built, tmp_path):
    paths = draw(name, results["dir"], tmp_path)
    pdfs = [p for p in paths if p.suffix == ".pdf"]
    assert pdfs and all(p.read_bytes().startswith(b"%PDF") for p in pdfs)
    for pdf in pdfs:
        assert_image(pdf.with_suffix(".png"))
    assert len(built) == len(pdfs)
    for labels, fig_name in built:
        assert_labelled(labels, fig_name)
    assert callable(FIGURES[name].build) and FIGURES[name].ANALYSIS in PRODUCERS


def test_figures_read_units_from_the_layouts(results):
    """A few numbers that must land where the writers put them."""
    from figures import border_barriers, imp_curves, plane
    from figures.sources import pick
    from runs.results import open_result
    data = open_result(results["plane"])
    labels = [a[0] for a in plane.anchors(data)]
    assert labels == ["A: teacher", "B: student init", "C: student"]
    border = open_result(results["border"])
    pairs = pick(border, "error_barrier", ("start", "pair"), split="test")
    mean, low, high = border_barriers.summary(pairs, 1)
    stored = pick(border, "barrier_summary", ("start", "stat"), barrier="error_barrier",
                  split="test")[:, [str(s) for s in border.coords["stat"]].index("mean")]
    np.testing.assert_allclose(mean, stored)  # the scan's mean over pairs, recomputed
    assert np.all(low <= mean) and np.all(mean <= high) and mean[0] > mean[-1]
    imp = [open_result(results["imp_init"]), open_result(results["imp_student"])]
    assert [imp_curves.rewind_label(r) for r in imp] == ["init@1ep", "student"]
    density, values = imp_curves.pooled(imp[:1], "test_accuracy")["ticket"]
    np.testing.assert_allclose(density, 100 * 0.8 ** np.arange(5))
    assert values.shape == (5, 3)  # (level, seed)


def test_all_from_the_command_line_without_torch(results, tmp_path):
    """`python -m figures all` writes every figure; neither it nor drawing imports torch."""
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.argv = ['figures', 'all', '--results', sys.argv[1], "
            "'--out', sys.argv[2]]\n"
            "try:\n    runpy.run_module('figures', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'figures imported torch'")
    done = subprocess.run([sys.executable, "-c", code, str(results["dir"]), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped" not in done.stderr
    written = {p.name for p in out.iterdir()}
    for name in FIGURES:
        assert any(n.startswith(name) and n.endswith(".pdf") for n in written), name
        assert any(n.startswith(name) and n.endswith(".png") for n in written), name


@pytest.mark.parametrize("name", FIGURES)
def test_wrong_analysis_names_the_file_and_the_need(name, results, tmp_path):
    analysis = FIGURES[name].ANALYSIS
    wrong = results[WRONG[analysis]]
    with pytest.raises(UserError) as err:
        draw(name, wrong, tmp_path)
    assert str(wrong) in str(err.value) and repr(analysis) in str(err.value)
    assert not list(tmp_path.iterdir())


def test_a_line_is_not_a_plane(results, tmp_path):
    with pytest.raises(UserError, match="not 2-D plane"):
        draw("plane", results["path"], tmp_path)
    with pytest.raises(UserError, match="not 1-D path"):
        draw("interpolate-1d", results["plane"], tmp_path)


@pytest.mark.parametrize("name", FIGURES)
def test_missing_results_name_the_stage(name, tmp_path):
    with pytest.raises(UserError) as err:
        draw(name, tmp_path, tmp_path / "out")
    assert PRODUCERS[FIGURES[name].ANALYSIS] in str(err.value)


def test_unknown_figure_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="unknown figure 'bars'.*plane"):
        draw("bars", tmp_path, tmp_path / "out")


def test_all_on_an_empty_folder_fails_with_one_line(tmp_path, capsys):
    assert main(["all", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "run the imp (python -m tickets.imp) stage first" in err
    assert err.strip().splitlines()[-1].startswith("error: no figure could be drawn")


def test_data_size_plots_the_last_epoch_per_size_and_the_noise_control(results):
    """Each size's point is the mean over seeds of the student's last probed epoch (never an
    epoch picked by its test accuracy);
    noise-input students are a separate series; the teacher is a level line."""
    from figures import data_size
    from figures.sources import load
    fig = data_size.build(load(results["dir"], "distill", "data-size"))
    (ax,) = fig.axes
    from runs.results import open_result
    handles, labels = ax.get_legend_handles_labels()
    lines = {label: getattr(h, "lines", [h])[0] for h, label in zip(handles, labels)}
    images = lines["student (convnet, images)"]
    runs = {}
    for path in sorted(Path(results["dir"]).rglob("distill.h5")):
        res = open_result(path)
        if res.config["dataset"] != "noise" and res.config["alpha"] == 1e-10:
            acc = 100 * res.metrics["knn_accuracy"][1:, 1]
            runs.setdefault(int(res.attrs["train_images"]), []).append(acc[-1])
    sizes = sorted(runs)
    np.testing.assert_allclose(images.get_xdata(), sizes)
    np.testing.assert_allclose(images.get_ydata(), [np.mean(runs[n]) for n in sizes])
    assert ax.get_xscale() == "log"
    noise = lines["student (convnet, noise inputs)"]
    assert list(noise.get_xdata()) == [400] and noise.get_ydata()[0] < images.get_ydata()[-1]
    assert lines["teacher (convnet, images)"].get_ydata()[0] == pytest.approx(30)


def test_npz_datasets_are_named_by_their_file(results):
    """Panels, table rows and titles call an `npz` dataset by its file, not "npz"."""
    from figures import distill_curves, imp_curves
    from figures.labels import dataset_name
    root = "../shared/data/cifar10_subset.npz"
    assert dataset_name("npz", root) == "cifar10-subset"
    assert dataset_name("cifar10", "/data") == "cifar10" and dataset_name("npz") == "npz"
    assert distill_curves.probed_on({"dataset": "npz", "data_root": root}) == "cifar10-subset"
    result = type("R", (), {"config": {"train": {"model": "vgg11", "dataset": "npz",
                                                 "data_root": root}}})
    assert imp_curves.panel_of(result) == "vgg11 on cifar10-subset"


def test_data_size_ticks_are_the_sizes_themselves(results):
    from figures import data_size
    from figures.sources import load
    (ax,) = data_size.build(load(results["dir"], "distill", "data-size")).axes
    sizes = {n for r in load(results["dir"], "distill", "data-size")
             for n in [data_size.train_images(r)]}
    assert list(ax.get_xticks()) == sorted(sizes)
    ax.figure.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{n:,}" for n in sorted(sizes)]


def test_probe_table_draws_each_probe_and_marks_the_paper_on_request(results, tmp_path):
    """Default: one table per probe in the results; --probe picks; --paper adds the paper's
    numbers (CIFAR10 / ResNet18 k-NN: teacher 37.65, student 44.67) to the table."""
    assert main(["probe-table", "--results", str(results["probe"]), "--out",
                 str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").glob("*.md")) == \
        ["probe-table_knn20.md", "probe-table_linear.md"]
    assert "paper" not in (tmp_path / "all" / "probe-table_knn20.md").read_text()
    assert main(["probe-table", "--results", str(results["probe"]), "--out",
                 str(tmp_path / "one"), "--probe", "knn@20", "--paper"]) == 0
    assert [p.name for p in (tmp_path / "one").glob("*.md")] == ["probe-table_knn20.md"]
    table = (tmp_path / "one" / "probe-table_knn20.md").read_text()
    assert "(paper 37.65)" in table and "(paper 44.67)" in table


def test_unknown_probe_lists_the_probes_there(results, tmp_path, capsys):
    code = main(["probe-table", "--results", str(results["probe"]), "--out", str(tmp_path),
                 "--probe", "knn@7"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--probe" in err and "knn@20, linear" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_distill_curves_leave_subsets_to_data_size_and_draw_a_shared_teacher_once(results):
    """Fixtures: full-data students on images and noise plus subset students, one random
    teacher. The curves show the two full-data students and that teacher once."""
    from figures import distill_curves
    from figures.sources import load
    (ax,) = distill_curves.build(load(results["dir"], "distill", "distill-curves")).axes
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["student (convnet, images)", "random teacher (convnet)",
                      "student (convnet, noise inputs)"]


def test_imp_band_is_the_t_interval_of_scipy():
    """The IMP band: mean +- the 95 % t-interval over finished seeds, as scipy computes it;
    a level with one finished seed has no band."""
    from scipy import stats

    from figures.imp_curves import mean_ci
    values = np.array([[50.0, 52.0, 54.0], [40.0, np.nan, 44.0], [30.0, np.nan, np.nan]])
    mean, half = mean_ci(values)
    np.testing.assert_allclose(mean, [52.0, 42.0, 30.0])
    for row, h in zip(values[:2], half[:2]):
        row = row[np.isfinite(row)]
        low, high = stats.t.interval(0.95, len(row) - 1, loc=row.mean(), scale=stats.sem(row))
        np.testing.assert_allclose([row.mean() - h, row.mean() + h], [low, high])
    assert np.isnan(half[2])


def test_alpha_locality_draws_one_line_per_alpha_and_their_last_epochs(results):
    """Fixtures: full-data image students at alpha 1e-10, 0.5 and 1 (two seeds each): one
    curve per alpha plus the teacher; the right panel is each alpha's mean over seeds of the
    last probed epoch, read back from the files."""
    from figures import alpha_locality
    from figures.sources import load
    from runs.results import open_result
    left, right = alpha_locality.build(load(results["dir"], "distill", "alpha-locality")).axes
    assert left.get_legend_handles_labels()[1] == ["α = 1e-10", "α = 0.5", "α = 1",
                                                   "random teacher"]
    best = {}
    for path in sorted(Path(results["dir"]).rglob("distill.h5")):
        res = open_result(path)
        if res.config["dataset"] == "toy" and not res.config["subset"]:
            acc = 100 * res.metrics["knn_accuracy"][1:, 1]
            best.setdefault(res.config["alpha"], []).append(acc[-1])
    points = [bar.lines[0].get_ydata()[0] for bar in right.containers]  # errorbar markers
    np.testing.assert_allclose(points, [np.mean(best[a]) for a in sorted(best)])
    assert points[0] > points[-1]  # closer to the teacher learns more (the fixture's law)
    assert [t.get_text() for t in right.get_xticklabels()] == ["1e-10", "0.5", "1"]


def test_alpha_locality_needs_two_alphas_and_says_which_stage(results, tmp_path):
    """Runs at one alpha only: the error names the alpha found and the `alphas` key."""
    one = tmp_path / "one"
    one.mkdir()
    (one / "distill.h5").write_bytes(Path(results["distill"]).read_bytes())
    with pytest.raises(UserError, match=r"hold alpha 1e-10; it needs students at two or more"
                                        r" alphas \(the pipeline's `alphas` key"):
        draw("alpha-locality", one, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_alphas_stay_out_of_curves_and_data_size(results):
    """distill-curves and data-size draw the lowest alpha only; alpha-locality the rest."""
    from figures import data_size, distill_curves
    from figures.sources import load
    runs = load(results["dir"], "distill", "distill-curves")
    assert {r.config["alpha"] for r in runs} == {1e-10, 0.5, 1.0}
    assert {r.config["alpha"] for r in distill_curves.lowest_alpha(runs)} == {1e-10}
    (ax,) = data_size.build(runs).axes
    assert not any("alpha" in label for label in ax.get_legend_handles_labels()[1])


def test_anchors_name_noise_and_alpha_students_from_the_inputs(tmp_path):
    """The plane through teacher, student and noise student (the demo's): the `run` summary
    in each input record tells the two distillation runs apart."""
    from _figure_fixtures import plane as make_plane

    from figures import plane
    from figures.labels import ref_label
    from runs.results import open_result
    images, noise = "store/distill_0123abcd/seed_0", "store/distill_4567cdef/seed_0"
    refs = [f"{images}@last:teacher", f"{images}@last", f"{noise}@last"]
    runs = [{"kind": "distill", "dataset": "toy"}] * 2 + [{"kind": "distill",
                                                          "dataset": "noise"}]
    inputs = [{"ref": r, "path": f"{r}.pt", "sha256": "0" * 64, "run": run}
              for r, run in zip(refs, runs)]
    data = open_result(make_plane(tmp_path / "plane.h5", refs, inputs))
    assert [a[0] for a in plane.anchors(data)] == ["A: teacher", "B: student",
                                                  "C: noise student"]
    off_recipe = {"run": {"kind": "distill", "dataset": "toy", "alpha": 1.0}}
    assert ref_label(f"{images}@init", off_recipe) == "student α=1 init"
    assert ref_label(f"{images}@8", off_recipe) == "student α=1 @8"
    assert ref_label(f"{images}@last") == "student"  # no record: the recipe's student


def test_every_role_of_a_probe_table_has_its_own_colour():
    """The fixed roles keep their colours across figures; students at other alphas (or any
    other role) take spare palette colours, never one already in use."""
    from figures.probe_table import ROLES
    roles = [*ROLES, "student (alpha=0.5)", "student (alpha=1.0)"]
    colors = style.role_colors(roles)
    assert len({tuple(c) for c in colors.values()}) == len(roles)
    assert all(colors[r] == style.ROLE_COLORS[r] for r in ROLES)


def test_start_points_beside_the_random_init_say_they_are_students(results):
    """A border scan over the random init and students (the LMC figure's) names each
    student start 'student step N'; with no random init, 'step N' is enough."""
    from figures import labels
    from runs.results import open_result
    result = open_result(results["border"])
    assert labels.start_names(result)[0] == ["random init", "student step 0",
                                             "student step 196", "student step 392"]
    result.coords["start"] = result.coords["start"][1:]  # the distillation run alone
    result.metrics.update({k: result.metrics[k][1:] for k in ("start_step", "start_alpha",
                                                               "start_epoch")
                           if k in result.metrics})
    assert labels.start_names(result)[0] == ["step 0", "step 196", "step 392"]


def test_probe_tables_never_pool_two_probe_settings(tmp_path, capsys):
    """Two probe results of one dataset that differ in a setting (the train subset) are
    refused, naming the setting and both values; other seeds and checkpoints pool."""
    from _figure_fixtures import probe as make_probe
    make_probe(tmp_path / "mixed" / "probe_a.h5", subset=0)
    make_probe(tmp_path / "mixed" / "probe_b.h5", subset=100)
    code = main(["probe-table", "--results", str(tmp_path / "mixed"), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "subset: 0, 100" in err and "\n" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    make_probe(tmp_path / "pooled" / "probe_a.h5", seeds=[0, 1, 2])
    make_probe(tmp_path / "pooled" / "probe_b.h5", seeds=[3, 4, 5])
    assert main(["probe-table", "--results", str(tmp_path / "pooled"), "--out",
                 str(tmp_path / "out")]) == 0


def test_border_bars_are_the_clipped_spread_over_pairs(tmp_path):
    """The border figure's error bars: min-max over 2 pairs, the t-interval from 3 on, never
    below 0 (a barrier is a maximum over a path holding its endpoints) nor above 100 %."""
    from _figure_fixtures import border as make_border
    from matplotlib.container import ErrorbarContainer

    from figures import border_barriers, honest
    from figures.sources import pick
    from runs.results import open_result
    pairs = np.array([[0.0, 0.002, 0.4], [0.1, 0.2, 0.3], [0.99, 1.0, 1.0]]) * 100
    mean, low, high = border_barriers.summary(pairs, 100)
    assert low[0] == 0 and high[2] == 100 and low[1] < 10 < 30 < high[1]
    _, low2, high2 = border_barriers.summary(pairs[:, :2], 100)
    assert np.allclose(low2, pairs[:, 0]) and np.allclose(high2, pairs[:, 1])
    result = open_result(make_border(tmp_path / "border.h5", children=3))
    fig = border_barriers.build(result)
    (bars,) = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()
    drawn = pick(result, "error_barrier", ("start", "pair"), split="test") * 100
    _, want_low, want_high = honest.spread(drawn, 0, 100)
    for segment, lo, hi in zip(segments, want_low, want_high):
        assert np.allclose(sorted(segment[:, 1]), [lo, hi])
