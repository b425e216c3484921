"""runs.results' write lock is keyed by the file, not its spelling (symlinks resolved, the
inode locked too); merge locks only its output and reads shards in a read-only folder
(issue #19)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _results_writer import fill, open_scan

from runs.errors import UserError
from runs.results import main as results_main
from runs.results import merge_results, open_result, shard_path

WRITER = Path(__file__).with_name("_results_writer.py")


class Holder:
    """A writer process holding `path` open (and locked) after writing 2 cells."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, str(WRITER), str(path), "2", "hold"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "2"

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        self.proc.communicate("", timeout=30)


def test_a_second_writer_through_a_symlink_is_refused(tmp_path):
    real, link = tmp_path / "r.h5", tmp_path / "link.h5"
    link.symlink_to(real)  # dangling until the holder writes the file through it
    with Holder(link) as holder:
        assert real.is_file() and (tmp_path / "r.h5.lock").is_file()  # beside the target
        before = real.read_bytes()
        for spelling in (real, link, tmp_path / "." / "r.h5"):
            with pytest.raises(UserError, match=f"{spelling} is being written by another "
                                                f"process \\(pid {holder.pid}\\)"):
                open_scan(spelling)
        assert real.read_bytes() == before
    with open_scan(real) as result:
        assert len(result.missing()) == 10


def test_a_second_writer_through_a_hard_link_is_refused(tmp_path):
    real, hard = tmp_path / "r.h5", tmp_path / "other_name.h5"
    with Holder(real):
        os.link(real, hard)  # another name of the same inode: another .lock file
        with pytest.raises(UserError, match=f"{hard} is being written by another process"):
            open_scan(hard)
    assert not list(tmp_path.glob("*.lock"))  # released by both
    with open_scan(hard) as result:
        assert len(result.missing()) == 10


def write_shards(folder, count=2) -> list[str]:
    paths = []
    for i in range(count):
        with open_scan(shard_path(folder / "s.h5", i, count), shard=(i, count)) as result:
            fill(result, result.missing())
            paths.append(result.path)
    return paths


def test_merge_reads_shards_in_a_read_only_folder(tmp_path, monkeypatch, capsys):
    shards_dir = tmp_path / "shards"
    shards_dir.mkdir()
    shards = write_shards(shards_dir)
    before = sorted(os.listdir(shards_dir))
    written = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):  # root ignores 0555: watch for writes instead
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            written.append(os.path.realpath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    shards_dir.chmod(0o555)
    try:
        out = tmp_path / "merged.h5"
        assert results_main(["merge", str(out), *shards]) == 0
        assert "12 of 12 cells done" in capsys.readouterr().out
        assert not [p for p in written if p.startswith(str(shards_dir.resolve()))], written
        assert written  # ... while the output was locked and written
        assert sorted(os.listdir(shards_dir)) == before
    finally:
        shards_dir.chmod(0o755)
    assert open_result(out).done.all()


def test_merge_still_refuses_a_shard_being_written(tmp_path):
    path = tmp_path / "s.h5"
    with Holder(path) as holder:
        with pytest.raises(UserError, match=f"being written by another process "
                                            f"\\(pid {holder.pid}\\)"):
            merge_results(tmp_path / "m.h5", [path])
    assert not (tmp_path / "m.h5").exists()
