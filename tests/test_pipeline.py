"""runs.pipeline end to end on a reduced demo preset: every stage, every figure, resumable."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from figures.__main__ import FIGURES
from runs.errors import UserError
from runs.studies.pipeline import flags, load_preset, main, resolve

REDUCED = {
    "description": "the demo preset, reduced for CI",
    "seeds": [0],
    "noise": True,
    "subsets": [10],
    "alphas": [1.0],
    "distill": {"model": "convnet", "width": 0.25, "dataset": "digits", "subset": 40,
                "batch_size": 50, "out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 16,
                "steps": "2ep", "save_at": ["1ep"], "probe_every": 1},
    "train": {"batch_size": 50, "crop_padding": 1, "flip": False},
    "probe": {"probes": ["knn"], "seeds": [0]},
    "interpolate": [{"name": "path", "refs": ["@images[0]:teacher", "@images[0]:last"],
                     "metrics": ["knn"], "grid": "0:1:3", "train_samples": 100,
                     "test_samples": 100},
                    {"name": "plane", "refs": ["@images[0]:teacher", "@images[0]:last",
                                               "@noise[0]:last"],
                     "teacher": "@images[0]:teacher", "metrics": ["distill", "knn", "norm"],
                     "grid": "0:1:3", "train_samples": 100, "test_samples": 100}],
    "border": [{"name": "lmc", "refs": ["random", "@images[0]:encoder"], "children": 2,
                "steps": "1ep", "grid": "0:1:3", "test_samples": 100}],
    "imp": [{"name": "imp", "rewind": "init@0", "levels": 1, "steps": "1ep", "val_size": 50,
             "seeds": [0]}],
    "curvature": [{"name": "curvature", "refs": ["@images[0]:teacher", "@images[0]:last"],
                   "loss": "distill", "teacher": "@images[0]:teacher", "samples": 32,
                   "measures": ["top", "trace", "density", "layer-top"], "top_k": 2,
                   "trace_probes": "2:4", "slq_runs": 1, "slq_steps": 8}],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    preset = root / "reduced.json"
    preset.write_text(json.dumps(REDUCED))
    assert main(["--preset", str(preset), "--out", str(root / "out")]) == 0
    return root, preset


@pytest.mark.slow
def test_every_stage_and_figure(demo):
    root, _ = demo
    results = {p.stem for p in (root / "out" / "results").glob("*.h5")}
    assert results == {"probe_digits", "path", "plane", "lmc", "imp", "curvature"}
    figures = {p.stem for p in (root / "out" / "figures").glob("*.png")}
    # every figure the toolkit has; `border` draws scans only (this preset's one border
    # result, random vs student, is the `lmc` figure's); `layerwise` has no stage, `curve`
    # only where the preset has a curve section
    skip = {"border", "layerwise"} | (set() if REDUCED.get("curve") else {"curve"})
    for name in set(FIGURES) - skip:
        assert any(f == name or f.startswith((f"{name}_", f"{name}-")) for f in figures), \
            (name, figures)


@pytest.mark.slow
def test_data_size_students_take_the_full_datas_steps(demo):
    """`subsets` adds students on fewer images with as many steps (not epochs) as the
    full-data student, and probes them as often per step."""
    from runs.results import open_result
    root, _ = demo
    found = {}
    for path in (root / "out" / "store").rglob("distill.h5"):
        res = open_result(path)
        found[(res.config["dataset"], res.config["subset"], res.config["alpha"])] = res
    assert set(found) == {("digits", 40, 0.0), ("digits", 10, 0.0), ("noise", 0, 0.0),
                          ("digits", 40, 1.0)}
    full, small = found[("digits", 40, 0.0)], found[("digits", 10, 0.0)]
    assert (small.attrs["train_images"], full.attrs["train_images"]) == (100, 400)
    assert small.config["num_steps"] == full.config["num_steps"] == 16
    # As many probes: every epoch of 8 steps, every 4 epochs of 2 steps (init, 8, 16).
    assert (full.config["probe_every"], small.config["probe_every"]) == (1, 4)
    for res in (full, small):
        probed = np.isfinite(res.metrics["knn_accuracy"][:, 1])
        assert probed.sum() == 3, res.path


@pytest.mark.slow
def test_rerun_trains_nothing(demo, monkeypatch):
    root, preset = demo
    ckpts = {p: p.stat().st_mtime_ns for p in (root / "out" / "store").rglob("*.pt")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("runs.engines.train.fit", refuse)
    monkeypatch.setattr("runs.engines.distill.fit", refuse)
    assert main(["--preset", str(preset), "--out", str(root / "out")]) == 0
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts


@pytest.mark.slow
def test_rerun_with_parallel_runs_trains_nothing(demo, monkeypatch):
    """--parallel-runs finds the border children and IMP levels done: nothing trains."""
    root, preset = demo
    for name in ("runs.engines.train.fit", "runs.engines.distill.fit",
                 "runs.engines.parallel.fit_together"):
        monkeypatch.setattr(name, lambda *a, **k: pytest.fail("trained"))
    assert main(["--preset", str(preset), "--out", str(root / "out"), "--parallel-runs",
                 "4", "--stages", "distill", "border", "imp"]) == 0


@pytest.mark.slow
def test_another_spelling_of_out_resumes_and_trains_nothing(demo, monkeypatch):
    """The demo was made with an absolute --out; `--out out` from its parent is the same
    folder: every stage resumes (no "different config"), nothing trains again."""
    root, preset = demo
    ckpts = {p: p.stat().st_mtime_ns for p in (root / "out" / "store").rglob("*.pt")}
    monkeypatch.setattr("runs.engines.train.fit", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr("runs.engines.distill.fit", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.chdir(root)
    assert main(["--preset", str(preset), "--out", "./out/"]) == 0
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts


def test_out_is_spelled_as_the_study_was_made(tmp_path, monkeypatch):
    """A new --out inside the working folder is spelled relative to it (so a copy run from
    its new parent resumes); a recorded spelling wins for the same folder; a folder with
    results but no record (made before the record) keeps the spelling given."""
    from runs.studies.pipeline import Layout, out_folder, record_out
    monkeypatch.chdir(tmp_path)
    assert out_folder(str(tmp_path / "out")) == Path("out") == out_folder("./out/")
    assert out_folder("/") == Path("/")
    (tmp_path / "abs").mkdir()
    record_out(Layout(tmp_path / "abs"))
    assert out_folder("abs") == tmp_path / "abs"  # recorded absolute: kept
    (tmp_path / "old" / "results").mkdir(parents=True)
    assert out_folder(str(tmp_path / "old")) == tmp_path / "old"
    copy = tmp_path / "elsewhere" / "abs"
    copy.parent.mkdir()
    shutil.copytree(tmp_path / "abs", copy)  # the record names the original: not this one
    assert out_folder(str(copy)) == Path("elsewhere/abs")


def test_alpha_groups_take_their_own_seeds():
    """`alphas` adds a group per alpha at every seed, or at `alpha_seeds` where given."""
    from runs.studies.pipeline import distill_configs
    preset = {"seeds": [0, 1], "alphas": [0.5, 1.0], "distill": {"model": "convnet",
                                                                "dataset": "toy"}}
    groups = distill_configs(preset)
    assert list(groups) == ["images", "alpha=0.5", "alpha=1.0"]
    assert [(c.seed, c.alpha) for c in groups["alpha=0.5"]] == [(0, 0.5), (1, 0.5)]
    groups = distill_configs({**preset, "alpha_seeds": [1]})
    assert [(c.seed, c.alpha) for c in groups["alpha=1.0"]] == [(1, 1.0)]
    assert [c.seed for c in groups["images"]] == [0, 1]


def test_stages_report_their_wall_time(capsys):
    from runs.studies.pipeline import timed
    with timed("probe"):
        pass
    assert capsys.readouterr().err == "stage probe: 0 min 0 s\n"


def test_flags_and_templates():
    assert flags({"batch_size": 64, "save_at": ["1ep", 2], "flip": False, "centering": True}) \
        == ["--batch-size", "64", "--save-at", "1ep", "2", "--no-flip", "--centering"]

    class Run:
        path = "store/distill_ab/seed_0"

    students = {"images": [Run()]}
    assert resolve("@images[0]:teacher", students) == "store/distill_ab/seed_0@last:teacher"
    assert resolve(["@images[0]", "random"], students) == ["store/distill_ab/seed_0", "random"]
    with pytest.raises(UserError, match="groups images"):
        resolve("@noise[0]:last", students)


def test_bad_presets(tmp_path):
    with pytest.raises(UserError, match="valid: .*demo"):
        load_preset("no-such-preset")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"distill": {}, "plot": {}}))
    with pytest.raises(UserError, match="unknown key.*plot"):
        load_preset(str(bad))
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_preset(str(bad))


def test_shipped_presets_load():
    for name in ("demo", "cifar10-subset", "paper-cifar10", "paper-cifar10-vgg11"):
        preset = load_preset(name)
        assert "distill" in preset and preset["description"]


@pytest.mark.parametrize("name, model", [("paper-cifar10", "resnet18"),
                                         ("paper-cifar10-vgg11", "vgg11")])
def test_paper_presets_are_the_recipe(name, model):
    """Their distillation and training flags are the paper's settings, spelled out."""
    from runs.config import from_dict, to_dict
    from runs.engines.distill import DistillConfig
    from runs.engines.train import TrainConfig
    from runs.recipe import PAPER, PAPER_TRAIN, variant_names
    preset = load_preset(name)
    fields = {k: v for k, v in preset["distill"].items() if k not in ("steps", "save_at")}
    cfg = to_dict(from_dict(DistillConfig, fields))
    assert cfg["model"] == model and variant_names(cfg) == []
    assert {k: v for k, v in preset["distill"].items() if k in PAPER} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in PAPER.items()
         if k != "model_options"}
    train = to_dict(from_dict(TrainConfig, preset["train"]))
    assert variant_names(train) == [] and set(PAPER_TRAIN) - set(preset["train"]) \
        == {"model_options", "warmup_steps"}
    assert (cfg["alpha"], cfg["head_last"], cfg["drop_last"]) == (0.0, "raw", False)


def test_a_preset_can_start_from_another(tmp_path):
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"base": "paper-cifar10", "seeds": [0],
                                 "distill": {"model": "vgg11", "steps": "1ep"}}))
    preset, base = load_preset(str(child)), load_preset("paper-cifar10")
    assert preset["seeds"] == [0] and preset["imp"] == base["imp"]
    assert preset["distill"] == {**base["distill"], "model": "vgg11", "steps": "1ep"}
    child.write_text(json.dumps({"base": str(child)}))
    with pytest.raises(UserError, match="includes itself"):
        load_preset(str(child))


SMALL = {"demo": ["seeds=[0]", "alphas=[1.0]", "subsets=[10]", "distill.steps=1ep",
                  "distill.save_at=[]", "distill.probe_every=1"],
         "cifar10-subset": ["seeds=[0]", "alphas=[]", "subsets=[]", "noise=false",
                            "distill.steps=1ep", "distill.save_at=[]"]}


@pytest.mark.parametrize("name", [
    "demo", pytest.param("cifar10-subset", marks=pytest.mark.slow)])
def test_shipped_presets_distill_stage_runs_with_the_new_defaults(name, tmp_path):
    """Each shipped CPU preset's first stage, one seed and one epoch: the paper's defaults
    (alpha 0, raw head, last partial batch kept) run on its data and models."""
    from runs.data import cifar10_subset_path
    from runs.results import open_result
    from runs.studies.pipeline import Layout, distill_stage, override
    if name == "cifar10-subset" and cifar10_subset_path() is None:
        pytest.skip("../shared/data/cifar10_subset.npz is absent")
    preset = override(load_preset(name), SMALL[name])
    runs = distill_stage(preset, Layout(tmp_path), "cpu")
    expected = {"images"} | ({"alpha=1.0", "subset=10", "noise"} if name == "demo" else set())
    assert set(runs) == expected
    images = runs["images"][0]
    config = images.config()
    assert config["config"]["alpha"] == 0.0 and config["config"]["head_last"] == "raw"
    train_images = open_result(images.path / "distill.h5").attrs["train_images"]
    batch = preset["distill"]["batch_size"]
    assert train_images % batch  # the last batch is partial, and kept:
    assert config["steps_per_epoch"] == -(-train_images // batch) == images.latest_step()
    summary = images.summary()
    assert summary["knn_student"] is not None and summary["knn_teacher"] is not None


def test_overrides():
    from runs.studies.pipeline import override
    preset = {"distill": {"data_root": "data"}, "imp": [{"levels": 24}, {"levels": 24}]}
    override(preset, ["distill.data_root=~/cifar", "imp.levels=3", "seeds=[0, 1]"])
    assert preset == {"distill": {"data_root": "~/cifar"}, "imp": [{"levels": 3}, {"levels": 3}],
                      "seeds": [0, 1]}
    with pytest.raises(UserError, match="no stage 'border'"):
        override(preset, ["border.children=2"])


PAPER_SHRINK = [
    "distill.width=0.125", "distill.out_dim=256", "distill.hidden_dim=64",
    "distill.bottleneck_dim=16", "distill.batch_size=16", "distill.steps=2ep",
    "distill.save_at=[\"1ep\"]", "distill.probe_every=1", "train.batch_size=16",
    "interpolate.grid=-0.5:1.5:3", "interpolate.train_samples=32",
    "border.children=2", "border.steps=1ep", "border.grid=0:1:3", "imp.levels=1",
    "imp.steps=6ep", "imp.val_size=16", "curvature.samples=16", "curvature.top_k=2",
    "curvature.trace_probes=2:4", "curvature.slq_runs=1", "curvature.slq_steps=8",
    "curve.steps=2", "curve.grid=0:1:3", "curve.batch_size=16",
]


@pytest.mark.slow
def test_paper_preset_runs_every_stage_on_cifar10_files(tmp_path, monkeypatch):
    """paper-cifar10's own flags, only sizes shrunk, on tiny files in CIFAR-10's on-disk
    format: every stage's command accepts them and every figure is drawn."""
    from tests.helpers import write_cifar10
    write_cifar10(tmp_path / "data", monkeypatch, per_batch=16, test_count=20)
    out = tmp_path / "out"
    assert main(["--preset", "paper-cifar10", "--out", str(out), "--device", "cpu", "--set",
                 f"distill.data_root={tmp_path / 'data'}", *PAPER_SHRINK]) == 0
    preset = load_preset("paper-cifar10")
    names = {job["name"] for stage in ("interpolate", "border", "curve", "imp", "curvature")
             for job in preset[stage]}
    assert {p.stem for p in (out / "results").glob("*.h5")} == names | {"probe_cifar10"}
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    for name in ("probe-table_knn20", "distill-curves", "alpha-locality", "data-size", "imp",
                 "plane_teacher_alpha1", "border_along_distillation"):
        assert name in figures, sorted(figures)
    table = (out / "figures" / "probe-table_knn20.md").read_text()
    assert "student (alpha=1.0)" in table and "noise-student" in table
