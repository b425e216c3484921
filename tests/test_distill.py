"""Random-teacher distillation: the init formula, the loss, a frozen teacher, exact resume,
the result file, NaN and input-size errors, and the CLI end to end (tiny CPU runs)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runs.checkpoint import read_checkpoint
from runs.engines import distill as distill_module
from runs.engines.distill import (
    DinoNet,
    DistillConfig,
    alpha_init,
    build_pair,
    distill,
    distill_loss,
    main,
)
from runs.errors import UserError
from runs.models.head import create_head
from runs.refs import load_model
from runs.results import open_result
from runs.store import Run
from tests.helpers import assert_same

# toy at 8x8: 256 train images, 8 steps of 32 per epoch; 20 steps end mid-epoch 3.
CFG = DistillConfig(model="convnet", width=0.125, dataset="toy", data_options=("side=8",),
                    seed=0, teacher_seed=7, out_dim=256, hidden_dim=64, bottleneck_dim=16,
                    batch_size=32, num_steps=20, save_at=(8,))
STEPS_PER_EPOCH = 8
TINY = ["--model", "convnet", "--width", "0.125", "--out-dim", "256", "--hidden-dim", "64",
        "--bottleneck-dim", "16", "--batch-size", "32", "--device", "cpu"]






def same_checkpoint(path_a, path_b):
    """Everything a resume must reproduce; the RNG state is the process's, not the run's."""
    a, b = read_checkpoint(path_a), read_checkpoint(path_b)
    for key in ("step", "model", "modules", "optimizer", "config"):
        assert_same(a[key], b[key], key)


def fresh_teacher(cfg=CFG) -> DinoNet:
    return DinoNet(*build_pair(cfg, 4, 3, cfg.teacher_seed)).eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, with the teacher module it trained against captured."""
    seen = {}
    real_setup = distill_module.setup

    def spy(*args, **kwargs):
        seen["session"] = real_setup(*args, **kwargs)
        return seen["session"]

    store = tmp_path_factory.mktemp("distill_ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill_module, "setup", spy)
        run = distill(CFG, store, device="cpu")
    return run, seen["session"].teacher


# --- pure pieces ---------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 1e-10, 0.3, 1.0])
def test_alpha_init_mixes_parameters_not_buffers(alpha):
    teacher, student = (DinoNet(*build_pair(CFG, 4, 3, seed)) for seed in (7, 11))
    for buf in teacher.buffers():  # distinct buffers: copying them would show
        buf.add_(3)
    fresh = {k: v.clone() for k, v in student.named_parameters()}
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    alpha_init(student, teacher, alpha)
    delta = math.sqrt(alpha ** 2 + (1 - alpha) ** 2)
    t_params = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        expect = ((1 - alpha) * t_params[name].double() + alpha * fresh[name].double()) / delta
        torch.testing.assert_close(p.double(), expect, rtol=1e-6, atol=3e-7, msg=name)
        if alpha == 0:
            assert torch.equal(p, t_params[name]), name
        if alpha == 1:
            assert torch.equal(p, fresh[name]), name
    assert_same(dict(student.named_buffers()), buffers, "buffers")


def test_alpha_init_keeps_the_init_variance():
    """Independent draws mixed at alpha = 0.5 keep the weights' scale (the point of delta)."""
    teacher, student = (DinoNet(*build_pair(CFG, 4, 3, seed)) for seed in (7, 11))
    before = student.head.mlp[2].weight.std()
    alpha_init(student, teacher, 0.5)
    assert abs(student.head.mlp[2].weight.std() / before - 1) < 0.05


def test_normed_linear_rows_are_unit_and_scale_free():
    head = create_head(in_dim=8, out_dim=256, hidden_dim=64, bottleneck_dim=16, seed=0,
                       last="normed")
    norms = head.last.effective_weight().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(256))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = head(x)
        head.last.weight[3] *= 40.0  # a row's raw length is not part of the function
        head.last.weight[7] *= 0.01
        after = head(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert before.abs().max() <= 1 + 1e-6  # unit bottleneck times unit rows: cosines
    with torch.no_grad():
        head.last.weight[3] *= -1  # the direction is
        assert not torch.allclose(head(x)[:, 3], before[:, 3])


def test_raw_last_layer_multiplies_by_the_weight_as_is():
    """The paper's code's head (the default): logits = unit bottleneck @ W.T, W raw."""
    head = create_head(in_dim=8, out_dim=256, hidden_dim=64, bottleneck_dim=16, seed=0)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = F.normalize(head.mlp(x), dim=-1)  # (5, 16)
        torch.testing.assert_close(head(x), z @ head.last.weight.T)
        before = head(x)
        head.last.weight[3] *= 40.0  # a row's length scales its logit
        torch.testing.assert_close(head(x)[:, 3], 40.0 * before[:, 3], rtol=1e-5, atol=1e-7)
    # trunc-normal(0.02) rows of 16: norms about 0.08, so logits far below the normed +-1
    assert before.abs().max() < 0.3


def manual_loss(s, t, ts=1.0, tt=1.0):
    p = torch.softmax(t.double() / tt, -1)
    log_s = torch.log_softmax(s.double() / ts, -1)
    ce = -(p * log_s).sum(-1).mean()
    entropy = -(p * p.log()).sum(-1).mean()
    kl = (p * (p.log() - log_s)).sum(-1).mean()
    return ce, entropy, kl


@pytest.mark.parametrize("ts, tt", [(1.0, 1.0), (0.1, 0.04)])
def test_distill_loss_matches_a_manual_computation(ts, tt):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=gen), 3 * torch.randn(6, 50, generator=gen)
    out = distill_loss(s, t, student_temp=ts, teacher_temp=tt)
    ce, entropy, kl = manual_loss(s, t, ts, tt)
    torch.testing.assert_close(out["loss"].double(), ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["teacher_entropy"].double(), entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["kl"].double(), kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["kl"], out["loss"] - out["teacher_entropy"])
    assert out["kl"] > 0
    reference = F.kl_div(F.log_softmax(s / ts, -1), F.log_softmax(t / tt, -1), log_target=True,
                         reduction="batchmean")
    torch.testing.assert_close(out["kl"], reference, rtol=1e-4, atol=1e-5)


def test_distill_loss_is_zero_kl_at_the_teacher_and_centres():
    t = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    out = distill_loss(t.clone(), t)
    assert abs(out["kl"].item()) < 1e-6
    torch.testing.assert_close(out["loss"], out["teacher_entropy"])
    center = torch.randn(30)
    centred = distill_loss(t - center, t, center=center)  # the teacher is (t - c) / temp
    assert abs(centred["kl"].item()) < 1e-6
    for _ in range(3):  # KL >= 0 on random pairs
        s = torch.randn(4, 30)
        assert distill_loss(s, t)["kl"] >= 0


@pytest.mark.parametrize("gap, far", [(1e-4, False), (1e-2, False), (1.0, False),
                                      (1.0, True)])
def test_kl_is_accurate_near_the_teacher(gap, far):
    """The raw head's KLs are 1e-12..1e-6 nats, where fp32 H(t, s) - H(t) is noise."""
    gen = torch.Generator().manual_seed(4)
    t = 0.03 * torch.randn(8, 4096, generator=gen)  # raw-head logits at init: small
    s = t + gap * 0.03 * torch.randn(8, 4096, generator=gen)
    if far:  # a gap past the log1p form's range: the log-sum-exp form takes the row
        t, s = 30 * t, 30 * s - 25 * (torch.arange(4096) == 0)
    ref = F.kl_div(F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1),
                   log_target=True, reduction="batchmean")
    kl = distill_loss(s, t)["kl"].double()
    torch.testing.assert_close(kl, ref, rtol=1e-3 if not far else 1e-4, atol=0)


def test_distill_loss_gradient_is_zero_at_the_teacher():
    t = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    s = t.clone().requires_grad_(True)
    distill_loss(s, t)["loss"].backward()
    assert s.grad.abs().max() < 1e-7


# --- a whole run -----------------------------------------------------------------------------

def test_teacher_is_bit_identical_and_frozen(reference):
    run, teacher = reference
    assert run.done
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    # Parameters and BN buffers (running stats, num_batches_tracked) as built from the seed.
    assert_same(teacher.state_dict(), fresh_teacher().state_dict(), "teacher")
    bn = teacher.model.encoder[1]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert bn.num_batches_tracked.item() == 0


def test_load_model_rebuilds_the_teacher(reference):
    run, _ = reference
    loaded = load_model(f"{run.path}@last:teacher").model
    assert loaded.spec["seed"] == CFG.teacher_seed
    assert_same(loaded.state_dict(), fresh_teacher().model.state_dict(), "teacher")
    student = load_model(f"{run.path}@last").model  # the student, which did move
    assert not torch.equal(student.encoder[0].weight, loaded.encoder[0].weight)
    assert student.encoder[1].num_batches_tracked.item() == 20  # student BN in train mode
    assert sorted(run.steps()) == [0, 8, 20]


def test_result_file(reference):
    run, _ = reference
    data = open_result(run.path / "distill.h5", "distill")
    assert list(data.coords["epoch"]) == [0, 1, 2, 3]  # 20 steps = 2.5 epochs: 3 is partial
    assert list(data.coords["model"]) == ["teacher", "student"]
    assert data.specs["knn_accuracy"].dims == ("epoch", "model")
    knn = data.metrics["knn_accuracy"]
    assert np.isfinite(knn[0]).all() and np.isfinite(knn[-1]).all()
    assert np.isnan(knn[1:-1]).all()  # probe_every=0: only init and end
    assert ((0 <= knn[[0, -1]]) & (knn[[0, -1]] <= 1)).all()
    assert knn[0, 0] == knn[-1, 0]  # the frozen teacher probes the same
    for name in ("loss", "kl", "teacher_entropy"):
        assert np.isfinite(data.metrics[name]).all(), name
    assert data.done.all()
    summary = run.summary()
    assert summary["step"] == 20 and summary["knn_student"] == pytest.approx(knn[-1, 1])
    with pytest.raises(UserError, match="distill"):
        open_result(run.path / "distill.h5", "interpolate")


@pytest.mark.parametrize("stop_at", [5, 8, 16])  # mid-epoch, a kept step, an epoch end
def test_resume_is_bitwise(reference, tmp_path, stop_at):
    ref, _ = reference
    run = distill(CFG, tmp_path, device="cpu", stop_at=stop_at)
    assert not run.done and run.path.name == ref.path.name
    assert (run.ckpt_dir / "resume.pt").exists() or stop_at in CFG.save_at
    run = distill(CFG, tmp_path, device="cpu")
    assert run.done and not (run.ckpt_dir / "resume.pt").exists()
    assert run.steps() == ref.steps()
    for step in ref.steps():
        same_checkpoint(ref.ckpt_path(step), run.ckpt_path(step))
    assert run.metrics() == ref.metrics()
    a, b = (open_result(r.path / "distill.h5", "distill") for r in (ref, run))
    for name in a.metrics:
        np.testing.assert_array_equal(a.metrics[name], b.metrics[name], err_msg=name)
    assert run.summary() == ref.summary()


def test_finished_run_is_skipped(reference, monkeypatch):
    run, _ = reference
    monkeypatch.setattr(distill_module, "setup", lambda *a, **k: pytest.fail("re-ran"))
    assert distill(CFG, run.path.parents[1], device="cpu").done


@pytest.mark.parametrize("bad_step, kept, kept_step", [
    (11, "step_0000008.pt", 8),  # after a kept step
    (19, "resume.pt", 16),  # after an epoch end, which leaves only the resume file
])
def test_nan_loss_names_the_step_and_keeps_good_checkpoints(tmp_path, monkeypatch, bad_step,
                                                             kept, kept_step):
    calls = {"n": 0}
    real = distill_module.distill_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == bad_step:  # steps count from 1
            out["loss"] = out["loss"] * math.nan
        return out

    monkeypatch.setattr(distill_module, "distill_loss", poisoned)
    with pytest.raises(UserError, match=rf"at step {bad_step}\b") as err:
        distill(CFG, tmp_path, device="cpu")
    run = Run(next(tmp_path.glob("distill_*/seed_0")))
    assert not run.done and run.steps() == [0, 8]  # the end (20) is never reached
    assert f"last good checkpoint: {run.ckpt_dir / kept}" in str(err.value)
    good = read_checkpoint(run.ckpt_dir / kept)  # nothing was written after the NaN
    assert good["step"] == kept_step
    assert all(torch.isfinite(v).all() for v in good["model"]["state"].values())
    monkeypatch.setattr(distill_module, "distill_loss", real)
    assert distill(CFG, tmp_path, device="cpu").done  # resumes from there


def test_huge_learning_rate_stops_with_a_user_error(tmp_path):
    cfg = dataclasses.replace(CFG, lr=1e30, num_steps=8, save_at=())
    with pytest.raises(UserError, match="at step"):
        distill(cfg, tmp_path, device="cpu")
    run = Run(next(tmp_path.glob("distill_*/seed_0")))
    assert run.steps() == [0]
    read_checkpoint(run.ckpt_path(0))


def test_image_size_the_encoder_cannot_take_fails_before_training(tmp_path):
    cfg = dataclasses.replace(CFG, model="mlp")  # mlp is built for 32x32, toy here is 8x8
    with pytest.raises(UserError, match=r"mlp cannot take images of shape \(3, 8, 8\)"):
        distill(cfg, tmp_path, device="cpu")
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.h5"))


def test_bad_alpha_and_steps(tmp_path):
    with pytest.raises(UserError, match="--alpha"):
        distill(dataclasses.replace(CFG, alpha=1.5), tmp_path, device="cpu")
    with pytest.raises(UserError, match="--steps"):
        distill(dataclasses.replace(CFG, num_steps=0), tmp_path, device="cpu")
    assert not list(tmp_path.rglob("*.pt"))


# --- CLI -------------------------------------------------------------------------------------

def test_cli_end_to_end(tmp_path, capsys):
    argv = ["--store", str(tmp_path), *TINY, "--dataset", "toy", "--data-options", "side=8",
            "--steps", "2ep", "--save-at", "1ep"]
    assert main(argv) == 0
    run = Run(next(tmp_path.glob("distill_*/seed_0")))
    assert run.done and run.steps() == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert run.config()["config"]["num_steps"] == 16
    out = capsys.readouterr().out
    assert "k-NN teacher" in out and "n/a" not in out
    assert main(argv) == 0  # again: skipped, same summary
    assert run.steps() == [0, 8, 16]


def test_cli_noise_data_with_a_probe_dataset(tmp_path, capsys):
    argv = ["--store", str(tmp_path), *TINY, "--dataset", "noise", "--data-options",
            "shape=3,16,16", "count=64", "--probe-dataset", "toy", "--steps", "2ep"]
    assert main(argv) == 0
    run = Run(next(tmp_path.glob("distill_*/seed_0")))
    assert run.steps() == [0, 4]  # 64 images, batch 32: 2 steps per epoch
    data = open_result(run.path / "distill.h5", "distill")
    assert np.isfinite(data.metrics["knn_accuracy"][[0, -1]]).all()
    assert run.summary()["knn_teacher"] is not None


@pytest.mark.parametrize("flags, culprit", [
    (["--steps", "0"], "--steps"),
    (["--steps", "1ep", "--save-at", "3ep"], "--save-at"),
    (["--steps", "2", "--batch-size", "100000"], "--batch-size"),
    (["--steps", "1ep", "--batch-size", "100000"], "--batch-size"),
    (["--steps", "2", "--data-options", "sidee=8"], "sidee"),
    (["--steps", "2", "--probe-dataset", "digits"], "--probe-dataset"),
])
def test_cli_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, culprit):
    argv = ["--store", str(tmp_path), *TINY, "--dataset", "toy", "--data-options", "side=8",
            *flags]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and culprit in errors[0]
    assert not list(tmp_path.rglob("*.pt"))


# --- the paper recipe's options (issue #18) -------------------------------------------------

def test_alpha_zero_student_is_the_teacher_at_step_0_and_moves(reference):
    """The main figures' init: alpha = 0 exactly; the student still learns (its BN is in
    train mode, the teacher's in eval mode, so the gradient at step 0 is not zero)."""
    from runs.refs import load_head
    run, _ = reference
    assert CFG.alpha == 0.0
    student, teacher = (load_model(f"{run.path}@init{part}").model for part in ("", ":teacher"))
    assert_same(student.state_dict(), teacher.state_dict(), "step 0")
    assert_same(load_head(f"{run.path}@init").state_dict(),
                load_head(f"{run.path}@init:teacher").state_dict(), "head at step 0")
    moved = load_model(f"{run.path}@8").model
    assert not torch.equal(moved.encoder[0].weight, teacher.encoder[0].weight)


def test_init_noise_has_the_relative_size():
    teacher, student = (DinoNet(*build_pair(CFG, 4, 3, seed)) for seed in (7, 11))
    alpha_init(student, teacher, 0.0)
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    distill_module.add_init_noise(student, teacher, 0.01, seed=5)
    for (name, p_s), p_t in zip(student.named_parameters(), teacher.parameters()):
        size = (p_s - p_t).double().norm() / p_t.double().norm().clamp_min(1e-30)
        if p_t.norm() > 0:
            assert size.item() == pytest.approx(0.01, rel=1e-4), name
        else:  # zero biases stay zero: the noise is relative to the teacher's tensor
            assert torch.equal(p_s, p_t), name
    assert_same(dict(student.named_buffers()), buffers, "buffers")
    again = DinoNet(*build_pair(CFG, 4, 3, 11))
    alpha_init(again, teacher, 0.0)
    distill_module.add_init_noise(again, teacher, 0.01, seed=5)
    assert_same(again.state_dict(), student.state_dict(), "same seed, same noise")


def test_init_noise_is_applied_after_the_alpha_mix(tmp_path):
    """At alpha = 0 a perturbation made before the mix would vanish: the run's student
    starts at eps from its teacher, tensor by tensor."""
    s = distill_module.setup(dataclasses.replace(CFG, init_noise=0.05), tmp_path, device="cpu")
    s.result.close()
    sizes = [((p_s - p_t).norm() / p_t.norm()).item()
             for p_s, p_t in zip(s.student.parameters(), s.teacher.parameters())
             if p_t.norm() > 0]
    assert sizes and max(abs(size - 0.05) for size in sizes) < 1e-4


@pytest.mark.parametrize("ts, tt, center", [(1.0, 1.0, False), (0.1, 0.04, True)])
def test_mse_loss_is_dinopls_mean_squared_logit_difference(ts, tt, center):
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 50, generator=gen), 3 * torch.randn(6, 50, generator=gen)
    c = torch.randn(50, generator=gen) if center else None
    out = distill_loss(s, t, ts, tt, c, loss="mse")
    target = (t.double() - (c.double() if center else 0)) / tt
    expect = ((s.double() / ts - target) ** 2).mean()  # over the m outputs, then the batch
    torch.testing.assert_close(out["loss"].double(), expect, rtol=1e-5, atol=1e-6)
    ce = distill_loss(s, t, ts, tt, c)
    torch.testing.assert_close(out["kl"], ce["kl"])  # logged as with ce
    at_teacher = distill_loss(t * ts / tt, t, ts, tt, None, loss="mse")["loss"]
    assert at_teacher.item() < 1e-10


@pytest.mark.parametrize("options", [{"loss": "mse"}, {"head": "linear"},
                                     {"head_last": "normed", "bottleneck_dim": 0}])
def test_recipe_variants_train_end_to_end(tmp_path, options):
    from runs.refs import load_head
    cfg = dataclasses.replace(CFG, num_steps=4, save_at=(), **options)
    run = distill(cfg, tmp_path, device="cpu")
    assert run.done and np.isfinite(run.summary()["loss"])
    head = load_head(f"{run.path}@last")
    assert head.spec["name"] == cfg.head and head.spec["last"] == cfg.head_last
    assert head.spec["bottleneck_dim"] == cfg.bottleneck_dim
    data = open_result(run.path / "distill.h5", "distill")
    assert data.specs["loss"].units == distill_module.LOSS_UNITS[cfg.loss][0]
    assert run.config()["config"]["head"] == cfg.head  # recorded with the run
    start, last = (load_model(f"{run.path}@{step}").model for step in ("init", "last"))
    assert not torch.equal(start.encoder[0].weight, last.encoder[0].weight)


def test_an_epoch_keeps_the_last_partial_batch_unless_drop_last(tmp_path):
    """256 toy images at batch 48: 5 full batches and one of 16 (the paper's code), or 5."""
    argv = ["--store", str(tmp_path), *TINY, "--batch-size", "48", "--dataset", "toy",
            "--data-options", "side=8", "--steps", "1ep"]
    assert main(argv) == 0
    assert main([*argv, "--drop-last"]) == 0
    runs = {Run(p).config()["config"]["drop_last"]: Run(p)
            for p in tmp_path.glob("distill_*/seed_0")}
    assert runs[False].config()["steps_per_epoch"] == 6 and runs[False].steps() == [0, 6]
    assert runs[True].config()["steps_per_epoch"] == 5 and runs[True].steps() == [0, 5]


def test_input_stats_and_model_options_reach_data_and_model(monkeypatch):
    seen = []
    real = distill_module.load_dataset

    def spy(*args, **kwargs):
        seen.append(kwargs["stats"])
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "load_dataset", spy)
    distill_module.load_data(CFG)
    distill_module.load_data(dataclasses.replace(CFG, input_stats="dataset"))
    assert seen == ["paper"] * 3 + ["dataset"] * 3  # train, probe train, probe test
    vgg = dataclasses.replace(CFG, model="vgg11")
    assert build_pair(vgg, 10, 3, 0)[0].spec["pool"] == "max"  # the paper's build
    avg = dataclasses.replace(vgg, model_options=("pool=avg",))
    assert build_pair(avg, 10, 3, 0)[0].spec["pool"] == "avg"
    with pytest.raises(UserError, match="--model-option"):
        build_pair(dataclasses.replace(vgg, model_options=("poool=avg",)), 10, 3, 0)


@pytest.mark.parametrize("field, value, message", [
    ("head", "mlp", "--head mlp: must be one of dino_head, linear"),
    ("head_last", "unit", "--head-last unit: must be one of raw, normed"),
    ("loss", "kl", "--loss kl: must be one of ce, mse"),
    ("input_stats", "imagenet", "--input-stats imagenet: must be one of paper, dataset"),
    ("init_noise", -0.1, "--init-noise -0.1"),
    ("bottleneck_dim", -1, "--bottleneck-dim -1"),
    ("model_options", ("pool",), "--model-option pool: expected key=value"),
])
def test_recipe_fields_are_checked_naming_the_flag(field, value, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(CFG, **{field: value})
    assert dataclasses.replace(CFG, bottleneck_dim=0).bottleneck_dim == 0  # no bottleneck


def test_help_shows_the_recipe_flags_with_their_choices():
    text = distill_module.parser().format_help()
    for flag in ("--head {dino_head,linear}", "--head-last {raw,normed}", "--loss {ce,mse}",
                 "--input-stats {paper,dataset}", "--drop-last, --no-drop-last",
                 "--model-option [KEY=VALUE ...], --model-options", "--init-noise"):
        assert flag in text, flag
    args = distill_module.parser().parse_args(["--model-option", "pool=avg", "norm=none"])
    assert args.model_options == ["pool=avg", "norm=none"]
