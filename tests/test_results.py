"""runs.results: round trip, xarray, crash resume, shards and merge, validation, locking, CLI."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from _results_writer import CONFIG, COORDS, METRICS, POINT_DIMS, fill, open_scan, values
from hypothesis import given, settings
from hypothesis import strategies as st

from runs.errors import UserError
from runs.results import (
    SCHEMA,
    create_result,
    file_sha256,
    main,
    merge_results,
    open_result,
    owned_cells,
    parse_shard,
    shard_path,
)

WRITER = Path(__file__).with_name("_results_writer.py")
ALL_CELLS = owned_cells((3, 4))


def run_writer(path, stop_after, how) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WRITER), str(path), str(stop_after), how],
                          capture_output=True, text=True, timeout=60)


def whole_scan(path):
    with open_scan(path) as result:
        fill(result, result.missing())
    return open_result(path)


def assert_same_data(a, b):
    assert a.config == b.config and a.analysis == b.analysis
    assert list(a.coords) == list(b.coords)
    for name in a.coords:
        np.testing.assert_array_equal(a.coords[name], b.coords[name])
    assert a.specs == b.specs
    np.testing.assert_array_equal(a.done, b.done)
    for name in a.metrics:
        np.testing.assert_array_equal(a.metrics[name], b.metrics[name])  # NaN == NaN here


# ---------------------------------------------------------------------------- round trip


def test_round_trip_coords_metrics_attrs(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path, config={"k": [1, 2]}) as result:
        result.write({"alpha": 2, "pair": 1}, loss=[1.5, 2.5], example_loss=np.arange(5))
        assert result.is_done((1, 2)) and not result.is_done((0, 0))
        assert result.labels((1, 2)) == {"pair": "0-2", "alpha": 2 / 3}
    data = open_result(path, analysis="interpolate")
    assert list(data.coords) == ["pair", "alpha", "example", "split"]
    assert data.coords["pair"].tolist() == COORDS["pair"]
    np.testing.assert_array_equal(data.coords["alpha"], COORDS["alpha"])
    assert data.point_dims == ("pair", "alpha") and data.shape == (3, 4)
    assert data.metrics["loss"].shape == (3, 4, 2)
    assert data.metrics["example_loss"].shape == (5, 3, 4)
    np.testing.assert_array_equal(data.metrics["loss"][1, 2], [1.5, 2.5])
    np.testing.assert_array_equal(data.metrics["example_loss"][:, 1, 2], np.arange(5))
    assert data.done.sum() == 1 and data.done[1, 2]
    assert np.isnan(np.delete(data.metrics["loss"].reshape(12, 2), 6, axis=0)).all()
    assert data.specs["loss"].units == "nats" and data.specs["loss"].long_name == "mean loss"
    attrs = data.attrs
    assert attrs["schema"] == SCHEMA and attrs["config"] == {"k": [1, 2]}
    assert attrs["bn_mode"] == "reset" and attrs["device"] == "cpu"
    for key in ("created_utc", "package_version", "git_sha", "git_dirty", "torch_version"):
        assert isinstance(attrs[key], str) and attrs[key]
    assert "shard" not in attrs and not (tmp_path / "r.h5.lock").exists()


def test_inputs_are_hashed(tmp_path):
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"x" * 3000)
    sha = hashlib.sha256(b"x" * 3000).hexdigest()
    assert file_sha256(ckpt, chunk_bytes=7) == sha
    with create_result(tmp_path / "r.h5", "interpolate", COORDS, METRICS, POINT_DIMS, CONFIG,
                       [ckpt], "cuda:0"):
        pass
    data = open_result(tmp_path / "r.h5")
    assert data.attrs["inputs"] == [{"path": str(ckpt), "sha256": sha}]
    assert data.attrs["device"] == "cuda:0"


def test_xarray_opens_with_dims_and_coords(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path) as result:
        result.write((0, 1), **values((0, 1)))
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds["loss"].dims == ("pair", "alpha", "split")
        assert ds["example_loss"].dims == ("example", "pair", "alpha")
        assert ds["done"].dims == ("pair", "alpha") and ds["done"].dtype == bool
        assert ds["pair"].values.tolist() == COORDS["pair"]
        assert ds["split"].values.tolist() == ["train", "test"]
        assert bool(ds["done"].sel(pair="0-1", alpha=1 / 3))
        assert float(ds["loss"].sel(pair="0-1", alpha=1 / 3, split="test")) == 10.25
        assert ds.attrs["analysis"] == "interpolate"


# ---------------------------------------------------------------------------- crash and resume


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_killed_writer_keeps_cells_and_resumes(tmp_path, how):
    path = tmp_path / "r.h5"
    first = run_writer(path, 5, how)
    assert first.stdout.strip() == "5", first.stderr
    partial = open_result(path)
    assert partial.done.sum() == 5
    for cell in ALL_CELLS[:5]:
        np.testing.assert_allclose(partial.metrics["loss"][cell], values(cell)["loss"])
    assert np.isnan(partial.metrics["loss"][ALL_CELLS[5]]).all()
    second = run_writer(path, -1, "close")
    assert second.stdout.strip() == str(len(ALL_CELLS) - 5), second.stderr
    assert_same_data(open_result(path), whole_scan(tmp_path / "whole.h5"))


def test_values_of_unfinished_cells_read_as_nan(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path) as result:
        result.write((0, 0), **values((0, 0)))
    with h5py.File(path, "r+") as file:  # as if killed between a cell's values and `done`
        file["loss"][1, 1] = [7.0, 7.0]
    data = open_result(path)
    assert np.isnan(data.metrics["loss"][1, 1]).all()
    np.testing.assert_array_equal(data.metrics["loss"][0, 0], values((0, 0))["loss"])


def test_resume_in_process_keeps_finished_cells(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path) as result:
        fill(result, ALL_CELLS[:3])
    with open_scan(path) as result:
        assert result.missing() == ALL_CELLS[3:]


# ---------------------------------------------------------------------------- shards and merge


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(1, 9))
def test_every_cell_owned_by_exactly_one_shard(shape, count):
    owned = [cell for i in range(count) for cell in owned_cells(shape, (i, count))]
    assert sorted(owned) == owned_cells(shape)
    assert len(set(owned)) == len(owned) == int(np.prod(shape))


def write_shards(tmp_path, count=3) -> list[str]:
    paths = []
    for i in range(count):
        paths.append(shard_path(tmp_path / "r.h5", i, count))
        with open_scan(paths[-1], shard=(i, count)) as result:
            assert result.missing() == ALL_CELLS[i::count]  # defaults to its own shard
            fill(result, result.missing())
    return paths


def test_merged_shards_equal_unsharded_run(tmp_path):
    paths = write_shards(tmp_path)
    assert open_result(paths[1]).shard == (1, 3)
    merged = merge_results(tmp_path / "merged.h5", paths)
    assert_same_data(merged, whole_scan(tmp_path / "whole.h5"))
    assert "shard" not in merged.attrs and merged.shard is None
    assert merged.attrs["bn_mode"] == "reset"


def test_merge_is_order_independent_and_partial(tmp_path):
    paths = write_shards(tmp_path)
    forward = merge_results(tmp_path / "a.h5", paths)
    backward = merge_results(tmp_path / "b.h5", paths[::-1])
    assert_same_data(forward, backward)
    drop = {"created_utc"}
    assert {k: v for k, v in forward.attrs.items() if k not in drop} == \
        {k: v for k, v in backward.attrs.items() if k not in drop}
    partial = merge_results(tmp_path / "c.h5", paths[:2])
    assert partial.done.sum() == len(ALL_CELLS[0::3]) + len(ALL_CELLS[1::3])


def test_merge_conflicting_cell_is_an_error(tmp_path):
    paths = write_shards(tmp_path, count=2)
    with open_scan(paths[1], shard=(1, 2)) as result:  # a cell of shard 0, same values
        result.write((0, 0), **values((0, 0)))
    merge_results(tmp_path / "ok.h5", paths)
    with open_scan(paths[1], shard=(1, 2)) as result:
        result.write((0, 0), loss=[9.0, 9.0], example_loss=np.zeros(5))
    with pytest.raises(UserError, match="pair='0-1', alpha=0.0") as err:
        merge_results(tmp_path / "bad.h5", paths)
    assert paths[0] in str(err.value) and paths[1] in str(err.value)


def test_merge_refuses_shards_of_other_scans(tmp_path):
    paths = write_shards(tmp_path, count=2)
    with pytest.raises(UserError, match="no such result file: .*nope.h5"):
        merge_results(tmp_path / "m.h5", [paths[0], tmp_path / "nope.h5"])
    other = str(tmp_path / "other.h5")
    with open_scan(other, config={**CONFIG, "seed": 1}, shard=(1, 2)):
        pass
    with pytest.raises(UserError, match=f"cannot merge {other}: .*different config"):
        merge_results(tmp_path / "m.h5", [paths[0], other])
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        merge_results(paths[0], paths[1:])
    merge_results(tmp_path / "m.h5", paths)
    merge_results(tmp_path / "m.h5", paths, overwrite=True)


@pytest.mark.parametrize("spec", ["4/4", "1", "a/b", "-1/4", "0/0", "1/2/3", ""])
def test_bad_shard_spec(spec):
    with pytest.raises(UserError, match=r"--shard expects i/n with 0 <= i < n, e\.g\. 0/4"):
        parse_shard(spec)


def test_shard_spec_and_path():
    assert parse_shard("3/4") == (3, 4) and parse_shard(" 0 / 1 ") == (0, 1)
    assert shard_path("out/x.h5", 0, 4) == os.path.join("out", "x.shard0of4.h5")


# ---------------------------------------------------------------------------- bad files


def test_truncated_file_names_the_file(tmp_path):
    path = whole_scan(tmp_path / "r.h5").path
    size = os.path.getsize(path)
    with open(path, "rb+") as file:
        file.truncate(size // 2)
    with pytest.raises(UserError, match=f"cannot read result file {path}"):
        open_result(path)
    with pytest.raises(UserError, match="cannot be resumed.*--overwrite"):
        open_scan(path)
    with open_scan(path, overwrite=True) as result:
        assert len(result.missing()) == len(ALL_CELLS)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(UserError, match="no such result file: .*nope.h5"):
        open_result(tmp_path / "nope.h5")
    (tmp_path / "t.h5").write_text("hello")
    with pytest.raises(UserError, match=f"not an HDF5 file: {tmp_path / 't.h5'}"):
        open_result(tmp_path / "t.h5")


def test_wrong_schema_and_analysis(tmp_path):
    path = whole_scan(tmp_path / "r.h5").path
    with pytest.raises(UserError, match="holds analysis 'interpolate', expected 'prune'"):
        open_result(path, analysis="prune")
    with h5py.File(path, "r+") as file:
        file.attrs["schema"] = "results/0"
    with pytest.raises(UserError, match="schema 'results/0', expected 'results/1'"):
        open_result(path)


def test_different_config_leaves_file_untouched(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path) as result:
        fill(result, ALL_CELLS[:2])
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    with pytest.raises(UserError, match=f"{path} already exists and holds a different config"
                                        ".*--overwrite"):
        open_scan(path, config={**CONFIG, "seed": 1})
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    with open_scan(path, config={**CONFIG, "seed": 1}, overwrite=True) as result:
        assert len(result.missing()) == len(ALL_CELLS)
    assert open_result(path).config["seed"] == 1


def test_bad_writes_change_nothing(tmp_path):
    with open_scan(tmp_path / "r.h5") as result:
        with pytest.raises(ValueError, match="missing \\['example_loss'\\]"):
            result.write((0, 0), loss=[1, 2])
        with pytest.raises(ValueError, match="expects shape \\(2,\\)"):
            result.write((0, 0), loss=1.0, example_loss=np.zeros(5))
        with pytest.raises(UserError, match="unknown metric 'acc'; valid: example_loss, loss"):
            result.write((0, 0), acc=1.0)
        with pytest.raises(IndexError):
            result.write((3, 0), **values((0, 0)))
        assert not result.is_done((0, 0))
    assert np.isnan(open_result(tmp_path / "r.h5").metrics["loss"]).all()


# ---------------------------------------------------------------------------- concurrency


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "r.h5"
    holder = subprocess.Popen([sys.executable, str(WRITER), str(path), "2", "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "2"
        with pytest.raises(UserError, match=f"being written by another process "
                                            f"\\(pid {holder.pid}\\)"):
            open_scan(path)
        assert open_result(path).done.sum() == 2  # readers are not locked out
        with pytest.raises(UserError, match="being written by another process"):
            merge_results(tmp_path / "m.h5", [path])  # a running shard is not merged
    finally:
        holder.communicate("", timeout=30)
    with open_scan(path) as result:
        assert len(result.missing()) == len(ALL_CELLS) - 2


# ---------------------------------------------------------------------------- CLI


def test_cli_show_and_merge(tmp_path, capsys):
    paths = write_shards(tmp_path, count=2)
    out = str(tmp_path / "m.h5")
    assert main(["merge", out, *paths]) == 0
    assert f"merged 2 files into {out}: 12 of 12 cells done" in capsys.readouterr().out
    assert main(["show", out]) == 0
    shown = capsys.readouterr().out
    assert "analysis: interpolate" in shown and "pair (3): '0-1' .. '1-2'" in shown
    assert "alpha (4): 0 .. 1" in shown and "split (2): 'train' .. 'test'" in shown
    assert "loss (pair, alpha, split) 3x4x2 f4 [nats] mean loss: 12 of 12 cells done" in shown
    assert json.dumps(CONFIG, sort_keys=True) in shown
    assert main(["merge", out, *paths]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", out, *paths, "--overwrite"]) == 0


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope.h5")]) == 2
    assert "no such result file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "merge" in capsys.readouterr().out
