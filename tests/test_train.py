"""Supervised training: exact resume, fixed masks, the lr schedule, the holdout split,
--init from a distilled student, --rewind, skipping finished runs and the CLI (tiny CPU runs)."""

import contextlib
import dataclasses
import io

import pytest
import torch

from runs.checkpoint import read_checkpoint
from runs.data import DatasetInfo, ImageData, holdout
from runs.engines import train as train_module
from runs.engines.distill import DistillConfig, distill
from runs.engines.train import TrainConfig, lr_factor, main, make_optimizer, train
from runs.errors import UserError
from runs.models import create_model
from runs.store import Run
from tests.helpers import assert_same

# toy 16x16: 256 train images, 32 held out, 224 left = 7 steps of 32 per epoch; 24 steps
# cross the milestones at steps 12 and 18 and end mid-epoch 4.
CFG = TrainConfig(model="convnet", width=0.125, dataset="toy", val_size=32, batch_size=32,
                  num_steps=24, save_at=(4, 8), lr=0.05, warmup_steps=3)
STEPS_PER_EPOCH = 7
TINY = ["--model", "convnet", "--width", "0.125", "--dataset", "toy", "--batch-size", "32",
        "--device", "cpu"]






def snapshot(root) -> dict:
    """Every file under root with its bytes and mtime."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def param_names(cfg=CFG) -> list[str]:
    """Names in the order the optimiser's state_dict numbers them."""
    model = create_model(cfg.model, num_classes=4, width=cfg.width)
    return [name for name, _ in model.named_parameters()]


def momentum(payload: dict) -> dict:
    names = param_names()
    return {names[i]: s["momentum_buffer"] for i, s in payload["optimizer"]["state"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(CFG, tmp_path_factory.mktemp("train_ref"), device="cpu")


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    """Half of every conv weight masked, drawn from a fixed generator."""
    gen = torch.Generator().manual_seed(0)
    model = create_model(CFG.model, num_classes=4, width=CFG.width)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() == 4:
            keep = torch.zeros(p.numel(), dtype=torch.bool)
            keep[torch.randperm(p.numel(), generator=gen)[: p.numel() // 2]] = True
            masks[name] = keep.view_as(p)
    path = tmp_path_factory.mktemp("mask") / "mask.pt"
    torch.save(masks, path)
    return path, masks


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 2-step distillation run on the same toy data (a convnet student, 4 classes)."""
    cfg = DistillConfig(model="convnet", width=0.125, dataset="toy", out_dim=256, hidden_dim=64,
                        bottleneck_dim=16, batch_size=32, num_steps=2)
    return distill(cfg, tmp_path_factory.mktemp("student"), device="cpu")


# --- the schedule and the split -------------------------------------------------------------

def test_multistep_factors_at_the_milestones():
    cfg = TrainConfig(num_steps=100, milestones=(0.5, 0.75), gamma=0.1)
    factors = {step: lr_factor(cfg, step) for step in (0, 49, 50, 74, 75, 99)}
    assert factors == pytest.approx({0: 1, 49: 1, 50: 0.1, 74: 0.1, 75: 0.01, 99: 0.01})


def test_cosine_endpoints_and_midpoint():
    cfg = TrainConfig(num_steps=100, schedule="cosine")
    assert lr_factor(cfg, 0) == 1.0
    assert lr_factor(cfg, 50) == pytest.approx(0.5)
    assert lr_factor(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(cfg, s) >= lr_factor(cfg, s + 1) for s in range(100))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "multistep"])
def test_warmup_is_linear_then_the_schedule(schedule):
    cfg = TrainConfig(num_steps=100, schedule=schedule, warmup_steps=10)
    plain = dataclasses.replace(cfg, warmup_steps=0)
    for step in range(10):
        assert lr_factor(cfg, step) == pytest.approx((step + 1) / 10 * lr_factor(plain, step))
    assert all(lr_factor(cfg, s) == lr_factor(plain, s) for s in range(10, 100))


def test_optimizer_follows_the_schedule():
    cfg = TrainConfig(num_steps=20, lr=0.4, warmup_steps=2, milestones=(0.5,), gamma=0.5)
    model = create_model("convnet", width=0.125)
    opt, sched = make_optimizer(cfg, model, torch.device("cpu"))
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * lr_factor(cfg, step)), step
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def counting_data(counts=(150, 90, 60)) -> ImageData:
    """Images whose two pixels encode their index; imbalanced classes."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    index = torch.arange(len(y))
    x = torch.stack([index // 256, index % 256], 1).to(torch.uint8).view(-1, 1, 1, 2)
    info = DatasetInfo("count", len(counts), (0.5,), (0.25,), (1, 2), 1,
                       tuple(map(str, range(len(counts)))))
    return ImageData(x, y, info)


def ids(data: ImageData) -> list[int]:
    x = data.x.view(-1, 2).long()
    return (x[:, 0] * 256 + x[:, 1]).tolist()


def test_holdout_is_stratified_disjoint_and_deterministic():
    data = counting_data()
    train, val = holdout(data, 60, seed=0)
    train_ids, val_ids = ids(train), ids(val)
    assert len(val_ids) == 60 and len(set(val_ids)) == 60
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(300))
    assert torch.equal(data.y[val_ids], val.y) and torch.equal(data.y[train_ids], train.y)
    assert torch.bincount(val.y).tolist() == [30, 18, 12]  # 60 * (150, 90, 60) / 300
    assert ids(holdout(data, 60, seed=0)[1]) == val_ids
    assert ids(holdout(data, 60, seed=1)[1]) != val_ids
    assert holdout(data, 0, seed=0) == (data, None)
    with pytest.raises(UserError, match="--val-size"):
        holdout(data, 300, seed=0)


def test_holdout_rounds_within_one_per_class():
    data = counting_data((7, 5, 3))
    for size in range(1, 15):
        val = holdout(data, size, seed=2)[1]
        expected = torch.tensor([7, 5, 3]) * size / 15
        assert ((torch.bincount(val.y, minlength=3) - expected).abs() < 1).all(), size


# --- whole runs ------------------------------------------------------------------------------

def test_reference_run(reference):
    assert reference.done and reference.steps() == [0, 4, 8, 24]
    assert not (reference.ckpt_dir / "resume.pt").exists()
    records = reference.metrics()
    assert [r["step"] for r in records] == [7, 14, 21, 24]
    assert all(0 <= r["val_accuracy"] <= 1 and r["train_loss"] > 0 for r in records)
    summary = reference.summary()
    assert summary["step"] == 24 and summary["best_val_step"] in (7, 14, 21, 24)
    assert read_checkpoint(reference.ckpt_path(24))["scheduler"]["last_epoch"] == 24


@pytest.mark.parametrize("stop_at", [10, 14])  # mid-epoch, an epoch end
def test_resume_is_bitwise(reference, tmp_path, stop_at):
    run = train(CFG, tmp_path, device="cpu", stop_at=stop_at)
    assert not run.done and run.path.name == reference.path.name
    assert read_checkpoint(run.ckpt_dir / "resume.pt")["step"] == stop_at
    run = train(CFG, tmp_path, device="cpu")
    assert run.done and run.steps() == reference.steps()
    for step in reference.steps():
        a, b = read_checkpoint(reference.ckpt_path(step)), read_checkpoint(run.ckpt_path(step))
        for key in ("step", "model", "optimizer", "scheduler", "config"):
            assert_same(a[key], b[key], f"step {step} {key}")
    assert run.metrics() == reference.metrics()  # train_loss covers whole epochs
    assert run.summary() == reference.summary()


def test_finished_run_is_not_trained_again(reference, monkeypatch):
    before = snapshot(reference.path)
    monkeypatch.setattr(train_module, "train_step", lambda *a: pytest.fail("trained again"))
    run = train(CFG, reference.path.parents[1], device="cpu")
    assert run.done and snapshot(reference.path) == before


def test_mask_keeps_weights_and_momentum_zero(tmp_path, mask_file):
    path, masks = mask_file
    run = train(dataclasses.replace(CFG, mask=str(path), num_steps=10), tmp_path, device="cpu")
    init = read_checkpoint(run.ckpt_path(0))
    for step in run.steps():
        payload = read_checkpoint(run.ckpt_path(step))
        state, buffers = payload["model"]["state"], momentum(payload)
        for name, keep in masks.items():
            assert (state[name][~keep] == 0).all(), (step, name)
            if step:
                assert (buffers[name][~keep] == 0).all(), (step, name)
                assert (state[name][keep] != init["model"]["state"][name][keep]).any()
    assert (state[name][keep] != 0).float().mean() > 0.99  # the kept half trains


def test_huge_learning_rate_stops_naming_the_step(tmp_path):
    cfg = dataclasses.replace(CFG, lr=1e30, num_steps=7, save_at=(), warmup_steps=0)
    with pytest.raises(UserError, match="at step [1-7]; last good checkpoint: .*step_0000000"):
        train(cfg, tmp_path, device="cpu")
    run = Run(next(tmp_path.glob("train_*/seed_0")))
    assert run.steps() == [0] and not run.done
    read_checkpoint(run.ckpt_path(0))


def test_rewind_restores_the_full_state(reference, tmp_path):
    # Another init seed is fine: every weight comes from the checkpoint.
    cfg = dataclasses.replace(CFG, rewind=f"{reference.path}@8", seed=5)
    run = train(cfg, tmp_path, device="cpu", stop_at=9)
    assert run.steps() == [8]  # the first checkpoint is the rewind point
    source, start = (read_checkpoint(r.ckpt_path(8)) for r in (reference, run))
    for key in ("step", "optimizer", "scheduler"):
        assert_same(source[key], start[key], key)
    assert_same(source["model"]["state"], start["model"]["state"], "model")
    assert read_checkpoint(run.ckpt_dir / "resume.pt")["step"] == 9


def test_rewind_with_a_mask(reference, tmp_path, mask_file):
    path, masks = mask_file
    cfg = dataclasses.replace(CFG, rewind=f"{reference.path}@8", mask=str(path))
    run = train(cfg, tmp_path, device="cpu", stop_at=9)
    source, start = (read_checkpoint(r.ckpt_path(8)) for r in (reference, run))
    expect, got = source["model"]["state"], start["model"]["state"]
    for name in expect:
        wanted = expect[name] * masks[name] if name in masks else expect[name]
        assert torch.equal(got[name], wanted), name
    src_momentum, new_momentum = momentum(source), momentum(start)
    for name, buf in src_momentum.items():
        wanted = buf * masks[name] if name in masks else buf
        assert torch.equal(new_momentum[name], wanted), name
    assert_same(source["scheduler"], start["scheduler"], "scheduler")
    assert start["step"] == 8


def test_rewind_to_a_distill_checkpoint_points_to_init(student, tmp_path):
    with pytest.raises(UserError, match="--init"):
        train(dataclasses.replace(CFG, rewind=f"{student.path}@last"), tmp_path, device="cpu")


def test_bad_rewind_leaves_no_run_directory(reference, tmp_path):
    other = dataclasses.replace(CFG, width=0.25, rewind=f"{reference.path}@8", num_steps=14)
    with pytest.raises(UserError, match="--rewind"):
        train(other, tmp_path)
    assert not list(tmp_path.rglob("config.json"))


def test_rewind_at_or_past_the_end_is_refused_naming_both_steps(reference, tmp_path):
    """`--steps 2 --rewind RUN@8` would end where it starts: refused before any file."""
    for step in (8, 24):
        cfg = dataclasses.replace(CFG, rewind=f"{reference.path}@{step}", num_steps=min(step, 2),
                                  save_at=())
        with pytest.raises(UserError, match=rf"at step {step}, not before the end of training "
                                            rf"\(--steps 2\)"):
            train(cfg, tmp_path, device="cpu")
    assert not list(tmp_path.rglob("*"))


def test_init_with_rewind_is_refused(reference, student, tmp_path):
    cfg = dataclasses.replace(CFG, rewind=f"{reference.path}@8",
                              init=f"{student.path}@last:encoder")
    with pytest.raises(UserError, match="--init .* with --rewind .*give one of them"):
        train(cfg, tmp_path, device="cpu")
    assert not list(tmp_path.rglob("*"))


def test_init_of_a_rewind_run_is_the_rewound_state(reference, tmp_path):
    """RUN@init names the state the run began training from: for --rewind the checkpoint
    it rewound to, at its step (recorded as init_step), not a model rebuilt from the seed."""
    from runs.refs import load_model
    cfg = dataclasses.replace(CFG, rewind=f"{reference.path}@8", num_steps=10, save_at=())
    run = train(cfg, tmp_path, device="cpu")
    assert run.config()["init_step"] == 8 and run.steps() == [8, 10]
    loaded = load_model(f"{run.path}@init")
    assert loaded.step == 8 and loaded.path == run.ckpt_path(8)
    assert_same(loaded.model.state_dict(),
                read_checkpoint(reference.ckpt_path(8))["model"]["state"], "rewound")


def test_init_of_an_init_run_is_its_first_weights_or_fails_naming_why(student, tmp_path):
    from runs.refs import load_model
    cfg = dataclasses.replace(CFG, init=f"{student.path}@last:encoder", num_steps=2, save_at=())
    run = train(cfg, tmp_path, device="cpu")
    first = read_checkpoint(run.ckpt_path(0))["model"]["state"]
    assert_same(load_model(f"{run.path}@init").model.state_dict(), first, "init")
    run.ckpt_path(0).unlink()
    with pytest.raises(UserError, match=r"lacks its starting state ckpt/step_0000000\.pt"):
        load_model(f"{run.path}@init")


def one_error(capsys) -> str:
    """The only `error:` line on stderr (asserted to be the only one)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_run_folder_deleted_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    real = train_module.train_step

    def deleting(s, x, y):
        if s.step == 3:
            import shutil
            shutil.rmtree(s.run.path.parent)
        return real(s, x, y)

    monkeypatch.setattr(train_module, "train_step", deleting)
    assert main(["--store", str(tmp_path), *TINY, "--steps", "8"]) == 2
    line = one_error(capsys)
    assert "disappeared" in line and "re-run the same command" in line
    assert not list(tmp_path.glob("train_*"))  # nothing half-made again


def test_a_corrupt_config_json_is_one_line_naming_it(tmp_path, capsys):
    from runs.refs import load_model
    run = train(dataclasses.replace(CFG, num_steps=8, save_at=()), tmp_path, device="cpu",
                stop_at=4)
    (run.path / "config.json").write_text('{"kind": "train", ')
    before = snapshot(tmp_path)
    assert main(["--store", str(tmp_path), *TINY, "--val-size", "32", "--steps", "8",
                 "--lr", "0.05", "--warmup-steps", "3"]) == 2
    assert f"{run.path / 'config.json'} is not valid JSON" in one_error(capsys)
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load_model(f"{run.path}@last")
    assert snapshot(tmp_path) == before


def test_a_file_as_store_is_one_line(tmp_path, capsys):
    store = tmp_path / "store"
    store.write_text("not a folder")
    assert main(["--store", str(store), *TINY, "--steps", "2"]) == 2
    assert f"--store {store}: a file, not a folder" in one_error(capsys)
    assert store.read_text() == "not a folder" and len(list(tmp_path.iterdir())) == 1


def test_init_from_a_student_encoder(student, tmp_path):
    cfg = dataclasses.replace(CFG, init=f"{student.path}@last:encoder", seed=3, num_steps=2,
                              save_at=())
    run = train(cfg, tmp_path, device="cpu")
    assert run.done
    first = read_checkpoint(run.ckpt_path(0))["model"]
    source = read_checkpoint(student.ckpt_path(student.latest_step()))["model"]["state"]
    fresh = create_model("convnet", num_classes=4, width=0.125, seed=3).state_dict()
    for name, value in first["state"].items():
        expect = source[name] if name.startswith("encoder.") else fresh[name]
        assert torch.equal(value, expect), name
    assert not torch.equal(first["state"]["fc.weight"], source["fc.weight"])
    assert first["spec"]["seed"] == 3


@pytest.mark.parametrize("change, culprit", [
    (dict(model="mlp"), "name 'convnet', not 'mlp'"),
    (dict(width=0.25), "width 0.125, not 0.25"),
])
def test_init_of_another_architecture_is_a_user_error(student, tmp_path, change, culprit):
    cfg = dataclasses.replace(CFG, init=f"{student.path}@last:encoder", **change)
    with pytest.raises(UserError, match=culprit):
        train(cfg, tmp_path, device="cpu")
    assert not list(tmp_path.rglob("*.pt"))


def test_image_size_the_encoder_cannot_take(tmp_path):
    with pytest.raises(UserError, match="cannot take images"):
        train(dataclasses.replace(CFG, model="mlp"), tmp_path, device="cpu")
    assert not list(tmp_path.rglob("*"))


# --- CLI -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("cli")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["--store", str(store), *TINY, "--val-size", "32", "--steps", "2ep",
                     "--save-at", "1ep"])
    return code, store, out.getvalue()


def test_cli_end_to_end(cli_run):
    code, store, out = cli_run
    assert code == 0
    run = Run(next(store.glob("train_*/seed_0")))
    assert run.done and run.steps() == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    summary = run.summary()
    assert f"best validation {100 * summary['best_val_accuracy']:.2f} %" in out
    assert f"at step {summary['best_val_step']}" in out


@pytest.mark.parametrize("flags, culprit", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "2ep", "--save-at", "1ep", "3ep"], "--save-at"),
    (["--steps", "2ep", "--batch-size", "100000"], "--batch-size"),
    (["--steps", "10", "--batch-size", "100000"], "--batch-size"),
    (["--steps", "10", "--val-size", "100000"], "--val-size"),
    (["--steps", "10", "--mask", "no_such_mask.pt"], "--mask"),
])
def test_cli_bad_flags_exit_2_and_touch_nothing(cli_run, capsys, flags, culprit):
    _, store, _ = cli_run
    before = snapshot(store)
    assert main(["--store", str(store), *TINY, "--val-size", "32", *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and culprit in errors[0]
    assert snapshot(store) == before


# --- the paper recipe's options (issue #18) -------------------------------------------------

def test_an_epoch_keeps_the_last_partial_batch_unless_drop_last(tmp_path, capsys):
    """224 toy images (32 held out) at batch 48: 4 full batches and one of 32, or 4."""
    argv = ["--store", str(tmp_path), *TINY, "--batch-size", "48", "--val-size", "32",
            "--steps", "1ep"]
    assert main(argv) == 0
    assert main([*argv, "--drop-last"]) == 0
    runs = {Run(p).config()["config"]["drop_last"]: Run(p)
            for p in tmp_path.glob("train_*/seed_0")}
    assert runs[False].config()["steps_per_epoch"] == 5 and runs[False].steps() == [0, 5]
    assert runs[True].config()["steps_per_epoch"] == 4 and runs[True].steps() == [0, 4]
    evals = [r["step"] for r in runs[False].metrics() if "test_accuracy" in r]
    assert evals == [5]  # --eval-every 1: at the end of the (partial-batch) epoch


def test_input_stats_and_model_options_reach_data_and_model(monkeypatch, tmp_path):
    from runs.checkpoint import save_checkpoint
    seen = []
    real = train_module.load_splits
    monkeypatch.setattr(train_module, "load_splits",
                        lambda *a, **k: seen.append(k["stats"]) or real(*a, **k))
    train_module.load_data(CFG)
    train_module.load_data(dataclasses.replace(CFG, input_stats="dataset"))
    assert seen == ["paper", "dataset"]
    cfg = dataclasses.replace(CFG, model="resnet20", model_options=("shortcut=A",))
    assert train_module.build_model(cfg, 4, 3).spec["shortcut"] == "A"
    paper = train_module.build_model(dataclasses.replace(cfg, model_options=()), 4, 3)
    assert paper.spec["shortcut"] == "projection"
    path = save_checkpoint(tmp_path / "r20.pt", paper, 0)
    with pytest.raises(UserError, match="shortcut 'projection', not 'A'"):
        train_module.build_model(dataclasses.replace(cfg, init=str(path)), 4, 3)


@pytest.mark.parametrize("field, value, message", [
    ("input_stats", "imagenet", "--input-stats imagenet: must be one of paper, dataset"),
    ("schedule", "linear", "--schedule linear: must be one of multistep, cosine, constant"),
    ("model_options", ("shortcut",), "--model-option shortcut: expected key=value"),
])
def test_recipe_fields_are_checked_naming_the_flag(field, value, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(CFG, **{field: value})
