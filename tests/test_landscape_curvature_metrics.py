"""Curvature as a metric of scans (`landscape.interpolate --metrics hessian-top
hessian-trace`) on a tiny convnet with BatchNorm and digits: at the endpoints the values equal
landscape.curvature's on the checkpoint itself after torch's update_bn (the network whose loss
the scan reports), the trace lies within 3 standard errors of the dense Hessian's, only the
points asked for are evaluated, the values do not depend on --points-per-pass, the student
landscape takes the distillation loss, and bad flags are one line with nothing written."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.optim.swa_utils import update_bn

from landscape.curvature import (
    distillation_loss,
    hessian_operator,
    supervised_loss,
    teacher_targets,
    top_eigen,
)
from landscape.interpolate import InterpolateConfig, main, scan
from landscape.network import Subject
from landscape.points import images, take
from runs.checkpoint import save_checkpoint
from runs.data import load_splits
from runs.gpu_loader import eval_loader
from runs.models import create_model
from runs.refs import load_head, load_model
from runs.results import open_result
from tests.helpers import run_cli


def run_main(argv: list[str]) -> tuple[int, list[str]]:
    """(exit status, the `error: ...` lines) of the CLI (its first line echoes the command)."""
    code, err = run_cli(main, argv)
    return code, [line for line in err if not line.startswith("python -m ")]

WIDTH = 0.0625  # convnet channels 2, 4, 8: 496 parameters, a dense Hessian in ~1 s
HESSIAN = dict(hessian_k=2, hessian_samples=16, hessian_tol=0.1, hessian_probes=24)
BN = dict(bn_samples=64, bn_batch_size=32)


@pytest.fixture(scope="module")
def digits():
    """The scan's own train split of digits (un-normalised uint8 ImageData)."""
    train, _ = load_splits("digits", "", 0, seed=0, stats="paper")
    return train


@pytest.fixture(scope="module")
def refs(tmp_path_factory, digits) -> list[str]:
    """Two tiny convnets a few SGD steps (train mode: BN statistics move) from two inits."""
    folder = tmp_path_factory.mktemp("curvature_metrics")
    x, y = next(eval_loader(digits, "cpu", 128).epoch(0))
    out = []
    for seed in (0, 1):
        model = create_model("convnet", num_classes=10, width=WIDTH, in_channels=1, seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for _ in range(8):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        out.append(str(save_checkpoint(folder / f"net{seed}.pt", model, 8)))
    return out


def config(refs, **fields) -> InterpolateConfig:
    base = dict(refs=tuple(refs), grid="0,0.5,1", dataset="digits", train_samples=32,
                test_samples=32, metrics=("supervised", "hessian-top", "hessian-trace"),
                **BN, **HESSIAN)
    return InterpolateConfig(**{**base, **fields})


@pytest.fixture(scope="module")
def whole(refs, tmp_path_factory):
    """The 3-point path, curvature at every point, one point at a time (the reference)."""
    path = tmp_path_factory.mktemp("whole") / "path.h5"
    return open_result(scan(config(refs), path, device="cpu", points_per_pass=1))


def endpoint(ref: str, digits, cfg: dict):
    """The checkpoint as the scan's point: BN recalibrated by update_bn on the scan's BN
    images (seed + 1), eval mode; and the Hessian's (images, labels) batch (seed + 2)."""
    model = load_model(ref).model
    bn = eval_loader(take(digits, cfg["bn_samples"], cfg["seed"] + 1, ""), "cpu",
                     cfg["bn_batch_size"])
    update_bn(list(images(bn)), model)
    batch = next(eval_loader(take(digits, cfg["hessian_samples"], cfg["seed"] + 2, ""),
                             "cpu", 512).epoch(0))
    return model.eval(), batch


def dense_trace(model, x, y) -> float:
    """tr(H) of the mean cross-entropy from torch.autograd.functional.hessian, BN in eval."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(vector):
        chunks = vector.split([p.numel() for p in params.values()])
        state = {n: c.view(p.shape) for (n, p), c in zip(params.items(), chunks)}
        return F.cross_entropy(functional_call(model, {**state, **buffers}, (x,)), y)
    return float(torch.autograd.functional.hessian(loss, flat, vectorize=True).trace())


def test_endpoints_equal_the_operator_on_each_recalibrated_checkpoint(whole, refs, digits):
    cfg = whole.config
    assert whole.attrs["hessian_loss"] == "supervised"
    assert list(whole.coords["eigen"]) == [0, 1]
    for alpha, ref in ((0.0, refs[0]), (1.0, refs[1])):
        model, (x, y) = endpoint(ref, digits, cfg)
        op = hessian_operator(model, supervised_loss, [(x, y)])
        expected = top_eigen(op, 2, tol=cfg["hessian_eigen_tol"], seed=cfg["seed"],
                             vectors=False).values
        i = list(whole.coords["alpha"]).index(alpha)
        assert whole.metrics["hessian_top"][i] == pytest.approx(expected, rel=1e-5), alpha
        assert expected[0] >= expected[1] > 0
    own = hessian_operator(load_model(refs[1]).model, supervised_loss, [(x, y)])  # no recal
    unrecalibrated = top_eigen(own, 1, seed=cfg["seed"], vectors=False).values[0]
    assert whole.metrics["hessian_top"][2, 0] != pytest.approx(unrecalibrated, rel=0.05)


def test_trace_lies_within_three_standard_errors_of_the_dense_trace(whole, refs, digits):
    for alpha, ref in ((0.0, refs[0]), (1.0, refs[1])):
        model, (x, y) = endpoint(ref, digits, whole.config)
        exact = dense_trace(model, x, y)
        i = list(whole.coords["alpha"]).index(alpha)
        value, se = whole.metrics["hessian_trace"][i], whole.metrics["hessian_trace_se"][i]
        assert 0 < se < abs(value)
        assert abs(value - exact) <= 3 * se, (alpha, value, se, exact)


def test_points_per_pass_gives_the_same_curvature(whole, refs, tmp_path):
    batched = open_result(scan(config(refs), tmp_path / "p3.h5", device="cpu",
                               points_per_pass=3))
    for name in ("hessian_top", "hessian_trace", "hessian_trace_se"):
        np.testing.assert_array_equal(batched.metrics[name], whole.metrics[name], name)
    np.testing.assert_allclose(batched.metrics["loss"], whole.metrics["loss"], rtol=1e-5)


@pytest.mark.parametrize("per_pass", [1, 3])
def test_hessian_at_evaluates_only_those_points(whole, refs, tmp_path, per_pass):
    cfg = config(refs, hessian_at="0.5")
    only = open_result(scan(cfg, tmp_path / "mid.h5", device="cpu", points_per_pass=per_pass))
    assert only.done.all()
    for name in ("hessian_top", "hessian_trace", "hessian_trace_se"):
        values = only.metrics[name]
        assert np.isnan(values[[0, 2]]).all(), name
        np.testing.assert_array_equal(values[1], whole.metrics[name][1], name)
    np.testing.assert_allclose(only.metrics["loss"], whole.metrics["loss"], rtol=1e-5)
    assert not np.isnan(only.metrics["error"]).any()


@pytest.mark.parametrize("flags, says", [
    (["--hessian-k", "0"], "--hessian-k 0: must be at least 1"),
    (["--hessian-k", "100000"], "--hessian-k 100000: must lie in 1..496"),
    (["--hessian-tol", "0"], "--hessian-tol 0.0: must be a positive number"),
    (["--hessian-probes", "1"], "--hessian-probes 1: must be at least 2"),
    (["--hessian-at", "0.3"], "--hessian-at 0.3: not a point of the scan's grid (0, 0.5, 1)"),
    (["--hessian-beta-at", "0"], "--hessian-beta-at 0: the scan has no beta axis"),
])
def test_bad_flags_are_one_line_and_write_nothing(refs, tmp_path, flags, says):
    out = tmp_path / "bad.h5"
    code, err = run_main([*refs, "--grid", "0,0.5,1", "--dataset", "digits", "--metrics",
                          "supervised", "hessian-top", "--device", "cpu", "--out", str(out),
                          *flags])
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not out.exists()


def test_hessian_at_without_a_hessian_metric_is_refused(refs, tmp_path):
    code, err = run_main([*refs, "--dataset", "digits", "--metrics", "supervised",
                          "--hessian-at", "0", "--device", "cpu", "--out", str(tmp_path / "x.h5")])
    assert code == 2 and len(err) == 1 and "add one of them to --metrics" in err[0], err


def test_resume_with_other_hessian_options_is_refused(refs, tmp_path):
    path = tmp_path / "resume.h5"
    cfg = config(refs, hessian_at="0")
    scan(cfg, path, device="cpu", stop_after=0)  # the file exists, no point done
    again = ["--grid", "0,0.5,1", "--dataset", "digits", "--train-samples", "32",
             "--test-samples", "32", "--bn-samples", "64", "--bn-batch-size", "32",
             "--metrics", "supervised", "hessian-top", "hessian-trace", "--hessian-samples",
             "16", "--hessian-tol", "0.1", "--hessian-probes", "24", "--hessian-at", "0",
             "--device", "cpu", "--out", str(path)]
    code, err = run_main([*refs, *again, "--hessian-k", "3"])
    assert code == 2 and len(err) == 1 and "hessian_k" in err[0], err
    code, err = run_main([*refs, *again, "--hessian-k", "2"])  # the same: resumes
    assert code == 0, err
    assert open_result(path).done.all()


def test_student_landscape_takes_the_distillation_loss(tmp_path):
    """--teacher without supervised metrics: the Hessian of H(t, s) over encoder + head, at
    the trained student equal to the operator on it (BN recalibrated as the scan does)."""
    from runs.engines.distill import DistillConfig, distill
    cfg = DistillConfig(model="convnet", width=0.0625, dataset="digits", teacher_seed=7,
                        alpha=1.0, out_dim=16, hidden_dim=8, bottleneck_dim=4, batch_size=32,
                        num_steps=4)
    run = str(distill(cfg, tmp_path / "store", device="cpu").path)
    scanned = config([f"{run}@init", f"{run}@last"], grid="0,1", metrics=("hessian-top",),
                     teacher=f"{run}@init:teacher", hessian_at="1", dataset="",
                     hessian_samples=16)
    result = open_result(scan(scanned, tmp_path / "s.h5", device="cpu"))
    assert result.attrs["hessian_loss"] == "distill"
    assert np.isnan(result.metrics["hessian_top"][0]).all()
    train, _ = load_splits("digits", "", 0, seed=0, stats=result.config["input_stats"])
    model, (x, _) = endpoint(f"{run}@last", train, result.config)
    subject = Subject(model.encoder, None, load_head(f"{run}@last")).eval()
    teacher = load_model(f"{run}@init:teacher").model.eval()
    head = load_head(f"{run}@init:teacher").eval()
    probs = teacher_targets(lambda images: head(teacher.encoder(images)), [x])
    op = hessian_operator(subject, distillation_loss(1.0), [(x, probs[0])])
    expected = top_eigen(op, 2, tol=1e-4, seed=0, vectors=False).values
    assert result.metrics["hessian_top"][1] == pytest.approx(expected, rel=1e-4)


def test_python_api_gives_the_cli_values(whole, refs):
    """landscape.path on the same networks in memory: the same curvature at alpha = 1."""
    import landscape
    a, b = (load_model(ref).model for ref in refs)
    options = {**BN, **HESSIAN, "train_samples": 32, "test_samples": 32}
    ds = landscape.path(a, b, "digits", [0.0, 0.5, 1.0], metrics=("hessian-top",),
                        hessian_at="1", device="cpu", **options)
    assert ds.attrs["hessian_loss"] == "supervised"
    assert np.isnan(ds.hessian_top.sel(alpha=0.5)).all()
    np.testing.assert_array_equal(ds.hessian_top.sel(alpha=1.0), whole.metrics["hessian_top"][2])


def test_a_point_whose_loss_is_nan_gets_nan_curvature():
    """A diverged point (its loss NaN) holds NaN curvature instead of stopping the scan."""
    from landscape.point_curvature import Curvature, point_curvature
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    batches = [(torch.randn(5, 1, 2, 2), torch.arange(5) % 3)]
    names = [n for n, _ in model.named_parameters()]
    out = point_curvature(model, batches, names, Curvature(k=2),
                          ("hessian-top", "hessian-trace"))
    assert out["hessian_top"].shape == (1, 2) and torch.isnan(out["hessian_top"]).all()
    assert torch.isnan(out["hessian_trace"]).all() and torch.isnan(out["hessian_trace_se"]).all()
