"""runs.results when things go wrong: a full disk (simulated, and a real tmpfs where user
namespaces allow), read-only folders, foreign or corrupt attributes, sizes beyond a sane
bound. Each is one `error:` line and exit 2; nothing half-written is left (issue #19)."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from _results_cli import main as scan_main
from _results_writer import fill, open_scan
from helpers import run_cli

import runs.results
from runs.checkpoint import save_checkpoint
from runs.errors import UserError
from runs.models import create_model
from runs.results import main as results_main
from runs.results import open_result, shard_path

REPO = Path(__file__).resolve().parents[1]
SCAN = Path(__file__).with_name("_results_cli.py")  # the test scan as a command


def call(main, argv) -> tuple[int, list[str]]:
    """main(argv): exit status and the stderr lines that are not the command's echo."""
    code, lines = run_cli(main, argv)
    return code, [line for line in lines if not line.startswith("python -m ")]


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------- a full disk


def test_full_disk_writing_a_new_result_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "r.h5"
    monkeypatch.setattr(runs.results.os, "fsync", enospc)
    code, lines = call(scan_main, [str(out)])
    assert code == 2 and lines == [f"error: No space left on device while writing {out}; "
                                   f"free space, then re-run the same command to resume "
                                   f"(finished work is kept)"]
    assert os.listdir(tmp_path) == []  # no result, no temp file, no lock


def test_full_disk_replacing_a_result_keeps_the_old_one(tmp_path, monkeypatch):
    shards = []
    for i in range(2):
        with open_scan(shard_path(tmp_path / "s.h5", i, 2), shard=(i, 2)) as result:
            fill(result, result.missing())
            shards.append(result.path)
    out = tmp_path / "m.h5"
    assert results_main(["merge", str(out), *shards]) == 0
    before = files(tmp_path)
    monkeypatch.setattr(runs.results.os, "fsync", enospc)
    code, lines = call(results_main, ["merge", str(out), *shards, "--overwrite"])
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: No space left on device while writing {out}")
    assert files(tmp_path) == before


def test_hdf5s_own_full_disk_error_on_a_cell_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "r.h5"
    with open_scan(out) as result:
        fill(result, result.missing()[:2])
    flushes = []

    def flush(self):  # what HDF5 raises: a RuntimeError carrying the errno in its text
        flushes.append(1)
        raise RuntimeError("Can't decrement id ref count (file write failed: ... errno = 28, "
                           "error message = 'No space left on device', ...)")

    monkeypatch.setattr(h5py.File, "flush", flush)
    code, lines = call(scan_main, [str(out)])
    assert flushes and code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: No space left on device while writing {out}")
    monkeypatch.undo()
    assert open_result(out).done.sum() in (2, 3) and not list(tmp_path.glob("*.lock"))


def unshare_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none "
                            "/mnt"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not unshare_available(), reason="needs unshare -rm to mount a tmpfs")
def test_a_real_full_disk_never_crashes_and_leaves_files_that_open(tmp_path):
    """The test scan on a 64 KiB tmpfs filled to leave 0 to 40 KiB: exit 0, or exit 2 with
    one `error:` line; never a traceback or a crash (the issue saw exit 139 at 8 KiB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    script = f"""
mount -t tmpfs -o size=64k none {mount} || exit 99
for kb in 0 8 16 24 40; do
  rm -rf {mount}/*; rm -f {mount}/.??*
  avail=$(df -k --output=avail {mount} | tail -1)
  dd if=/dev/zero of={mount}/filler bs=1k count=$((avail - kb)) 2>/dev/null
  {sys.executable} {SCAN} {mount}/r.h5 > {mount}/../out_$kb 2> {mount}/../err_$kb
  echo "$kb $?"
  if [ -e {mount}/r.h5 ]; then {sys.executable} -c "
from runs.results import open_result; print(open_result('{mount}/r.h5').done.sum())" \
    >> {mount}/../out_$kb 2>&1; fi
  ls -a {mount} > {mount}/../ls_$kb
done
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                         text=True, env=env, timeout=300)
    statuses = dict(line.split() for line in out.stdout.split("\n") if line.strip())
    if {"126", "127"} & set(statuses.values()):
        pytest.skip(f"python cannot run inside the namespace: {out.stderr.strip()[-300:]}")
    assert len(statuses) == 5, out.stderr[-2000:]
    assert set(statuses.values()) <= {"0", "2"}, statuses
    assert "2" in statuses.values() and "0" in statuses.values()
    for kb, status in statuses.items():
        err = (tmp_path / f"err_{kb}").read_text()
        listing = (tmp_path / f"ls_{kb}").read_text().split()
        assert not [name for name in listing if name.endswith((".tmp", ".lock"))], listing
        if status == "2":
            assert err.strip().splitlines() == [
                f"error: No space left on device while writing {mount}/r.h5; free space, "
                f"then re-run the same command to resume (finished work is kept)"], err
        else:
            assert err == "" and (tmp_path / f"out_{kb}").read_text().split()[-1] == "12"


# ---------------------------------------------------------------------------- read-only


@pytest.fixture
def read_only_writer():
    """Raise EROFS from the result's writes, as a read-only folder would even for root."""
    def deny(path, flags, *args, real=os.open, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *args, **kwargs)
    return deny


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch, read_only_writer):
    out = tmp_path / "sub" / "r.h5"
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr(runs.results.os, "open", read_only_writer)
    code, lines = call(scan_main, [str(out)])
    assert code == 2 and lines == [f"error: cannot write {out}: read-only file system; "
                                   f"choose a writable output folder (--out) or change its "
                                   f"permissions"]
    assert os.listdir(tmp_path / "sub") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into 0555 folders")
def test_a_chmod_read_only_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, lines = call(scan_main, [str(folder / "r.h5")])
        assert code == 2 and len(lines) == 1 and "permission denied" in lines[0]
        code, lines = call(scan_main, [str(folder / "new" / "r.h5")])  # mkdir fails too
        assert code == 2 and len(lines) == 1 and "permission denied" in lines[0]
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(not unshare_available(), reason="needs unshare -rm for a read-only mount")
def test_a_read_only_mount_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
              f"{sys.executable} {SCAN} {folder}/r.h5")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    if out.returncode in (126, 127):
        pytest.skip(f"python cannot run inside the namespace: {out.stderr.strip()}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"error: cannot write {folder}/r.h5: read-only file system; choose a writable output "
        f"folder (--out) or change its permissions"]


# ---------------------------------------------------------------------------- foreign attrs


@pytest.mark.parametrize(("key", "value", "says"), [
    ("inputs", '{"path": "a"}', "root attribute 'inputs' is not a JSON list (got dict)"),
    ("inputs", "7", "root attribute 'inputs' is not a JSON list (got int)"),
    ("inputs", '["a.pt"]', "root attribute 'inputs' holds 'a.pt', not a record with a"),
    ("inputs", '[{"path": 1, "sha256": 2}]', "root attribute 'inputs' holds"),
    ("inputs", "not json", "root attribute 'inputs' is not JSON"),
    ("config", "[1, 2]", "root attribute 'config' is not a JSON object (got list)"),
    ("config", "{bad", "root attribute 'config' is not JSON"),
])
def test_foreign_attributes_are_one_line_in_show_merge_and_figures(tmp_path, key, value, says):
    path = tmp_path / "r.h5"
    with open_scan(path) as result:
        fill(result, result.missing())
    with h5py.File(path, "r+") as file:
        file.attrs[key] = value
    from figures.__main__ import main as figures_main
    for main, argv in ((results_main, ["show", str(path)]),
                       (results_main, ["merge", str(tmp_path / "m.h5"), str(path)]),
                       (figures_main, ["interpolate-1d", "--results", str(path), "--out",
                                       str(tmp_path / "figs")])):
        code, lines = call(main, argv)
        assert code == 2 and len(lines) == 1, (argv[0], lines)
        assert lines[0].startswith(f"error: {path}: ") and says in lines[0], lines
    assert not (tmp_path / "m.h5").exists()


def test_json_attr_names_the_file_and_attribute(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path) as result:
        fill(result, result.missing()[:1])
    with h5py.File(path, "r+") as file:
        file.attrs["checkpoints"] = "{oops"
        file.attrs["rows"] = '{"a": 1}'
    data = open_result(path)
    with pytest.raises(UserError, match=f"{path}: root attribute 'checkpoints' is not JSON"):
        runs.results.json_attr(data, "checkpoints")
    with pytest.raises(UserError, match="root attribute 'rows' is not a JSON list"):
        runs.results.json_attr(data, "rows")
    assert runs.results.json_attr(data, "rows", dict) == {"a": 1}
    assert runs.results.json_attr(data, "absent", default=[]) == []


# ---------------------------------------------------------------------------- sizes


def test_a_result_beyond_the_size_bound_is_refused_before_it_exists(tmp_path, monkeypatch):
    out = tmp_path / "r.h5"
    monkeypatch.setattr(runs.results, "MAX_POINTS", 11)  # the test scan has 12 points
    with pytest.raises(UserError, match=f"{out}: 3 pair x 4 alpha is 12 points and about "
                                        f".* GiB, beyond the limit of 11 points or 4 GiB"):
        open_scan(out)
    monkeypatch.setattr(runs.results, "MAX_POINTS", 10**7)
    monkeypatch.setattr(runs.results, "MAX_RESULT_BYTES", 100)
    with pytest.raises(UserError, match="is 12 points and about"):
        open_scan(out)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def three_ckpts(tmp_path):
    paths = []
    for seed, name in enumerate("ABC"):
        model = create_model("convnet", num_classes=4, width=0.125, in_channels=1, seed=seed)
        paths.append(str(save_checkpoint(tmp_path / f"{name}.pt", model, 0)))
    return paths


@pytest.mark.parametrize(("refs", "grid", "says"), [
    (2, "0:1:100000000", "--grid '0:1:100000000': 100,000,000 points is beyond the limit of "
                         "10,000,000"),
    (2, "1e308:1e309:3", "--grid '1e308:1e309:3': its ends or span are not finite numbers"),
    (2, "-1e308:1e308:3", "its ends or span are not finite numbers"),
    (2, "0,1e309", "--grid '0,1e309': a coordinate is not a finite number"),
    (3, "0:1:4000", "4,000 alpha x 4,000 beta is 16,000,000 points and about"),
])
def test_huge_or_non_finite_grids_are_one_line(three_ckpts, tmp_path, refs, grid, says):
    from landscape.interpolate import main
    out = tmp_path / "out.h5"
    code, lines = call(main, [*three_ckpts[:refs], "--metrics", "norm", f"--grid={grid}",
                              "--device", "cpu", "--out", str(out)])
    assert code == 2 and len(lines) == 1 and says in lines[0], lines
    assert "repeats a coordinate" not in lines[0] and not out.exists()
