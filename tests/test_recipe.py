"""runs.recipe: the paper's settings, labels for departures from them, and runs written
before issue #18 read back with the settings they were made with (never today's defaults)."""

import dataclasses
import hashlib
import json

import pytest

from runs.checkpoint import save_checkpoint
from runs.config import from_dict, to_dict
from runs.engines.distill import DistillConfig
from runs.engines.train import TrainConfig
from runs.models import create_model
from runs.recipe import PAPER, PAPER_TRAIN, SCALE_KEYS, fill_legacy, variant_names
from runs.refs import load_model
from runs.store import Run, identity, open_run, run_path

NEW_KEYS = ("model_options", "input_stats", "drop_last", "head", "head_last", "loss",
            "init_noise")


def old_record(cfg) -> dict:
    """config.json as this toolkit wrote it before issue #18: without the new keys."""
    return {k: v for k, v in to_dict(cfg).items() if k not in NEW_KEYS}


def old_hash(config: dict, defaults: dict) -> str:
    """The folder hash the old toolkit gave: sha256 of its non-default fields."""
    changed = {k: v for k, v in config.items() if k != "seed" and v != defaults.get(k)}
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


# --- PAPER and variant_names ----------------------------------------------------------------

def test_defaults_are_the_paper_recipe():
    for cls, paper in ((DistillConfig, PAPER), (TrainConfig, PAPER_TRAIN)):
        cfg = cls()
        for key, value in paper.items():
            assert getattr(cfg, key) == value, (cls.__name__, key)
        assert variant_names(to_dict(cfg)) == []


def test_variant_names_name_every_departure():
    cfg = to_dict(DistillConfig(model="vgg11", head_last="normed", input_stats="dataset",
                                drop_last=True, loss="mse", init_noise=0.01, head="linear",
                                model_options=("pool=avg",)))
    assert variant_names(cfg) == ["linear head", "normed head", "mse loss", "init noise 0.01",
                                  "dataset stats", "drop last", "avg pool"]
    r20 = {"model": "resnet20", "model_options": ["shortcut=A", "norm=batch"]}
    assert variant_names({**to_dict(DistillConfig()), **r20}) == ["option-A shortcuts"]
    assert variant_names({**to_dict(DistillConfig()), "model": "vgg11",
                          "model_options": ["pool=max"]}) == []  # the paper's own build
    alpha = to_dict(DistillConfig(alpha=1.0, out_dim=2048, bottleneck_dim=0))
    assert variant_names(alpha) == ["no bottleneck", "alpha 1", "m=2048"]
    assert variant_names(alpha, skip=("alpha", *SCALE_KEYS)) == ["no bottleneck"]
    demo = to_dict(DistillConfig(model="convnet", out_dim=2048, hidden_dim=256,
                                 bottleneck_dim=64, batch_size=64))
    assert variant_names(demo) == ["bottleneck 64", "m=2048", "hidden 256", "batch 64"]
    assert variant_names(demo, skip=SCALE_KEYS) == []
    supervised = to_dict(TrainConfig(flip=False, crop_padding=1, batch_size=64))
    assert variant_names(supervised) == ["no flips", "crop 1", "batch 64"]


# --- legacy fill ----------------------------------------------------------------------------

@pytest.mark.parametrize("model, options", [("resnet18", []), ("vgg11", ["pool=avg"]),
                                            ("resnet20", ["shortcut=A"])])
def test_a_config_written_before_the_options_reads_back_as_it_was_made(tmp_path, model,
                                                                        options):
    cfg = DistillConfig(model=model, alpha=1e-10)
    run_dir = tmp_path / "distill_old" / "seed_0"
    run_dir.mkdir(parents=True)
    record = {"kind": "distill", "seed": 0, "config": old_record(cfg), "identity": {},
              "steps_per_epoch": 195}
    (run_dir / "config.json").write_text(json.dumps(record))
    config = Run(run_dir).config()["config"]
    assert {k: config[k] for k in NEW_KEYS} == {
        "model_options": options, "input_stats": "dataset", "drop_last": True,
        "head": "dino_head", "head_last": "normed", "loss": "ce", "init_noise": 0.0}
    rebuilt = from_dict(DistillConfig, config)
    assert (rebuilt.head_last, rebuilt.drop_last, rebuilt.alpha) == ("normed", True, 1e-10)
    assert "normed head" in variant_names(config) and "drop last" in variant_names(config)
    train = {"kind": "train", "seed": 0, "config": old_record(TrainConfig(model=model))}
    (run_dir / "config.json").write_text(json.dumps(train))
    config = Run(run_dir).config()["config"]
    assert (config["input_stats"], config["drop_last"], config["model_options"]) == \
        ("dataset", True, options)
    assert "head_last" not in config  # a train run has no head
    from_dict(TrainConfig, config)


def test_fill_never_changes_what_a_record_holds():
    config = {**to_dict(DistillConfig()), "head_last": "raw"}
    assert fill_legacy("distill", config) == config
    assert fill_legacy("distill", {"lr": 0.1}) == {"lr": 0.1}  # not an engine's record
    assert fill_legacy("interpolate", {"model": "x"}) == {"model": "x"}


def test_an_old_checkpoint_loads_with_its_config_filled(tmp_path):
    """refs.load_model (runs.load, probes, landscape) reads a checkpoint's own config."""
    model = create_model("convnet", width=0.125, num_classes=4)
    path = save_checkpoint(tmp_path / "old.pt", model, 5,
                           config=old_record(DistillConfig(model="convnet")),
                           extra={"kind": "distill"})
    config = load_model(str(path)).config
    assert (config["head_last"], config["input_stats"], config["drop_last"]) == \
        ("normed", "dataset", True)


# --- the store: old folders stay, today's defaults get new ones ----------------------------

def test_old_runs_keep_their_folder_and_new_defaults_get_another(tmp_path):
    old_defaults = {**to_dict(DistillConfig()), "alpha": 1e-10}
    as_made = DistillConfig(alpha=1e-10, head_last="normed", input_stats="dataset",
                            drop_last=True)
    assert identity("distill", as_made) == {}
    old_dir = run_path(tmp_path, "distill", as_made, 0).parent.name
    assert old_dir == f"distill_{old_hash(old_record(as_made), old_defaults)}"
    lr = dataclasses.replace(as_made, lr=0.01)
    assert run_path(tmp_path, "distill", lr, 0).parent.name == \
        f"distill_{old_hash(old_record(lr), old_defaults)}"
    today = DistillConfig()
    assert identity("distill", today) == {"alpha": 0.0, "head_last": "raw",
                                          "input_stats": "paper", "drop_last": False}
    assert run_path(tmp_path, "distill", today, 0) != run_path(tmp_path, "distill", as_made, 0)
    vgg = DistillConfig(model="vgg11")  # max pool now: the old avg-pool runs' folder is apart
    assert identity("distill", vgg)["model_options"] == []
    train = TrainConfig()
    assert identity("train", train) == {"input_stats": "paper", "drop_last": False}
    assert identity("train", TrainConfig(input_stats="dataset", drop_last=True)) == {}


def test_an_old_run_reopens_with_the_flags_it_was_made_with(tmp_path):
    """Resume or skip: the old run's own settings, given as flags, name its folder."""
    as_made = DistillConfig(alpha=1e-10, head_last="normed", input_stats="dataset",
                            drop_last=True, lr=0.01)
    run = open_run(tmp_path, "distill", as_made)
    record = json.loads((run.path / "config.json").read_text())
    record["config"] = old_record(as_made)  # as the old toolkit wrote it
    (run.path / "config.json").write_text(json.dumps(record))
    assert record["identity"] == {"lr": 0.01}  # what the old toolkit recorded too
    assert open_run(tmp_path, "distill", as_made).path == run.path
    assert open_run(tmp_path, "distill", dataclasses.replace(as_made, alpha=0.0)).path \
        != run.path
