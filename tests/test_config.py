"""Configs: stable hashes of the non-default fields, typed CLI flags, strict rebuilding."""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from runs.config import (
    add_config_args,
    arg,
    config_from_args,
    config_hash,
    from_dict,
    non_default,
    parse_steps,
    to_dict,
)
from runs.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Defined as text too, so a fresh interpreter can build the very same class.
CONFIG_SOURCE = textwrap.dedent('''
    from dataclasses import dataclass
    from runs.config import arg

    @dataclass(frozen=True)
    class Cfg:
        lr: float = arg(0.1, "peak learning rate")
        num_steps: int = arg(100, "iterations to train")
        optimizer: str = arg("sgd", "optimiser", choices=("sgd", "adam"))
        flip: bool = arg(True, "random horizontal flips")
        milestones: tuple[int, ...] = arg((10, 20), "steps where the LR drops")
        mask: str | None = arg(None, "mask file, or none")
        nesterov: bool | None = arg(None, "Nesterov momentum (none: the optimiser's choice)")
        prune_fraction: float = arg(0.2, "weights pruned per level (20 % of the rest)")
        seed: int = arg(0, "init seed")
''')
namespace: dict = {}
exec(CONFIG_SOURCE, namespace)  # noqa: S102 - our own literal source
Cfg = namespace["Cfg"]


def parse(argv):
    parser = add_config_args(argparse.ArgumentParser(), Cfg)
    return config_from_args(Cfg, parser.parse_args(argv))


def test_hash_is_stable_across_processes():
    cfg = Cfg(lr=0.05, milestones=(5,))
    script = CONFIG_SOURCE + textwrap.dedent('''
        from runs.config import config_hash
        print(config_hash(Cfg(lr=0.05, milestones=(5,))))
    ''')
    env = dict(os.environ, PYTHONHASHSEED="12345")  # set/dict order must not matter
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == config_hash(cfg)
    # Pinned format: changing it would silently move every existing run directory.
    expected = json.dumps({"lr": 0.05, "milestones": [5]}, sort_keys=True)
    assert out == hashlib.sha256(expected.encode()).hexdigest()[:8]


def test_hash_names_non_default_fields_only():
    base = config_hash(Cfg())
    assert config_hash(Cfg(lr=0.1)) == base  # explicitly the default
    assert non_default(Cfg()) == {}
    changed = [Cfg(lr=0.2), Cfg(num_steps=5), Cfg(optimizer="adam"), Cfg(flip=False),
               Cfg(milestones=(10,)), Cfg(mask="m.pt"), Cfg(nesterov=False)]
    hashes = {config_hash(c) for c in changed}
    assert base not in hashes and len(hashes) == len(changed)
    assert len(base) == 8


def test_seed_is_excluded_from_the_hash():
    assert config_hash(Cfg(seed=3)) == config_hash(Cfg())
    assert config_hash(Cfg(lr=0.3, seed=1)) == config_hash(Cfg(lr=0.3, seed=2))
    assert "seed" not in non_default(Cfg(seed=7))


def test_flags_are_typed_from_fields():
    cfg = parse(["--lr", "0.5", "--num-steps", "7", "--optimizer", "adam", "--no-flip",
                 "--milestones", "1", "2", "3", "--mask", "m.pt", "--nesterov"])
    assert cfg == Cfg(lr=0.5, num_steps=7, optimizer="adam", flip=False,
                      milestones=(1, 2, 3), mask="m.pt", nesterov=True)
    assert isinstance(cfg.milestones, tuple) and isinstance(cfg.num_steps, int)
    assert parse(["--flip"]).flip is True and parse(["--no-nesterov"]).nesterov is False
    assert parse([]) == Cfg()
    assert parse(["--milestones"]).milestones == ()


def test_bad_flag_values_are_rejected():
    for argv in (["--optimizer", "lbfgs"], ["--num-steps", "1.5"], ["--milestones", "a"]):
        with pytest.raises(SystemExit):
            parse(argv)


def test_help_lists_every_field_with_its_help_line():
    parser = add_config_args(argparse.ArgumentParser(), Cfg, exclude=("seed",), group="model")
    text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
    for flag, line in [("--lr", "peak learning rate"), ("--num-steps", "iterations to train"),
                       ("--flip", "random horizontal flips"), ("--no-flip", ""),
                       ("--milestones", "steps where the LR drops"),
                       ("--prune-fraction", "(20 % of the rest)")]:
        assert flag in text and line in text
    assert "--seed" not in text and "model:" in text


def test_overrides_and_missing_flags():
    parser = add_config_args(argparse.ArgumentParser(), Cfg, exclude=("seed",))
    cfg = config_from_args(Cfg, parser.parse_args(["--lr", "0.3"]), seed=4)
    assert cfg == Cfg(lr=0.3, seed=4)


def test_from_dict_round_trip_and_unknown_keys():
    cfg = Cfg(lr=0.01, milestones=(3, 4), seed=2)
    data = json.loads(json.dumps(to_dict(cfg)))  # as read back from config.json
    assert data["milestones"] == [3, 4]
    assert from_dict(Cfg, data) == cfg
    with pytest.raises(UserError) as err:
        from_dict(Cfg, {"lr": 0.1, "learning_rate": 0.2, "epochs": 3})
    message = str(err.value)
    assert "epochs, learning_rate" in message
    for name in ("lr", "milestones", "num_steps", "seed"):
        assert name in message.split("valid:")[1]


def test_configs_are_frozen_and_defaults_immutable():
    with pytest.raises(AttributeError):
        Cfg().lr = 1.0  # noqa: B018
    assert replace(Cfg(), lr=1.0).lr == 1.0
    with pytest.raises(TypeError, match="tuples"):
        arg([1, 2], "a list default would be shared")


@pytest.mark.parametrize("spec, steps", [("1000", 1000), (1000, 1000), ("0", 0), ("2ep", 100),
                                         ("0.5ep", 25), ("0.3ep", 15), (" 3ep ", 150)])
def test_parse_steps(spec, steps):
    assert parse_steps(spec, steps_per_epoch=50) == steps


@pytest.mark.parametrize("spec", ["", "ep", "2 ep", "-5", "1e3", "2epochs", "abc"])
def test_parse_steps_rejects_bad_specs(spec):
    with pytest.raises(UserError, match="--rewind-step: cannot parse") as err:
        parse_steps(spec, 50, flag="--rewind-step")
    assert "e.g. 1000" in str(err.value) and "e.g. 2ep" in str(err.value)  # both forms


def test_parse_steps_rejects_fractional_iterations():
    with pytest.raises(UserError, match="--rewind-step: '1.5' is not a whole number"):
        parse_steps("1.5", 50, flag="--rewind-step")


def test_parse_steps_in_epochs_needs_steps_per_epoch():
    assert parse_steps("40", 0) == 40
    with pytest.raises(UserError, match="steps_per_epoch"):
        parse_steps("2ep", 0)
