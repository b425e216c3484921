"""Issue #18, probes: the normalised pixel row, every epoch of a run (RUN@epochs), tables in
both protocols (last epoch, honest; best epoch on test, as the paper), --input-stats, and
recipe variants in labels and roles."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from figures import protocols
from figures.__main__ import main as figures_main
from probes.evaluate import describe
from probes.evaluate import main as probe_main
from runs.checkpoint import save_checkpoint
from runs.config import to_dict
from runs.data import PAPER_STATS, load_dataset
from runs.engines.distill import DistillConfig
from runs.errors import UserError
from runs.models import create_model
from runs.refs import expand_refs, load_model, ref_labels
from runs.results import MetricSpec, create_result, open_result
from runs.store import open_run

PER_EPOCH = 10  # steps per epoch of the hand-made runs
TINY = DistillConfig(model="convnet", width=0.125, dataset="digits", out_dim=64, hidden_dim=32,
                     bottleneck_dim=8, batch_size=64)  # the recipe, CPU-sized
KNN = ["--probes", "knn", "--seeds", "0"]


def distill_run(root, cfg=TINY, steps=(0, 10, 20, 30, 35)) -> str:
    """A distillation run's store layout: checkpoints at init, epochs 1-3 and mid-epoch 4,
    each a different random convnet (so each epoch probes differently)."""
    run = open_run(root, "distill", cfg, extra={"steps_per_epoch": PER_EPOCH})
    for step in steps:
        model = create_model("convnet", width=0.125, in_channels=1, num_classes=10,
                             seed=100 + step)
        save_checkpoint(run.ckpt_path(step), model, step, config=to_dict(cfg),
                        extra={"kind": "distill"})
    return str(run.path)


# ---------------------------------------------------------------- RUN@epochs, RUN@every


def test_epochs_and_every_name_each_saved_checkpoint(tmp_path):
    run = distill_run(tmp_path / "store")
    assert expand_refs([f"{run}@epochs", "pixels"]) == \
        [f"{run}@10", f"{run}@20", f"{run}@30", "pixels"]
    assert expand_refs([f"{run}@every:encoder"]) == \
        [f"{run}@{step}:encoder" for step in (0, 10, 20, 30, 35)]
    assert expand_refs([f"mine:={run}@epochs"]) == \
        [f"mine ep{e}:={run}@{10 * e}" for e in (1, 2, 3)]
    assert ref_labels(expand_refs([f"{run}@every"])) == \
        ["student s0 init", "student s0 ep1", "student s0 ep2", "student s0 ep3",
         "student s0 @35"]
    with pytest.raises(UserError, match="names several checkpoints .* give one @STEP"):
        load_model(f"{run}@epochs")  # every other command takes one checkpoint
    with pytest.raises(UserError, match="applies to run directories, not files"):
        expand_refs([f"{run}/ckpt/step_0000010.pt@epochs"])
    partial = distill_run(tmp_path / "other", dataclasses.replace(TINY, seed=1), steps=(0, 5))
    with pytest.raises(UserError, match="no checkpoint at a whole epoch >= 1; saved steps: 0, 5"):
        expand_refs([f"{partial}@epochs"])


def test_labels_and_roles_name_departures_from_the_recipe(tmp_path):
    """A run off the paper's recipe says how, in its label and its table role; scale
    settings a CPU-sized run shrinks (head widths, batch) do not count."""
    recipe = distill_run(tmp_path / "store", steps=(10,))
    normed = distill_run(tmp_path / "store", dataclasses.replace(TINY, head_last="normed"),
                         steps=(10,))
    assert ref_labels([f"{recipe}@10", f"{normed}@10"]) == \
        ["student s0 ep1", "student s0 ep1 (normed head)"]
    info = load_dataset("digits", split="test").info
    rows = [describe(f"{run}@10", info) for run in (recipe, normed)]
    assert [row["role"] for row in rows] == ["student", "student (normed head)"]
    assert rows[1]["step"] == 10 and rows[1]["epoch"] == 1.0
    assert rows[0]["run"] != rows[1]["run"] and rows[0]["run"].startswith("distill_")


# ---------------------------------------------------------------- probes.evaluate end to end


def test_probing_every_epoch_prints_and_draws_both_protocols(tmp_path, capsys):
    run = distill_run(tmp_path / "store")
    out = tmp_path / "probe.h5"
    assert probe_main([f"{run}@epochs", "pixels", "--dataset", "digits", *KNN, "--subset",
                       "20", "--out", str(out)]) == 0
    result = open_result(out, "probe")
    rows = json.loads(result.attrs["checkpoints"])
    name = rows[0]["run"]
    assert [(r["run"], r["role"], r["step"], r["epoch"]) for r in rows] == \
        [(name, "student", 10, 1.0), (name, "student", 20, 2.0), (name, "student", 30, 3.0),
         ("", "pixels", None, None)]
    assert result.config["refs"] == [f"{run}@10", f"{run}@20", f"{run}@30", "pixels"]
    assert result.config["input_stats"] == "paper"
    acc = 100 * result.metrics["accuracy"][:3, 0, 0, 0]  # knn@20 raw, epochs 1-3
    text = capsys.readouterr().out
    honest, paper = text.split("last epoch of each run (honest):")[1].split("best epoch")
    assert f"| student s0 ep3 | {acc[2]:.2f} ± 0.00 |" in honest
    assert f"| student s0 ep3 (best of 3) | {acc.max():.2f} ± 0.00 |" in paper
    figures = tmp_path / "figures"
    assert figures_main(["probe-table", "--results", str(out), "--out", str(figures)]) == 0
    assert sorted(p.name for p in figures.glob("*.md")) == \
        ["probe-table_knn20.md", "probe-table_knn20_paper.md"]
    assert f"{acc[2]:.2f} ± 0.00" in (figures / "probe-table_knn20.md").read_text()
    assert f"{acc.max():.2f} ± 0.00" in (figures / "probe-table_knn20_paper.md").read_text()


# ---------------------------------------------------------------- the two protocols


def epochs_result(path, student=((40, 50, 45), (42, 52, 47))) -> str:
    """A probe result: 2 runs x epochs 1-3 of a student (the middle epoch best), each run's
    teacher, and pixels; knn@20 only, 2 probe seeds (+1 point for seed 1), in %."""
    rows, values = [], []
    for r, accs in enumerate(student):
        rows += [{"ref": f"student s{r} ep{e}", "role": "student", "model": "resnet18",
                  "trained_on": "cifar10", "run": f"distill_x/seed_{r}", "step": 196 * e,
                  "epoch": float(e)} for e in range(1, len(accs) + 1)]
        values += list(accs)
        rows.append({"ref": f"teacher s{r}", "role": "teacher", "model": "resnet18",
                     "trained_on": "cifar10", "run": f"distill_x/seed_{r}", "step": 588,
                     "epoch": 3.0})
        values.append(30 + r)
    rows.append({"ref": "pixels", "role": "pixels", "model": "", "trained_on": "",
                 "run": "", "step": None, "epoch": None})
    values.append(35)
    labels = [row["ref"] for row in rows]
    coords = {"checkpoint": labels, "probe": ["knn@20"], "features": ["raw", "standardized"],
              "seed": [0, 1]}
    metric = MetricSpec(("checkpoint", "probe", "features", "seed"), "fraction", "accuracy")
    config = {"refs": labels, "dataset": "cifar10", "probes": ["knn"], "ks": [20],
              "seeds": [0, 1]}
    with create_result(path, "probe", coords, {"accuracy": metric}, ("checkpoint",), config,
                       [], "cpu", attrs={"checkpoints": rows}) as result:
        for (index,) in result.missing():
            cell = (values[index] + np.array([0.0, 1.0])) / 100  # (seed,)
            result.write((index,), accuracy=np.broadcast_to(cell, (1, 2, 2)).copy())
    return str(path)


def test_paper_table_shows_the_best_epoch_and_the_honest_one_the_last(tmp_path):
    path = epochs_result(tmp_path / "probe.h5")
    out = tmp_path / "both"
    assert figures_main(["probe-table", "--results", path, "--out", str(out)]) == 0
    honest = (out / "probe-table_knn20.md").read_text()
    paper = (out / "probe-table_knn20_paper.md").read_text()
    last, best = [45, 46, 47, 48], [50, 51, 52, 53]  # runs x seeds, epoch 3 and epoch 2
    cell = "| cifar10 | resnet18 | {:.2f} ± {:.2f} | {:.2f} ± {:.2f} | {:.2f} ± {:.2f} |"
    teacher, pixels = [30, 31, 31, 32], [35, 36]
    assert cell.format(np.mean(pixels), np.std(pixels), np.mean(teacher), np.std(teacher),
                       np.mean(last), np.std(last)) in honest
    assert cell.format(np.mean(pixels), np.std(pixels), np.mean(teacher), np.std(teacher),
                       np.mean(best), np.std(best)) in paper
    assert honest.splitlines()[0].startswith("knn@20 test accuracy (%), last epoch of each "
                                             "run (honest)")
    assert "best epoch of each run on the test set, as the paper" in paper.splitlines()[0]
    assert "best epoch of each run on the test set" in (out / "probe-table_knn20_paper.tex") \
        .read_text().splitlines()[0]
    assert {p.name for p in out.glob("*.png")} == {"probe-table_knn20.png",
                                                   "probe-table_knn20_paper.png"}
    for protocol, names in (("last", ["probe-table_knn20.md"]),
                            ("paper", ["probe-table_knn20_paper.md"])):
        one = tmp_path / protocol
        assert figures_main(["probe-table", "--results", path, "--out", str(one),
                             "--protocol", protocol]) == 0
        assert sorted(p.name for p in one.glob("*.md")) == names


def test_one_epoch_per_run_writes_only_the_honest_table(tmp_path):
    path = epochs_result(tmp_path / "probe.h5", student=((45,), (47,)))
    out = tmp_path / "out"
    assert figures_main(["probe-table", "--results", path, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.md")) == ["probe-table_knn20.md"]


def test_selection_is_per_run_role_and_seed():
    """Each seed picks its own best epoch; a run's teacher is not pooled with its student;
    NaN (a row not probed yet) is skipped by the maximum and kept by the last epoch."""
    rows = [{"run": "a", "role": "student", "step": s} for s in (30, 10, 20)] + \
        [{"run": "a", "role": "teacher", "step": 30}, {"run": "", "role": "pixels"},
         {"role": "checkpoint"}]
    acc = np.array([[np.nan, 0.1], [0.5, 0.2], [0.4, 0.9], [0.3, 0.3], [0.6, 0.6],
                    [0.7, 0.7]])  # (checkpoint, seed); the first row is the last epoch
    assert protocols.groups(rows) == [[1, 2, 0], [3], [4], [5]]
    picked, last = protocols.select(acc, rows, "last")
    assert picked == [0, 3, 4, 5] and np.array_equal(last[0], [np.nan, 0.1], equal_nan=True)
    _, best = protocols.select(acc, rows, "paper")
    assert best.tolist() == [[0.5, 0.9], [0.3, 0.3], [0.6, 0.6], [0.7, 0.7]]
    assert protocols.chosen("both", [rows]) == ["last", "paper"]
    assert protocols.chosen("both", [rows[3:]]) == ["last"]
    with pytest.raises(UserError, match="unknown --protocol 'best'; valid: both, last, paper"):
        protocols.chosen("best", [rows])


# ---------------------------------------------------------------- the pixel row


def test_pixel_row_is_knn_on_normalised_pixels_as_scikit_learn(tmp_path, capsys):
    """The paper's input row: k-NN (k=20, Euclidean, uniform votes) on the pixels after the
    per-channel mean/std normalisation. The data makes the difference matter: channel 0 is
    loud noise, channel 1 carries the class in a narrow range; /255 alone would drown it."""
    sklearn = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(0)

    def images(n):
        y = np.arange(n) % 4
        x = np.empty((n, 3, 4, 4), np.uint8)
        x[:, 0] = rng.integers(0, 256, (n, 4, 4))
        x[:, 1] = 100 + 6 * y[:, None, None] + rng.integers(0, 4, (n, 4, 4))
        x[:, 2] = 50 + rng.integers(0, 3, (n, 4, 4))
        return x, y
    (x_train, y_train), (x_test, y_test) = images(200), images(100)
    npz = tmp_path / "channels.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = tmp_path / "probe.h5"
    assert probe_main(["pixels", "--dataset", "npz", "--data-root", str(npz), *KNN,
                       "--out", str(out)]) == 0
    got = open_result(out, "probe").metrics["accuracy"][0, 0, 0, 0]  # pixels, knn@20, raw

    unit = x_train / 255.0
    mean, std = unit.mean((0, 2, 3))[:, None, None], unit.std((0, 2, 3))[:, None, None]

    def score(scale):
        knn = sklearn.KNeighborsClassifier(n_neighbors=20, metric="euclidean",
                                           weights="uniform")
        knn.fit(scale(x_train).reshape(len(x_train), -1), y_train)
        return knn.score(scale(x_test).reshape(len(x_test), -1), y_test)
    assert got == pytest.approx(score(lambda x: (x / 255.0 - mean) / std))
    assert got > 0.9 and score(lambda x: x / 255.0) < 0.5  # /255 alone: near chance


# ---------------------------------------------------------------- --input-stats


def test_input_stats_are_recorded_and_a_mismatch_is_named(tmp_path, monkeypatch, capsys):
    """cifar10 has a paper choice (the paper's code's statistics) and its own: the result
    records the choice, the pixel row uses it, and a checkpoint trained with the other one
    (a run before the field: its own, "dataset") is named in a warning with both values."""
    from probes.features import pixel_features
    from probes.nearest import knn_accuracy
    from tests.helpers import write_cifar10
    write_cifar10(tmp_path / "data", monkeypatch, per_batch=6, test_count=8)
    model = create_model("convnet", width=0.125, num_classes=10, seed=0)
    config = {"model": "convnet", "dataset": "cifar10", "alpha": 0.0}  # an old run's record
    old = save_checkpoint(tmp_path / "old.pt", model, 0, config=config,
                          extra={"kind": "distill"})
    new = save_checkpoint(tmp_path / "new.pt", model, 0, extra={"kind": "distill"},
                          config={**config, "input_stats": "paper"})
    args = ["--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--probes", "knn",
            "--ks", "3", "--seeds", "0"]
    for stats, warned in (("paper", str(old)), ("dataset", str(new))):
        out = tmp_path / f"{stats}.h5"
        assert probe_main([str(old), str(new), "pixels", *args, "--input-stats", stats,
                           "--out", str(out)]) == 0
        err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(err) == 1 and warned in err[0] and "input_stats=" in err[0]
        other = "dataset" if stats == "paper" else "paper"
        assert f"input_stats={other!r}" in err[0] and f"--input-stats {stats}" in err[0]
        result = open_result(out, "probe")
        assert result.config["input_stats"] == stats
        train, test = (load_dataset("cifar10", root=tmp_path / "data", split=split,
                                    stats=stats) for split in ("train", "test"))
        assert ((train.info.mean, train.info.std) == PAPER_STATS["cifar10"]) == \
            (stats == "paper")  # CIFAR-10's own std differs in the 4th digit
        expect = knn_accuracy(pixel_features(train.x, train.info.mean, train.info.std),
                              train.y, pixel_features(test.x, train.info.mean, train.info.std),
                              test.y, k=3)
        assert result.metrics["accuracy"][2, 0, 0, 0] == pytest.approx(expect)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_imported_dinopl_students_probe_end_to_end(tmp_path, capsys, arch):
    """A dinopl Lightning checkpoint (the paper's own runs) probes as a student of no run:
    no recipe notes, no input-statistics warning, its own row."""
    from tests.test_dinopl import write_ckpt
    path, _ = write_ckpt(tmp_path, arch)
    out = tmp_path / "probe.h5"
    assert probe_main([f"dinopl={path}:student", "pixels", "--dataset", "digits", "--channels",
                       "3", "--size", "32", "--subset", "10", *KNN, "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    result = open_result(out, "probe")
    row = json.loads(result.attrs["checkpoints"])[0]
    assert (row["role"], row["model"], row["run"]) == ("student", arch, "")
    assert np.isfinite(result.metrics["accuracy"]).all() and result.done.all()


def test_every_epoch_file_resumes_without_recomputing(tmp_path, monkeypatch):
    run = distill_run(tmp_path / "store", steps=(10, 20))
    out = str(tmp_path / "probe.h5")
    argv = [f"{run}@epochs", "--dataset", "digits", *KNN, "--subset", "10", "--out", out]
    assert probe_main(argv) == 0
    first = open_result(out, "probe").metrics["accuracy"]
    import probes.api

    def never(*args, **kwargs):
        raise AssertionError("a resumed probe recomputed a row")
    monkeypatch.setattr(probes.api, "split_features", never)
    assert probe_main(argv) == 0
    assert np.array_equal(open_result(out, "probe").metrics["accuracy"], first)
    assert torch.is_tensor(torch.as_tensor(first))
