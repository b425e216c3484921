"""A preset is data: checked against runs.studies.preset_schema before anything runs.

Each rule refuses in one line naming the preset file and the key path, through
`python -m runs.pipeline` with exit 2 and nothing written under --out."""

import contextlib
import io
import json

import pytest

from runs import usercode
from runs.errors import UserError
from runs.studies.pipeline import load_preset, main, preset_names
from runs.studies.preset_schema import preset_problems, validate

JOB = {"name": "path", "refs": ["@images[0]:teacher", "@images[0]:last"], "grid": "-0.5:1:3"}
GOOD = {"description": "ok", "seeds": [0], "noise": False, "alphas": [1.0],
        "distill": {"model": "convnet", "dataset": "digits", "save_at": ["1ep"]},
        "interpolate": [JOB]}


def with_job(**change) -> dict:
    return {**GOOD, "interpolate": [JOB, {**JOB, **change}]}


BAD = {  # case: (preset, key path and words the one line must hold)
    "name up two folders": (with_job(name="../../x"),
                            "interpolate[1].name '../../x' must be a plain file name"),
    "absolute name": (with_job(name="/tmp/x"), "interpolate[1].name '/tmp/x' must be a plain"),
    "backslash name": (with_job(name="a\\b"), "interpolate[1].name"),
    "dot-dot name": (with_job(name=".."), "interpolate[1].name '..' must be a plain"),
    "empty name": (with_job(name=""), "interpolate[1].name '' must be a plain"),
    "name not a string": (with_job(name=3), "interpolate[1].name 3 must be a plain"),
    "unknown key": ({**GOOD, "plots": {}}, "unknown key(s) plots; valid:"),
    "seeds a string": ({**GOOD, "seeds": "0"}, "seeds '0' must be a list of integers"),
    "noise a string": ({**GOOD, "noise": "yes"}, "noise 'yes' must be true or false"),
    "stage not an object": ({**GOOD, "distill": ["model"]}, "distill ['model'] must be an obj"),
    "jobs not a list": ({**GOOD, "imp": {"name": "x"}}, "imp {'name': 'x'} must be a list"),
    "job not an object": ({**GOOD, "border": ["x"]}, "border[0] 'x' must be an object"),
    "refs not strings": (with_job(refs=[1]), "interpolate[1].refs [1] must be a list"),
    "nested value": ({**GOOD, "train": {"lr": {"a": 1}}}, "train.lr {'a': 1} must be a"),
    "out set": ({**GOOD, "probe": {"out": "/tmp/x.h5"}}, "probe.out: a preset may not set out"),
    "store set": (with_job(store="/tmp/s"), "interpolate[1].store: a preset may not set"),
    "import set": ({**GOOD, "train": {"import": "os"}}, "train.import: a preset may not set"),
    "trust_pickle set": (with_job(trust_pickle="x.ckpt"), "interpolate[1].trust_pickle: a pr"),
    "flag in a list": (with_job(metrics=["knn", "--import", "antigravity"]),
                       "interpolate[1].metrics[1] '--import' looks like a flag"),
    "flag in refs": (with_job(refs=["--trust-pickle=x.ckpt"]), "interpolate[1].refs[0] '--t"),
    "flag name": ({**GOOD, "train": {"Batch-Size": 3}}, "train.Batch-Size: 'Batch-Size' is n"),
    "code as model": ({**GOOD, "distill": {"model": "evil_mod:net"}},
                      "distill.model 'evil_mod:net' names Python code (module evil_mod); "
                      "allow it on the command line with --import evil_mod"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_rule_refuses_naming_file_and_key(tmp_path, case):
    preset, words = BAD[case]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(UserError) as err:
        load_preset(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_good_and_shipped_presets_pass():
    assert validate(GOOD, "g.json") is GOOD
    for name in preset_names():
        load_preset(name)


def test_every_problem_is_listed_and_counted(tmp_path):
    preset = {**with_job(name="../x"), "seeds": "0", "plots": 1}
    assert len(list(preset_problems(preset))) == 3
    with pytest.raises(UserError, match=r"\(\+2 more problems\)$"):
        validate(preset, "p.json")


def test_code_as_model_passes_once_allowed_on_the_command_line():
    preset = {**GOOD, "distill": {"model": "my_lab.models:net"}}
    assert list(preset_problems(preset))
    usercode.allow("my_lab.models")  # what --import my_lab.models does (conftest resets it)
    assert not list(preset_problems(preset))


def test_base_preset_is_checked_as_its_own_file(tmp_path):
    base, child = tmp_path / "base.json", tmp_path / "child.json"
    base.write_text(json.dumps(with_job(name="../../x")))
    child.write_text(json.dumps({"base": str(base), "seeds": [1]}))
    with pytest.raises(UserError, match=rf"^{base}: interpolate\[1\]\.name"):
        load_preset(str(child))


def snapshot(root) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", ["name up two folders", "flag in a list", "code as model"])
def test_pipeline_exits_2_and_writes_nothing(tmp_path, case):
    preset, words = BAD[case]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(preset))
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    (out / "results" / "kept.h5").write_bytes(b"mine")
    before = snapshot(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--preset", str(path), "--out", str(out), "--device", "cpu"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: {path}: ")
    assert words in lines[-1] and sum(line.startswith("error:") for line in lines) == 1
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "x").exists()
