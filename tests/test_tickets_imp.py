"""Iterative magnitude pruning end to end on tiny CPU runs (digits, convnet width 0.125):
the CLI and its result file, nested exact masks per level, masked weights staying zero,
rewinding to a bit-identical state, resuming a killed sweep, rewinding to a student, shards
and bad input."""

import contextlib
import dataclasses
import io

import numpy as np
import pytest
import torch

import tickets.imp as imp_module
from runs.checkpoint import read_checkpoint, save_checkpoint
from runs.engines import train as train_module
from runs.engines.distill import DistillConfig, distill
from runs.models import create_model
from runs.results import merge_results, open_result
from tests.helpers import assert_same
from tickets.imp import (
    Sweep,
    cell_config,
    identity,
    imp_dir,
    level_run,
    main,
    make_plan,
    mask_file,
    parse_rewind,
    parser,
    sweep_from_args,
)
from tickets.mask import is_nested, num_kept, read_mask
from tickets.prune import kept_count

# digits: 1198 train images, 100 held out for validation, ceil(1098 / 64) = 18 steps per
# epoch (the last partial batch kept); 4 epochs = 72 steps. No flip and no crop: 8x8 digits
# are neither symmetric nor paddable.
STEPS_PER_EPOCH, NUM_STEPS = 18, 72
TINY = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size", "64",
        "--val-size", "100", "--lr", "0.05", "--steps", "4ep", "--crop-padding", "0",
        "--no-flip", "--device", "cpu", "--seeds", "0"]
TOTAL = 36 + 288 + 1152 + 160  # prunable: conv weights (1 input channel) and fc.weight
LEVELS, REWIND_STEP = 3, STEPS_PER_EPOCH




def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def sweep_argv(store, out, *extra) -> list[str]:
    return ["--store", str(store), "--out", str(out), *TINY, *extra]


def snapshot(root) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}




def param_names() -> list[str]:
    """Names in the order the optimiser's state_dict numbers them."""
    model = create_model("convnet", num_classes=10, width=0.125, in_channels=1)
    return [name for name, _ in model.named_parameters()]


def momentum(payload: dict) -> dict:
    names = param_names()
    return {names[i]: s["momentum_buffer"] for i, s in payload["optimizer"]["state"].items()}


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
    """3 levels rewound to epoch 1 with both baselines, through the CLI."""
    root = tmp_path_factory.mktemp("imp")
    argv = sweep_argv(root / "store", root / "imp.h5", "--levels", str(LEVELS), "--rewind",
                      "init@1ep", "--baselines", "random", "reinit")
    code, out, _ = run_main(argv)
    return code, out, argv, root


@pytest.fixture(scope="module")
def sweep(cli_sweep) -> Sweep:
    """The same sweep planned again (it finds everything done in the store)."""
    return sweep_from_args(parser().parse_args(cli_sweep[2]))


def test_cli_writes_the_imp_result(cli_sweep):
    code, out, _, root = cli_sweep
    assert code == 0 and "| 3 | 51.22 |" in out and "wrote" in out
    data = open_result(root / "imp.h5", "imp")
    assert list(data.coords["branch"]) == ["ticket", "random", "reinit"]
    assert data.coords["level"].tolist() == [0, 1, 2, 3] and data.coords["seed"].tolist() == [0]
    assert data.done.all() and data.point_dims == ("branch", "level", "seed")
    kept = np.array([kept_count(TOTAL, 0.2, level) for level in range(LEVELS + 1)])
    for b in range(3):
        assert np.array_equal(data.metrics["remaining_weights"][b, :, 0], kept)
        assert np.array_equal(data.metrics["density"][b, :, 0], kept / TOTAL)
    for name in ("test_accuracy", "best_val_accuracy", "test_accuracy_at_best_val"):
        values = data.metrics[name]
        assert np.isfinite(values).all() and ((0 <= values) & (values <= 1)).all(), name
        assert (values[:, 0] == values[0, 0]).all(), name  # level 0: one dense run for all
    assert data.metrics["test_accuracy"][0, :, 0].min() > 0.5  # the tickets learn
    assert data.config["rewind_step"] == REWIND_STEP and data.config["prunable_weights"] == TOTAL


def test_result_opens_with_xarray(cli_sweep):
    xr = pytest.importorskip("xarray")
    with xr.open_dataset(cli_sweep[3] / "imp.h5", engine="h5netcdf") as ds:
        assert ds["test_accuracy"].dims == ("branch", "level", "seed")
        assert float(ds["density"].sel(branch="ticket", level=2, seed=0)) == 1047 / TOTAL


def test_masks_are_nested_exact_and_stored_per_level(sweep):
    plan = sweep.plan
    for chain in ("ticket", "random_layerwise"):
        masks = [read_mask(mask_file(plan, 0, chain, level)) for level in (1, 2, 3)]
        assert all(num_kept(m) == kept_count(TOTAL, 0.2, level)
                   for level, m in zip((1, 2, 3), masks))
        assert is_nested(masks[1], masks[0]) and is_nested(masks[2], masks[1])
        assert list(masks[0]) == ["encoder.0.weight", "encoder.4.weight", "encoder.8.weight",
                                  "fc.weight"]
    ticket, random = (read_mask(mask_file(plan, 0, c, 3)) for c in ("ticket",
                                                                     "random_layerwise"))
    assert any(not torch.equal(ticket[n], random[n]) for n in ticket)
    assert mask_file(plan, 0, "ticket", 1).parent.parent.parent == imp_dir(plan)
    assert (imp_dir(plan) / "imp.json").exists()


def test_every_cell_is_one_finished_run_with_its_mask(sweep, monkeypatch):
    monkeypatch.setattr(train_module, "train_step", lambda *a: pytest.fail("trained again"))
    plan = sweep.plan
    for branch in ("ticket", "random", "reinit"):
        for level in range(1, LEVELS + 1):
            run = level_run(sweep, 0, branch, level)
            cfg = cell_config(sweep, 0, branch, level)
            assert run.done and run.config()["config"]["mask"] == cfg.mask
            assert run.path.name == ("seed_1000" if branch == "reinit" else "seed_0")
            chain = "random_layerwise" if branch == "random" else "ticket"
            assert cfg.mask == str(mask_file(plan, 0, chain, level))
            final = read_checkpoint(run.ckpt_path(NUM_STEPS))
            state, buffers = final["model"]["state"], momentum(final)
            for name, keep in read_mask(cfg.mask).items():
                assert (state[name][~keep] == 0).all() and (buffers[name][~keep] == 0).all()
                assert (state[name][keep] != 0).float().mean() > 0.99, (branch, level, name)
            assert run.steps() == [REWIND_STEP, NUM_STEPS]  # reinit too: --reinit-from k


def test_rewinding_restores_the_dense_state_at_k_except_the_mask(sweep):
    dense = level_run(sweep, 0, "ticket", 0)
    source = read_checkpoint(dense.ckpt_path(REWIND_STEP))
    for level in (1, 3):
        cfg = cell_config(sweep, 0, "ticket", level)
        start = read_checkpoint(level_run(sweep, 0, "ticket", level).ckpt_path(REWIND_STEP))
        masks = read_mask(cfg.mask)
        assert start["step"] == REWIND_STEP
        assert start["scheduler"] == source["scheduler"]
        for name, value in source["model"]["state"].items():  # weights and BN buffers
            expect = value * masks[name] if name in masks else value
            assert torch.equal(start["model"]["state"][name], expect), name
        for name, buf in momentum(source).items():
            expect = buf * masks[name] if name in masks else buf
            assert torch.equal(momentum(start)[name], expect), name


def test_a_rerun_trains_nothing(cli_sweep, monkeypatch):
    _, _, argv, root = cli_sweep
    before = snapshot(root / "store")
    monkeypatch.setattr(train_module, "train_step", lambda *a: pytest.fail("trained again"))
    code, out, _ = run_main(argv)
    assert code == 0 and "| 3 | 51.22 |" in out
    assert snapshot(root / "store") == before


def test_a_level_that_prunes_nothing_retraces_the_dense_run(tmp_path):
    """Rate 1e-4 keeps all 1636 weights at level 1: the rewound run must then end exactly
    where the dense run did (weights, optimiser, schedule, data order from step K on)."""
    args = parser().parse_args(sweep_argv(tmp_path, tmp_path / "r.h5", "--levels", "1",
                                          "--rate", "1e-4", "--rewind", "init@30",
                                          "--steps", "50", "--flip", "--crop-padding", "1"))
    sweep = sweep_from_args(args)
    level1 = level_run(sweep, 0, "ticket", 1)
    dense = level_run(sweep, 0, "ticket", 0)
    assert read_mask(cell_config(sweep, 0, "ticket", 1).mask)["fc.weight"].all()
    a, b = (read_checkpoint(r.ckpt_path(50)) for r in (dense, level1))
    for key in ("step", "model", "optimizer", "scheduler"):
        assert_same(a[key], b[key], key)


def test_a_killed_sweep_resumes_at_the_unfinished_level(tmp_path, monkeypatch):
    argv = sweep_argv(tmp_path / "store", tmp_path / "imp.h5", "--levels", "3",
                      "--rewind", "init@1ep")
    real_train = imp_module.train

    def killed_at_level_2(cfg, *args, **kw):
        if cfg.mask.endswith("level_002.pt"):  # dies mid-way through level 2
            real_train(cfg, *args, stop_at=REWIND_STEP + 10, **kw)
            raise RuntimeError("killed")
        return real_train(cfg, *args, **kw)

    monkeypatch.setattr(imp_module, "train", killed_at_level_2)
    with pytest.raises(RuntimeError, match="killed"):
        run_main(argv)
    partial = open_result(tmp_path / "imp.h5", "imp")
    assert partial.done[0, :, 0].tolist() == [True, True, False, False]
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("step_*.pt")}

    monkeypatch.setattr(imp_module, "train", real_train)
    steps = []
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda s, x, y: steps.append(s.step)
                        or real_step(s, x, y))
    code, out, _ = run_main(argv)
    assert code == 0 and open_result(tmp_path / "imp.h5", "imp").done.all()
    per_level = NUM_STEPS - REWIND_STEP
    assert len(steps) == (per_level - 10) + per_level  # the rest of level 2, then level 3
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # none rewritten


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 2-step distillation of a convnet student on digits."""
    cfg = DistillConfig(model="convnet", width=0.125, dataset="digits", out_dim=64,
                        hidden_dim=32, bottleneck_dim=16, batch_size=64, num_steps=2)
    return distill(cfg, tmp_path_factory.mktemp("student"), device="cpu")


def test_rewinding_to_a_student_encoder(student, tmp_path):
    ref = f"{student.path}@last:encoder"
    code, _, _ = run_main(sweep_argv(tmp_path / "store", tmp_path / "s.h5", "--levels", "1",
                                     "--rewind", ref, "--seeds", "3"))
    assert code == 0
    sweep = sweep_from_args(parser().parse_args(sweep_argv(
        tmp_path / "store", tmp_path / "s.h5", "--levels", "1", "--rewind", ref,
        "--seeds", "3")))
    assert sweep.plan.rewind_step == 0 and sweep.plan.reference == ref
    dense, level1 = (level_run(sweep, 3, "ticket", level) for level in (0, 1))
    source = read_checkpoint(student.ckpt_path(student.latest_step()))["model"]["state"]
    fresh = create_model("convnet", num_classes=10, width=0.125, in_channels=1, seed=3)
    start = read_checkpoint(dense.ckpt_path(0))["model"]["state"]
    for name, value in start.items():
        expect = source[name] if name.startswith("encoder.") else fresh.state_dict()[name]
        assert torch.equal(value, expect), name
    masks = read_mask(cell_config(sweep, 3, "ticket", 1).mask)
    rewound = read_checkpoint(level1.ckpt_path(0))["model"]["state"]
    assert all(torch.equal(rewound[n], start[n] * masks.get(n, 1)) for n in start)
    inputs = open_result(tmp_path / "s.h5", "imp").attrs["inputs"]
    assert inputs[0]["ref"] == ref and len(inputs[0]["sha256"]) == 64


def test_shards_split_the_seeds_and_merge(tmp_path):
    for i in (0, 1):
        code, _, _ = run_main(sweep_argv(tmp_path / "store", tmp_path / "imp.h5", "--levels",
                                         "1", "--steps", "20", "--rewind", "init@5",
                                         "--seeds", "0", "1", "--shard", f"{i}/2"))
        assert code == 0
        part = open_result(tmp_path / f"imp.shard{i}of2.h5", "imp")
        assert part.done[:, :, i].all() and not part.done[:, :, 1 - i].any()
    merged = merge_results(tmp_path / "imp.h5", [tmp_path / f"imp.shard{i}of2.h5"
                                                 for i in (0, 1)])
    assert merged.done.all()
    assert sorted(p.name for p in (tmp_path / "store").glob("train_*/seed_*")) == \
        ["seed_0", "seed_0", "seed_1", "seed_1"]


def test_instability_trains_a_sibling_per_cell_and_stores_barriers(tmp_path):
    argv = sweep_argv(tmp_path / "store", tmp_path / "i.h5", "--levels", "1", "--rewind",
                      "init@1ep", "--instability", "--barrier-grid", "0:1:5")
    code, _, _ = run_main(argv)
    assert code == 0
    data = open_result(tmp_path / "i.h5", "imp")
    assert data.attrs["bn_mode"] == "recalibrate" and list(data.coords["split"]) == \
        ["train", "test"]
    for name in ("error_barrier", "loss_barrier_mean", "loss_barrier_linear"):
        values = data.metrics[name]
        assert values.shape == (1, 2, 1, 2) and np.isfinite(values).all(), name
        assert (values > -0.01).all()  # the path's maximum includes its endpoints
    sweep = sweep_from_args(parser().parse_args(argv))
    for level in (0, 1):
        cfg = cell_config(sweep, 0, "ticket", level)
        sibling = imp_module.child_config(sweep.plan, cfg, level)
        assert sibling.data_seed == cfg.data_seed + 1 and sibling.mask == cfg.mask
        assert sibling.rewind == imp_module.rewind_ref(sweep.plan, 0)
        runs = [sweep.train(c) for c in (cfg, sibling)]
        assert all(r.done for r in runs) and runs[0].path != runs[1].path
        starts = [read_checkpoint(r.ckpt_path(REWIND_STEP))["model"] for r in runs]
        assert_same(starts[0], starts[1], f"level {level} start")
        ends = [read_checkpoint(r.ckpt_path(NUM_STEPS))["model"]["state"] for r in runs]
        assert not torch.equal(ends[0]["fc.weight"], ends[1]["fc.weight"])


# --- planning without training ---------------------------------------------------------------

def test_parse_rewind():
    assert parse_rewind("init@0", 17) == ("", 0)
    assert parse_rewind("init", 17) == ("", 0)
    assert parse_rewind("init@2ep", 17) == ("", 34)
    assert parse_rewind("init@40", 17) == ("", 40)
    assert parse_rewind("store/distill_x/seed_0@last:encoder", 17) == \
        ("store/distill_x/seed_0@last:encoder", 0)
    # a label names a row; the dense run (and its hash) is the same without it
    assert parse_rewind("student:=store/distill_x/seed_0@last:encoder", 17) == \
        ("store/distill_x/seed_0@last:encoder", 0)


def test_mask_folder_hash_ignores_levels_and_baselines(sweep):
    plan = sweep.plan
    more = dataclasses.replace(plan, imp=dataclasses.replace(plan.imp, levels=9, baselines=()))
    assert imp_dir(more) == imp_dir(plan) and identity(more) == identity(plan)
    for change in (dict(rate=0.3), dict(prune_scope="all"), dict(rewind_optimizer="reset")):
        other = dataclasses.replace(plan, imp=dataclasses.replace(plan.imp, **change))
        assert imp_dir(other) != imp_dir(plan), change
    # the random chains have their own folders; reinit runs differ by their TrainConfig
    for change in (dict(random_baseline="global"), dict(reinit_from="0")):
        other = dataclasses.replace(plan, imp=dataclasses.replace(plan.imp, **change))
        assert imp_dir(other) == imp_dir(plan), change
    # the output layer enters resolved, under the key of sweeps before --prune-output
    dense_fc = dataclasses.replace(plan, output_pruned=False)
    assert identity(dense_fc)["imp"] == {**identity(plan)["imp"], "keep_output_dense": True}
    later = dataclasses.replace(plan, rewind_step=2 * STEPS_PER_EPOCH)
    assert imp_dir(later) != imp_dir(plan)


def test_make_plan_scopes(sweep):
    plan = sweep.plan
    dense_only = make_plan(dataclasses.replace(plan.imp, prune_output="no"), plan.train,
                           plan.store, sweep.data, "4ep")
    assert dense_only.total == TOTAL - 160 and "fc.weight" not in dense_only.shapes
    every = make_plan(dataclasses.replace(plan.imp, prune_scope="all"), plan.train,
                      plan.store, sweep.data, "4ep")
    assert every.total == TOTAL + 2 * (4 + 8 + 16) + 10


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A toolkit checkpoint of a convnet twice as wide as the sweep's."""
    path = tmp_path_factory.mktemp("wide") / "wide.pt"
    save_checkpoint(path, create_model("convnet", num_classes=10, width=0.25, in_channels=1), 0)
    return path


@pytest.mark.parametrize("flags, culprit", [
    (["--rate", "1.5"], "--rate 1.5"),
    (["--rate", "0"], "--rate 0"),
    (["--levels", "40"], "--levels 40 leaves no weight"),
    (["--levels", "-1"], "--levels -1"),
    (["--baselines", "shuffled"], "unknown baseline 'shuffled'; valid: random, reinit"),
    (["--rewind", "init@5ep"], "--rewind init@5ep"),
    (["--rewind", "init@two"], "--rewind init@K"),
    (["--rewind", "WIDE:encoder"], "another architecture"),
    (["--rewind", "no/such/run@last:encoder"], "no file or run"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--shard", "2/2"], "--shard"),
    (["--instability", "--barrier-grid", "0.2:0.8:4"], "alpha = 0 and 1"),
])
def test_bad_input_exits_2_before_training(tmp_path, capsys, wide_checkpoint, flags, culprit):
    flags = [f.replace("WIDE", str(wide_checkpoint)) for f in flags]
    code = main(sweep_argv(tmp_path / "store", tmp_path / "imp.h5", *flags))
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and errors[-1].startswith("error: ") and culprit in errors[-1]
    assert sum(line.startswith("error") for line in errors) == 1
    assert not list(tmp_path.rglob("*"))  # no run, mask or result written
