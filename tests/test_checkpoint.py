"""Checkpoints rebuild their model from the file alone and fail loudly, naming the file."""

import numpy as np
import pytest
import torch
from torch import nn

from runs.checkpoint import (
    load_state_strict,
    module_entry,
    read_checkpoint,
    rebuild,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from runs.errors import UserError
from runs.models import create_model
from runs.models.head import create_head


def tiny(seed=0, **kw):
    return create_model("convnet", width=0.125, num_classes=4, seed=seed, **kw)


def trained(seed=0):
    """A tiny model with one SGD step (momentum) and non-trivial BN running stats."""
    model = tiny(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 4
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_round_trip_rebuilds_a_bit_identical_model(tmp_path):
    model, optimizer, scheduler = trained()
    assert model.encoder[1].num_batches_tracked.item() == 1  # BN buffers moved
    path = save_checkpoint(tmp_path / "ckpt" / "step_0000001.pt", model, 1,
                           config={"lr": 0.1, "milestones": (1, 2)}, optimizer=optimizer,
                           scheduler=scheduler, extra={"steps_per_epoch": 3})
    payload = read_checkpoint(path)
    assert payload["format"] == "runs/ckpt/1" and payload["step"] == 1
    assert payload["model"]["spec"]["name"] == "convnet"
    assert payload["config"] == {"lr": 0.1, "milestones": (1, 2)}
    assert payload["extra"] == {"steps_per_epoch": 3}
    rebuilt = rebuild(payload["model"], str(path))
    assert type(rebuilt) is type(model) and rebuilt.spec == model.spec
    assert_same_state(model, rebuilt)
    x = torch.randn(4, 3, 8, 8)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_optimizer_and_scheduler_state_round_trip(tmp_path):
    model, optimizer, scheduler = trained()
    path = save_checkpoint(tmp_path / "c.pt", model, 1, optimizer=optimizer,
                           scheduler=scheduler)
    payload = read_checkpoint(path)
    model2 = rebuild(payload["model"], str(path))
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=1, gamma=0.5)
    optimizer2.load_state_dict(payload["optimizer"])
    scheduler2.load_state_dict(payload["scheduler"])
    assert scheduler2.last_epoch == 1 and optimizer2.param_groups[0]["lr"] == 0.05
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(optimizer.state[p]["momentum_buffer"],
                           optimizer2.state[p2]["momentum_buffer"])
    # One more identical step on both gives identical weights: the resume is exact.
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    for m, opt in ((model, optimizer), (model2, optimizer2)):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    assert_same_state(model, model2)


def test_rng_state_is_saved(tmp_path):
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "c.pt", tiny(), 0)
    expected = torch.rand(3)
    torch.manual_seed(99)
    set_rng_state(read_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_extra_modules_and_seed_only_entries(tmp_path):
    teacher = tiny(seed=5)
    head = create_head(in_dim=16, out_dim=32, hidden_dim=8, bottleneck_dim=4, seed=2)
    path = save_checkpoint(tmp_path / "c.pt", tiny(), 0, modules={
        "teacher": module_entry(teacher, with_state=False), "head": module_entry(head)})
    modules = read_checkpoint(path)["modules"]
    assert modules["teacher"]["state"] is None
    assert_same_state(rebuild(modules["teacher"], str(path)), teacher)  # from its seed alone
    assert_same_state(rebuild(modules["head"], str(path)), head)


def test_numpy_values_in_config_and_extra_read_back(tmp_path):
    # The weights-only loader refuses numpy objects: they must be plain numbers in the file.
    center = torch.randn(5)  # tensors stay tensors (distillation stores its centre)
    path = save_checkpoint(tmp_path / "c.pt", tiny(), 2, config={"lr": np.float32(0.5)},
                           extra={"acc": np.float64(0.25), "n": np.int64(3), "center": center,
                                  "curve": [np.arange(2), (np.int32(1), "a")]})
    payload = read_checkpoint(path)
    assert payload["config"] == {"lr": 0.5}
    extra = payload["extra"]
    assert extra["acc"] == 0.25 and type(extra["n"]) is int and extra["n"] == 3
    assert extra["curve"] == [[0, 1], (1, "a")] and torch.equal(extra["center"], center)


def test_truncated_file_names_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "step_0000010.pt", tiny(), 10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="step_0000010.pt") as err:
        read_checkpoint(path)
    assert "truncated" in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(UserError, match="step_0000010.pt"):
        read_checkpoint(path)
    with pytest.raises(UserError, match="no checkpoint file at .*missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")


def test_other_architecture_names_file_and_keys(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", tiny(), 0)
    state = read_checkpoint(path)["model"]["state"]
    other = create_model("resnet20", width=0.5, num_classes=4)  # stem 8 vs 4 channels
    with pytest.raises(UserError) as err:
        load_state_strict(other, state, str(path))
    message = str(err.value)
    assert str(path) in message and "resnet20" in message
    assert "missing keys: encoder.0.weight" not in message  # both have encoder.0.weight
    assert "missing keys" in message and "unexpected keys" in message
    assert "shape mismatch" in message and "encoder.0.weight" in message
    assert "more)" in message  # long key lists are cut, with a count


def test_width_mismatch_names_shapes(tmp_path):
    state = tiny().state_dict()
    with pytest.raises(UserError) as err:
        load_state_strict(create_model("convnet", width=0.25, num_classes=4), state, "f.pt")
    message = str(err.value)
    assert "f.pt" in message and "encoder.0.weight (4, 3, 3, 3) vs (8, 3, 3, 3)" in message
    assert "missing keys" not in message


def test_load_state_strict_accepts_a_fitting_state():
    source, target = tiny(seed=1), tiny(seed=2)
    assert load_state_strict(target, source.state_dict(), "x") is target
    assert_same_state(source, target)


def test_rebuild_without_spec_asks_for_a_name(tmp_path):
    with pytest.raises(UserError, match="resnet18=") as err:
        rebuild({"spec": {}, "state": {}}, "plain.pt")
    assert "plain.pt" in str(err.value)


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the real model under `._orig_mod`."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module


def test_unwrap(tmp_path):
    model = tiny()
    assert unwrap(model) is model
    assert unwrap(Wrapper(model)) is model
    assert unwrap(Compiled(model)) is model
    assert unwrap(Wrapper(Compiled(Wrapper(model)))) is model
    empty = nn.Sequential()  # falsy (len 0), yet a module
    assert unwrap(Wrapper(empty)) is empty
    path = save_checkpoint(tmp_path / "c.pt", Wrapper(Compiled(model)), 3)
    entry = read_checkpoint(path)["model"]
    assert entry["spec"] == model.spec and "encoder.0.weight" in entry["state"]


# ---- damaged or foreign files: one complete line naming the file --------------------------

def _spec(change):
    def edit(payload):
        change(payload["model"]["spec"])
    return edit


MALFORMED = {
    "spec not a dict": (lambda p: p["model"].update(spec=["convnet"]), "spec is a list"),
    "name missing": (_spec(lambda s: s.pop("name")), "spec has no name"),
    "name not a str": (_spec(lambda s: s.update(name=5)), "spec has no name"),
    "unknown registry": (_spec(lambda s: s.update(registry="zoo")), "registry 'zoo'; valid"),
    "option of the wrong type": (_spec(lambda s: s.update(width="wide")), "width='wide'"),
    "state missing": (lambda p: p["model"].pop("state"), "has no state"),
    "model entry not a dict": (lambda p: p.update(model="convnet"), "entry is a str"),
    "state not tensors": (lambda p: p["model"].update(state={"w": 1}), "not a dict of name"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_checkpoint_is_one_line_naming_the_file(tmp_path, case):
    from runs.refs import load_model
    change, words = MALFORMED[case]
    payload = read_checkpoint(save_checkpoint(tmp_path / "c.pt", tiny(), 0))
    change(payload)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path / "bad.pt"))
    message = str(err.value)
    assert str(tmp_path / "bad.pt") in message and words in message and "\n" not in message


def _foreign(path):
    import h5py
    kind = path.suffix
    if kind == ".json":
        path.write_text('{"model": {"spec": {"name": "convnet"}}}')
    elif kind == ".h5":
        with h5py.File(path, "w") as file:
            file["x"] = np.zeros(3)
    elif kind == ".npz":
        np.savez(path, x=np.zeros(3))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("name, words", [("x.json", "a JSON file"), ("x.h5", "an HDF5 file"),
                                         ("x.npz", "a NumPy .npz archive"),
                                         ("x.pt", "an empty file")])
def test_foreign_file_as_checkpoint_is_named_whole(tmp_path, name, words):
    """A JSON, HDF5, npz or empty file: said in full (the old message was cut mid-sentence)."""
    path = tmp_path / name
    _foreign(path)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert str(err.value) == f"cannot read checkpoint {path}: it is {words}" + \
        (" (a result?)" if name == "x.h5" else "") + ", not a torch checkpoint"
