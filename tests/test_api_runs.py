"""The runs package from Python (runs.load, run_train, run_distill, save) and user models
from the command line (--model module:factory, --import), with checkpoints that never
import a module the user did not name."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import runs
from runs import usercode
from runs.checkpoint import module_entry, read_checkpoint, save_checkpoint
from runs.config import from_dict
from runs.errors import UserError, cli
from runs.models import MODELS, Classifier, create_model
from runs.models import base as models_base
from runs.store import Run, open_run
from tests.helpers import assert_same
from tests.test_dinopl import write_ckpt
from tests.test_refs import Cfg, assert_same_state, tiny

BUILT_IN = dict(MODELS._entries)  # the registry before any test adds a user model
TRAIN = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size", "64",
         "--steps", "4", "--save-at", "2", "--device", "cpu"]
TRAIN_KW = dict(model="convnet", data="digits", steps="4", save_at=("2",), width=0.125,
                batch_size=64, device="cpu")
DISTILL = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--batch-size",
           "64", "--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "8",
           "--steps", "3", "--device", "cpu"]
DISTILL_KW = dict(model="convnet", data="digits", steps=3, width=0.125, batch_size=64,
                  out_dim=64, hidden_dim=32, bottleneck_dim=8, device="cpu")

USER_MODULE = '''
from torch import nn
from runs.models import Classifier

def net(num_classes=10, width=1.0, in_channels=3):
    hidden = max(1, round(16 * width))
    encoder = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden),
                            nn.ReLU(), Mean())
    return Classifier(encoder, hidden, num_classes)

class Mean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))

def plain(num_classes=10, width=1.0, in_channels=3):
    return nn.Linear(3, num_classes)
'''


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has named no user code: built-in models only, nothing allowed,
    tmp_path on sys.path, user modules forgotten afterwards."""
    def reset():
        monkeypatch.setattr(MODELS, "_entries", dict(BUILT_IN))
        monkeypatch.setattr(usercode, "_allowed", set())
        monkeypatch.setattr(models_base, "_user_names", set())
        for name in [m for m in sys.modules if m.startswith("apimodels_")]:
            del sys.modules[name]  # not monkeypatch.delitem: it would put them back
    reset()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield reset
    for name in [m for m in sys.modules if m.startswith("apimodels_")]:
        del sys.modules[name]


def same_checkpoint(path_a, path_b):
    a, b = read_checkpoint(path_a), read_checkpoint(path_b)
    for key in ("step", "model", "modules", "optimizer", "scheduler", "config", "extra"):
        assert_same(a[key], b[key], key)


def same_runs(run_a: Run, run_b: Run, store_a, store_b):
    assert run_a.path.relative_to(store_a) == run_b.path.relative_to(store_b)
    assert run_a.config() == run_b.config() and run_a.summary() == run_b.summary()
    assert run_a.steps() == run_b.steps()
    for step in run_a.steps():
        same_checkpoint(run_a.ckpt_path(step), run_b.ckpt_path(step))


# --- import runs stays cheap -----------------------------------------------------------------

def test_import_runs_and_results_import_no_torch():
    code = ("import sys, runs, runs.results; assert 'torch' not in sys.modules; "
            "assert callable(runs.save); assert 'torch' not in sys.modules; "
            "import runs.train; assert callable(runs.run_train) and callable(runs.load)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_api_names_do_not_shadow_the_cli_modules():
    import runs.distill
    import runs.train
    assert not hasattr(runs.train, "__getattr__") and callable(runs.train.main)
    assert runs.save is __import__("runs.results").results.save
    with pytest.raises(AttributeError):
        runs.nothing_here  # noqa: B018


# --- runs.load on every reference form -------------------------------------------------------

@pytest.fixture
def run_with_teacher(tmp_path):
    teacher = create_model("convnet", width=0.25, num_classes=4, seed=42)
    run = open_run(tmp_path / "store", "train", Cfg(lr=0.2), seed=0,
                   extra={"steps_per_epoch": 10, "model_spec": tiny().spec})
    for step in (0, 10, 20):
        save_checkpoint(run.ckpt_path(step), tiny(seed=100 + step), step, config={},
                        modules={"teacher": module_entry(teacher, with_state=False)})
    return run, teacher


def test_load_every_reference_form(run_with_teacher):
    run, teacher = run_with_teacher
    cases = {str(run.ckpt_path(10)): tiny(seed=110), f"{run.path}@last": tiny(seed=120),
             f"{run.path}@10": tiny(seed=110), f"{run.path}@1ep": tiny(seed=110),
             f"{run.path}@init": tiny(seed=100), f"{run.path.parent}": tiny(seed=120),
             f"{run.path}@20:teacher": teacher, f"{run.path}@20:student": tiny(seed=120)}
    for ref, expected in cases.items():
        model = runs.load(ref)
        assert not model.training and next(model.parameters()).device.type == "cpu", ref
        assert_same_state(model, expected)
    assert_same_state(runs.load(run.path, part="teacher"), teacher)  # a path, part=
    assert_same_state(runs.load(Run(run.path)), tiny(seed=120))  # a Run
    encoder = runs.load(f"{run.path}@10", part="encoder")
    assert_same_state(encoder.encoder, tiny(seed=110).encoder)
    run.ckpt_path(0).unlink()  # @init is the state the run began from: never rebuilt
    with pytest.raises(UserError, match="lacks its starting state"):
        runs.load(f"{run.path}@init")
    with pytest.raises(UserError, match="part 'head'; valid: encoder, student, teacher"):
        runs.load(run.path, part="head")
    with pytest.raises(UserError, match="holds no DINO head"):
        runs.load(run.path, head=True)


def test_load_plain_state_dict_and_dinopl(tmp_path):
    model = create_model("convnet", num_classes=7, seed=8)  # NAME=FILE: width 1
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert_same_state(runs.load(f"convnet={tmp_path / 'plain.pt'}"), model)
    path, models = write_ckpt(tmp_path, "resnet18")
    for role in ("student", "teacher"):
        encoder, head = models[role]
        loaded = runs.load(f"dinopl={path}", part=role, head=True)
        assert_same_state(loaded.model.encoder, encoder.encoder)
        assert_same_state(loaded.head, head)
        assert loaded.encoder is loaded.model.encoder and not loaded.training


# --- run_train / run_distill = the CLIs ------------------------------------------------------

def test_run_train_gives_the_cli_run(tmp_path):
    from runs.engines.train import main
    assert main([*TRAIN, "--store", str(tmp_path / "cli")]) == 0
    cli_run = Run(next((tmp_path / "cli").glob("train_*/seed_0")))
    result = runs.run_train(store=tmp_path / "api", **TRAIN_KW)
    assert result.run.done and result.summary == result.run.summary()
    assert result.run.steps() == [0, 2, 4]
    same_runs(cli_run, result.run, tmp_path / "cli", tmp_path / "api")
    again = runs.run_train(store=tmp_path / "api", **TRAIN_KW)  # finished: skipped
    assert again == result
    model = result.model()
    assert not model.training and model.spec["name"] == "convnet"
    assert_same(model.state_dict(), read_checkpoint(result.run.ckpt_path(4))["model"]["state"])
    assert_same_state(result.load(step="init"), runs.load(cli_run.ckpt_path(0)))


def test_run_train_on_tensors_stores_them_by_content_and_trains_as_on_the_name(tmp_path):
    """Digits given as tensors train bit for bit as data="digits" (same pixels, same
    statistics, same order), from an .npz in STORE/data named by its content."""
    from runs.data import load_dataset
    train, test = (load_dataset("digits", split=s) for s in ("train", "test"))
    kw = {**TRAIN_KW, "data": (train.x, train.y)}
    result = runs.run_train(store=tmp_path, test=(test.x, test.y), **kw)
    stored = sorted((tmp_path / "data").glob("tensors_*.npz"))
    assert len(stored) == 1 and result.run.config()["config"]["data_root"] == str(stored[0])
    named = runs.run_train(store=tmp_path, **TRAIN_KW)
    assert named.path != result.path  # another config, another run
    a, b = (read_checkpoint(r.run.ckpt_path(4))["model"]["state"] for r in (result, named))
    assert_same(a, b)
    assert runs.run_train(store=tmp_path, test=(test.x, test.y), **kw) == result  # reused
    flipped = (train.x.flip(3), train.y)
    other = runs.run_train(store=tmp_path, **{**kw, "data": flipped})
    assert other.path != result.path and len(list((tmp_path / "data").iterdir())) == 2
    with pytest.raises(UserError, match="uint8 pixels"):
        runs.run_train(store=tmp_path, **{**kw, "data": (train.x.float(), train.y)})


def test_run_train_log_is_the_cli_flag(tmp_path):
    """log= reaches the engine as --log does: without tensorboard, one line before training."""
    import importlib.util
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed: the missing-package error cannot show")
    with pytest.raises(UserError, match="pip install tensorboard"):
        runs.run_train(store=tmp_path, log="tensorboard", **TRAIN_KW)
    saved = {p.name for p in tmp_path.glob("train_*/seed_0/ckpt/*.pt")}
    assert saved <= {"step_0000000.pt"}  # no step was trained


def test_run_train_refuses_unknown_and_reserved_fields(tmp_path):
    with pytest.raises(UserError, match=r"unknown field\(s\) colour; valid: .*batch_size"):
        runs.run_train(store=tmp_path, colour="red", **TRAIN_KW)
    with pytest.raises(UserError, match="give num_steps as steps/save_at"):
        runs.run_train(store=tmp_path, num_steps=3, **TRAIN_KW)
    with pytest.raises(UserError, match="data="):
        runs.run_train(store=tmp_path, dataset="toy", **TRAIN_KW)
    assert not any(tmp_path.iterdir())  # nothing written


def test_run_distill_gives_the_cli_run_and_loads_with_head(tmp_path):
    from runs.engines.distill import DistillConfig, build_pair, main, teacher_seed
    from runs.models.head import DinoNet
    assert main([*DISTILL, "--store", str(tmp_path / "cli")]) == 0
    cli_run = Run(next((tmp_path / "cli").glob("distill_*/seed_0")))
    result = runs.run_distill(store=tmp_path / "api", **DISTILL_KW)
    same_runs(cli_run, result.run, tmp_path / "cli", tmp_path / "api")
    assert "knn_student" in result.summary
    student = result.load(head=True)
    assert isinstance(student, DinoNet) and not student.training
    payload = read_checkpoint(result.run.ckpt_path(3))
    assert_same(student.model.state_dict(), payload["model"]["state"])
    assert_same(student.head.state_dict(), payload["modules"]["head"]["state"])
    x = torch.zeros(2, 1, 8, 8)  # digits: 1 channel, 8x8, 10 classes
    assert student(x).shape == (2, 64) and student.encoder(x).shape == (2, 16)  # 128 x 0.125
    teacher = result.load(part="teacher", head=True)  # rebuilt from its seed
    cfg = from_dict(DistillConfig, result.run.config()["config"])
    assert_same_state(teacher, DinoNet(*build_pair(cfg, 10, 1, teacher_seed(cfg))))


def test_run_distill_takes_the_recipe_options_as_the_cli_does(tmp_path):
    """head_last=, loss=, drop_last=, input_stats= are DistillConfig fields: the same run
    as the flags, recorded in its config, and the head loads as it trained."""
    from runs.engines.distill import main
    flags = ["--head-last", "normed", "--loss", "mse", "--drop-last", "--input-stats",
             "dataset"]
    assert main([*DISTILL, *flags, "--store", str(tmp_path / "cli")]) == 0
    result = runs.run_distill(store=tmp_path / "api", **DISTILL_KW, head_last="normed",
                              loss="mse", drop_last=True, input_stats="dataset")
    cli_run = Run(next((tmp_path / "cli").glob("distill_*/seed_0")))
    assert cli_run.path.relative_to(tmp_path / "cli") == \
        result.run.path.relative_to(tmp_path / "api")
    config = result.run.config()["config"]
    assert (config["head_last"], config["loss"], config["drop_last"]) == ("normed", "mse", True)
    head = result.load(head=True).head
    assert head.spec["last"] == "normed" and head.last.normed
    with pytest.raises(UserError, match="--head-last flat: must be one of raw, normed"):
        runs.run_distill(store=tmp_path / "api", **DISTILL_KW, head_last="flat")


# --- the --import flag, on every CLI through the cli wrapper ---------------------------------

def test_import_flags_are_taken_off_before_the_parser(fresh, tmp_path):
    (tmp_path / "apimodels_flag.py").write_text("LOADED = True\n")
    seen = []

    @cli
    def command(argv=None):
        seen.append(argv)
        return 0

    assert command(["--import", "apimodels_flag", "a", "--import=apimodels_flag", "--", "b",
                    "--import", "x"]) == 0
    assert seen[-1] == ["a", "--", "b", "--import", "x"]  # after --: positional
    assert usercode.allowed_modules() == ["apimodels_flag"]
    assert command(["a"]) == 0 and seen[-1] == ["a"]
    assert command.__wrapped__(["--import", "apimodels_flag"]) == 0 and seen[-1] == []


@pytest.mark.parametrize("argv, message", [
    (["--import", "apimodels_missing"], r"--import apimodels_missing: cannot import module "
                                        r"apimodels_missing \(ModuleNotFoundError"),
    (["--import"], "--import needs a module name"),
    (["--import", "apimodels_broken"], r"apimodels_broken \(ZeroDivisionError: division by "
                                       r"zero\) at .*apimodels_broken.py:2"),
    (["--model", "apimodels_user:nope"], "--model apimodels_user:nope: module "
                                         "apimodels_user has no 'nope'"),
    (["--model", "apimodels_user:plain"], r"returned a Linear without encoder, fc, embed_dim"),
])
def test_import_errors_are_one_line(fresh, tmp_path, capsys, argv, message):
    from runs.engines.train import main
    (tmp_path / "apimodels_broken.py").write_text("X = 1\nY = 1 / 0\n")
    (tmp_path / "apimodels_user.py").write_text(USER_MODULE)
    assert main([*TRAIN, "--store", str(tmp_path / "store"), *argv]) == 2  # last --model wins
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and len(lines) <= 2  # the echo line, the error
    assert re.search(message, lines[-1]), lines[-1]
    assert not (tmp_path / "store").exists()


# --- user models: trained from the command line, loaded only when allowed --------------------

def test_user_model_through_the_cli_then_loaded_only_when_allowed(fresh, tmp_path, capsys):
    from landscape.interpolate import main as interpolate
    from runs.engines.train import main as train
    (tmp_path / "apimodels_user.py").write_text(USER_MODULE)
    store = tmp_path / "store"
    argv = ["--import", "apimodels_user", *TRAIN, "--store", str(store)]
    argv[argv.index("convnet")] = "apimodels_user:net"
    assert train(argv) == 0
    run = Run(next(store.glob("train_*/seed_0")))
    spec = read_checkpoint(run.ckpt_path(4))["model"]["spec"]
    assert spec["name"] == "apimodels_user:net" and run.config()["config"]["model"] == spec["name"]

    fresh()  # a later process: nothing named, the module not imported
    with pytest.raises(UserError) as err:
        runs.load(f"{run.path}@last")
    assert str(err.value).startswith(
        f"{run.ckpt_path(4)}: model 'apimodels_user:net' comes from module apimodels_user; "
        f"pass --import apimodels_user to allow it")
    assert "apimodels_user" not in sys.modules and "apimodels_user:net" not in MODELS

    out = tmp_path / "path.h5"
    scan = [f"{run.path}@init", f"{run.path}@last", "--dataset", "digits", "--grid", "0,1",
            "--device", "cpu", "--out", str(out)]
    capsys.readouterr()
    assert interpolate(scan) == 2
    assert "pass --import apimodels_user" in capsys.readouterr().err
    assert "apimodels_user" not in sys.modules and not out.exists()
    assert interpolate(["--import", "apimodels_user", *scan]) == 0 and out.exists()

    fresh()
    runs.models.allow("apimodels_user")  # the Python form of --import
    model = runs.load(f"{run.path}@last")
    assert_same(model.state_dict(), read_checkpoint(run.ckpt_path(4))["model"]["state"])


def test_run_train_with_a_module_factory_matches_the_cli(fresh, tmp_path):
    from runs.engines.train import main
    (tmp_path / "apimodels_user.py").write_text(USER_MODULE)
    argv = [*TRAIN, "--store", str(tmp_path / "cli")]
    argv[argv.index("convnet")] = "apimodels_user:net"
    assert main(argv) == 0
    fresh()
    result = runs.run_train(store=tmp_path / "api", **{**TRAIN_KW, "model": "apimodels_user:net"})
    cli_run = Run(next((tmp_path / "cli").glob("train_*/seed_0")))
    same_runs(cli_run, result.run, tmp_path / "cli", tmp_path / "api")
    assert result.model().spec["name"] == "apimodels_user:net"  # named here: allowed


def test_register_decorator(fresh):
    @runs.models.register
    def apimodels_tiny(num_classes=10, width=1.0, in_channels=3):
        return create_model("convnet", num_classes=num_classes, width=width,
                            in_channels=in_channels)

    model = create_model("apimodels_tiny", num_classes=3, width=0.125, seed=1)
    assert isinstance(model, Classifier) and model.spec["name"] == "apimodels_tiny"
    assert "apimodels_tiny" in MODELS.names() and "apimodels_tiny" in list(MODELS.names())
    runs.models.register(apimodels_tiny)  # a notebook cell run again: replaced, no error
    with pytest.raises(UserError, match="'resnet18' is built in"):
        runs.models.register(apimodels_tiny, name="resnet18")
    with pytest.raises(UserError, match="must take num_classes, width and in_channels"):
        runs.models.register(lambda size: None, name="apimodels_bad")

    @runs.models.register
    def apimodels_plain(num_classes=10, width=1.0, in_channels=3):
        return torch.nn.Linear(3, num_classes)

    with pytest.raises(UserError, match="without encoder, fc, embed_dim"):
        create_model("apimodels_plain")


def test_model_choices_follow_the_registry(fresh):
    from runs.engines.train import TrainConfig, parser
    choices = next(f for f in TrainConfig.__dataclass_fields__.values()
                   if f.name == "model").metadata["choices"]
    assert "apimodels_later" not in choices
    runs.models.register(lambda num_classes=10, width=1.0, in_channels=3: tiny(),
                         name="apimodels_later")
    assert "apimodels_later" in choices and list(choices) == sorted(MODELS._entries)
    assert parser().parse_args(["--model", "apimodels_later"]).model == "apimodels_later"


# --- a checkpoint never imports code on its own ----------------------------------------------

EVIL = textwrap.dedent('''
    import pathlib
    pathlib.Path(__file__).with_name("IMPORTED").write_text("ran")
    def net(num_classes=10, width=1.0, in_channels=3):
        raise SystemExit("must never run")
''')


@pytest.mark.parametrize("name, module", [("apimodels_evil:net", "apimodels_evil"),
                                          ("os:system", "os"),
                                          ("subprocess:run", "subprocess")])
def test_checkpoint_naming_a_module_is_refused_and_imports_nothing(fresh, tmp_path, name,
                                                                   module):
    (tmp_path / "apimodels_evil.py").write_text(EVIL)
    model = tiny()
    model.spec = {**model.spec, "name": name}
    path = save_checkpoint(tmp_path / "evil.pt", model, 0)
    before = set(sys.modules)
    message = (f"{path}: model '{name}' comes from module {module}; pass --import {module} "
               f"to allow it")
    with pytest.raises(UserError) as err:
        runs.load(path)
    assert str(err.value).startswith(message)
    run = open_run(tmp_path / "store", "train", Cfg(), seed=0, extra={"model_spec": model.spec})
    save_checkpoint(run.ckpt_path(0), model, 0)
    with pytest.raises(UserError, match=f"{run.ckpt_path(0)}: model '{name}' comes from"):
        runs.load(f"{run.path}@init")  # a run's checkpoint naming it: refused too
    assert not (tmp_path / "IMPORTED").exists()
    assert not {m for m in set(sys.modules) - before if "evil" in m or m == module}
    assert name not in MODELS and not usercode.allowed_modules()
    json.loads((run.path / "config.json").read_text())  # untouched, still valid
