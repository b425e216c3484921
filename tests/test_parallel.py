"""K runs trained together (runs.engines.parallel) equal the same runs trained one by one:
weights, BN running statistics, momentum, masks, data orders, metrics, DONE; a kill in the
middle resumes all K; runs of different shapes are refused naming the setting."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from runs.checkpoint import read_checkpoint
from runs.engines import parallel
from runs.engines.parallel import (
    Stack,
    check_shared,
    fitting_runs,
    shape_groups,
    train_many,
    train_together,
)
from runs.engines.train import TrainConfig, load_data, train
from runs.errors import UserError
from runs.models import create_model
from runs.store import Run
from tests.helpers import killed_on_call
from tickets.mask import dense_mask, prunable_names, save_mask
from tickets.prune import magnitude_prune

# toy 16x16: 256 train images, 8 steps of 32 an epoch; 11 steps cross an epoch end and the
# multistep milestones (5, 8); checkpoints kept at 3 and 11.
BASE = TrainConfig(model="convnet", width=0.125, dataset="toy", batch_size=32, num_steps=11,
                   save_at=(3,), lr=0.05, warmup_steps=2)
K = 3
ATOL = 1e-6  # float32: a grouped convolution sums in another order than K plain ones


def children(base: TrainConfig = BASE, **changes) -> list[TrainConfig]:
    """K runs of one shape: their own init seed and data order."""
    return [dataclasses.replace(base, seed=k, data_seed=100 + k, **changes) for k in range(K)]


def assert_runs_equal(solo: Run, together: Run) -> None:
    """Every kept checkpoint (weights, BN buffers, momentum, schedule), the metrics and the
    summary of two runs agree to ATOL; momentum (a sum of raw gradients, which a grouped
    convolution sums in another order) where it moves the weights: lr * buffer to ATOL."""
    assert solo.path.name == together.path.name and solo.steps() == together.steps()
    for step in solo.steps():
        a, b = (read_checkpoint(r.ckpt_path(step)) for r in (solo, together))
        assert a["step"] == b["step"] == step
        for name, value in a["model"]["state"].items():
            torch.testing.assert_close(b["model"]["state"][name], value, atol=ATOL, rtol=0,
                                       msg=f"{name} at step {step}")
        assert a["scheduler"] == b["scheduler"]
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
        assert state_a.keys() == state_b.keys()
        for i in state_a:
            torch.testing.assert_close(state_b[i]["momentum_buffer"],
                                       state_a[i]["momentum_buffer"], atol=ATOL / BASE.lr,
                                       rtol=0)
    metrics_a, metrics_b = solo.metrics(), together.metrics()
    assert [m["step"] for m in metrics_a] == [m["step"] for m in metrics_b]
    for m_a, m_b in zip(metrics_a, metrics_b):
        assert m_a.keys() == m_b.keys()
        for key in m_a:
            assert m_b[key] == pytest.approx(m_a[key], abs=1e-6), key
    assert together.done and together.summary()["step"] == solo.summary()["step"]


@pytest.fixture(scope="module")
def toy_data():
    return load_data(BASE)


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory, toy_data):
    store = tmp_path_factory.mktemp("solo")
    return [train(cfg, store, toy_data, "cpu") for cfg in children()]


def test_convnet_with_bn_together_equals_one_by_one(tmp_path, toy_data, one_by_one):
    runs = train_together(children(), tmp_path, toy_data, "cpu", parallel_runs=K)
    for solo, together in zip(one_by_one, runs):
        assert_runs_equal(solo, together)
    state = read_checkpoint(runs[1].ckpt_path(11))["model"]["state"]
    assert int(state["encoder.1.num_batches_tracked"]) == 11  # BN stepped once per step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, toy_data):
    """The K runs trained together without a kill."""
    store = tmp_path_factory.mktemp("together")
    return train_together(children(), store, toy_data, "cpu", parallel_runs=K)


def assert_identical(a: Run, b: Run) -> None:
    """Two runs hold the same checkpoints (weights, optimiser, schedule) bit for bit, the
    same metrics and the same files."""
    files = sorted(p.relative_to(a.path) for p in a.path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.path) for p in b.path.rglob("*") if p.is_file())
    for step in a.steps():
        x, y = (read_checkpoint(r.ckpt_path(step)) for r in (a, b))
        for name, value in x["model"]["state"].items():
            assert torch.equal(y["model"]["state"][name], value), (step, name)
        for i, state in x["optimizer"]["state"].items():
            assert torch.equal(y["optimizer"]["state"][i]["momentum_buffer"],
                               state["momentum_buffer"]), (step, i)
        assert (x["scheduler"], x["extra"]["kind"]) == (y["scheduler"], y["extra"]["kind"])
    assert a.metrics() == b.metrics() and a.summary() == b.summary()


def test_killed_together_resumes_all_to_the_same_files(tmp_path, toy_data, one_by_one,
                                                       uninterrupted):
    configs = children()
    stopped = train_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K, stop_at=6)
    assert all(not r.done and (r.path / "ckpt" / "resume.pt").is_file() for r in stopped)
    runs = train_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    for solo, clean, together in zip(one_by_one, uninterrupted, runs):
        assert_identical(clean, together)
        assert_runs_equal(solo, together)
        assert not list((together.path / "ckpt").glob("resume*"))


def test_a_kill_between_the_groups_saves_resumes_bit_for_bit(tmp_path, toy_data,
                                                             uninterrupted):
    """Killed after the first run wrote its epoch-end state and before the others did: the
    re-run takes every run back to the step all hold and trains them together again."""
    configs = children()
    with killed_on_call(parallel, "save_resume", 2) as calls:
        train_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    assert [step for _, step in calls] == [8, 8]  # the first epoch end (8 steps)
    first = Run(tmp_path / uninterrupted[0].path.relative_to(uninterrupted[0].root))
    assert (first.path / "ckpt" / "resume.pt").is_file()  # step 8, its peers are at 3
    runs = train_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    for clean, together in zip(uninterrupted, runs):
        assert_identical(clean, together)


def test_a_kill_while_the_group_marks_itself_done_leaves_no_resume_state(
        tmp_path, toy_data, uninterrupted):
    """Killed after two runs were marked DONE: the third finishes alone (runs.train), and
    keeps neither resume.pt nor the group's resume.prev.pt."""
    from runs.engines import engine
    # stopped at 9, the group holds resume states at 9 and 8 (resume.prev.pt)
    train_together(children(), tmp_path, toy_data, "cpu", parallel_runs=K, stop_at=9)
    with killed_on_call(engine, "clear_resume", 3) as calls:
        train_together(children(), tmp_path, toy_data, "cpu", parallel_runs=K)
    third = calls[2][0]
    assert (third.path / "ckpt" / "resume.prev.pt").is_file() and not third.done
    runs = train_together(children(), tmp_path, toy_data, "cpu", parallel_runs=K)
    for clean, together in zip(uninterrupted, runs):
        assert_identical(clean, together)  # the same files: no resume state left


def test_runs_at_different_steps_after_a_kill_still_finish_equal(tmp_path, toy_data,
                                                                one_by_one):
    """One run killed further than the others (a kill between two saves): it trains in its
    own group, the others together."""
    configs = children()
    train(configs[0], tmp_path, toy_data, "cpu", stop_at=9)
    train_together(configs[1:], tmp_path, toy_data, "cpu", parallel_runs=2, stop_at=4)
    runs = train_many(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    for solo, together in zip(one_by_one, runs):
        assert_runs_equal(solo, together)


@pytest.fixture(scope="module")
def mlp_tickets(tmp_path_factory, toy_data):
    """An MLP trained densely for 4 steps (the rewind point), and K masks of it at three
    densities: IMP's branches at one level, rewound to step 4 under their masks."""
    store = tmp_path_factory.mktemp("mlp")
    dense_cfg = dataclasses.replace(BASE, model="mlp", width=0.25, save_at=(4,), num_steps=12,
                                    model_options=("image_size=16",))
    dense = train(dense_cfg, store, toy_data, "cpu")
    model = create_model("mlp", num_classes=4, width=0.25, in_channels=3, image_size=16)
    state = read_checkpoint(dense.ckpt_path(12))["model"]["state"]
    names = prunable_names(model)
    full = dense_mask(model, names)
    total = sum(m.numel() for m in full.values())
    masks = [save_mask(store / f"mask{k}.pt", magnitude_prune(state, full, total * d // 10))
             for k, d in enumerate((8, 5, 2))]
    configs = [dataclasses.replace(dense_cfg, rewind=f"{dense.path}@4", mask=str(m),
                                   data_seed=7 + k, save_at=())
               for k, m in enumerate(masks)]
    return store, configs


def test_mlp_with_masks_together_equals_one_by_one(tmp_path_factory, toy_data, mlp_tickets):
    store, configs = mlp_tickets
    solo = [train(cfg, tmp_path_factory.mktemp("mlp_solo"), toy_data, "cpu")
            for cfg in configs]
    runs = train_together(configs, store, toy_data, "cpu", parallel_runs=K)
    for one, together, cfg in zip(solo, runs, configs):
        assert_runs_equal(one, together)
        mask = read_checkpoint(cfg.mask)
        state = read_checkpoint(together.ckpt_path(12))["model"]["state"]
        for name, keep in mask.items():
            assert (state[name][~keep] == 0).all(), name  # pruned weights stay exactly 0


@pytest.mark.slow
def test_a_compiled_stack_trains_the_runs_eager_trains(tmp_path, toy_data, uninterrupted):
    """--compile: the vmapped step under torch.compile (BN statistics updated in place in
    the compiled graph) gives the eager group's runs (one compile, ~15 s on 2 CPU cores)."""
    runs = train_together(children(), tmp_path, toy_data, "cpu", parallel_runs=K,
                          compile_model=True)
    for eager, compiled in zip(uninterrupted, runs):
        assert_runs_equal(eager, compiled)


def test_stack_of_models_matches_separate_sgd():
    """The Stack alone: K models with BN, one SGD over the stacked tensors = K SGDs."""
    models = [create_model("convnet", num_classes=4, width=0.125, seed=k) for k in range(K)]
    plain = [create_model("convnet", num_classes=4, width=0.125, seed=k) for k in range(K)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
                  for m in plain]
    stack = Stack(models, lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        xs, ys = torch.randn(K, 8, 3, 16, 16, generator=gen), torch.randint(0, 4, (K, 8),
                                                                           generator=gen)
        losses = stack.step(xs, ys)
        for k, (model, opt) in enumerate(zip(plain, optimizers)):
            loss = F.cross_entropy(model(xs[k]), ys[k])
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert losses[k].item() == pytest.approx(loss.item(), abs=ATOL)
    stack.write_back()
    for model, ref in zip(models, plain):
        for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=name)


def test_runs_of_different_shapes_are_refused_naming_the_setting(tmp_path, toy_data):
    configs = children()
    configs[2] = dataclasses.replace(configs[2], lr=0.1)
    with pytest.raises(UserError, match=r"--lr \(0\.05 vs 0\.1\)"):
        train_together(configs, tmp_path, toy_data, "cpu", parallel_runs=K)
    assert not any(tmp_path.iterdir())  # refused before any run folder
    with pytest.raises(UserError, match="--width"):
        check_shared([BASE, dataclasses.replace(BASE, width=0.25)])
    other = dataclasses.replace(BASE, batch_size=16)
    assert [len(g) for g in shape_groups([BASE, other, BASE])] == [2, 1]


def test_fitting_runs_counts_what_memory_holds():
    assert fitting_runs(100, 1000) == 8  # 80 % of 1000 / 100
    assert fitting_runs(100, 10**9) == 16  # capped
    assert fitting_runs(10**9, 100) == 1  # never 0


def test_run_train_many_is_run_train_per_seed(tmp_path):
    """The Python door: three seeds trained together are the runs run_train makes for each
    seed (same folders, weights to ATOL); mismatched lists are one line."""
    import runs
    options = dict(data="toy", steps="6", width=0.125, batch_size=32, lr=0.05, device="cpu")
    together = runs.run_train_many(store=tmp_path / "a", seeds=[0, 1, 2],
                                   data_seeds=[5, 6, 7], parallel_runs=3, **options)
    for result, seed, data_seed in zip(together, (0, 1, 2), (5, 6, 7)):
        alone = runs.run_train(store=tmp_path / "b", seed=seed, data_seed=data_seed,
                               **options)
        assert_runs_equal(alone.run, result.run)
    with pytest.raises(UserError, match="3 seeds, 2 data_seeds and 3 masks"):
        runs.run_train_many(store=tmp_path / "a", seeds=[0, 1, 2], data_seeds=[0, 1],
                            **options)


@pytest.mark.gpu
def test_on_cuda_auto_stacks_several_runs_and_they_match_alone(tmp_path, toy_data):
    """CUDA: auto picks several runs for a tiny model, and fp32 runs trained together (bf16
    off, TF32 as configured) end near the same runs trained alone."""
    from runs.engines.parallel import auto_parallel_runs
    assert auto_parallel_runs(BASE, toy_data, "cuda") >= 2
    configs = children()
    together = train_together(configs, tmp_path / "a", toy_data, "cuda", "fp32", K)
    for cfg, run in zip(configs, together):
        alone = train(cfg, tmp_path / "b", toy_data, "cuda", "fp32")
        a, b = (read_checkpoint(r.ckpt_path(11))["model"]["state"] for r in (alone, run))
        for name, value in a.items():
            torch.testing.assert_close(b[name], value, atol=1e-3, rtol=1e-3, msg=name)
