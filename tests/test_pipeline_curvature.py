"""runs.pipeline's curvature stage: `python -m landscape.hessian` on the distilled networks
(distillation loss against their teacher) and on the imp jobs' dense supervised runs at
their rewind steps (supervised loss), end to end on a tiny preset, resumable."""

import json
from pathlib import Path

import numpy as np
import pytest

from runs.errors import UserError
from runs.studies.pipeline import (
    DenseRun,
    distill_configs,
    load_preset,
    main,
    resolve,
)

CURVATURE = {"samples": 32, "measures": ["top", "trace", "density"], "top_k": 2,
             "eigen_tol": 0.001, "trace_probes": "2:4", "slq_runs": 1, "slq_steps": 8}
TINY = {
    "description": "distill, imp and curvature at the smallest size",
    "seeds": [0],
    "alphas": [1.0],
    "distill": {"model": "convnet", "width": 0.25, "dataset": "digits", "subset": 20,
                "batch_size": 50, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
                "steps": "2ep", "save_at": ["1ep"], "probe_every": 0},
    "train": {"batch_size": 50, "crop_padding": 1, "flip": False},
    "imp": [{"name": "imp", "rewind": "init@1ep", "levels": 1, "steps": "2ep",
             "val_size": 50, "seeds": [0]}],
    "curvature": [
        {"name": "curvature_distill", "loss": "distill", "teacher": "@images[0]:teacher",
         "refs": ["@images[0]:teacher", "@images[0]:epochs",
                  "@alpha=1.0[0]:init", "@alpha=1.0[0]:last"], **CURVATURE},
        {"name": "curvature_supervised", "loss": "supervised",
         "refs": ["@imp[0]:init", "@imp[0]:rewind", "tuned:=@imp[0]:last"], **CURVATURE}],
}
STAGES = ["--stages", "distill", "imp", "curvature", "figures"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("curvature")
    preset = root / "tiny.json"
    preset.write_text(json.dumps(TINY))
    argv = ["--preset", str(preset), "--out", str(root / "out"), "--device", "cpu", *STAGES]
    assert main(argv) == 0
    return root / "out", argv


@pytest.mark.slow
def test_the_stage_writes_both_results_with_readable_labels(study):
    from runs.results import open_result
    out, _ = study
    distill = open_result(out / "results" / "curvature_distill.h5", "hessian")
    supervised = open_result(out / "results" / "curvature_supervised.h5", "hessian")
    assert list(distill.coords["checkpoint"]) == [
        "teacher s0", "student s0 ep1", "student s0 ep2", "student α=1 s0 init",
        "student α=1 s0 ep2"]
    # the imp job rewinds to epoch 1 of its dense run: init, that rewind point, the end
    labels = list(supervised.coords["checkpoint"])  # + the recipe's departures: "(no flips..)"
    assert [label.split(" (")[0] for label in labels] == [
        "supervised s0 init", "supervised s0 ep1", "tuned"]
    assert distill.done.all() and supervised.done.all()
    assert (distill.config["loss"], supervised.config["loss"]) == ("distill", "supervised")
    for result in (distill, supervised):
        top = result.metrics["eigenvalue"]  # (checkpoint, eigen), descending per row
        assert np.all(np.isfinite(top)) and np.all(top[:, 0] >= top[:, 1])
        assert len(set(result.metrics["param_count"])) == 1  # one network, one Hessian size


@pytest.mark.slow
def test_the_figures_stage_draws_each_curvature_result(study):
    out, _ = study
    drawn = {p.stem for p in (out / "figures").glob("curvature-*.png")}
    for name in ("curvature_distill", "curvature_supervised"):
        assert {f"curvature-density_{name}", f"curvature-top-trace_{name}"} <= drawn, drawn


@pytest.mark.slow
def test_the_teacher_is_where_the_distillation_loss_is_least(study):
    """H(t, s) >= H(t, t) = H(t): the teacher's own row holds the smallest loss."""
    from runs.results import open_result
    out, _ = study
    loss = open_result(out / "results" / "curvature_distill.h5").metrics["loss"]
    assert np.all(loss[0] <= loss[1:] + 1e-6), loss


@pytest.mark.slow
def test_a_second_run_recomputes_nothing(study, monkeypatch):
    out, argv = study
    files = {p: p.stat().st_mtime_ns for p in (out / "store").rglob("*.pt")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished checkpoint was measured or trained again")

    monkeypatch.setattr("landscape.hessian.measure", refuse)
    monkeypatch.setattr("runs.engines.train.fit", refuse)
    monkeypatch.setattr("runs.engines.distill.fit", refuse)
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_templates_name_saved_steps_labels_and_imp_rewind_points():
    class Run:
        path = "store/distill_ab/seed_0"

    groups = {"images": [Run()], "imp_init1ep": [DenseRun(Path("store/train_cd/seed_0"), 8)]}
    assert resolve("@images[0]:4ep", groups) == "store/distill_ab/seed_0@4ep"
    assert resolve("@images[0]:40", groups) == "store/distill_ab/seed_0@40"
    assert resolve("@imp_init1ep[0]:rewind", groups) == "store/train_cd/seed_0@8"
    assert resolve("student + fc:=@imp_init1ep[0]:last", groups) == \
        "student + fc:=store/train_cd/seed_0@last"
    assert resolve("teacher:=store/x@last", groups) == "teacher:=store/x@last"  # no template
    with pytest.raises(UserError, match=r"rewind: imp jobs only"):
        resolve("@images[0]:rewind", groups)
    with pytest.raises(UserError, match="groups images, imp_init1ep"):
        resolve("@images[0]:soon", groups)


@pytest.mark.parametrize("name", ["demo", "cifar10-subset", "paper-cifar10"])
def test_shipped_presets_curvature_templates_name_their_runs(name):
    """Every curvature job of a shipped preset names runs its distill and imp stages make,
    one result per loss: the distilled networks under the distillation loss against their
    teacher, the supervised (imp dense) runs under the supervised loss."""
    preset = load_preset(name)
    groups = {group: [DenseRun(Path(group), 0)] * len(configs)
              for group, configs in distill_configs_offline(preset).items()}
    groups.update({job["name"]: [DenseRun(Path(job["name"]), 8)] * len(job["seeds"])
                   for job in preset["imp"]})
    jobs = {job["name"]: job for job in preset["curvature"]}
    assert set(jobs) == {"curvature_distill", "curvature_supervised"}
    assert jobs["curvature_distill"]["loss"] == "distill"
    assert jobs["curvature_supervised"]["loss"] == "supervised"
    for job in jobs.values():
        refs = resolve(job["refs"], groups)
        assert len(set(refs)) == len(refs) and not any(r.startswith("@") for r in refs)
    assert resolve(jobs["curvature_distill"]["teacher"], groups).endswith("@last:teacher")


def distill_configs_offline(preset: dict) -> dict:
    """distill_configs without the noise group's data (it loads the train images)."""
    groups = distill_configs({**preset, "noise": False})
    return {**groups, "noise": groups["images"]} if preset.get("noise") else groups
