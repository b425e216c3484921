"""K distillations trained together (runs.engines.distill_parallel) equal the same runs
distilled one by one: students, BN statistics, AdamW moments, centres, metrics, probes,
DONE; a kill resumes all K bit for bit; runs of different shapes are refused naming the
setting."""

import dataclasses

import numpy as np
import pytest
import torch

from runs.checkpoint import read_checkpoint
from runs.engines import distill_parallel
from runs.engines.distill import DistillConfig, distill, load_data
from runs.engines.distill_parallel import check_shared, distill_together
from runs.errors import UserError
from runs.results import open_result
from runs.store import Run
from tests.helpers import assert_same, killed_on_call

# toy at 8x8 (as tests/test_distill.py): 256 train images, 8 steps of 32 an epoch; 12 steps
# end mid-epoch 2; a probe every epoch; the centre on.
BASE = DistillConfig(model="convnet", width=0.125, dataset="toy", data_options=("side=8",),
                     out_dim=256, hidden_dim=64, bottleneck_dim=16, batch_size=32,
                     num_steps=12, lr=1e-3, weight_decay=0.04, centering=True, probe_every=1)
K = 3
# float32: a grouped convolution sums in another order than K plain ones, so gradients
# agree to ~1e-5 of their largest element; AdamW divides each by its own RMS, so an element
# near 0 (1e-9, rounding 1e-10) moves its weight by a visible part of lr. A wrong update
# (a run's moment or gradient in another run's place) moves weights by ~lr = 1e-3.
ATOL = 1e-6  # centres, BN statistics, metrics
WEIGHT_ATOL = BASE.lr / 200
MOMENT_RTOL = 1e-4  # of the largest |moment| of the tensor


def seeds(base: DistillConfig = BASE) -> list[DistillConfig]:
    """K runs of one shape: their own seeds, teachers, alpha, init noise and kept steps."""
    return [dataclasses.replace(base, seed=0, teacher_seed=7, alpha=0.0, save_at=(8,)),
            dataclasses.replace(base, seed=1, alpha=0.5, init_noise=0.01, save_at=(3,)),
            dataclasses.replace(base, seed=2, alpha=1.0)]


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=what)


def close_state(a: dict, b: dict, what: str) -> None:
    """Weights to WEIGHT_ATOL, BN buffers to ATOL."""
    assert a.keys() == b.keys(), what
    for name, value in a.items():
        close(value, b[name], f"{what} {name}", ATOL if "running" in name else WEIGHT_ATOL)


def assert_runs_equal(solo: Run, together: Run) -> None:
    """Every kept checkpoint (student, head, BN buffers, AdamW moments, centre, epoch sums),
    the metrics (losses, k-NN) and the summary of two runs agree to float32 rounding; the
    moments (sums of gradients, summed in another order) relatively."""
    assert solo.path.name == together.path.name and solo.steps() == together.steps()
    for step in solo.steps():
        a, b = (read_checkpoint(r.ckpt_path(step)) for r in (solo, together))
        assert a["step"] == b["step"] == step
        close_state(a["model"]["state"], b["model"]["state"], f"step {step}")
        close_state(a["modules"]["head"]["state"], b["modules"]["head"]["state"],
                    f"head at {step}")
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
        assert state_a.keys() == state_b.keys() and (step > 0) == bool(state_a)
        for i in state_a:
            assert torch.equal(state_a[i]["step"], state_b[i]["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                scale = MOMENT_RTOL * state_a[i][key].abs().max().item()
                close(state_a[i][key], state_b[i][key], f"{key} {i} at {step}", scale)
        close(a["extra"]["center"], b["extra"]["center"], f"centre at {step}")
        assert a["extra"]["epoch_count"] == b["extra"]["epoch_count"]
    metrics_a, metrics_b = solo.metrics(), together.metrics()
    assert [(m["step"], m["epoch"]) for m in metrics_a] == \
        [(m["step"], m["epoch"]) for m in metrics_b]
    for m_a, m_b in zip(metrics_a, metrics_b):
        assert m_a.keys() == m_b.keys()
        for key in m_a:
            assert m_b[key] == pytest.approx(m_a[key], abs=1e-6), key
    assert together.done and together.summary() == pytest.approx(solo.summary(), abs=1e-6)


def assert_identical(a: Run, b: Run) -> None:
    """Two runs hold the same files, checkpoints, metrics, result arrays and summary."""
    files = sorted(p.relative_to(a.path) for p in a.path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.path) for p in b.path.rglob("*") if p.is_file())
    for step in a.steps():
        x, y = (read_checkpoint(r.ckpt_path(step)) for r in (a, b))
        for key in ("step", "model", "modules", "optimizer", "config"):
            assert_same(x[key], y[key], f"{key} at {step}")
        assert_same(x["extra"], y["extra"], f"extra at {step}")
    assert a.metrics() == b.metrics() and a.summary() == b.summary()
    ra, rb = (open_result(r.path / "distill.h5", "distill") for r in (a, b))
    for name in ("knn_accuracy", "loss", "kl", "teacher_entropy"):
        np.testing.assert_array_equal(ra.metrics[name], rb.metrics[name], err_msg=name)


@pytest.fixture(scope="module")
def toy_data():
    return load_data(BASE)


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory, toy_data):
    store = tmp_path_factory.mktemp("solo")
    return [distill(cfg, store, toy_data, "cpu") for cfg in seeds()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, toy_data):
    store = tmp_path_factory.mktemp("together")
    return distill_together(seeds(), store, toy_data, "cpu", parallel_runs=K)


def test_distillations_together_equal_one_by_one(one_by_one, uninterrupted):
    for solo, together in zip(one_by_one, uninterrupted):
        assert_runs_equal(solo, together)
        probed = [m for m in together.metrics() if m["knn_student"] is not None]
        assert [m["epoch"] for m in probed] == [0, 1, 2]  # every epoch's k-NN probe
    state = read_checkpoint(uninterrupted[1].ckpt_path(12))["model"]["state"]
    assert int(state["encoder.1.num_batches_tracked"]) == 12  # BN stepped once per step


def test_without_centering_too(tmp_path, toy_data):
    configs = seeds(dataclasses.replace(BASE, centering=False, num_steps=4, probe_every=0))
    together = distill_together(configs[:2], tmp_path / "a", toy_data, "cpu", parallel_runs=2)
    for cfg, run in zip(configs, together):
        solo = distill(cfg, tmp_path / "b", toy_data, "cpu")
        a, b = (read_checkpoint(r.ckpt_path(4)) for r in (solo, run))
        assert "center" not in b["extra"]
        close_state(a["model"]["state"], b["model"]["state"], "step 4")


def test_killed_together_resumes_all_to_the_same_files(tmp_path, toy_data, uninterrupted):
    configs = seeds()
    stopped = distill_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K, stop_at=6)
    assert all(not r.done and (r.path / "ckpt" / "resume.pt").is_file() for r in stopped)
    runs = distill_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    for clean, together in zip(uninterrupted, runs):
        assert_identical(clean, together)
        assert not list((together.path / "ckpt").glob("resume*"))


def test_a_kill_between_the_groups_saves_resumes_bit_for_bit(tmp_path, toy_data,
                                                             uninterrupted):
    """Killed after the first run wrote its epoch-end state and before the others did: the
    re-run takes every run back to the step all hold and distils them together again."""
    configs = seeds()
    with killed_on_call(distill_parallel, "save_resume", 2) as calls:
        distill_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    assert [step for _, step in calls] == [8, 8]  # the first epoch end: run 0 wrote, run 1 not
    runs = distill_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    for clean, together in zip(uninterrupted, runs):
        assert_identical(clean, together)


@pytest.mark.parametrize("field,value,flag", [("lr", 2e-3, "--lr"),
                                              ("out_dim", 128, "--out-dim")])
def test_distillations_of_different_shapes_are_refused_naming_the_flag(tmp_path, toy_data,
                                                                       field, value, flag):
    configs = seeds()
    configs[2] = dataclasses.replace(configs[2], **{field: value})
    with pytest.raises(UserError, match=f"{flag} "):
        distill_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    assert not any(tmp_path.iterdir())  # refused before any run folder
    check_shared(seeds())  # what only changes the init may differ


def test_pipeline_distills_each_groups_seeds_together(tmp_path, monkeypatch):
    """runs.pipeline with parallel_runs != 1: the seeds of a group are distilled together
    (not the data-size groups, which hold other data), and end as the runs trained alone."""
    from runs.studies.pipeline import Layout, distill_stage
    fields = {f.name: getattr(BASE, f.name) for f in dataclasses.fields(BASE)
              if f.name not in ("save_at", "num_steps")}
    preset = {"distill": {**fields, "probe_every": 0, "steps": "5", "save_at": [3]},
              "seeds": [0, 1], "subsets": [10]}
    real, groups = distill_parallel.distill_together, []

    def spy(configs, *args, **kwargs):
        groups.append([(c.seed, c.subset, c.num_steps, c.save_at) for c in configs])
        return real(configs, *args, **kwargs)

    monkeypatch.setattr(distill_parallel, "distill_together", spy)
    together = distill_stage(preset, Layout(tmp_path / "a"), "cpu", 2)
    assert groups == [[(0, 0, 5, (3,)), (1, 0, 5, (3,))]]
    alone = distill_stage(preset, Layout(tmp_path / "b"), "cpu")
    assert len(groups) == 1 and together.keys() == alone.keys()
    for group in alone:
        for solo, run in zip(alone[group], together[group]):
            assert_runs_equal(solo, run)


def test_parallel_count_is_one_on_the_cpu_and_refuses_negatives(toy_data):
    from runs.engines.parallel import parallel_count

    def count(requested):
        return parallel_count(requested, [BASE], toy_data, "cpu",
                              distill_parallel.auto_parallel_runs)

    assert count(0) == 1 and count(4) == 4
    with pytest.raises(UserError, match="--parallel-runs -1"):
        count(-1)


@pytest.mark.gpu
def test_on_cuda_auto_stacks_several_distillations_near_alone(tmp_path, toy_data):
    """CUDA: auto picks several runs for a tiny model, and fp32 runs trained together end
    near the same runs trained alone (TF32 as configured)."""
    assert distill_parallel.auto_parallel_runs(BASE, toy_data, "cuda") >= 2
    configs = seeds()
    together = distill_together(configs, tmp_path / "a", toy_data, "cuda", "fp32", K)
    for cfg, run in zip(configs, together):
        alone = distill(cfg, tmp_path / "b", toy_data, "cuda", "fp32")
        a, b = (read_checkpoint(r.ckpt_path(12))["model"]["state"] for r in (alone, run))
        for name, value in a.items():
            torch.testing.assert_close(b[name], value, atol=1e-3, rtol=1e-3, msg=name)
