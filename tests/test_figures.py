"""Every figure renders from small fixture results: files exist, are not blank, axes labelled;
bad inputs name the file or the stage; figures never import torch."""

import subprocess
import sys

import matplotlib.image as mpimg
import pytest
from _figure_fixtures import all_results

from figures import style
from figures.__main__ import FIGURES, draw, main
from runs.errors import UserError


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("figure_results")
    all_results(folder)
    return folder


@pytest.fixture
def saved(monkeypatch):
    """The matplotlib figures handed to style.save, captured before they are closed."""
    figures, real = [], style.save

    def capture(fig, out_dir, name):
        figures.append((name, fig, [(ax.get_label(), ax.get_xlabel(), ax.get_ylabel(),
                                     ax.has_data()) for ax in fig.axes]))
        return real(fig, out_dir, name)

    monkeypatch.setattr(style, "save", capture)
    return figures


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_renders_labelled_and_not_blank(name, results, tmp_path, saved):
    paths = draw(name, results, tmp_path)
    pngs = [p for p in paths if p.suffix == ".png"]
    assert pngs and all(p.with_suffix(".pdf").stat().st_size > 1000 for p in pngs)
    for png in pngs:
        assert mpimg.imread(png).std() > 0.02, f"{png} looks blank"
    assert len(saved) == len(pngs)  # every figure went through style.save
    for figure, _, axes in saved:
        plotted = [a for a in axes if a[3] and a[0] != "<colorbar>"]
        assert plotted, f"{figure}: nothing drawn"
        assert all(xlabel for _, xlabel, _, _ in plotted), f"{figure}: an x axis is unlabelled"
        assert any(ylabel for _, _, ylabel, _ in plotted), f"{figure}: no y axis label"


def test_all_writes_every_figure(results, tmp_path, capsys):
    assert main(["all", "--results", str(results), "--out", str(tmp_path)]) == 0
    written = {p.stem for p in tmp_path.glob("*.png")}
    for name in FIGURES:
        if name == "probe-table":
            name = "probe-table_knn20"
        assert any(stem.startswith(name.split("-")[0]) for stem in written), name
    assert "skipped" not in capsys.readouterr().err


def test_wrong_analysis_names_the_file_and_what_is_needed(results, tmp_path):
    with pytest.raises(UserError, match=r"probe\.h5 holds analysis 'probe'; figure imp needs "
                                         r"'imp'"):
        draw("imp", results / "probe.h5", tmp_path)


def test_missing_results_name_the_stage(tmp_path):
    with pytest.raises(UserError, match=r"run the imp \(python -m tickets.imp\) stage"):
        draw("imp", tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="unknown figure 'bars'"):
        draw("bars", tmp_path, tmp_path / "out")


def test_figures_never_import_torch(results, tmp_path):
    code = ("import sys; from figures.__main__ import main; "
            f"main(['all', '--results', {str(results)!r}, '--out', {str(tmp_path)!r}]); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.strip().splitlines()[-1] == "False"
