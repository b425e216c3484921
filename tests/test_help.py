"""--help of every command and the messages a user copies from: examples that parse, each
default shown once, echoes that paste back, errors that name flags (issue #17, item 4)."""

import argparse
import importlib
import re
import shlex

import pytest
from _results_writer import CONFIG, open_scan

from runs.config import HelpFormatter, show_default
from runs.errors import UserError

# `python -m NAME` -> the module whose main(argv) it runs (the doors import it).
COMMANDS = {
    "runs.train": "runs.train",
    "runs.distill": "runs.distill",
    "runs.pipeline": "runs.pipeline",
    "runs.bench": "runs.bench",
    "runs.results": "runs.results",
    "runs.crashtest": "runs.crashtest",
    "runs.reproduce": "runs.reproduce",
    "probes.evaluate": "probes.evaluate",
    "landscape.interpolate": "landscape.interpolate",
    "landscape.border": "landscape.border",
    "tickets.imp": "tickets.imp",
    "figures": "figures.__main__",
}


def command_help(name, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal width
    main = importlib.import_module(COMMANDS[name]).main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> list[str]:
    """Each option's (or subcommand's) entry: its line at two spaces, then its indented
    continuation lines; the examples block is left out."""
    text = text.split("\nexamples:")[0]
    entries = []
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            entries.append(line)
        elif line.startswith("   ") and entries:
            entries[-1] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            entries.append("")  # a heading or a blank line ends the entry
    return [e for e in entries if e]


def example_commands(text: str) -> list[list[str]]:
    """The argv of every command line in the `examples:` block (continuations joined)."""
    block = text.split("\nexamples:\n", 1)[1].split("\n\n")[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [c for c in commands if c]


class Parsed(Exception):
    """Raised in place of running the command once its argv parsed."""


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_examples_and_each_default_once(name, capsys, monkeypatch):
    text = command_help(name, capsys, monkeypatch)
    assert "\nexamples:\n" in text
    assert 2 <= len(example_commands(text)) <= 4
    entries = option_entries(text)
    assert entries
    for entry in entries:
        words = re.sub(r"\{[^}]*\}", "", entry)  # choices like {default,max-autotune}
        assert len(re.findall(r"\bdefault\b", words, re.IGNORECASE)) <= 1, entry
        assert "%(" not in entry, entry


@pytest.mark.parametrize("name", COMMANDS)
def test_examples_are_real_command_lines(name, capsys, monkeypatch):
    """Every example starts with `python -m NAME` and its flags parse."""
    text = command_help(name, capsys, monkeypatch)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = importlib.import_module(COMMANDS[name]).main
    for argv in example_commands(text):
        assert argv[:3] == ["python", "-m", name], argv
        with pytest.raises(Parsed):
            main(argv[3:])


@pytest.mark.parametrize("name", ["runs.train", "runs.distill", "landscape.interpolate"])
def test_config_defaults_shown_once_and_as_typed(name, capsys, monkeypatch):
    text = command_help(name, capsys, monkeypatch)
    assert text.count("(default: resnet18)") <= 1
    assert "(default: ())" not in text and "(default: [])" not in text


def test_show_default_as_typed():
    assert show_default("") == "''"
    assert show_default(("0.5", 0.75)) == "0.5 0.75"
    assert show_default(()) == "none"
    assert show_default(256) == "256"


def test_formatter_keeps_a_default_given_in_words():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: out/<preset>)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flips")
    p.add_argument("--quick", action="store_true", help="a smoke run")
    text = p.format_help()
    assert "peak learning rate (default: 0.1)" in text
    assert text.count("default") == 3  # --out's own, --lr's, --flip's (argparse's)
    assert "smoke run (default" not in text


def test_pipeline_echo_pastes_back(tmp_path, capsys, monkeypatch):
    from runs.studies import pipeline
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *args: None)
    argv = ["--preset", "demo", "--out", str(tmp_path / "my out"), "--set",
            "distill.data_root=/data/with space", "seeds=[0]"]
    assert pipeline.main(argv) == 0
    echo = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("python -m runs.pipeline ")]
    assert len(echo) == 1
    assert shlex.split(echo[0]) == ["python", "-m", "runs.pipeline", *argv]


def test_pipeline_leaves_unset_values_out(tmp_path, monkeypatch):
    """No `--data-root ''` (an empty word a pasted echo loses): the flag is left out."""
    import probes.evaluate
    from runs.studies import pipeline
    assert pipeline.flags({"data_root": "", "dataset": "digits", "size": None}) == \
        ["--dataset", "digits"]
    calls = []
    monkeypatch.setattr(probes.evaluate, "main", lambda argv: calls.append(argv) or 0)
    layout = pipeline.Layout(tmp_path / "a folder")
    preset = {"distill": {"dataset": "digits"}, "probe": {"probes": ["knn"]}}
    pipeline.probe_stage(preset, layout, {"images": []}, "cpu")
    (argv,) = calls
    assert "--data-root" not in argv and "" not in argv
    assert shlex.split(shlex.join(argv)) == argv


def test_missing_root_names_the_flag(tmp_path, capsys):
    from runs.distill import main
    code = main(["--steps", "1", "--device", "cpu", "--store", str(tmp_path / "store")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "pass root=<" not in err


def test_loader_errors_name_flag_and_argument(tmp_path):
    from runs.data import load_dataset
    with pytest.raises(UserError, match=r"--data-root .*root= in Python"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match=r"--data-root \(root= in Python\)"):
        load_dataset("cifar10", root=tmp_path)


def test_refused_result_names_the_differing_key(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path, config={**CONFIG, "grid": "0:1:25"}):
        pass
    with pytest.raises(UserError, match=r"different config \(grid: '0:1:25' vs '0:1:11'\)"):
        open_scan(path, config={**CONFIG, "grid": "0:1:11"})
    with pytest.raises(UserError, match=r"config \(grid: '0:1:25' vs \(not set\); seed: 0 vs 1\)"):
        open_scan(path, config={**CONFIG, "seed": 1})


def test_merge_command_pastes_back_with_spaces(tmp_path):
    """The launcher's "when they finish" line: quoted paths, the shard glob left to the shell."""
    import glob

    from runs.launch import merge_command
    out = tmp_path / "my results" / "scan.h5"
    out.parent.mkdir()
    shards = [out.parent / f"scan.shard{i}of2.h5" for i in range(2)]
    for shard in shards:
        shard.touch()
    argv = shlex.split(merge_command(out, 2))
    assert argv[:6] == ["python", "-m", "runs.results", "merge", "--overwrite", str(out)]
    assert sorted(glob.glob(argv[6])) == [str(s) for s in shards]
