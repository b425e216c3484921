"""runs.studies.bench.parallel (`python -m runs.bench --sections parallel`): K runs trained
together (runs.engines.parallel.Stack) against the same K runs in turn, at tiny sizes through
the real code. Speed is never asserted: only the layout, the arithmetic of the recorded
numbers and the equivalence check."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from runs.studies.bench import cli
from runs.studies.bench.common import QUICK, Bench, synthetic_images
from runs.studies.bench.parallel import (
    max_difference,
    parallel_bench,
    runs_per_hour,
    sequential,
    together,
)
from runs.studies.bench.report import ORDER, SECTIONS, goal_rows

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = dataclasses.replace(
    QUICK, num_images=32, warmup=1, workers=0, parallel_models=("resnet20", "resnet18"),
    parallel_ks=(1, 3), parallel_batch=4, parallel_width=0.125, parallel_steps=1,
    parallel_rounds=2, parallel_check_steps=2, run_steps=100)


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    """The section run by the CLI at TINY sizes (QUICK patched), its JSON read back."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "QUICK", TINY)
        assert cli.main(["--device", "cpu", "--quick", "--sections", "parallel",
                         "--out", str(out)]) == 0
    (path,) = out.glob("cpu-*-quick.json")
    return json.loads(path.read_text())


def test_section_records_both_paths_per_model_and_k(doc):
    body = doc["sections"]["parallel"]
    assert body["config"]["parallel_ks"] == [1, 3] and body["run_steps"] == 100
    assert set(body["comparisons"]) == {f"{m}_k{k}" for m in ("resnet20", "resnet18")
                                        for k in (1, 3)}
    assert body["ks_note"] == "not measured: K = 2, 4, 8, 16"
    for name, comp in body["comparisons"].items():
        k = comp["k"]
        assert name == f"{comp['model']}_k{k}" and comp["unit"] == "images/s"
        assert comp["flops_per_item"] > 0
        for path in ("together", "sequential"):
            rec = comp["paths"][path]
            assert rec["k"] == k and rec["steps"] == 1 and rec["items"] == k * 4
            assert len(rec["round_seconds"]) == 2
            for key in ("rate", "runs_per_hour", "gflop_per_s", "seconds_per_step"):
                assert math.isfinite(rec[key]) and rec[key] > 0, (name, path, key)
            assert rec["mfu"] is None  # no peak on a CPU
            # runs/hour = 3600 / (seconds per step x run_steps) x K, from the record
            assert rec["runs_per_hour"] == pytest.approx(
                3600 / (rec["seconds_per_step"] * 100) * k)
            assert rec["rate"] == pytest.approx(rec["items"] / rec["seconds"])
        tog, seq = comp["paths"]["together"], comp["paths"]["sequential"]
        assert comp["ratio"] == pytest.approx(tog["rate"] / seq["rate"])
        assert comp["ratio"] == pytest.approx(tog["runs_per_hour"] / seq["runs_per_hour"])


def test_stacked_runs_equal_the_runs_in_turn(doc):
    body = doc["sections"]["parallel"]
    for comp in body["comparisons"].values():
        checks = comp["checks"]
        assert checks["weights_match"] is True and checks["max_abs_diff"] <= 1e-4
        assert checks["checked_steps"] == 2 and checks["checked_in"] == "float64"
        assert math.isfinite(checks["max_abs_diff_timed"])
    assert body["all_weights_match"] is True


def test_the_cpu_default_trains_in_turn_and_is_judged_on_that_path(doc):
    """--parallel-runs' auto default is 1 on a CPU: the runs train in turn, the reference
    itself (ratio 1.0), and the CPU rule reads that path; no 5x speed-up goal judges the
    section."""
    body = doc["sections"]["parallel"]
    for name in ("resnet20", "resnet18"):
        assert body["defaults"][name] == {"parallel_runs": 1, "path": "sequential",
                                          "ratio": 1.0, "at_least_reference": True}
    assert {c["default_path"] for c in body["comparisons"].values()} == {"sequential"}
    rows = [r for r in doc["goals"] if r["measured"].startswith("parallel/")]
    assert rows and all(r["goal"].startswith("CPU quick sizes") for r in rows)
    assert all(r["value"] == 1.0 and r["met"] is True for r in rows)


def test_the_k8_resnet20_goal_reads_its_ratio():
    def comp(ratio):
        return {"ratio": ratio, "paths": {"together": {}, "sequential": {}}, "checks": {}}

    sections = {"parallel": {"comparisons": {"resnet20_k8": comp(4.5),
                                             "resnet20_k1": comp(0.9)}}}
    rows = goal_rows(sections)
    assert [(r["measured"], r["met"]) for r in rows] == [("parallel/resnet20_k8", True)]
    sections["parallel"]["comparisons"]["resnet20_k8"] = comp(3.0)
    assert [r["met"] for r in goal_rows(sections)] == [False]
    assert "parallel" in ORDER and "parallel" in SECTIONS
    assert "parallel)" in (ROOT / "bench" / "gpu_check.sh").read_text()


def test_the_check_sees_a_difference():
    """max_difference is no vacuous check: after two float64 steps each way the runs agree,
    and a weight moved by 1e-3 in one run shows as 1e-3."""
    bench = parallel_bench(Bench(TINY, CPU), "resnet20")
    data = synthetic_images(16, seed=0)
    runners = [together(bench, data, 2, False, torch.float64),
               sequential(bench, data, 2, False, torch.float64)]
    for runner in runners:
        for _ in range(2):
            runner.step()
    stack, sessions = runners[0].session, runners[1].session
    assert max_difference(stack, sessions) < 1e-10
    with torch.no_grad():
        next(sessions[1].model.parameters()).view(-1)[0] += 1e-3
    assert max_difference(stack, sessions) == pytest.approx(1e-3, rel=1e-6)


def test_runs_per_hour():
    assert runs_per_hour(0.5, 3600, 8) == pytest.approx(16.0)  # 8 runs per 1800 s
