"""python -m landscape.hessian end to end on a tiny convnet with BatchNorm on digits: top
eigenvalues against the dense Hessian (torch.autograd.functional.hessian + eigvalsh, float64),
eigenvectors against plain double-backward products, layer traces summing to the trace, the
density integrating to 1, readable labels, parameter counts, the distillation loss against a
teacher, resume after a kill, and every bad input in one line with nothing written."""

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from torch.func import functional_call

from landscape import curvature
from landscape.hessian import HessianConfig, main, measure_checkpoints
from landscape.network import Subject
from landscape.points import take
from runs.checkpoint import save_checkpoint
from runs.data import load_dataset
from runs.engines.distill import DistillConfig, distill
from runs.engines.train import TrainConfig, train
from runs.gpu_loader import eval_loader
from runs.refs import load_head, load_model
from runs.results import open_result

TRAIN = TrainConfig(model="convnet", width=0.125, dataset="digits", batch_size=64, num_steps=6,
                    lr=0.05, save_at=(3,))
DISTILL = DistillConfig(model="convnet", width=0.125, dataset="digits", teacher_seed=7,
                        alpha=1.0, out_dim=32, hidden_dim=16, bottleneck_dim=8, batch_size=64,
                        num_steps=4)
SAMPLES = 48
FAST = ["--samples", str(SAMPLES), "--device", "cpu", "--trace-probes", "5:30",
        "--slq-runs", "2", "--slq-steps", "20"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A supervised run (checkpoints at steps 0, 3, 6), a distillation run, a checkpoint
    whose loss is NaN (finite weights, a negative BN variance) and a finished result."""
    store = tmp_path_factory.mktemp("hessian_store")
    supervised = str(train(TRAIN, store, device="cpu").path)
    student = str(distill(DISTILL, store, device="cpu").path)
    model = load_model(f"{supervised}@last").model
    model.encoder[1].running_var.fill_(-1.0)
    broken = save_checkpoint(store / "broken.pt", model, 0)
    done = store / "done.h5"
    code, err = run_cli(main, [f"{supervised}@last", "--params", "fc", "--measures", "trace",
                               "--out", str(done), *FAST])
    assert code == 0, err
    return {"run": supervised, "student": student, "broken": str(broken), "done": done}


def samples(count: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels the command measures: `count` of digits' train split drawn
    with seed 0, in one normalised batch (paper statistics, as the runs trained with)."""
    data = take(load_dataset("digits", split="train"), count, 0, "")
    x, y = next(iter(eval_loader(data, "cpu", 10_000).epoch(0)))
    return x.double(), y


def subject_of(ref: str, head: bool = False) -> Subject:
    """encoder + fc (or + DINO head) in float64, eval mode: the command's parameter names."""
    model = load_model(ref).model
    parts = (model.encoder, None, load_head(ref)) if head else (model.encoder, model.fc)
    return Subject(*parts).double().eval()


def flat_loss(subject: Subject, names: list[str], loss_of, x):
    """(loss(flat), flat point) of the named parameters, all else fixed."""
    state = {**{k: v.detach() for k, v in subject.named_parameters()},
             **dict(subject.named_buffers())}
    shapes = [state[n].shape for n in names]

    def loss(flat):
        chunks = flat.split([math.prod(s) for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, chunks, shapes)}
        return loss_of(functional_call(subject, {**state, **params}, (x,)))
    return loss, torch.cat([state[n].reshape(-1) for n in names])


def supervised_hessian(ref: str, names: list[str]) -> torch.Tensor:
    x, y = samples()
    loss, point = flat_loss(subject_of(ref), names,
                            lambda out: F.cross_entropy(out["logits"], y), x)
    return torch.autograd.functional.hessian(loss, point)


def flat_vectors(entry: dict) -> tuple[list[str], torch.Tensor]:
    """(parameter names, (k, n) float64) of one checkpoint's saved eigenvectors."""
    names = list(entry["vectors"])
    rows = [entry["vectors"][n].reshape(len(entry["eigenvalues"]), -1) for n in names]
    return names, torch.cat(rows, 1).double()


def test_top_eigenvalues_match_the_dense_hessian(runs, tmp_path):
    """--params fc: the fc's 170 parameters, the dense float64 Hessian as the oracle, every
    measure at once; labels are the runs' readable names; the eigenvectors file holds
    eigenvectors of the same Hessian, one tensor per parameter."""
    refs = [f"{runs['run']}@init", f"{runs['run']}@last"]
    out, vectors = tmp_path / "h.h5", tmp_path / "v.pt"
    code, err = run_cli(main, [*refs, "--params", "fc", "--eigen-tol", "1e-6",
                               "--out", str(out), "--eigenvectors", str(vectors), *FAST])
    assert code == 0, err
    data = open_result(out, "hessian")
    labels = list(data.coords["checkpoint"])
    assert labels == ["supervised s0 init", "supervised s0 @6"]
    for label in labels:  # one progress line per checkpoint
        assert any(line.startswith(f"hessian: {label}: loss") and "HVPs" in line
                   for line in err), err
    assert data.attrs["bn_mode"] == "checkpoint" and data.config["loss"] == "supervised"
    assert [r["label"] for r in data.attrs["inputs"]] == labels
    assert list(data.coords["layer"]) == ["fc"] and data.done.all()
    saved = torch.load(vectors, weights_only=True)["checkpoints"]
    for i, ref in enumerate(refs):
        hessian = supervised_hessian(ref, ["fc.weight", "fc.bias"])
        exact = torch.linalg.eigvalsh(hessian).flip(0).numpy()  # descending
        np.testing.assert_allclose(data.metrics["eigenvalue"][i], exact[:5], rtol=1e-4)
        assert data.metrics["param_count"][i] == 170 == data.metrics["layer_size"][i, 0]
        assert data.metrics["layer_trace"][i].sum() == pytest.approx(
            data.metrics["trace"][i], rel=1e-9)
        error = abs(data.metrics["trace"][i] - float(hessian.trace()))
        assert error <= 3 * data.metrics["trace_se"][i]
        density, grid = data.metrics["density"][i], data.metrics["density_eigenvalue"][i]
        assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-6)
        entry = saved[labels[i]]
        assert entry["vectors"]["fc.weight"].shape == (5, 10, 16)
        names, flat = flat_vectors(entry)
        assert names == ["fc.weight", "fc.bias"]
        for value, vector in zip(entry["eigenvalues"], flat):
            assert (hessian @ vector - value * vector).norm() <= 1e-3 * abs(value)


@pytest.mark.parametrize("params", ["encoder", "fc", "all"])
def test_params_select_the_right_parameters(runs, tmp_path, params):
    ref = f"{runs['run']}@last"
    model = load_model(ref).model
    count = {"encoder": sum(p.numel() for p in model.encoder.parameters()),
             "fc": sum(p.numel() for p in model.fc.parameters())}
    count["all"] = count["encoder"] + count["fc"]
    out = tmp_path / "p.h5"
    code, err = run_cli(main, [ref, "--params", params, "--measures", "top", "--top-k", "1",
                               "--eigen-steps", "5", "--samples", "8", "--device", "cpu",
                               "--out", str(out)])
    assert code == 0, err
    data = open_result(out)
    assert data.metrics["param_count"][0] == count[params]
    assert data.metrics["layer_size"][0].sum() == count[params]
    layers = list(data.coords["layer"])
    assert ("fc" in layers) == (params != "encoder")
    assert all(name.startswith("encoder.") for name in layers if name != "fc")
    assert data.metrics["hvp_count"][0] == 5


def test_distill_loss_against_a_teacher(runs, tmp_path):
    """The student (encoder + head) and the teacher itself under the distillation loss:
    the loss is H(t, s) of the heads' softmaxes, and each saved top eigenpair satisfies
    H v = l v with H v from plain double-backward on that loss in float64."""
    student, teacher = f"{runs['student']}@last", f"{runs['student']}@init:teacher"
    out, vectors = tmp_path / "d.h5", tmp_path / "dv.pt"
    code, err = run_cli(main, [student, teacher, "--loss", "distill", "--teacher", teacher,
                               "--measures", "top", "trace", "--top-k", "2",
                               "--eigenvectors", str(vectors), "--out", str(out), *FAST])
    assert code == 0, err
    data = open_result(out)
    labels = list(data.coords["checkpoint"])
    assert labels == ["student α=1 s0 @4", "teacher s0"]
    assert data.attrs["parts"] == "encoder+head" and data.config["teacher"] == teacher
    x, _ = samples()
    with torch.no_grad():
        target = torch.softmax(subject_of(teacher, head=True)(x)["head"], -1)
    saved = torch.load(vectors, weights_only=True)["checkpoints"]
    for i, ref in enumerate((student, teacher)):
        names, flat = flat_vectors(saved[labels[i]])
        loss, point = flat_loss(subject_of(ref, head=True), names, lambda out: -(
            target * F.log_softmax(out["head"], -1)).sum(1).mean(), x)
        assert data.metrics["loss"][i] == pytest.approx(float(loss(point)), rel=1e-5)
        point.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(point), point, create_graph=True)
        for value, vector in zip(saved[labels[i]]["eigenvalues"], flat):
            (product,) = torch.autograd.grad(grad @ vector, point, retain_graph=True)
            assert (product - value * vector).norm() <= 1e-3 * abs(value)
    assert np.isfinite(data.metrics["trace"]).all()


def test_killed_run_resumes_only_the_missing_checkpoint(runs, tmp_path, monkeypatch):
    refs = (f"{runs['run']}@init", f"{runs['run']}@3")
    cfg = HessianConfig(refs=refs, params="fc", samples=SAMPLES, measures=("top", "trace"),
                        trace_probes="5:30", slq_runs=2, slq_steps=20)  # as FAST
    whole = open_result(measure_checkpoints(cfg, tmp_path / "whole.h5", "cpu"))
    path, vectors = tmp_path / "killed.h5", tmp_path / "killed.pt"
    measure_checkpoints(cfg, path, "cpu", vectors=str(vectors), stop_after=1)
    first = open_result(path)
    assert first.done.tolist() == [True, False]
    calls = []
    real = curvature.top_eigen
    monkeypatch.setattr(curvature, "top_eigen", lambda *a, **k: calls.append(1) or real(*a,
                                                                                      **k))
    code, err = run_cli(main, [*refs, "--params", "fc", "--measures", "top", "trace",
                               "--out", str(path), "--eigenvectors", str(vectors), *FAST])
    assert code == 0, err
    assert len(calls) == 1  # the second checkpoint only
    saved = torch.load(vectors, weights_only=True)["checkpoints"]
    assert list(saved) == ["supervised s0 init", "supervised s0 @3"]  # the first one kept
    resumed = open_result(path)
    assert resumed.done.all()
    for name, values in whole.metrics.items():
        np.testing.assert_array_equal(resumed.metrics[name], values, err_msg=name)
    np.testing.assert_array_equal(resumed.metrics["trace"][0], first.metrics["trace"][0])


def test_a_result_measured_with_jvp_resumes_under_the_default_on_a_cpu(runs, tmp_path):
    """--hvp auto (the default: double backward on CPUs) continues a result started with
    jvp (the default before) instead of refusing it as another config; a new file takes
    the device's method."""
    refs = (f"{runs['run']}@init", f"{runs['run']}@3")
    cfg = HessianConfig(refs=refs, params="fc", samples=SAMPLES, measures=("top",))
    path = tmp_path / "jvp.h5"
    measure_checkpoints(dataclasses.replace(cfg, hvp="jvp"), path, "cpu", stop_after=1)
    measure_checkpoints(cfg, path, "cpu")
    resumed = open_result(path)
    assert resumed.done.all() and resumed.config["hvp"] == "jvp"
    fresh = open_result(measure_checkpoints(cfg, tmp_path / "new.h5", "cpu"))
    assert fresh.config["hvp"] == "double-backward"
    np.testing.assert_allclose(fresh.metrics["eigenvalue"], resumed.metrics["eigenvalue"],
                               rtol=1e-3)


BAD = [
    (["{run}@last", "--params", "fc", "--top-k", "171"], "--top-k 171: must lie in 1..170"),
    (["{run}@last", "--trace-tol", "0"], "--trace-tol 0"),
    (["{run}@last", "--trace-tol", "-0.5"], "--trace-tol -0.5"),
    (["{run}@last", "--eigen-tol", "0"], "--eigen-tol 0"),
    (["{run}@last", "{broken}", "--dataset", "digits"], "{broken}: the loss is nan"),
    (["{student}@last", "--loss", "distill"], "--loss distill needs --teacher"),
    (["{run}@last", "--measures", "top", "sharpness"], "unknown measure 'sharpness'"),
    (["{run}@last", "--params", "head"], "--params 'head'"),
    (["{student}@last"], "distillation checkpoint"),
    (["{student}@last", "--loss", "distill", "--teacher", "{student}@init:teacher",
      "--params", "fc"], "--params fc: the network has no fc parameters"),
    (["{run}@last", "--trace-probes", "20:10"], "--trace-probes '20:10'"),
    (["{run}@last", "--density-grid", "5:1:10"], "--density-grid '5:1:10'"),
]


@pytest.mark.parametrize("args, culprit", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(runs, tmp_path, args, culprit):
    """Once into a new path (no file made), once onto a finished result (left as it was)."""
    argv = [a.format(**runs) for a in args] + ["--samples", "8", "--device", "cpu"]
    existing = tmp_path / "existing.h5"
    shutil.copy2(runs["done"], existing)
    before = (existing.read_bytes(), existing.stat().st_mtime_ns)
    for out in (tmp_path / "new.h5", existing):
        code, err = run_cli(main, [*argv, "--out", str(out)])
        assert code == 2, err
        errors = [line for line in err if "error:" in line]
        assert len(errors) == 1 and err[-1].startswith("error: "), err
        assert culprit.format(**runs) in err[-1]
    assert not (tmp_path / "new.h5").exists()
    assert (existing.read_bytes(), existing.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.h5"]


def test_shards_merge_into_the_whole_result(runs, tmp_path):
    from runs.results import merge_results
    refs = [f"{runs['run']}@init", f"{runs['run']}@3", f"{runs['run']}@last"]
    args = [*refs, "--params", "fc", "--measures", "top", "--top-k", "2", *FAST]
    assert run_cli(main, [*args, "--out", str(tmp_path / "whole.h5")])[0] == 0
    shards = []
    for i in range(2):
        assert run_cli(main, [*args, "--out", str(tmp_path / "s.h5"), "--shard", f"{i}/2"])[0] == 0
        shards.append(tmp_path / f"s.shard{i}of2.h5")
    merged = merge_results(tmp_path / "merged.h5", shards)
    whole = open_result(tmp_path / "whole.h5")
    assert merged.done.all()
    np.testing.assert_array_equal(merged.metrics["eigenvalue"], whole.metrics["eigenvalue"])


def test_bf16_products(runs, tmp_path):
    """--precision bf16: double-backward products under autocast stay within a few percent
    of fp32's top eigenvalue; forward-over-reverse either runs or refuses in one line."""
    ref = f"{runs['run']}@last"
    args = [ref, "--params", "all", "--measures", "top", "--top-k", "1", "--samples", "16",
            "--device", "cpu", "--eigen-tol", "1e-2"]
    values = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16", "--hvp",
                                                "double-backward"])):
        out = tmp_path / f"{name}.h5"
        code, err = run_cli(main, [*args, *extra, "--out", str(out)])
        assert code == 0, err
        values[name] = open_result(out)
        assert values[name].config["precision"] == name
    assert values["bf16"].metrics["eigenvalue"][0, 0] == pytest.approx(
        values["fp32"].metrics["eigenvalue"][0, 0], rel=0.1)
    code, err = run_cli(main, [*args, "--precision", "bf16", "--out", str(tmp_path / "j.h5")])
    assert code == 0 or (code == 2 and err[-1].startswith("error: --precision bf16 --hvp jvp")
                         and not (tmp_path / "j.h5").exists()), err
