"""Guard rails (issue #17): degenerate scans are refused before any point is computed, and
figures stay honest: no interval past the metric's range, no mixing of recipes on one
axis, no silent drawing of unfinished results, each border result drawn once, distillation
results found in the store."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from _figure_fixtures import border, distill_run, imp, plane

import landscape
from figures import style
from figures.__main__ import draw, main
from landscape import geometry as G
from landscape.interpolate import main as interpolate_main
from runs.checkpoint import save_checkpoint
from runs.errors import UserError
from runs.models import create_model

EVAL = ["--bn-samples", "16", "--bn-batch-size", "16", "--device", "cpu", "--dataset", "toy",
        "--metrics", "norm"]


def model(seed: int, nudge: float = 0.0):
    net = create_model("convnet", num_classes=4, width=0.125, seed=seed)
    if nudge:
        with torch.no_grad():
            next(net.parameters()).view(-1)[0] += nudge
    return net


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """A, a copy of A nudged by 1e-8 (what a student at alpha 1e-10 is to its teacher), B, and
    the midpoint of A and B (collinear)."""
    root = tmp_path_factory.mktemp("ckpt")
    a, b = model(0), model(1)
    mid = model(0)
    with torch.no_grad():
        for pm, pa, pb in zip(mid.parameters(), a.parameters(), b.parameters()):
            pm.copy_((pa + pb) / 2)
    nets = {"A": a, "near": model(0, 1e-8), "B": b, "mid": mid}
    return {name: str(save_checkpoint(root / f"{name}.pt", net, 0))
            for name, net in nets.items()}


@pytest.mark.parametrize("refs, match", [
    (("A", "near", "B"), r"B and A are nearly identical, 1e-08 apart \(\|A\| = .*--alpha 1"),
    (("A", "B", "A"), "C and A are identical"),
    (("A", "B", "mid"), "collinear"),
])
def test_degenerate_plane_is_refused_before_any_cell(checkpoints, tmp_path, capsys, refs, match):
    out = tmp_path / "plane.h5"
    code = interpolate_main([checkpoints[r] for r in refs] + ["--grid", "0:1:3", *EVAL,
                                                              "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err), err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_path_with_a_tiny_unit_is_refused(checkpoints, tmp_path, capsys):
    out = tmp_path / "path.h5"
    code = interpolate_main([checkpoints["A"], checkpoints["near"], "--grid", "0:1:3", *EVAL,
                             "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "B and A are nearly identical, 1e-08 apart" in err, err
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="nearly identical"):
        G.line(model(0), model(0, 1e-8))
    G.line(model(0), model(0), guard=False)  # border's children may coincide: barrier 0


def test_the_python_api_refuses_the_same_planes():
    a, b = model(0), model(1)
    with pytest.raises(UserError, match="nearly identical"):
        landscape.plane(a, model(0, 1e-8), b, "toy", [0.0, 1.0], bn_mode="keep",
                        metrics=("norm",))
    with pytest.raises(UserError, match="identical"):
        landscape.plane(a, b, b, "toy", [0.0, 1.0], bn_mode="keep", metrics=("norm",))
    with pytest.raises(UserError, match="nearly identical"):
        landscape.path(a, model(0, 1e-8), "toy", [0.0, 1.0], bn_mode="keep",
                       metrics=("norm",))


# --- figures ---------------------------------------------------------------------------------

@pytest.fixture
def saved(monkeypatch) -> list:
    """(name, fig) of every figure saved."""
    figures, save = [], style.save

    def capture(fig, out_dir, name):
        figures.append((name, fig))
        return save(fig, out_dir, name)

    monkeypatch.setattr(style, "save", capture)
    return figures


def test_imp_over_two_seeds_stays_within_0_and_100(tmp_path, saved):
    """Two seeds near 90 %: a t-interval (12.7 sd) would pass 100 %; min-max does not."""
    imp(tmp_path / "imp.h5", seeds=(0, 1))
    draw("imp", tmp_path, tmp_path / "out")
    ((_, fig),) = saved
    accuracy = fig.axes[0]
    tops = [poly.get_paths()[0].vertices[:, 1].max() for poly in accuracy.collections]
    assert tops and max(tops) <= 100
    assert "min-max" in fig.legends[0].get_title().get_text()


def test_imp_sweeps_with_different_recipes_get_separate_figures(tmp_path, saved):
    imp(tmp_path / "a.h5")
    imp(tmp_path / "b.h5", rewind="store/distill_0123abcd/seed_0@last:encoder",
        reference="store/distill_0123abcd/seed_0@last:encoder", train={"batch_size": 64})
    paths = draw("imp", tmp_path, tmp_path / "out")
    names = sorted({p.stem for p in paths})
    assert names == ["imp", "imp_batch_size64"], names
    assert all("batch_size" in fig._suptitle.get_text() for _, fig in saved)


def test_data_size_refuses_runs_of_different_recipes(tmp_path):
    distill_run(tmp_path, 0, "toy", 400, 0)
    path = distill_run(tmp_path / "other", 5, "toy", 10, 0)
    import h5py
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["config"])
        config["lr"] = 0.5
        f.attrs["config"] = json.dumps(config)
    with pytest.raises(UserError, match=r"differ in lr: 0\.001, 0\.5"):
        draw("data-size", tmp_path, tmp_path / "out")


def test_an_incomplete_result_is_annotated_and_an_empty_one_skipped(tmp_path, saved, capsys):
    border(tmp_path / "scan.h5", done=2)  # 2 of 4 start points
    border(tmp_path / "fresh" / "scan.h5", done=0)  # nothing done yet
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 'Mean of empty slice'
        paths = draw("border", tmp_path, tmp_path / "out")
    assert len({p.stem for p in paths}) == 1
    ((_, fig),) = saved
    assert any("2 of 4 cells done" in t.get_text() for t in fig.texts)
    assert "skipped" in capsys.readouterr().err


def test_each_border_result_is_drawn_by_one_figure(tmp_path):
    border(tmp_path / "border_along_distillation.h5")
    border(tmp_path / "lmc_random_vs_student.h5", steps=(392,))
    border(tmp_path / "lmc_random_vs_students.h5", steps=(392,),
           runs=[f"store/distill_{h}/seed_{s}" for h, s in (("aa", 0), ("bb", 1))])
    lmc = {p.stem for p in draw("lmc", tmp_path, tmp_path / "out")}
    scans = {p.stem for p in draw("border", tmp_path, tmp_path / "out")}
    assert lmc == {"lmc_random_vs_student", "lmc_random_vs_students"}
    assert scans == {"border_along_distillation"}


def test_figures_find_distill_results_in_the_store(tmp_path, capsys):
    """The pipeline's layout: OUT/results beside OUT/store, distill.h5 in the store."""
    results = tmp_path / "out" / "results"
    plane(results / "plane.h5")
    for seed in (0, 1):
        distill_run(tmp_path / "out" / "store", 0, "toy", 400, seed)
    assert main(["distill-curves", "--results", str(results), "--out",
                 str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "distill-curves.png").is_file()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "results").mkdir(parents=True)
    plane(elsewhere / "results" / "plane.h5")
    assert main(["distill-curves", "--results", str(elsewhere / "results"), "--out",
                 str(tmp_path / "figs2"), "--store", str(tmp_path / "out" / "store")]) == 0
    assert main(["distill-curves", "--results", str(elsewhere / "results"), "--out",
                 str(tmp_path / "figs3")]) == 2
    assert "--store" in capsys.readouterr().err
    assert Path(tmp_path / "figs2" / "distill-curves.pdf").is_file()
