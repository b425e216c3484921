"""Progress that reaches logs (runs.progress): plain lines on a non-TTY stderr with label,
step x/y, epoch, loss, rate and ETA; tqdm bars in a terminal, inner ones cleared; times
that never read `60 s`; --log tensorboard kept out of the run's identity (tiny CPU runs)."""

import io
import json
import re

import pytest
import torch

from runs import progress
from runs.checkpoint import save_checkpoint
from runs.engines import train as train_module
from runs.engines.distill import DistillConfig
from runs.engines.train import TrainConfig
from runs.errors import UserError
from runs.models import create_model
from runs.progress import Progress, format_duration, run_label

# digits 8x8: 1198 train images; 128 per step = 9 steps per epoch, 12 steps = 2 epochs.
TINY = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size", "128",
        "--device", "cpu", "--steps", "12", "--eval-every", "1"]
LINE = re.compile(r"^train convnet digits s0: step (\d+)/12 \(epoch (\d)/2\) loss [\d.]+ .*"
                  r"[\d.]+ img/s ETA \d+ min \d+ s$")


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv(progress.LOG_EVERY_ENV, "0")


def progress_lines(err: str, label: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{label}:")]


# --- formatting ------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "0 min 0 s"), (59.4, "0 min 59 s"), (59.6, "1 min 0 s"), (299.5, "5 min 0 s"),
    (299.7, "5 min 0 s"), (750, "12 min 30 s"), (3599.9, "1 h 0 min 0 s"),
    (3725, "1 h 2 min 5 s"), (-3, "0 min 0 s"), (float("inf"), "?")])
def test_durations_round_once_then_split(seconds, text):
    assert format_duration(seconds) == text


def test_durations_never_read_60_s():
    for tenth in range(0, 40_000, 7):
        assert not re.search(r"\b60 (s|min)\b", format_duration(tenth / 10))


def test_log_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(progress.LOG_EVERY_ENV, raising=False)
    assert progress.log_every() == progress.LOG_EVERY_S == 30
    monkeypatch.setenv(progress.LOG_EVERY_ENV, "2.5")
    assert progress.log_every() == 2.5
    monkeypatch.setenv(progress.LOG_EVERY_ENV, "soon")  # not a number: the default
    assert progress.log_every() == 30


def test_labels_say_what_runs():
    cfg = DistillConfig(model="convnet", dataset="digits", alpha=1e-10)
    assert run_label("distill", cfg) == "distill convnet digits s0 α=1e-10"
    child = TrainConfig(model="resnet20", dataset="cifar10", seed=2, data_seed=5)
    assert run_label("train", child) == "train resnet20 cifar10 s2 d5"


def test_ascii_streams_spell_alpha(monkeypatch):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr("sys.stderr", stream)
    with Progress(2, "distill convnet digits s0 α=0.5") as bar:
        bar.update(2, True, loss=torch.tensor(1.5))
    stream.seek(0)
    assert stream.read().startswith("distill convnet digits s0 alpha=0.5: step 2/2 loss 1.5")


# --- lines in a log (stderr not a TTY) -------------------------------------------------------

def test_training_logs_progress_lines(tmp_path, capsys, every_update):
    assert train_module.main(["--store", str(tmp_path), *TINY]) == 0
    lines = progress_lines(capsys.readouterr().err, "train convnet digits s0")
    matched = [LINE.match(line) for line in lines[:-1]]
    assert all(matched), lines
    assert [int(m.group(1)) for m in matched] == list(range(1, 13))
    # the first epoch end: ceil(1198 / 128) = 10 steps, the last partial batch kept
    assert int(matched[9].group(2)) == 1 and "test_acc" in lines[9]
    assert lines[-1].startswith("train convnet digits s0: step 12/12 (epoch 1/2) loss")
    assert re.search(r"test_acc 0\.\d+ done in \d+ min \d+ s$", lines[-1])


def test_lines_keep_their_cadence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(progress.LOG_EVERY_ENV, "3600")  # only epoch ends (and the end)
    assert train_module.main(["--store", str(tmp_path), *TINY]) == 0
    lines = progress_lines(capsys.readouterr().err, "train convnet digits s0")
    steps = [int(re.search(r"step (\d+)/", line).group(1)) for line in lines]
    assert steps == [10, 12, 12] and "done in" in lines[-1]


def test_interpolation_logs_points(tmp_path, capsys, every_update):
    from landscape.interpolate import main
    refs = []
    for seed in (0, 1):
        path = tmp_path / f"m{seed}.pt"
        save_checkpoint(path, create_model("convnet", num_classes=10, width=0.125,
                                           in_channels=1, seed=seed), 0)
        refs.append(str(path))
    out = tmp_path / "path.h5"
    assert main([*refs, "--grid", "0:1:5", "--metrics", "norm", "--device", "cpu",
                 "--out", str(out)]) == 0
    lines = progress_lines(capsys.readouterr().err, "interpolate")
    assert [re.match(r"interpolate: point (\d)/5 ", line).group(1) for line in lines] \
        == ["1", "2", "3", "4", "5", "5"]
    assert re.search(r"[\d.]+ points/s ETA 0 min \d+ s$", lines[0])
    assert lines[-1].endswith(" s") and "done in" in lines[-1]


def test_pipeline_distill_stage_logs_without_a_tty(tmp_path, capsys, every_update):
    from runs.studies.pipeline import Layout, distill_stage, timed
    preset = {"seeds": [0], "distill": {
        "model": "convnet", "width": 0.125, "dataset": "digits", "batch_size": 128,
        "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 8, "steps": "1ep"}}
    with timed("distill"):
        distill_stage(preset, Layout(tmp_path), "cpu")
    err = capsys.readouterr().err
    lines = progress_lines(err, "distill convnet digits s0 α=0")
    assert len(lines) == 11  # steps 1..10 (ceil(1198 / 128)), then the end
    assert re.match(r".*: step 10/10 \(epoch 1/1\) loss [\d.]+ kl [\d.e-]+ knn 0\.\d+ ", lines[-2])
    assert re.search(r"^stage distill: \d+ min \d+ s$", err, re.M)


def test_other_ranks_stay_silent(capsys, every_update):
    with Progress(3, "quiet", show=False) as bar:
        bar.update(3, True, loss=1.0)
    assert capsys.readouterr().err == ""


def test_a_failing_run_ends_without_a_done_line(capsys, every_update):
    with pytest.raises(RuntimeError), Progress(3, "scan", "point") as bar:
        bar.update(1)
        raise RuntimeError("boom")
    assert "done" not in capsys.readouterr().err


def test_unknown_values_keep_the_last_known_one(capsys, every_update):
    with Progress(3, "distill", steps_per_epoch=1) as bar:
        bar.update(1, True, knn=0.25)
        bar.update(1, True, knn=float("nan"), loss=None)
    assert capsys.readouterr().err.splitlines()[1].startswith("distill: step 2/3 (epoch 2/3) "
                                                              "knn 0.25 ")


# --- bars in a terminal ----------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_bars_with_postfix_and_nested_ones_cleared(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with Progress(2, "border", "start") as outer:
        assert outer.bar is not None and outer.bar.leave
        with Progress(4, "train convnet digits s0 d1") as inner:
            assert inner.bar is not None and not inner.bar.leave  # cleared when finished
            inner.update(4, True, loss=torch.tensor(2.5), test_acc=0.75)
            assert inner.bar.postfix == "loss 2.5 test_acc 0.75"
        outer.update(1)
    assert progress._depth == 0
    assert "border" in terminal.getvalue() and "step" not in terminal.getvalue().split("\n")[0]


# --- --log tensorboard | wandb ---------------------------------------------------------------

def test_missing_logger_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    assert train_module.main(["--store", str(tmp_path), *TINY, "--log", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --log tensorboard: the tensorboard package is not installed "
                       "(pip install tensorboard)")
    assert not list(tmp_path.iterdir())  # nothing trained
    with pytest.raises(UserError, match="valid: tensorboard, wandb"):
        progress.check_logger("mlflow")


class FakeWriter:
    """Stands in for SummaryWriter: records what a run would write."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_log_flag_mirrors_metrics_and_keeps_the_run_identity(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "_backend", lambda name: FakeWriter)
    FakeWriter.made = []
    assert train_module.main(["--store", str(tmp_path), *TINY]) == 0
    assert train_module.main(["--store", str(tmp_path), *TINY, "--log", "tensorboard"]) == 0
    assert FakeWriter.made == []  # the same run: done, skipped
    assert len(list(tmp_path.glob("train_*"))) == 1
    other = ["--store", str(tmp_path), *TINY, "--seed", "1", "--log", "tensorboard"]
    assert train_module.main(other) == 0
    (writer,) = FakeWriter.made
    assert writer.log_dir.endswith("seed_1/tb") and writer.closed
    keys = {key for key, _, _ in writer.scalars}
    assert {"train_loss", "test_accuracy", "test_loss", "lr"} <= keys
    assert {step for _, _, step in writer.scalars} == {10, 12}


def test_tensorboard_writes_event_files(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    assert train_module.main(["--store", str(tmp_path), *TINY, "--log", "tensorboard"]) == 0
    assert list(tmp_path.glob("train_*/seed_0/tb/events.out.tfevents.*"))


class FakeWandb:
    """Stands in for the wandb module: records init's arguments, logged scalars, finish."""
    runs = []

    @classmethod
    def init(cls, **kwargs):
        run = FakeWandbRun(kwargs)
        cls.runs.append(run)
        return run


class FakeWandbRun:
    def __init__(self, kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, scalars, step):
        self.logged.append((step, scalars))

    def finish(self):
        self.finished = True


def test_wandb_runs_offline_in_the_run_folder_under_a_stable_id(tmp_path, monkeypatch,
                                                               capsys):
    """--log wandb: an offline run in <run>/, named and identified by the run (so a resumed
    run appends), with the run's config, the metrics.jsonl records as scalars, finished."""
    monkeypatch.setattr(progress, "_backend", lambda name: FakeWandb)
    FakeWandb.runs = []
    assert train_module.main(["--store", str(tmp_path), *TINY, "--log", "wandb"]) == 0
    (run,) = FakeWandb.runs
    (folder,) = tmp_path.glob("train_*/seed_0")
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(folder)
    assert run.kwargs["id"] == f"{folder.parent.name}-seed_0" and \
        run.kwargs["resume"] == "allow"
    assert run.kwargs["config"]["seed"] == 0 and run.finished
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in run.logged] == [r["step"] for r in records]
    assert run.logged[-1][1]["test_accuracy"] == records[-1]["test_accuracy"]


def test_wandb_writes_an_offline_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train_module.main(["--store", str(tmp_path), *TINY, "--log", "wandb"]) == 0
    assert list(tmp_path.glob("train_*/seed_0/wandb/offline-run-*/run-*.wandb"))
