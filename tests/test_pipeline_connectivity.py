"""runs.pipeline's connectivity pieces: the border stage with --align (barriers before and
after permutation alignment) and the curve stage (`python -m landscape.curve` between two
SGD children of a border start, named `@JOB.childK[S]:last`), end to end on a tiny preset,
resumable; and the shipped presets' curve jobs name children their border jobs make."""

import contextlib
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runs.errors import UserError
from runs.studies.pipeline import Child, Layout, border_children, load_preset, main, resolve

CURVE = {"kind": "bezier", "steps": "3", "grid": "0:1:3", "train_samples": 100,
         "test_samples": 100, "bn_samples": 64}
TINY = {
    "description": "distill, border with alignment and two trained curves, smallest size",
    "seeds": [0],
    "distill": {"model": "convnet", "width": 0.25, "dataset": "digits", "subset": 20,
                "batch_size": 50, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
                "steps": "2ep", "save_at": [], "probe_every": 0},
    "train": {"batch_size": 50, "crop_padding": 1, "flip": False},
    "border": [{"name": "lmc", "refs": ["random", "@images[0]:encoder"], "children": 2,
                "steps": "1ep", "grid": "0:1:3", "train_samples": 100, "test_samples": 100,
                "bn_samples": 64, "align": "weights"}],
    "curve": [
        {"name": "curve_random", "refs": ["random child 0:=@lmc.child0[0]:last",
                                          "random child 1:=@lmc.child1[0]:last"], **CURVE},
        {"name": "curve_student", "refs": ["student child 0:=@lmc.child0[1]:last",
                                           "student child 1:=@lmc.child1[1]:last"], **CURVE}],
}
STAGES = ["--stages", "distill", "border", "curve"]


@contextlib.contextmanager
def alignment():
    """landscape.align as it is, or (until it exists) an identity stand-in (contract A)."""
    if importlib.util.find_spec("landscape.align") is not None:
        yield
        return
    import copy
    module = types.ModuleType("landscape.align")
    module.METHODS = ("weights", "activations")
    module.permutation_spec = lambda model: None
    module.align = lambda a, b, method="weights", images=None, seed=0: (copy.deepcopy(b), {})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "landscape.align", module)
        yield


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("connectivity")
    preset = root / "tiny.json"
    preset.write_text(json.dumps(TINY))
    argv = ["--preset", str(preset), "--out", str(root / "out"), "--device", "cpu", *STAGES]
    with alignment():
        assert main(argv) == 0
    return root / "out", argv


@pytest.mark.slow
def test_the_border_stage_aligns_and_keeps_both_barriers(study):
    from landscape.barrier import NAMES
    from runs.results import open_result
    out, _ = study
    lmc = open_result(out / "results" / "lmc.h5", "border")
    assert lmc.attrs["align"] == "weights" and lmc.done.all()
    for name in NAMES:
        plain, aligned = lmc.metrics[name], lmc.metrics[name + "_aligned"]
        assert plain.shape == aligned.shape and np.isfinite(aligned).all()


@pytest.mark.slow
def test_each_curve_joins_two_children_of_its_start(study):
    """curve_random joins children 0 and 1 of the random start, curve_student those of the
    student start: the result's endpoints are those runs' last checkpoints, and the bend is
    a run in the pipeline's store."""
    from runs.results import json_attr, open_result
    out, _ = study
    lmc = open_result(out / "results" / "lmc.h5", "border")
    children = json_attr(lmc, "children", dict)
    starts = [str(s) for s in lmc.coords["start"]]
    for name, start, label in (("curve_random", starts[0], "random"),
                               ("curve_student", starts[1], "student")):
        result = open_result(out / "results" / f"{name}.h5", "curve")
        assert result.done.all() and result.attrs["kind"] == "bezier"
        assert json.loads(result.attrs["endpoints"]) == [f"{label} child 0",
                                                         f"{label} child 1"]
        paths = [Path(record["path"]).resolve() for record in result.attrs["inputs"][:2]]
        assert [p.parent.parent for p in paths] == [(out / "store" / c).resolve()
                                                     for c in children[start]]
        assert (out / "store" / result.attrs["bend"]).is_file()
        assert np.isfinite(result.metrics["loss"]).all()


@pytest.mark.slow
def test_a_second_run_recomputes_nothing(study, monkeypatch):
    """Nothing trains (children, bends) and nothing is measured again; the results hold
    the same numbers."""
    from runs.results import open_result
    out, argv = study
    files = {p: p.stat().st_mtime_ns for p in (out / "store").rglob("*.pt")}
    before = {p: open_result(p).metrics for p in (out / "results").glob("*.h5")}

    def refuse(*args, **kwargs):
        raise AssertionError("finished work was trained or measured again")

    for target in ("landscape.curve.fit", "landscape.curve.path_values",
                   "landscape.border.pair_curves", "runs.engines.train.fit",
                   "runs.engines.distill.fit"):
        monkeypatch.setattr(target, refuse)
    with alignment():
        assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == files
    for path, metrics in before.items():
        for name, values in open_result(path).metrics.items():
            np.testing.assert_array_equal(values, metrics[name])


@pytest.mark.slow
def test_children_templates_name_the_border_results_runs(study):
    out, _ = study
    groups = border_children(TINY, Layout(out))
    assert set(groups) == {"lmc.child0", "lmc.child1"}
    assert all(len(runs) == 2 for runs in groups.values())  # one per start
    ref = resolve("@lmc.child1[1]:last", groups)
    assert ref == f"{groups['lmc.child1'][1].path}@last" and Path(ref[:-5]).is_dir()
    with pytest.raises(UserError, match="index below the number of seeds"):
        resolve("@lmc.child0[2]:last", groups)


def test_no_border_result_means_no_children_groups(tmp_path):
    """Before the border stage has run, its children are no template group (a curve job
    naming them stops with the template error, listing the groups there are)."""
    assert border_children(TINY, Layout(tmp_path)) == {}
    with pytest.raises(UserError, match="groups images"):
        resolve("@lmc.child0[0]:last", {"images": [Child(Path("x"))]})


CHILD = re.compile(r"@(?P<job>.+)\.child(?P<k>\d+)\[(?P<start>\d+)\]:last$")


@pytest.mark.parametrize("name", ["demo", "cifar10-subset", "paper-cifar10",
                                  "paper-cifar10-vgg11"])
def test_shipped_presets_align_and_curve_between_children_they_make(name):
    """Every border job of a shipped preset aligns; there are two curve jobs, each between
    children 0 and 1 of one start of a border job: the random init's (start 0, "random")
    and a student's (start 1, an encoder)."""
    preset = load_preset(name)
    border = {job["name"]: job for job in preset["border"]}
    assert all(job.get("align") in ("weights", "activations") for job in border.values())
    curves = preset["curve"]
    assert len(curves) == 2
    starts = []
    for job in curves:
        found = [CHILD.search(ref) for ref in job["refs"]]
        assert len(found) == 2 and all(found), job["refs"]
        assert {m["job"] for m in found} <= set(border) and len({m["start"] for m in found}) == 1
        assert sorted(int(m["k"]) for m in found) == [0, 1]
        source = border[found[0]["job"]]
        assert all(int(m["k"]) < source["children"] for m in found)
        starts.append(source["refs"][int(found[0]["start"])])
    assert starts[0] == "random" and starts[1].endswith(":encoder")
