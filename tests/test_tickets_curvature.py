"""`tickets.imp --curvature` on tiny CPU runs (digits, convnet width 0.125, 2 levels): the
Hessian's top eigenvalue and trace over a ticket's surviving weights, for each level's
trained network and its rewind point, recomputed here from the checkpoints; pruned weights
left out of the operator; no new metric (nor cost) without the flag; resuming a killed
sweep; bad options as one line."""

import contextlib
import io

import numpy as np
import pytest
import torch

import tickets
import tickets.curvature as curvature_module
from landscape.curvature import (
    hessian_operator,
    hutchinson,
    masked_operator,
    supervised_loss,
    top_eigen,
)
from runs.checkpoint import read_checkpoint
from runs.refs import load_model
from runs.results import open_result
from tickets.api import apply_masks
from tickets.curvature import (
    EIGEN_TOL,
    MAX_PROBES,
    MIN_PROBES,
    SEED,
    curvature_batches,
    ticket_curvature,
    ticket_operator,
)
from tickets.imp import cell_config, imp_dir, level_run, main, parser, sweep_from_args
from tickets.mask import num_kept, read_mask

# tests/test_tickets_imp.py's tiny settings: 18 steps per epoch; here 20 steps rewound to
# step 5, two levels, and the curvature on 32 train images to a 25 % relative SE.
TINY = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size", "64",
        "--val-size", "100", "--lr", "0.05", "--steps", "20", "--crop-padding", "0",
        "--no-flip", "--device", "cpu", "--seeds", "0", "--levels", "2", "--rewind", "init@5"]
CURVATURE = ["--curvature", "--curvature-samples", "32", "--curvature-tol", "0.25"]
NUM_STEPS, REWIND_STEP, SAMPLES, TOL = 20, 5, 32, 0.25
METRICS = ("hessian_top", "hessian_trace", "hessian_trace_se")

pytestmark = pytest.mark.slow  # the module's sweep trains 5 runs and takes ~40 HVP-heavy s


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def argv(root, out, *extra) -> list[str]:
    return ["--store", str(root / "store"), "--out", str(root / out), *TINY, *extra]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep with --curvature and the reinit baseline: (root, its argv, its result)."""
    root = tmp_path_factory.mktemp("curv")
    flags = argv(root, "curv.h5", "--baselines", "reinit", *CURVATURE)
    code, _, err = run_main(flags)
    assert code == 0, err
    return root, flags, open_result(root / "curv.h5", "imp")


@pytest.fixture(scope="module")
def sweep(swept):
    return sweep_from_args(parser().parse_args(swept[1]))


@pytest.fixture(scope="module")
def batches(sweep):
    return curvature_batches(sweep.data[0], SAMPLES, torch.device("cpu"))


def direct(model, keep: torch.Tensor, batches) -> dict:
    """The three values from landscape.curvature alone: every parameter's Hessian, then
    restricted to `keep` (flat over named_parameters), as the result should hold them."""
    op = masked_operator(hessian_operator(model, supervised_loss, batches), keep)
    trace = hutchinson(op, TOL, MIN_PROBES, MAX_PROBES, seed=SEED)
    return {"hessian_top": top_eigen(op, 1, EIGEN_TOL, seed=SEED, vectors=False).values[0],
            "hessian_trace": trace.value, "hessian_trace_se": trace.se}


def keep_vector(model, mask: dict) -> torch.Tensor:
    """Hand-built: the mask's entries for the tensors it names, True for the rest."""
    return torch.cat([mask[n].reshape(-1) if n in mask else torch.ones(p.numel(), dtype=bool)
                      for n, p in model.named_parameters()])


def stored(data, branch: int, level: int, at: int) -> dict:
    return {name: data.metrics[name][branch, level, 0, at] for name in METRICS}


def test_the_layout_adds_curvature_at_and_three_metrics(swept):
    data = swept[2]
    assert list(data.coords["curvature_at"]) == ["trained", "rewind"] and data.done.all()
    for name in METRICS:
        assert data.specs[name].dims == ("branch", "level", "seed", "curvature_at")
        assert data.metrics[name].shape == (2, 3, 1, 2) and np.isfinite(data.metrics[name]).all()
    assert (data.metrics["hessian_trace_se"] > 0).all()
    # Hutchinson stopped at the tolerance (or its probe cap): SE <= tol x |trace|
    se, trace = data.metrics["hessian_trace_se"], data.metrics["hessian_trace"]
    assert (se <= TOL * np.abs(trace) + 1e-12).all()
    config = data.config
    assert config["imp"]["curvature"] and config["imp"]["curvature_tol"] == TOL
    assert config["curvature"]["samples"] == SAMPLES and config["curvature"]["trace_tol"] == TOL
    assert config["curvature"]["bn_mode"] == "checkpoint"


def test_trained_entries_equal_the_operator_on_each_trained_checkpoint(swept, sweep, batches):
    for b, branch in enumerate(("ticket", "reinit")):
        for level in (0, 1, 2):
            cfg = cell_config(sweep, 0, branch, level)
            mask = read_mask(cfg.mask) if cfg.mask else {}
            path = level_run(sweep, 0, branch, level).ckpt_path(NUM_STEPS)
            model = load_model(str(path)).model
            expect = direct(model, keep_vector(model, mask), batches)
            for name, value in stored(swept[2], b, level, 0).items():
                assert value == pytest.approx(expect[name], rel=1e-6), (branch, level, name)


def test_rewind_entries_are_the_rewind_checkpoint_under_the_levels_mask(swept, sweep, batches):
    """Level l >= 1 of the ticket: the dense run's step K, its pruned weights zeroed (what
    the level trained from); level 0: the dense step K itself."""
    dense = level_run(sweep, 0, "ticket", 0)
    for level in (0, 1, 2):
        model = load_model(str(dense.ckpt_path(REWIND_STEP))).model
        mask = read_mask(cell_config(sweep, 0, "ticket", level).mask) if level else {}
        apply_masks(model, mask)
        expect = direct(model, keep_vector(model, mask), batches)
        for name, value in stored(swept[2], 0, level, 1).items():
            assert value == pytest.approx(expect[name], rel=1e-6), (level, name)
    # the reinit branch's rewind point is its own fresh start at step K, under the mask
    run = level_run(sweep, 0, "reinit", 2)
    start = read_checkpoint(run.ckpt_path(REWIND_STEP))["model"]["state"]
    assert start["fc.weight"].ne(read_checkpoint(dense.ckpt_path(REWIND_STEP))["model"][
        "state"]["fc.weight"]).any()
    model = load_model(str(run.ckpt_path(REWIND_STEP))).model
    mask = read_mask(cell_config(sweep, 0, "reinit", 2).mask)
    assert swept[2].metrics["hessian_top"][1, 2, 0, 1] == pytest.approx(
        direct(model, keep_vector(model, mask), batches)["hessian_top"], rel=1e-6)


def test_pruned_weights_are_left_out_of_the_operator(sweep, batches):
    cfg = cell_config(sweep, 0, "ticket", 2)
    mask = read_mask(cfg.mask)
    model = load_model(str(level_run(sweep, 0, "ticket", 2).ckpt_path(NUM_STEPS))).model
    op = ticket_operator(model, mask, batches)
    params = dict(model.named_parameters())
    unmasked = sum(p.numel() for n, p in params.items() if n not in mask)  # biases, BN
    assert op.size == num_kept(mask) + unmasked == 1047 + 2 * (4 + 8 + 16) + 10
    # H restricted: the full Hessian's product with v placed on the kept entries, read there
    full = hessian_operator(model, supervised_loss, batches)
    keep = keep_vector(model, mask)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1))
    embedded = torch.zeros(full.size)
    embedded[keep] = v
    assert torch.allclose(op(v), full(embedded)[keep], rtol=1e-5, atol=1e-6)
    # the full Hessian's top eigenvalue bounds the restricted one's (Cauchy interlacing)
    assert top_eigen(full, 1, seed=0).values[0] >= top_eigen(op, 1, seed=0).values[0] - 1e-4


def test_a_nan_loss_names_the_checkpoint(sweep, batches):
    model = load_model(str(level_run(sweep, 0, "ticket", 0).ckpt_path(NUM_STEPS))).model
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    with pytest.raises(Exception, match="step_20.pt: the loss is nan"):
        ticket_curvature(model, {}, batches, TOL, "store/x/ckpt/step_20.pt")


def test_without_the_flag_no_new_metric_nor_cost(swept, monkeypatch):
    """The same store: nothing trains, nothing curves, the old layout and config."""
    root = swept[0]
    monkeypatch.setattr(curvature_module, "ticket_curvature",
                        lambda *a, **k: pytest.fail("curvature computed"))
    code, _, err = run_main(argv(root, "plain.h5", "--baselines", "reinit"))
    assert code == 0, err
    data = open_result(root / "plain.h5", "imp")
    assert list(data.coords) == ["branch", "level", "seed"]
    assert not any(name.startswith("hessian") for name in data.metrics)
    assert "curvature" not in data.config
    assert not any(key.startswith("curvature") for key in data.config["imp"])
    curved = swept[2]
    for name in ("test_accuracy", "remaining_weights"):  # the same runs under both
        assert np.array_equal(data.metrics[name], curved.metrics[name])
    # the mask folder (and so every run) does not depend on --curvature
    plain = sweep_from_args(parser().parse_args(argv(root, "plain.h5")))
    assert imp_dir(plain.plan) == imp_dir(sweep_from_args(parser().parse_args(swept[1])).plan)


def test_a_killed_curvature_sweep_resumes_the_missing_cells_only(swept, sweep, monkeypatch):
    root, real = swept[0], curvature_module.ticket_curvature
    calls = []

    def killed_at_level_2(model, mask, batches, tol, what):
        if len(calls) == 4:  # the trained and rewind networks of levels 0 and 1 are done
            raise RuntimeError("killed")
        calls.append(what)
        return real(model, mask, batches, tol, what)

    monkeypatch.setattr(curvature_module, "ticket_curvature", killed_at_level_2)
    flags = argv(root, "resume.h5", *CURVATURE)
    with pytest.raises(RuntimeError, match="killed"):
        run_main(flags)
    partial = open_result(root / "resume.h5", "imp")
    assert partial.done[0, :, 0].tolist() == [True, True, False]
    calls.clear()
    monkeypatch.setattr(curvature_module, "ticket_curvature", lambda *a: calls.append(a[4])
                        or real(*a))
    code, _, err = run_main(flags)
    assert code == 0, err
    level2 = level_run(sweep, 0, "ticket", 2)  # its two networks only
    assert calls == [str(level2.ckpt_path(NUM_STEPS)), str(level2.ckpt_path(REWIND_STEP))]
    done = open_result(root / "resume.h5", "imp")
    assert done.done.all()
    for name in METRICS:  # every cell as the uninterrupted sweep computed it
        assert np.array_equal(done.metrics[name][0], swept[2].metrics[name][0]), name


def test_run_imp_curvature_equals_the_cli_file(swept):
    xr = pytest.importorskip("xarray")
    ds = tickets.run_imp(model="convnet", data="digits", levels=2, rewind="init@5", steps=20,
                         seeds=(0,), store=swept[0] / "store", device="cpu", curvature=True,
                         curvature_samples=SAMPLES, curvature_tol=TOL, baselines="reinit",
                         width=0.125, batch_size=64, val_size=100, lr=0.05, crop_padding=0,
                         flip=False)
    assert ds["hessian_top"].dims == ("branch", "level", "seed", "curvature_at")
    with xr.open_dataset(swept[0] / "curv.h5", engine="h5netcdf") as cli:
        for name in METRICS:
            xr.testing.assert_identical(ds[name], cli[name].load())
    assert "curvature" not in tickets.api.option_names()  # a named argument of run_imp
    assert {"curvature_samples", "curvature_tol"} <= set(tickets.api.option_names())


@pytest.mark.parametrize("flags, culprit", [
    (["--curvature", "--curvature-tol", "0"], "--curvature-tol 0.0: must be a positive"),
    (["--curvature", "--curvature-tol", "-1"], "--curvature-tol -1.0"),
    (["--curvature", "--curvature-tol", "nan"], "--curvature-tol nan"),
    (["--curvature-tol", "0"], "--curvature-tol 0.0"),
    (["--curvature", "--curvature-samples", "-3"], "--curvature-samples -3"),
    (["--curvature", "--curvature-samples", "5000"], "--curvature-samples 5000: must lie in"),
])
def test_bad_curvature_options_are_one_line_before_anything(tmp_path, capsys, flags, culprit):
    code = main(argv(tmp_path, "imp.h5", *flags))
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and errors[-1].startswith("error: ") and culprit in errors[-1]
    assert sum(line.startswith("error") for line in errors) == 1
    assert not list(tmp_path.rglob("*"))  # no run, mask or result written
