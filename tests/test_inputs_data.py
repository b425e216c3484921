"""runs.filehash: the data files a result reads are recorded by content (size, mtime, sha256),
hashed once and cached; a resumed scan whose data changed is refused, naming the file
(issue #19)."""

import contextlib
import gzip
import hashlib
import io
import json
import os
import sys

import numpy as np
import pytest
from helpers import run_cli, write_cifar10

from runs import filehash
from runs.checkpoint import save_checkpoint
from runs.data import load_dataset
from runs.models import create_model
from runs.results import main as results_main
from runs.results import open_result


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test its own hash cache file."""
    path = tmp_path / "cache" / "sha256.json"
    monkeypatch.setenv(filehash.CACHE_ENV, str(path))
    return path


def write_npz(path, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8),
             y_train=np.arange(32) % 4, x_test=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8),
             y_test=np.arange(16) % 4)
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- hashing


def test_a_file_is_hashed_once_and_again_after_it_changes(tmp_path, cache, monkeypatch):
    data = write_npz(tmp_path / "d.npz")
    reads = []
    real = filehash._digest
    monkeypatch.setattr(filehash, "_digest", lambda path: reads.append(path) or real(path))
    first = filehash.file_record(data)
    assert first == {"kind": "data", "path": str(data), "size": data.stat().st_size,
                     "mtime": data.stat().st_mtime, "sha256": sha256(data)}
    assert filehash.file_record(data) == first and len(reads) == 1  # from the cache
    assert cache.is_file()
    write_npz(data, seed=1)  # rewritten: new content, new mtime
    assert filehash.file_record(data)["sha256"] == sha256(data) != first["sha256"]
    assert len(reads) == 2


def test_a_read_only_data_folder_and_an_unwritable_cache_still_hash(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    data = write_npz(folder / "d.npz")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(filehash.CACHE_ENV, str(tmp_path / "file" / "sha256.json"))
    folder.chmod(0o555)
    try:
        assert filehash.data_inputs("npz", str(data))[0]["sha256"] == sha256(data)
        assert sorted(os.listdir(folder)) == ["d.npz"]  # nothing written beside the data
    finally:
        folder.chmod(0o755)
    monkeypatch.setenv(filehash.CACHE_ENV, "")  # the cache turned off
    assert filehash.cache_file() is None and filehash.sha256_cached(data) == sha256(data)


def test_changed_data_names_the_file_and_ignores_older_results():
    old = [{"path": "a.pt", "sha256": "1" * 64},
           {"kind": "data", "path": "/d/x.npz", "sha256": "a" * 64}]
    new = [old[0], {"kind": "data", "path": "/e/x.npz", "sha256": "b" * 64}]
    assert filehash.changed_data(old, new) == ("/e/x.npz", "sha256 aaaaaaaaaaaa then, "
                                                           "bbbbbbbbbbbb now")
    moved = [old[0], {**old[1], "path": "/elsewhere/x.npz"}]
    assert filehash.changed_data(old, moved) is None  # same bytes, another folder
    assert filehash.changed_data(old[:1], new) is None  # written before data was recorded


# ---------------------------------------------------------------------------- datasets


@contextlib.contextmanager
def opened_files():
    """Paths the process opens meanwhile (audit events; the hook stays, but idle)."""
    seen = []
    if not getattr(opened_files, "hook", None):
        def hook(event, args):
            if event == "open" and opened_files.sink is not None and isinstance(args[0], str):
                opened_files.sink.append(os.path.realpath(args[0]))
        opened_files.hook, opened_files.sink = hook, None
        sys.addaudithook(hook)
    opened_files.sink = seen
    try:
        yield seen
    finally:
        opened_files.sink = None


def _idx(array) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root):
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, count in (("train", 6), ("t10k", 4)):
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(_idx(rng.integers(0, 256, (count, 28, 28)))))
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(_idx(np.arange(count) % 10))


@pytest.mark.parametrize("name", ["npz", "cifar10", "mnist"])
def test_every_file_a_loader_opens_is_recorded(name, tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    if name == "npz":
        root = write_npz(root / "d.npz")
    elif name == "cifar10":
        write_cifar10(root, monkeypatch)
    else:
        write_mnist(root)
    with opened_files() as seen:
        for split in ("train", "test"):
            load_dataset(name, root=root, split=split)
    read = {path for path in seen if path.startswith(str(tmp_path / "data"))}
    records = filehash.data_inputs(name, str(root))
    assert read and read <= {os.path.realpath(r["path"]) for r in records}
    for record in records:
        assert record["kind"] == "data" and record["sha256"] == sha256(
            type(tmp_path)(record["path"]))


def test_datasets_made_in_memory_record_nothing(tmp_path):
    assert filehash.data_inputs("toy", "") == filehash.data_inputs("digits", None) == []
    assert filehash.data_inputs("noise", "", ("shape=1,8,8",)) == []


def test_stl10_records_the_split_files(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for name in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"):
        (folder / name).write_bytes(name.encode())
    records = filehash.data_inputs("stl10", str(tmp_path))
    assert [os.path.basename(r["path"]) for r in records] == [
        "train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]


# ---------------------------------------------------------------------------- resume


def interpolate(argv) -> tuple[int, list[str]]:
    code, lines = run_cli("landscape.interpolate", argv)
    return code, [line for line in lines if line.startswith("error")]


def test_a_partial_npz_scan_resumed_after_the_npz_changed_is_refused(tmp_path):
    from landscape.interpolate import InterpolateConfig, scan
    refs = []
    for seed, name in enumerate("AB"):
        model = create_model("convnet", num_classes=4, width=0.125, in_channels=1, seed=seed)
        refs.append(str(save_checkpoint(tmp_path / f"{name}.pt", model, 0)))
    data, out = write_npz(tmp_path / "d.npz"), tmp_path / "path.h5"
    cfg = InterpolateConfig(refs=tuple(refs), grid="0:1:4", dataset="npz", data_root=str(data),
                            bn_samples=16, bn_batch_size=16)
    scan(cfg, str(out), device="cpu", points_per_pass=1, stop_after=1)  # as if killed
    recorded = open_result(out).attrs["inputs"][-1]
    assert recorded["kind"] == "data" and recorded["sha256"] == sha256(data)
    assert open_result(out).done.sum() == 1
    argv = [*refs, "--grid", "0:1:4", "--dataset", "npz", "--data-root", str(data),
            "--bn-samples", "16", "--bn-batch-size", "16", "--device", "cpu", "--out",
            str(out)]
    original = data.read_bytes()
    write_npz(data, seed=1)  # the data rewritten between the kill and the resume
    before = out.read_bytes()
    code, errors = interpolate(argv)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0] == (f"error: {data} changed since the result {out} was started "
                         f"(sha256 {recorded['sha256'][:12]} then, {sha256(data)[:12]} now); "
                         f"re-run with --overwrite or restore the file")
    assert out.read_bytes() == before
    data.write_bytes(original)  # restored (a new mtime, the same bytes): resumes
    assert interpolate(argv)[0] == 0 and open_result(out).done.all()
    write_npz(data, seed=1)
    assert interpolate([*argv, "--overwrite"])[0] == 0  # or start again on the new data
    assert open_result(out).attrs["inputs"][-1]["sha256"] == sha256(data)
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert results_main(["show", str(out)]) == 0
    assert f"{data}  sha256={sha256(data)[:12]}  (data, " in shown.getvalue()


@pytest.mark.parametrize("kind", ["train", "distill"])
def test_a_run_resumed_after_its_npz_changed_is_refused(tmp_path, capsys, kind):
    """A train or distill run records its data files in config.json; killed, its npz
    rewritten, the re-run is refused naming the file and the run, and no checkpoint changes;
    with the bytes restored it resumes."""
    from runs.engines import distill as distill_module
    from runs.engines import train as train_module
    main = {"train": train_module.main, "distill": distill_module.main}[kind]
    data = write_npz(tmp_path / "d.npz")
    argv = ["--store", str(tmp_path / "store"), "--model", "convnet", "--width", "0.125",
            "--dataset", "npz", "--data-root", str(data), "--batch-size", "16",
            "--device", "cpu", "--steps", "4"]
    if kind == "distill":
        argv += ["--out-dim", "16", "--hidden-dim", "8", "--bottleneck-dim", "4"]
    assert main([*argv, "--save-at", "2"]) == 0
    (run,) = (tmp_path / "store").glob(f"{kind}_*/seed_0")
    recorded = json.loads((run / "config.json").read_text())["data_inputs"]
    assert [r["sha256"] for r in recorded] == [sha256(data)]
    (run / "DONE").unlink()  # as if killed after step 2
    for late in sorted((run / "ckpt").glob("step_*.pt"))[2:]:
        late.unlink()
    kept = {p.name: p.read_bytes() for p in (run / "ckpt").iterdir()}
    original = data.read_bytes()
    write_npz(data, seed=1)
    capsys.readouterr()
    assert main([*argv, "--save-at", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"{data} changed since the run {run} was started" in errors[0]
    assert {p.name: p.read_bytes() for p in (run / "ckpt").iterdir()} == kept
    data.write_bytes(original)
    assert main([*argv, "--save-at", "2"]) == 0 and (run / "DONE").exists()


def test_a_result_copied_with_its_checkpoints_and_data_resumes_there(tmp_path):
    """A partial npz scan, its checkpoints and its npz copied to another folder: the config
    names other paths (refs, --data-root) but the files hold the same bytes, so the scan in
    the copy resumes; a copy whose npz differs is refused naming the file."""
    import shutil

    from landscape.interpolate import InterpolateConfig, scan
    first = tmp_path / "first"
    first.mkdir()
    for seed, name in enumerate("AB"):
        model = create_model("convnet", num_classes=4, width=0.125, in_channels=1, seed=seed)
        save_checkpoint(first / f"{name}.pt", model, 0)
    write_npz(first / "d.npz")
    cfg = InterpolateConfig(refs=(str(first / "A.pt"), str(first / "B.pt")), grid="0:1:4",
                            dataset="npz", data_root=str(first / "d.npz"), bn_samples=16,
                            bn_batch_size=16)
    scan(cfg, str(first / "path.h5"), device="cpu", points_per_pass=1, stop_after=1)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)

    def resume(folder):
        return interpolate([str(folder / "A.pt"), str(folder / "B.pt"), "--grid", "0:1:4",
                            "--dataset", "npz", "--data-root", str(folder / "d.npz"),
                            "--bn-samples", "16", "--bn-batch-size", "16", "--device", "cpu",
                            "--out", str(folder / "path.h5")])
    assert resume(copy) == (0, [])
    assert open_result(copy / "path.h5").done.all()
    other = tmp_path / "other"
    shutil.copytree(first, other)
    write_npz(other / "d.npz", seed=1)
    code, errors = resume(other)
    assert code == 2 and len(errors) == 1 and f"{other / 'd.npz'} changed" in errors[0], errors
    assert open_result(other / "path.h5").done.sum() == 1


def test_a_result_without_data_records_keeps_its_data_root_as_identity():
    """Results written before data files were recorded cannot tell a moved folder from
    other data: a different --data-root stays a different config for them."""
    from runs.results import ResultData, _difference
    old = ResultData(path="old.h5", analysis="interpolate", coords={}, point_dims=(),
                     specs={}, metrics={}, done=None, attrs={
                         "config": {"data_root": "/a", "refs": ["/a/A.pt"]},
                         "inputs": [{"path": "/a/A.pt", "sha256": "1" * 64}]})
    moved = dataclasses_replace(old, {"data_root": "/b", "refs": ["/b/A.pt"]},
                                [{"path": "/b/A.pt", "sha256": "1" * 64}])
    assert "data_root: '/a' vs '/b'" in _difference(old, moved)
    refs_only = dataclasses_replace(old, {"data_root": "/a", "refs": ["/b/A.pt"]},
                                    moved.attrs["inputs"])
    assert _difference(old, refs_only) is None  # checkpoints are compared by sha256
    with_data = [*old.attrs["inputs"], {"kind": "data", "path": "/a/d.npz", "sha256": "2" * 64}]
    recorded = dataclasses_replace(old, old.attrs["config"], with_data)
    assert _difference(recorded, dataclasses_replace(
        old, {"data_root": "/b", "refs": ["/b/A.pt"]},
        [moved.attrs["inputs"][0], {**with_data[1], "path": "/b/d.npz"}])) is None


def dataclasses_replace(data, config: dict, inputs: list):
    import dataclasses
    return dataclasses.replace(data, attrs={**data.attrs, "config": config,
                                            "inputs": inputs})
