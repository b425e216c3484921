"""Crash tests: every long command killed with SIGKILL at seeded moments spread over its run,
re-run until it finishes and compared with an uninterrupted run; stopped with SIGINT and
SIGTERM (exit 130 / 143 and a line saying how to resume) and resumed. The harness is
runs.crashtest (`python -m runs.crashtest` does 20 kills per command); here 5 per command,
on tiny CPU configurations, forked from one process that imported torch once.

Also the CLI wrapper's signal handling in process, and the harness' own ability to notice a
difference (so that a pass means something)."""

import contextlib
import io
import os
import signal
import time

import h5py
import numpy as np
import pytest
import torch

from runs.checkpoint import save_checkpoint
from runs.errors import EXIT_SIGINT, EXIT_SIGTERM, cli
from runs.models import create_model
from runs.results import MetricSpec, create_result
from runs.studies import crashtest

KILLS = 5  # per command, in CI; the script defaults to 20
COMMANDS = ("distill", "train", "interpolate", "border", "border-parallel", "imp", "imp-parallel",
            "pipeline")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with crashtest.ForkServer() as server:
        yield crashtest.Harness(tmp_path_factory.mktemp("crash"), server)


@pytest.fixture(scope="module")
def reports():
    """Crash reports by command: the signal tests reuse their uninterrupted run."""
    return {}


def explain(report) -> str:
    return "\n".join([report.line(), *report.problems])


# ---------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_results(
        harness, reports, name):
    report = harness.crash_test(harness.commands()[name], KILLS, seed=0)
    reports[name] = report
    assert report.ok, explain(report)
    assert len(report.kills) == KILLS and report.files_checked >= KILLS
    # the kills were aimed over the whole run, one in each fifth of it
    assert [int(KILLS * t / report.clean_s) for t in report.kills] == list(range(KILLS))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("name", COMMANDS)
def test_sigint_and_sigterm_stop_cleanly_and_the_rerun_resumes(harness, reports, name, sig):
    command = harness.commands()[name]
    report = reports.get(name) or harness.clean_run(command)
    reports[name] = report
    harness.signal_test(command, sig, report)
    assert report.ok, explain(report)
    assert report.stops[sig.name] == 128 + int(sig)


# ---------------------------------------------------------------------------- relocation


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "imp"])
def test_a_killed_command_moved_elsewhere_resumes_there_with_the_same_bits(harness, reports,
                                                                           name):
    """Killed part-way, its folder moved and renamed, re-run with --store and --out spelled
    absolute in the new place: the clean run's files (config.json byte for byte)."""
    command = harness.commands()[name]
    report = reports.get(name) or harness.clean_run(command)
    reports[name] = report
    harness.moved_test(command, report)
    assert report.ok, explain(report)
    assert "moved store resumed" in report.rows


@pytest.mark.slow
def test_a_scan_resumed_on_rewritten_data_is_refused_touching_nothing(harness):
    command = crashtest.data_command(harness.inputs)
    report = harness.clean_run(command)
    harness.changed_data_test(command, report)
    assert report.ok, explain(report)
    assert report.rows == ["changed data refused"]


def test_the_moved_row_spells_store_and_out_absolute(tmp_path):
    argv = ("--steps", "3", "--store", "store", "--out", "results/x.h5", "--device", "cpu")
    assert crashtest.spelled_in(argv, tmp_path) == (
        "--steps", "3", "--store", str(tmp_path / "store"), "--out",
        str(tmp_path / "results/x.h5"), "--device", "cpu")
    assert crashtest.out_file(argv) == "results/x.h5" and crashtest.out_file(()) == ""


# ---------------------------------------------------------------------------- the CLI wrapper


def run_cli(main, argv=None) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


def wait_for_signal(seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # the handler raises between two bytecodes
        time.sleep(0.01)
    raise AssertionError("no signal arrived")


def test_sigterm_exits_143_saying_how_to_resume_and_restores_the_handlers():
    before = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)]

    @cli
    def main(argv=None):
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signal()

    code, lines = run_cli(main)
    assert code == EXIT_SIGTERM == 143
    assert lines == ["terminated (SIGTERM): finished work is saved; re-run the same command "
                     "to resume"]
    assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)] == before


def test_ctrl_c_exits_130_saying_how_to_resume():
    @cli
    def main(argv=None):
        os.kill(os.getpid(), signal.SIGINT)
        wait_for_signal()

    code, lines = run_cli(main)
    assert code == EXIT_SIGINT == 130 and len(lines) == 1
    assert lines[0].startswith("interrupted: ") and "re-run the same command" in lines[0]


def test_an_interrupt_a_library_turned_into_its_own_error_still_exits_130():
    """matplotlib's C++ helpers report a Ctrl-C as 'ValueError: Invalid bounding box'."""
    @cli
    def main(argv=None):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_signal()
        except KeyboardInterrupt:
            raise ValueError("Invalid bounding box") from None

    code, lines = run_cli(main)
    assert code == 130 and lines[-1].startswith("interrupted: ")


def test_an_interrupted_inner_command_stops_the_outer_one():
    """The pipeline calls each stage's main: Ctrl-C in a stage ends the pipeline with 130
    and one message, not with 'stage failed (exit 130)'."""
    calls = []

    @cli
    def stage(argv=None):
        calls.append("stage")
        raise KeyboardInterrupt

    @cli
    def pipeline(argv=None):
        code = stage([])
        calls.append(f"went on after {code}")
        return 0

    code, lines = run_cli(pipeline)
    assert code == 130 and calls == ["stage"] and len(lines) == 1


def test_a_user_error_in_an_inner_command_is_still_its_exit_status():
    from runs.errors import UserError

    @cli
    def stage(argv=None):
        raise UserError("bad flag --x")

    @cli
    def pipeline(argv=None):
        return 5 if stage([]) == 2 else 0

    code, lines = run_cli(pipeline)
    assert code == 5 and lines == ["error: bad flag --x"]


# ---------------------------------------------------------------------------- the harness


def tiny_checkpoint(path, seed=0, step=3):
    model = create_model("convnet", num_classes=4, width=0.125, seed=seed)
    return save_checkpoint(path, model, step, config={"lr": 0.1})


def tiny_result(path, value=1.0, done_cells=2):
    with create_result(path, "interpolate", {"alpha": [0.0, 0.5, 1.0]},
                       {"loss": MetricSpec(("alpha",), "nats", "loss")}, ("alpha",), {}, [],
                       "cpu") as result:
        for cell in range(done_cells):
            result.write((cell,), loss=value + cell)


def twin_folders(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        tiny_checkpoint(folder / "run" / "step_0000003.pt")
        tiny_result(folder / "r.h5")
        (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    return folders


def test_the_harness_finds_twin_folders_equal_whatever_the_process_rng(tmp_path):
    a, b = twin_folders(tmp_path)
    torch.manual_seed(123)  # the global RNG state travels in checkpoints: not compared
    tiny_checkpoint(b / "run" / "step_0000003.pt")
    assert crashtest.compare_folders(a, b) == []


@pytest.mark.parametrize("change, found", [
    ("weight", "run/step_0000003.pt: differs in model"),
    ("cell", "r.h5: metric 'loss' differs"),
    ("done", "r.h5: done mask differs"),
    ("jsonl", "metrics.jsonl: contents differ"),
    ("extra", "only in the killed run: run/resume.pt"),
    ("missing", "only in the uninterrupted run: metrics.jsonl"),
])
def test_the_harness_notices_each_kind_of_difference(tmp_path, change, found):
    a, b = twin_folders(tmp_path)
    if change == "weight":
        tiny_checkpoint(b / "run" / "step_0000003.pt", seed=1)
    elif change == "cell":
        (b / "r.h5").unlink()
        tiny_result(b / "r.h5", value=1.5)
    elif change == "done":
        (b / "r.h5").unlink()
        tiny_result(b / "r.h5", done_cells=3)
    elif change == "jsonl":
        (b / "metrics.jsonl").write_text('{"step": 2}\n')
    elif change == "extra":
        tiny_checkpoint(b / "run" / "resume.pt")
    else:
        (b / "metrics.jsonl").unlink()
    assert found in crashtest.compare_folders(a, b)


def test_the_watch_notices_changed_finished_work_and_files_that_do_not_open(tmp_path):
    folder = twin_folders(tmp_path)[0]
    watch = crashtest.Watch()
    assert watch.check(folder) == [] and watch.opened == 2
    tiny_checkpoint(folder / "run" / "step_0000003.pt", seed=1)  # a kept step rewritten
    with h5py.File(folder / "r.h5", "r+") as file:
        file["loss"][0] = np.float32(7.0)  # a done cell recomputed differently
    (folder / "run" / "step_0000009.pt").write_bytes(b"PK\x03\x04 half a zip")
    problems = watch.check(folder)
    assert "run/step_0000003.pt changed after it was finished" in problems
    assert "r.h5: finished cells of 'loss' were recomputed differently" in problems
    assert any(p.startswith("run/step_0000009.pt does not open after a kill") for p in problems)


def test_kill_targets_cover_every_slice_of_the_run():
    import random
    targets = crashtest.kill_targets(10.0, 20, random.Random(0))
    assert [int(t / 0.5) for t in targets] == list(range(20))
