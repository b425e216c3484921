"""No file a user passes runs code: crafted pickles are refused in one line, exit 2.

A crafted pickle here is a `__reduce__` that writes a marker file when unpickled (checked to
be live with plain `pickle.load`). It is passed every way a command takes a checkpoint:
a plain path, RUN@STEP's file, resnet18=FILE and dinopl=FILE, to probes.evaluate and
landscape.interpolate; the marker must not appear, nothing is written, and the last stderr
line names the file and the pickled Python object. Lightning checkpoints load through an
explicit allow-list (tested on a checkpoint pickled with a stand-in `lightning` package);
anything else needs `--trust-pickle FILE`.
"""

import json
import pickle
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from helpers import run_cli

from runs import usercode
from runs.checkpoint import read_checkpoint, save_checkpoint
from runs.dinopl import import_dinopl
from runs.errors import UserError
from runs.models import create_model
from runs.refs import load_model
from runs.store import Run

PROBE = ["--dataset", "toy", "--probes", "knn", "--seeds", "0", "--device", "cpu"]
SCAN = ["--grid", "0:1:3", "--dataset", "toy", "--bn-samples", "32", "--bn-batch-size", "32",
        "--device", "cpu"]


class Marker:
    """Unpickling this calls builtins.exec, which creates `path`: code run by a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.fixture(autouse=True)
def no_trusted_files(monkeypatch):
    monkeypatch.setattr(usercode, "_trusted", set())


def lightning_like(extra) -> dict:
    """A dinopl checkpoint's top level (resnet20 student encoder), plus `extra` callbacks."""
    model = create_model("resnet20", width=0.25, shortcut="projection")
    state = {f"student.enc.{k}": v for k, v in model.encoder.state_dict().items()}
    return {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.9.4",
            "state_dict": state, "callbacks": {"ModelCheckpoint": extra}, "loops": {},
            "optimizer_states": [], "lr_schedulers": []}


def crafted(tmp_path, kind: str = "zip", lightning: bool = False):
    """(file, marker): a checkpoint whose unpickling would create `marker`."""
    marker = tmp_path / "MARKER"
    payload = lightning_like(Marker(marker)) if lightning else {"model": Marker(marker)}
    path = tmp_path / f"crafted_{kind}.pt"
    if kind == "zip":
        torch.save(payload, path)
    else:  # a bare pickle, protocol 2 (torch's legacy format) or 4 (pickle's default)
        path.write_bytes(pickle.dumps(payload, protocol=2 if kind == "raw2" else 4))
    return path, marker


def test_the_crafted_pickle_is_live(tmp_path):
    path, marker = crafted(tmp_path, "raw2")
    pickle.loads(path.read_bytes())  # what an unguarded loader would do
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "raw2", "raw4"])
def test_read_checkpoint_refuses_without_running(tmp_path, kind):
    path, marker = crafted(tmp_path, kind)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert not marker.exists()
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    if kind != "raw4":  # protocol 4 fails on its framing before any global is read
        assert "builtins.exec" in message and f"--trust-pickle {path}" in message


def test_blocked_module_is_named(tmp_path):
    import os
    path = tmp_path / "os.pt"
    torch.save({"x": os.system}, path)  # pickled as posix.system (or nt.system)
    with pytest.raises(UserError, match=r"Python object (posix|nt)\.system"):
        read_checkpoint(path)


def fake_run(tmp_path, content: bytes) -> str:
    """A run folder whose last checkpoint file holds `content`: RUN@last reads it."""
    run = Run(tmp_path / "store" / "train_00000000" / "seed_0")
    run.ckpt_dir.mkdir(parents=True)
    (run.path / "config.json").write_text(json.dumps({"kind": "train", "config": {}}))
    run.ckpt_path(4).write_bytes(content)
    return str(run.path)


def call(module: str, argv: list[str]) -> tuple[int, list[str]]:
    """main(argv) of a command: its exit status and stderr lines."""
    return run_cli(module, argv)


@pytest.mark.parametrize("command", ["probes.evaluate", "landscape.interpolate"])
@pytest.mark.parametrize("how", ["plain", "run", "resnet18", "dinopl"])
def test_crafted_reference_is_refused_by_the_clis(tmp_path, command, how):
    path, marker = crafted(tmp_path, lightning=how == "dinopl")
    ref = {"plain": str(path), "run": f"{fake_run(tmp_path, path.read_bytes())}@last",
           "resnet18": f"resnet18={path}", "dinopl": f"dinopl={path}"}[how]
    good = save_checkpoint(tmp_path / "good.pt", create_model("convnet", width=0.125,
                                                              num_classes=4), 0)
    out = tmp_path / "out.h5"
    argv = ([ref, *PROBE] if command == "probes.evaluate" else [str(good), ref, *SCAN])
    code, lines = call(command, [*argv, "--out", str(out)])
    assert not marker.exists()
    assert code == 2 and lines[-1].startswith("error: "), lines
    assert sum(line.startswith("error:") for line in lines) == 1, lines
    assert "builtins.exec" in lines[-1] and "--trust-pickle" in lines[-1]
    assert not out.exists()


# ---- Lightning checkpoints: what they legitimately pickle loads, nothing else ------------

FAKE_LIGHTNING = '''
class AttributeDict(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err

    def __setattr__(self, key, value):
        self[key] = value
'''

WRITER = '''
import argparse, pathlib, sys, numpy as np, torch
from lightning.fabric.utilities.data import AttributeDict
ckpt = torch.load(sys.argv[1], weights_only=False)
ckpt["hyper_parameters"] = AttributeDict(enc="resnet20", enc_norm_layer="BatchNorm",
    dataset="CIFAR10", lr=np.float64(0.1), steps=np.int64(3), logdir=pathlib.Path("/r/x"),
    dtype=np.dtype("float32"), table=np.arange(3), args=argparse.Namespace(seed=1),
    torch_version=torch.__version__)
ckpt["hparams_name"] = "kwargs"
torch.save(ckpt, sys.argv[1])
'''


def test_lightning_allow_list_reads_what_lightning_pickles(tmp_path):
    """AttributeDict (from a stand-in `lightning` package on the writer's path only),
    Namespace, a PosixPath, numpy scalars, dtype and array, TorchVersion: all load as data."""
    package = tmp_path / "pkg" / "lightning" / "fabric" / "utilities"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "data.py").write_text(FAKE_LIGHTNING)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_like({"best_model_score": torch.tensor(0.5)}), path)
    subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True,
                   env={"PYTHONPATH": str(tmp_path / "pkg")})
    model, payload = import_dinopl(path)
    config = payload["config"]
    assert payload["config_source"] == "hyper_parameters" and type(config) is dict
    assert config["lr"] == 0.1 and config["steps"] == 3 and list(config["table"]) == [0, 1, 2]
    assert str(config["logdir"]) == "/r/x" and vars(config["args"]) == {"seed": 1}
    assert config["dtype"] == "float32" and config["torch_version"] == torch.__version__
    assert model.spec["name"] == "resnet20"


def test_other_objects_need_trust_pickle(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(lightning_like(defaultdict(list)), path)
    with pytest.raises(UserError, match=r"collections\.defaultdict.*--trust-pickle"):
        load_model(f"dinopl={path}")
    rest = usercode.take_argv(["x", "--trust-pickle", str(tmp_path / "." / "last.ckpt"), "-y"])
    assert rest == ["x", "-y"] and usercode.is_trusted_file(path)
    assert load_model(f"dinopl={path}").model.spec["name"] == "resnet20"


def test_trust_pickle_through_a_cli(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(lightning_like(defaultdict(list)), path)
    out = tmp_path / "probe.h5"
    code, lines = call("probes.evaluate", [f"dinopl={path}", *PROBE, "--out", str(out)])
    assert code == 2 and "collections.defaultdict" in lines[-1] and not out.exists()
    code, lines = call("probes.evaluate", [f"dinopl={path}", *PROBE, "--out", str(out),
                                           f"--trust-pickle={path}"])
    assert code == 0, lines[-3:]
    assert out.exists()


def test_trust_pickle_needs_a_file():
    with pytest.raises(UserError, match="--trust-pickle needs a checkpoint file"):
        usercode.take_argv(["--trust-pickle", "--out", "x"])


def test_launched_tasks_trust_the_same_files(tmp_path):
    """--trust-pickle was taken off argv before main: each array task must get it again."""
    from runs.launch import job_specs
    usercode.trust_file(tmp_path / "last.ckpt")
    assert job_specs(["a", "--shards", "2"], 2)[0] == [
        "--trust-pickle", str((tmp_path / "last.ckpt").resolve()), "a", "--shard", "0/2"]
