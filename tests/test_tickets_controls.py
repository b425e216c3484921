"""IMP's controls (issue #18), each a named option: --random-baseline, --reinit-from,
--rewind-optimizer and --prune-output. Tiny CPU sweeps (digits, convnet width 0.125, 2
levels of a few steps); the output-layer choice needs no training (vgg11, resnet20)."""

import collections
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from runs.checkpoint import read_checkpoint
from runs.engines import engine
from runs.engines import train as train_module
from runs.errors import UserError
from runs.models import create_model
from runs.results import open_result
from tickets.imp import (
    cell_config,
    ensure_mask,
    identity,
    imp_dir,
    level_run,
    main,
    make_plan,
    mask_file,
    parser,
    result_config,
    sweep_from_args,
)
from tickets.mask import is_nested, num_kept, read_mask
from tickets.prune import derived_seed, kept_count, random_prune

# 50 steps, rewound to step 40: past both multistep milestones (25, 37), so the lr at K
# (0.05 * 0.01) differs from the lr at 0 and a schedule restarted at 0 would show.
K, T = 40, 50
TINY = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size", "64",
        "--val-size", "100", "--lr", "0.05", "--steps", str(T), "--rewind", f"init@{K}",
        "--crop-padding", "0", "--no-flip", "--device", "cpu", "--seeds", "0"]


def argv(tmp_path, *extra) -> list[str]:
    return ["--store", str(tmp_path / "store"), "--out", str(tmp_path / "imp.h5"), *TINY,
            *extra]


def planned(tmp_path, *extra):
    return sweep_from_args(parser().parse_args(argv(tmp_path, *extra)))


def counting_steps(monkeypatch) -> collections.Counter:
    """Optimizer steps taken, per (init seed, start step, mask file name)."""
    steps = collections.Counter()
    real = train_module.train_step

    def counted(s, x, y):
        steps[(s.cfg.seed, s.cfg.start_step, s.cfg.mask.rsplit("/", 1)[-1])] += 1
        return real(s, x, y)

    monkeypatch.setattr(train_module, "train_step", counted)
    return steps


# --- --reinit-from -------------------------------------------------------------------------

def test_reinit_from_k_trains_t_minus_k_steps_from_the_schedule_at_k(tmp_path, monkeypatch):
    steps = counting_steps(monkeypatch)
    assert main(argv(tmp_path, "--levels", "2", "--baselines", "reinit")) == 0
    for level in (1, 2):  # the ticket and the reinit control: T - K steps each, from K
        assert steps[(0, 0, f"level_00{level}.pt")] == T - K
        assert steps[(1000, K, f"level_00{level}.pt")] == T - K
    sweep = planned(tmp_path, "--levels", "2", "--baselines", "reinit")
    dense = read_checkpoint(level_run(sweep, 0, "ticket", 0).ckpt_path(K))
    run = level_run(sweep, 0, "reinit", 2)
    assert run.steps() == [K, T] and run.config()["config"]["start_step"] == K
    start = read_checkpoint(run.ckpt_path(K))
    fresh = create_model("convnet", num_classes=10, width=0.125, in_channels=1, seed=1000)
    mask = read_mask(cell_config(sweep, 0, "reinit", 2).mask)
    for name, value in fresh.state_dict().items():  # a fresh init (seed + 1000), masked
        assert torch.equal(start["model"]["state"][name], value * mask.get(name, 1)), name
    assert start["optimizer"]["state"] == {}  # a fresh optimiser: no momentum yet
    lr_at_k = dense["optimizer"]["param_groups"][0]["lr"]
    assert lr_at_k == pytest.approx(0.05 * 0.01)
    assert start["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at_k, rel=1e-12)
    assert start["scheduler"]["last_epoch"] == K
    config = open_result(tmp_path / "imp.h5", "imp").config
    assert config["imp"]["reinit_from"] == "k"


def test_reinit_from_0_trains_all_t_steps_and_reuses_the_tickets(tmp_path, monkeypatch):
    assert main(argv(tmp_path, "--levels", "1", "--baselines", "reinit")) == 0
    steps = counting_steps(monkeypatch)
    assert main(argv(tmp_path, "--levels", "1", "--baselines", "reinit", "--reinit-from",
                     "0", "--overwrite")) == 0
    assert steps == {(1000, 0, "level_001.pt"): T}  # the ticket runs were not retrained
    sweep = planned(tmp_path, "--levels", "1", "--baselines", "reinit", "--reinit-from", "0")
    assert level_run(sweep, 0, "reinit", 1).steps() == [0, T]
    assert open_result(tmp_path / "imp.h5", "imp").config["imp"]["reinit_from"] == "0"


# --- --rewind-optimizer --------------------------------------------------------------------

def fresh_sgd_step(model, cfg, lr, mask, x, y) -> dict:
    """The oracle: one step of a new torch SGD (no momentum buffer) under the mask."""
    model = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    F.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        params[name].grad.mul_(keep)
    sgd.step()
    with torch.no_grad():
        for name, keep in mask.items():
            params[name].mul_(keep)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def rewound_session(sweep, cfg, store):
    return train_module.setup(cfg, store, sweep.data, device="cpu")


def test_rewind_optimizer_reset_starts_a_fresh_sgd_at_k(tmp_path):
    sweep = planned(tmp_path, "--levels", "1", "--rewind-optimizer", "reset")
    cfg = cell_config(sweep, 0, "ticket", 1)  # trains the dense run (the mask needs it)
    assert cfg.rewind_optimizer == "reset" and cfg.start_step == 0
    dense = read_checkpoint(level_run(sweep, 0, "ticket", 0).ckpt_path(K))
    mask = read_mask(cfg.mask)
    s = rewound_session(sweep, cfg, tmp_path / "store")
    try:
        assert s.step == K and s.scheduler.last_epoch == K
        assert not s.optimizer.state  # no momentum buffers: momentum 0 at K
        lr = dense["optimizer"]["param_groups"][0]["lr"]
        assert s.optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        for name, value in dense["model"]["state"].items():  # weights and BN buffers
            expect = value * mask[name] if name in mask else value
            assert torch.equal(s.model.state_dict()[name], expect), name
        _, x, y = next(engine.batches(s.loader, s.step, cfg.num_steps))
        expect = fresh_sgd_step(s.model, cfg, lr, mask, x, y)
        train_module.train_step(s, x, y)
        for name, value in s.model.named_parameters():
            torch.testing.assert_close(value.detach(), expect[name], rtol=0, atol=1e-7)
    finally:
        train_module.release(s)


def test_rewind_optimizer_restore_keeps_the_momentum_at_k(tmp_path):
    sweep = planned(tmp_path, "--levels", "1")
    cfg = cell_config(sweep, 0, "ticket", 1)
    assert cfg.rewind_optimizer == "restore"
    dense = read_checkpoint(level_run(sweep, 0, "ticket", 0).ckpt_path(K))
    mask = read_mask(cfg.mask)
    s = rewound_session(sweep, cfg, tmp_path / "store")
    try:
        names = [n for n, _ in s.model.named_parameters()]
        for i, param in enumerate(s.model.parameters()):
            buf = dense["optimizer"]["state"][i]["momentum_buffer"]
            expect = buf * mask[names[i]] if names[i] in mask else buf
            assert torch.equal(s.optimizer.state[param]["momentum_buffer"], expect), names[i]
        _, x, y = next(engine.batches(s.loader, s.step, cfg.num_steps))
        lr = s.optimizer.param_groups[0]["lr"]
        fresh = fresh_sgd_step(s.model, cfg, lr, mask, x, y)
        train_module.train_step(s, x, y)
        assert not torch.allclose(s.model.fc.weight, fresh["fc.weight"], rtol=0, atol=1e-7)
    finally:
        train_module.release(s)


def test_rewind_optimizer_is_in_the_mask_identity_and_the_result(tmp_path):
    assert main(argv(tmp_path, "--levels", "1", "--rewind-optimizer", "reset")) == 0
    sweep = planned(tmp_path, "--levels", "1", "--rewind-optimizer", "reset")
    run = level_run(sweep, 0, "ticket", 1)
    assert read_checkpoint(run.ckpt_path(K))["optimizer"]["state"] == {}
    assert run.config()["config"]["rewind_optimizer"] == "reset"
    # the dense run is the restore sweep's: reset only changes what rewinding does
    restore = planned(tmp_path, "--levels", "1")
    assert cell_config(restore, 0, "ticket", 0) == cell_config(sweep, 0, "ticket", 0)
    assert imp_dir(restore.plan) != imp_dir(sweep.plan)  # later masks follow the tickets
    identity = json.loads((imp_dir(sweep.plan) / "imp.json").read_text())
    assert identity["imp"]["rewind_optimizer"] == "reset"
    config = open_result(tmp_path / "imp.h5", "imp").config
    assert config["imp"]["rewind_optimizer"] == "reset"
    assert config["train"]["rewind_optimizer"] == "restore"  # the dense run's own


def test_start_step_and_reset_are_checked_before_training():
    cfg = train_module.TrainConfig(model="convnet", num_steps=50)
    for bad in (dict(start_step=50), dict(start_step=-1),
                dict(start_step=5, rewind="RUN@5")):
        with pytest.raises(UserError, match="--start-step"):
            train_module.check_start(dataclasses.replace(cfg, **bad))
    with pytest.raises(UserError, match="--rewind-optimizer reset: only with --rewind"):
        train_module.check_start(dataclasses.replace(cfg, rewind_optimizer="reset"))
    train_module.check_start(dataclasses.replace(cfg, start_step=49))


# --- --random-baseline ---------------------------------------------------------------------

def test_layerwise_random_masks_have_the_tickets_per_layer_counts(tmp_path):
    assert main(argv(tmp_path, "--levels", "2", "--baselines", "random")) == 0
    sweep = planned(tmp_path, "--levels", "2", "--baselines", "random")
    assert cell_config(sweep, 0, "random", 1).mask == \
        str(mask_file(sweep.plan, 0, "random_layerwise", 1))
    previous = None
    for level in (1, 2):
        ticket = read_mask(mask_file(sweep.plan, 0, "ticket", level))
        random = read_mask(mask_file(sweep.plan, 0, "random_layerwise", level))
        assert {n: int(m.sum()) for n, m in random.items()} == \
            {n: int(m.sum()) for n, m in ticket.items()}, level
        assert all(not torch.equal(random[n], ticket[n]) for n in ticket)
        assert previous is None or is_nested(random, previous)
        previous = random
    run = level_run(sweep, 0, "random", 2)
    assert run.steps() == [K, T]  # rewound to K like the ticket
    assert open_result(tmp_path / "imp.h5", "imp").config["imp"]["random_baseline"] == \
        "layerwise"


def test_global_random_masks_are_the_old_chain(tmp_path):
    """--random-baseline global: the masks sweeps wrote before the option (folder "random":
    uniform over all prunable weights, the ticket's total count, nested); no training."""
    sweep = planned(tmp_path, "--levels", "2", "--baselines", "random", "--random-baseline",
                    "global")
    assert cell_config(sweep, 0, "random", 2).mask == str(mask_file(sweep.plan, 0, "random", 2))
    total = sweep.plan.total
    parent = {n: torch.ones(shape, dtype=torch.bool) for n, shape in sweep.plan.shapes.items()}
    for level in (1, 2):
        mask = read_mask(ensure_mask(sweep, 0, "random", level))
        expect = random_prune(parent, kept_count(total, 0.2, level),
                              derived_seed("random", 0, level))
        assert all(torch.equal(mask[n], expect[n]) for n in expect)
        assert num_kept(mask) == kept_count(total, 0.2, level)
        parent = mask
    assert not list(tmp_path.glob("store/train_*"))  # nothing trained


# --- --prune-output ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A planned digits sweep: its data and training config (nothing trains)."""
    return planned(tmp_path_factory.mktemp("digits"), "--levels", "1")


@pytest.mark.parametrize("model, options, fc_pruned", [
    ("vgg11", {}, False),  # open_lth: VGG's fc stays dense
    ("resnet20", {}, True),  # open_lth: ResNets' fc is pruned
    ("vgg11", {"prune_output": "yes"}, True),
    ("resnet20", {"prune_output": "no"}, False),
    ("vgg11", {"prune_scope": "all"}, True),  # the paper's code: every parameter
])
def test_output_layer_per_model(digits, tmp_path, model, options, fc_pruned):
    imp = dataclasses.replace(digits.plan.imp, **options)
    cfg = dataclasses.replace(digits.plan.train, model=model, width=0.125)
    plan = make_plan(imp, cfg, tmp_path, digits.data, str(T))
    assert ("fc.weight" in plan.shapes) is fc_pruned and plan.output_pruned is fc_pruned
    assert any(n.startswith("encoder.") for n in plan.shapes)  # conv weights prunable
    recorded = result_config(plan)
    assert recorded["output_pruned"] is fc_pruned
    assert recorded["imp"]["prune_output"] == options.get("prune_output", "auto")
    assert ("keep_output_dense" in identity(plan)["imp"]) is not fc_pruned


def test_model_options_decide_the_prunable_parameters(digits, tmp_path):
    """--model-option norm=batch adds BatchNorm parameters: prunable under scope all."""
    imp = dataclasses.replace(digits.plan.imp, prune_scope="all")
    plain, batch = (make_plan(imp, dataclasses.replace(digits.plan.train, model="vgg11",
                                                       width=0.125, model_options=options),
                              tmp_path, digits.data, str(T))
                    for options in ((), ("norm=batch",)))
    model = create_model("vgg11", num_classes=10, width=0.125, in_channels=1, norm="batch")
    assert list(batch.shapes) == [n for n, _ in model.named_parameters()]
    assert len(batch.shapes) > len(plain.shapes) and "fc.weight" in batch.shapes
