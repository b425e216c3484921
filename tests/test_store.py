"""The run store: directory names, config checks, metrics, DONE, steps, atomic writes."""

import json
import os
from dataclasses import dataclass

import pytest

from runs.config import arg, config_hash
from runs.errors import UserError
from runs.store import Run, atomic_write, atomic_write_text, find_run, open_run


@dataclass(frozen=True)
class Cfg:
    lr: float = arg(0.1, "peak learning rate")
    num_steps: int = arg(100, "iterations")
    seed: int = arg(0, "init seed")


def test_run_dir_is_kind_hash_seed(tmp_path):
    cfg = Cfg(lr=0.2, seed=3)
    run = open_run(tmp_path, "train", cfg)
    assert run.path == tmp_path / f"train_{config_hash(cfg)}" / "seed_3"
    assert open_run(tmp_path, "train", cfg, seed=5).path.name == "seed_5"
    record = json.loads((run.path / "config.json").read_text())
    assert record == {"kind": "train", "seed": 3, "identity": {"lr": 0.2},
                      "config": {"lr": 0.2, "num_steps": 100, "seed": 3}}
    assert run.config() == record
    # Seeds of one config share the kind directory.
    assert open_run(tmp_path, "train", Cfg(lr=0.2, seed=4)).path.parent == run.path.parent


def test_reopen_same_config(tmp_path):
    run = open_run(tmp_path, "train", Cfg(), extra={"steps_per_epoch": 7})
    run.log({"step": 1})
    again = open_run(tmp_path, "train", Cfg(), extra={"steps_per_epoch": 7})
    assert again == run and again.metrics() == [{"step": 1}]
    assert again.config()["steps_per_epoch"] == 7  # extra sits at the top level


def test_extra_may_not_shadow_the_record(tmp_path):
    with pytest.raises(ValueError, match="config"):
        open_run(tmp_path, "train", Cfg(), extra={"config": {}})


def test_other_config_at_the_same_path_is_an_error(tmp_path):
    run = open_run(tmp_path, "train", Cfg(lr=0.2))
    record = run.config()
    record["identity"]["num_steps"] = 50  # as if defaults changed, or a hash collision
    (run.path / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="config.json"):
        open_run(tmp_path, "train", Cfg(lr=0.2))
    del record["identity"]["num_steps"]
    record["kind"] = "distill"
    (run.path / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="another config"):
        open_run(tmp_path, "train", Cfg(lr=0.2))


def test_run_written_before_a_field_was_added_still_opens(tmp_path):
    run = open_run(tmp_path, "train", Cfg(lr=0.2))
    record = run.config()
    del record["config"]["num_steps"]  # an older version of the config had no such field
    (run.path / "config.json").write_text(json.dumps(record))
    assert open_run(tmp_path, "train", Cfg(lr=0.2)).path == run.path


def test_metrics_round_trip(tmp_path):
    run = open_run(tmp_path, "train", Cfg())
    assert run.metrics() == []
    records = [{"step": s, "loss": 1.0 / (s + 1), "split": "train"} for s in range(5)]
    for record in records:
        run.log(record)
    assert run.metrics() == records


def test_partial_last_line_is_ignored_and_logging_goes_on(tmp_path):
    run = open_run(tmp_path, "train", Cfg())
    run.log({"step": 1, "loss": 0.5})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.4, "st')  # killed mid-append
    assert run.metrics() == [{"step": 1, "loss": 0.5}]
    run.log({"step": 2, "loss": 0.3})  # the resumed run must not glue onto the torn line
    assert run.metrics() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.3}]


def test_trim_metrics(tmp_path):
    run = open_run(tmp_path, "train", Cfg())
    for step in (0, 10, 20, 30):
        run.log({"step": step})
    run.log({"note": "no step"})  # records without a step are kept
    run.trim_metrics(after_step=15)
    assert run.metrics() == [{"step": 0}, {"step": 10}, {"note": "no step"}]
    run.log({"step": 20})
    assert [r.get("step") for r in run.metrics()] == [0, 10, None, 20]


def test_done_round_trip(tmp_path):
    run = open_run(tmp_path, "train", Cfg())
    assert not run.done and run.summary() == {}
    run.mark_done({"test_accuracy": 0.91, "steps": 100})
    assert run.done and open_run(tmp_path, "train", Cfg()).done
    assert run.summary() == {"test_accuracy": 0.91, "steps": 100}
    Run(run.path).mark_done()
    assert run.summary() == {}


def test_steps_ignore_temp_and_foreign_files(tmp_path):
    run = open_run(tmp_path, "train", Cfg())
    assert run.steps() == [] and run.latest_step() is None
    for step in (1000, 0, 20):
        run.ckpt_path(step).parent.mkdir(exist_ok=True)
        run.ckpt_path(step).write_bytes(b"x")
    assert run.ckpt_path(20).name == "step_0000020.pt"
    for stray in (".step_0000050.pt.1a2b.tmp", "step_0000060.pt.tmp", "step_latest.pt",
                  "notes.txt"):
        (run.ckpt_dir / stray).write_bytes(b"x")
    assert run.steps() == [0, 20, 1000] and run.latest_step() == 1000


def test_find_run(tmp_path):
    run = open_run(tmp_path, "train", Cfg(lr=0.3), seed=0)
    kind_dir = run.path.parent
    assert find_run(run.path) == run
    assert find_run(kind_dir) == run  # one seed: the kind directory names it
    open_run(tmp_path, "train", Cfg(lr=0.3), seed=1)
    (kind_dir / "seed_9").mkdir()  # no config.json: not a run
    with pytest.raises(UserError) as err:
        find_run(kind_dir)
    message = str(err.value)
    assert "seed_0, seed_1" in message and "seed_9" not in message
    with pytest.raises(UserError, match="no run at"):
        find_run(tmp_path / "nothing")
    with pytest.raises(UserError, match="no run at"):
        find_run(kind_dir / "seed_9")


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "state.json"
    atomic_write_text(path, "old")

    def broken(tmp):
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["state.json"]  # no temp file left behind
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["state.json"]


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
