"""runs.bench --scaling (runs.studies.bench.scaling): every cost curve runs at tiny sizes
through its real code (CPU points in processes of their own), the JSON holds what the figure
needs, k-NN memory stays at one distance block, the figure is written; bad names are
refused before measuring. Speed is never asserted."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from runs.errors import UserError
from runs.studies.bench import scaling
from runs.studies.bench.cli import main
from runs.studies.bench.scaling import (
    CURVES,
    GROUPS,
    NAMES,
    ORDER,
    SCHEMA,
    ScalingConfig,
    linear_fit,
    measure_here,
    measure_point,
    select,
    write_doc,
)
from runs.studies.bench.scaling_plot import draw

CPU = torch.device("cpu")
MIB = 2**20
# Seconds of work in all: the k-NN block is 4 MiB (so its peak stands above RSS noise),
# everything else a convnet at width 1/8 on a few images.
TINY = ScalingConfig(knn_rows=(4000, 16000), knn_dim=8, knn_queries=500, knn_block_mib=4.0,
                     grid_model="convnet", grid_width=0.125, grid_images=8, path_points=(2, 4),
                     plane_sides=(2, 3), prune_model="convnet", prune_width=0.25,
                     prune_levels=(1, 3), prune_widths=(0.25, 0.5), parallel_model="convnet",
                     parallel_width=0.125, parallel_batch=4, parallel_runs=(1, 2), repeats=1)
POINT_KEYS = ("size", "x", "seconds", "seconds_repeats", "peak_bytes", "baseline_bytes",
              "memory")


def finite_positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", ORDER)
def test_every_curve_measures_a_point_in_process(name):
    size = CURVES.get(name).sizes(TINY)[-1]
    record = measure_here(name, size, TINY, CPU)
    assert all(key in record for key in POINT_KEYS)
    assert record["x"] == record[CURVES.get(name).x] and record["size"] == size
    assert finite_positive(record["seconds"]) and len(record["seconds_repeats"]) >= 1
    assert record["peak_bytes"] >= 0 and math.isfinite(record["peak_bytes"])
    json.dumps(record)  # the child sends it back pickled, the document stores it as JSON


def test_grid_curves_count_points_and_prune_curves_count_weights():
    plane = measure_here("plane", 3, TINY, CPU)
    assert plane["points"] == 9 and plane["x"] == 9
    narrow, wide = (measure_here("prune_weights", w, TINY, CPU) for w in TINY.prune_widths)
    assert wide["weights"] > narrow["weights"] and wide["density"] == pytest.approx(0.8, 1e-3)
    level = measure_here("prune_level", 3, TINY, CPU)
    assert level["kept"] == math.floor(level["weights"] * 0.8 ** 3 + 0.5)


def test_knn_memory_is_one_distance_block_whatever_the_rows():
    """The chunk shrinks as the rows grow, so the (chunk, rows) block stays at its budget;
    the peak measured in a process of its own is that block, not two (nor the rows)."""
    records = [measure_point("knn", rows, TINY, CPU) for rows in TINY.knn_rows]
    blocks = [r["block_bytes"] for r in records]
    budget = TINY.knn_block_mib * MIB
    assert all(0.9 * budget <= b <= budget for b in blocks)  # flat: does not grow with rows
    assert records[1]["chunk_rows"] < records[0]["chunk_rows"] < TINY.knn_queries
    for record in records:
        assert record["memory"].startswith("peak RSS")
        assert 0.5 * record["block_bytes"] <= record["peak_bytes"] <= \
            1.25 * record["block_bytes"] + MIB


def test_linear_fit_recovers_a_line():
    fit = linear_fit([1, 2, 4, 8], [0.5 + 2 * x for x in (1, 2, 4, 8)])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(0.5)
    assert fit["r2"] == pytest.approx(1)
    assert linear_fit([3], [1.0])["slope"] is None


def test_sections_pick_groups_and_curves_in_order():
    assert select(None) == list(ORDER)
    assert select(["parallel", "knn"]) == ["knn", "parallel"]
    assert select(["prune", "plane"]) == ["plane", *GROUPS["prune"]]
    with pytest.raises(UserError, match="valid: knn, landscape"):
        select(["knn", "nope"])


def test_cli_refuses_an_unknown_curve_before_measuring(tmp_path, capsys):
    assert main(["--device", "cpu", "--quick", "--scaling", "--sections", "nope",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: unknown scaling curve" in err and "'nope'" in err
    assert all(name in err for name in NAMES)
    assert not list(tmp_path.iterdir())


def test_cli_scaling_writes_json_and_png(tmp_path, monkeypatch):
    """The door: --quick --scaling (sizes monkeypatched tiny) measures k-NN and parallel in
    child processes and writes the document and its figure."""
    monkeypatch.setattr(scaling, "QUICK_SCALING", TINY)
    assert main(["--device", "cpu", "--quick", "--scaling", "--sections", "knn", "parallel",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("scaling-cpu-*-quick.json")
    doc = json.loads(path.read_text())
    for key in ("schema", "device_name", "torch_version", "git_sha", "created_utc", "quick",
                "sizes", "curves", "argv"):
        assert key in doc
    assert doc["schema"] == SCHEMA and doc["sizes"] == json.loads(json.dumps(
        dataclasses.asdict(TINY)))
    assert list(doc["curves"]) == ["knn", "parallel"]
    for curve in doc["curves"].values():
        assert [p["size"] for p in curve["points"]] == [p["x"] for p in curve["points"]]
        assert all(finite_positive(p["seconds"]) and finite_positive(p["peak_bytes"])
                   for p in curve["points"])
        assert set(curve["time_fit"]) == {"slope", "intercept", "r2"}
    png = path.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_document_keeps_curves_of_earlier_runs_of_the_same_sizes(tmp_path):
    path = tmp_path / "scaling.json"
    sizes = dataclasses.asdict(TINY)
    write_doc({"schema": SCHEMA, "sizes": sizes, "curves": {"knn": {"a": 1}}}, path)
    write_doc({"schema": SCHEMA, "sizes": sizes, "curves": {"path": {"b": 2}}}, path)
    assert json.loads(path.read_text())["curves"] == {"knn": {"a": 1}, "path": {"b": 2}}
    write_doc({"schema": SCHEMA, "sizes": {**sizes, "knn_dim": 9}, "curves": {"x": {}}}, path)
    assert list(json.loads(path.read_text())["curves"]) == ["x"]  # other sizes: replaced


def test_figure_draws_a_failed_curve_as_a_note(tmp_path):
    points = [{"x": x, "size": x, "seconds": 0.01 * x, "peak_bytes": MIB * x,
               "block_bytes": MIB} for x in (1.0, 2.0, 4.0)]
    curve = {"title": "k-NN", "x": "rows", "x_label": "rows", "linear": True,
             "points": points, "time_fit": linear_fit([1, 2, 4], [0.01, 0.02, 0.04])}
    doc = {"device_name": "test", "device": "cpu", "created_utc": "2026-01-01T00:00:00Z",
           "curves": {"knn": curve, "parallel": {"error": "RuntimeError: boom"}}}
    png = draw(doc, tmp_path, "scaling-test")
    assert png.exists() and (tmp_path / "scaling-test.pdf").exists()
    assert np.isclose(curve["time_fit"]["slope"], 0.01)
