"""Readable labels (LABEL:=REF, or derived from a run's config and step) in results, tables
and figures; `python -m runs.results ls` and `show --values` (issue #17, item 2)."""

import dataclasses
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from runs.engines.distill import DistillConfig, distill
from runs.engines.train import TrainConfig, train
from runs.errors import UserError
from runs.refs import load_model, parse_ref, ref_labels
from runs.results import MetricSpec, create_result, open_result
from runs.results import main as results_main

# digits 8x8: 1437 train images, 22 steps of 64 per epoch; a few steps each.
TRAIN = TrainConfig(model="convnet", width=0.125, dataset="digits", batch_size=64, num_steps=4,
                    lr=0.05)
DISTILL = DistillConfig(model="convnet", width=0.125, dataset="digits", out_dim=64,
                        hidden_dim=32, bottleneck_dim=8, batch_size=64, num_steps=4, seed=2)
PROBE = ["--dataset", "digits", "--probes", "knn", "--seeds", "0", "--subset", "20"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two supervised runs (seeds 0, 1) and one distillation run (seed 2)."""
    root = tmp_path_factory.mktemp("label_store")
    trained = [train(dataclasses.replace(TRAIN, seed=s), root, device="cpu").path
               for s in (0, 1)]
    student = distill(DISTILL, root, device="cpu").path
    return {"root": root, "A": str(trained[0]), "B": str(trained[1]), "student": str(student)}


def test_label_syntax_parses_and_loads(store):
    ref = parse_ref(f"my teacher:={store['student']}@last:teacher")
    assert (ref.label, ref.source, ref.step, ref.parts) == \
        ("my teacher", store["student"], "last", ("teacher",))
    assert parse_ref(f"{store['A']}@last").label is None
    loaded = load_model(f"T:={store['student']}@last:teacher")  # anywhere a REF goes
    assert loaded.model.spec["name"] == "convnet"
    with pytest.raises(UserError, match="empty LABEL"):
        parse_ref(f":={store['A']}")


def test_derived_labels_are_short_unique_and_pathless(store, tmp_path):
    loose = tmp_path / "weights.pt"
    shutil.copy(load_model(f"{store['A']}@last").path, loose)
    refs = [f"{store['A']}@last", f"{store['A']}@last:encoder", f"{store['B']}@last",
            f"{store['student']}@last", f"{store['student']}@last:teacher",
            f"{store['student']}@init", str(loose), "pixels", f"mine:={store['B']}@last"]
    labels = ref_labels(refs, keep=("pixels",))
    assert labels == ["supervised s0 @4", "supervised s0 @4 encoder", "supervised s1 @4",
                      "student s2 @4", "teacher s2", "student s2 init", "weights", "pixels",
                      "mine"]
    assert not any("/" in label for label in labels)
    assert ref_labels([refs[0], refs[0]]) == [labels[0]] * 2  # one reference, one label
    with pytest.raises(UserError, match="names two different checkpoints"):
        ref_labels([f"x:={store['A']}@last", f"x:={store['B']}@last"])


def test_probe_rows_carry_labels_and_resume(store, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "probe.h5")
    argv = [f"teacher:={store['student']}@last:teacher", f"{store['student']}@last", "pixels",
            *PROBE, "--out", out]
    from probes.evaluate import main as probe_main
    assert probe_main(argv) == 0
    result = open_result(out, "probe")
    assert list(result.coords["checkpoint"]) == ["teacher", "student s2 @4", "pixels"]
    table = capsys.readouterr().out
    assert "| teacher |" in table and "| student s2 @4 |" in table
    assert store["student"] not in table  # no path in the printed table
    records = result.attrs["inputs"]
    assert [r["label"] for r in records] == ["teacher", "student s2 @4"]
    assert records[1]["path"].startswith(store["student"]) and records[1]["sha256"]
    # The same references again: everything is done, nothing is recomputed.
    import probes.api

    def never(*args, **kwargs):
        raise AssertionError("a resumed probe recomputed a row")
    monkeypatch.setattr(probes.api, "split_features", never)
    assert probe_main(argv) == 0
    again = open_result(out, "probe")
    assert np.array_equal(again.metrics["accuracy"], result.metrics["accuracy"])


def test_interpolate_inputs_and_figure_names_use_labels(store, tmp_path, capsys):
    from figures.labels import anchor_labels
    from landscape.interpolate import main as interpolate_main
    out = str(tmp_path / "path.h5")
    argv = [f"A:={store['A']}@last", f"{store['B']}@last", "--grid", "0:1:3", "--device",
            "cpu", "--bn-samples", "64", "--bn-batch-size", "32", "--out", out]
    assert interpolate_main(argv) == 0
    result = open_result(out, "interpolate")
    assert [r["label"] for r in result.attrs["inputs"]] == ["A", "supervised s1 @4"]
    assert anchor_labels(result, 2) == ["A", "supervised s1 @4"]  # the figure legend
    assert interpolate_main(argv) == 0  # resumes: the same references, the same file
    capsys.readouterr()
    assert results_main(["show", out, "--values"]) == 0
    text = capsys.readouterr().out.split("values:\n", 1)[1]
    assert text.splitlines()[0].split()[:3] == ["alpha", "loss[train]", "loss[test]"]
    assert [line.split()[0] for line in text.splitlines()[1:4]] == ["0", "0.5", "1"]


def test_figures_name_old_and_new_border_starts():
    from figures.labels import ref_label, start_names
    store = "/s"

    def border(coords, inputs):
        n = len(coords)
        return SimpleNamespace(coords={"start": np.array(coords)}, attrs={"inputs": inputs},
                               metrics={"start_step": np.arange(n, dtype=float),
                                        "start_alpha": np.full(n, np.nan),
                                        "start_epoch": np.arange(n, dtype=float)})
    old = [f"{store}/distill_ab12/seed_0@{s}:encoder" for s in (0, 1)]
    assert start_names(border(old, []))[0] == ["ep 0", "ep 1"]  # files written before labels
    records = [{"ref": old[0], "label": "student s0 init"},
               {"ref": f"mine:={old[1]}", "label": "mine"}]
    assert start_names(border(["student s0 init", "mine"], records))[0] == ["ep 0", "mine"]
    from figures.border_barriers import is_scan
    assert is_scan(border(old, [])) and is_scan(border(["student s0 init", "mine"], records))
    mixed = [{"ref": old[0], "label": "student s0 init"},
             {"ref": f"{store}/train_cd34/seed_1@3", "label": "supervised s1 @3"}]
    assert start_names(border(["student s0 init", "supervised s1 @3"], mixed))[0] == \
        ["student s0 init", "supervised s1 @3"]
    assert ref_label(f"T:={old[0]}") == "T"
    assert ref_label(old[0], {"label": "student s0 init"}) == "student s0 init"


def test_border_starts_are_named_and_children_ignore_the_label(store):
    from landscape.border import given_starts, named_starts
    starts = given_starts(["random", f"S:={store['student']}@last:encoder",
                           f"{store['A']}@0"])
    assert starts[1].init == f"{store['student']}@last:encoder"  # the label trains nothing
    assert [s.label for s in named_starts(starts)] == ["random", "S", "supervised s0 init"]


def test_ls_lists_and_filters_a_store(store, capsys):
    assert results_main(["ls", str(store["root"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kind", "model", "dataset", "seed", "alpha", "steps",
                                "status", "path"]
    rows = [line.split() for line in lines[1:]]
    assert sorted((r[0], r[3]) for r in rows) == [("distill", "2"), ("train", "0"),
                                                   ("train", "1")]
    assert all(r[-2] == "done" and r[-3] == "4/4" and not r[-1].startswith("/") for r in rows)
    assert results_main(["ls", str(store["root"]), "--where", "kind=train", "--where",
                         "seed=1"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].split()[:4] == ["train", "convnet", "digits", "1"]
    assert results_main(["ls", str(store["root"]), "--where", "alpha=0"]) == 0  # the recipe's
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].split()[0] == "distill"
    assert results_main(["ls", str(store["root"]), "--where", "colour=red"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown --where key 'colour'; valid: ")
    assert "model" in err[-1] and "alpha" in err[-1]


def test_show_values_prints_probe_tables_and_grid_extremes(tmp_path, capsys):
    probe = tmp_path / "probe.h5"
    coords = {"checkpoint": ["teacher", "student"], "probe": ["knn@20"],
              "features": ["raw"], "seed": [0, 1]}
    spec = MetricSpec(("checkpoint", "probe", "features", "seed"), "fraction", "accuracy")
    with create_result(probe, "probe", coords, {"accuracy": spec}, ("checkpoint",), {},
                       [], "cpu") as result:
        result.write((0,), accuracy=np.array([[[0.5, 0.7]]]))
    assert results_main(["show", str(probe), "--values"]) == 0
    text = capsys.readouterr().out.split("values:\n", 1)[1].splitlines()
    assert text[1].split() == ["teacher", "60.00", "±", "10.00", "yes"]
    assert text[2].split() == ["student", "-", "no"]
    plane = tmp_path / "plane.h5"
    coords = {"alpha": [0.0, 1.0], "beta": [0.0, 1.0, 2.0]}
    spec = MetricSpec(("alpha", "beta"), "nats", "loss")
    with create_result(plane, "interpolate", coords, {"loss": spec}, ("alpha", "beta"), {},
                       [], "cpu") as result:
        for cell in result.missing():
            result.write(cell, loss=np.float32(cell[0] * 3 + cell[1]))
    assert results_main(["show", str(plane), "--values"]) == 0
    text = capsys.readouterr().out.split("values:\n", 1)[1]
    assert "loss: min 0 at alpha=0, beta=0; max 5 at alpha=1, beta=2" in text
