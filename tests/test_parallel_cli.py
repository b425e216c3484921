"""--parallel-runs on the commands that train many runs: landscape.border's children and
tickets.imp's levels trained together give the results (and runs) trained one by one give;
bad counts are refused before anything is written."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape.border import main as border_main
from runs.checkpoint import read_checkpoint
from runs.engines import parallel
from runs.engines.train import TrainConfig, train
from runs.results import open_result
from tests.helpers import run_cli
from tickets.imp import main as imp_main

BASE = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=10,
                   save_at=(2, 4), lr=0.05)
EVAL = ["--device", "cpu", "--bn-samples", "64", "--bn-batch-size", "32", "--grid", "0:1:3"]
IMP = ["--model", "convnet", "--width", "0.125", "--dataset", "toy", "--batch-size", "32",
       "--lr", "0.05", "--steps", "10", "--device", "cpu", "--seeds", "0", "1", "--levels", "1",
       "--rewind", "init@2", "--baselines", "random", "--instability", "--barrier-grid",
       "0:1:3"]


@pytest.fixture
def groups(monkeypatch):
    """The sizes of the groups trained together (runs.engines.parallel.fit_together)."""
    sizes = []
    real = parallel.fit_together

    def counting(sessions, *args):
        sizes.append(len(sessions))
        return real(sessions, *args)

    monkeypatch.setattr(parallel, "fit_together", counting)
    return sizes


def final_weights(store) -> dict:
    """What a run is (seeds, start, mask file, rewound or not) -> its last weights, for
    every run in the store (folder names hash the checkpoints a run rewinds to, which
    differ between stores in the last bits)."""
    out = {}
    for run in sorted(store.glob("train_*/seed_*")):
        cfg = json.loads((run / "config.json").read_text())["config"]
        key = (cfg["seed"], cfg["data_seed"], cfg["start_step"], Path(cfg["mask"]).parts[-2:],
               bool(cfg["rewind"]), cfg["init"])
        last = max(run.glob("ckpt/step_*.pt"))
        out[key] = read_checkpoint(last)["model"]["state"]
    return out


def assert_same_runs(a, b) -> None:
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert weights_a.keys() == weights_b.keys() and weights_a
    for name, state in weights_a.items():
        for key, value in state.items():
            torch.testing.assert_close(weights_b[name][key], value, atol=1e-4, rtol=0,
                                       msg=f"{name} {key}")


def test_border_children_together_equal_one_by_one(tmp_path, groups):
    """Two starts at steps 2 and 4, three children each: one call of six runs trains as two
    groups of three (runs at one step), and measures what one-by-one children measure."""
    run = train(BASE, tmp_path / "base", device="cpu")
    outs = {}
    for k in (1, 6):
        outs[k] = tmp_path / f"border{k}.h5"
        code, _ = run_cli(border_main, ["--rewind-steps", str(run.path), "2,4", "--children",
                                        "3", "--store", str(tmp_path / f"store{k}"), "--out",
                                        str(outs[k]), "--parallel-runs", str(k), *EVAL])
        assert code == 0
    assert groups == [3, 3]
    assert_same_runs(tmp_path / "store1", tmp_path / "store6")
    one, together = (open_result(outs[k], "border") for k in (1, 6))
    for name in ("loss", "error", "error_barrier", "loss_barrier_mean"):
        np.testing.assert_allclose(together.metrics[name], one.metrics[name], atol=1e-4)


def test_imp_levels_together_equal_one_by_one(tmp_path, groups):
    """Two seeds, ticket and random at level 1, with --instability siblings: each level's
    runs of both seeds train together, siblings after the runs they rewind to."""
    outs = {}
    for k in (1, 8):
        outs[k] = tmp_path / f"imp{k}.h5"
        code, _ = run_cli(imp_main, ["--store", str(tmp_path / f"store{k}"), "--out",
                                     str(outs[k]), "--parallel-runs", str(k), *IMP])
        assert code == 0
    # level 0: the dense runs of both seeds, then their siblings (from step 2); level 1:
    # ticket and random of both seeds, then their four siblings
    assert groups == [2, 2, 4, 4]
    assert_same_runs(tmp_path / "store1", tmp_path / "store8")
    one, together = (open_result(outs[k], "imp") for k in (1, 8))
    for name in ("density", "test_accuracy", "test_loss", "error_barrier"):
        np.testing.assert_allclose(together.metrics[name], one.metrics[name], atol=1e-4)


def test_runs_of_one_shape_at_another_setting_train_apart(tmp_path, groups, capsys):
    """train_many splits configs by shape: two lrs make two groups, none refused; runs
    that share no shape train alone, saying which setting keeps them apart."""
    configs = [dataclasses.replace(BASE, num_steps=3, save_at=(), seed=s, lr=lr)
               for lr in (0.05, 0.1) for s in (0, 1)]
    runs = parallel.train_many(configs, tmp_path, device="cpu", parallel_runs=4)
    assert groups == [2, 2] and all(r.done for r in runs)
    assert "note:" not in capsys.readouterr().err
    lone = [dataclasses.replace(c, num_steps=2) for c in configs[1:3]]  # lr 0.05 and 0.1
    parallel.train_many(lone, tmp_path, device="cpu", parallel_runs=4)
    assert groups == [2, 2]
    assert "note: --parallel-runs: the runs differ in --lr (0.05 vs 0.1)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("main, argv", [
    (border_main, ["random", "--children", "2", "--steps", "3", "--model", "convnet",
                   "--width", "0.125", "--dataset", "toy", *EVAL]),
    (imp_main, IMP),
])
def test_a_negative_count_is_refused_before_anything_is_written(tmp_path, main, argv):
    code, lines = run_cli(main, [*argv, "--store", str(tmp_path / "store"), "--out",
                                 str(tmp_path / "r.h5"), "--parallel-runs", "-1"])
    assert code == 2 and lines[-1] == "error: --parallel-runs -1: must be >= 1 (0 = auto)"
    assert not (tmp_path / "r.h5").exists() and not list(tmp_path.glob("store/train_*"))


def test_the_pipeline_passes_parallel_runs_to_border_and_imp(tmp_path, monkeypatch):
    """runs.pipeline --parallel-runs K: every border and imp job gets --parallel-runs K (a
    job's own value wins); the other stages do not take it."""
    from runs.studies import pipeline
    calls = []
    monkeypatch.setattr(pipeline, "distill_stage", lambda *a: {"images": []})
    monkeypatch.setattr(pipeline, "call", lambda main, argv, stage: calls.append((stage, argv)))
    preset = {"distill": {"model": "convnet", "dataset": "toy"},
              "interpolate": [{"name": "path", "refs": ["random", "random"]}],
              "border": [{"name": "lmc", "refs": ["random"]}],
              "imp": [{"name": "imp", "levels": 1}, {"name": "solo", "parallel_runs": 1}]}
    layout = pipeline.Layout(tmp_path)
    pipeline.run_pipeline(preset, layout, "cpu", ("distill", "interpolate", "border", "imp"),
                          parallel_runs=4)
    counts = {stage: argv[argv.index("--parallel-runs") + 1] if "--parallel-runs" in argv
              else None for stage, argv in calls}
    assert counts == {"interpolate path": None, "border lmc": "4", "imp imp": "4",
                      "imp solo": "1"}


def test_runs_of_other_data_train_on_their_own(tmp_path, groups):
    """train_many given the first config's data loads each other data set itself: runs on
    8x8 toy images train on those (not on the 16x16 ones passed), as they do alone."""
    from runs.engines.train import load_data
    small = dataclasses.replace(BASE, num_steps=3, save_at=(), model_options=(),
                                subset=8)
    configs = [dataclasses.replace(BASE, num_steps=3, save_at=(), seed=s) for s in (0, 1)]
    configs += [dataclasses.replace(small, seed=s) for s in (0, 1)]
    runs = parallel.train_many(configs, tmp_path / "a", load_data(configs[0]), "cpu",
                               parallel_runs=4)
    alone = [train(c, tmp_path / "b", device="cpu") for c in configs]
    assert groups == [2, 2]
    for a, b in zip(alone, runs):
        assert a.config()["steps_per_epoch"] == b.config()["steps_per_epoch"]
        assert a.summary()["test_accuracy"] == pytest.approx(b.summary()["test_accuracy"],
                                                             abs=1e-6)
