"""runs.results: --overwrite replaces only this toolkit's own result of the same analysis;
bad --out paths (empty, a folder, below a file) are one line each. Every refusal leaves the
file's bytes as they were, whatever the flags (issue #19)."""


import h5py
import numpy as np
import pytest
import torch
from _results_writer import fill, open_scan
from helpers import run_cli

from runs.checkpoint import save_checkpoint
from runs.errors import UserError
from runs.models import create_model
from runs.results import main as results_main
from runs.results import merge_results, open_result, shard_path


def call(main, argv) -> tuple[int, list[str]]:
    """main(argv): exit status and stderr lines."""
    return run_cli(main, argv)


def interpolate(argv) -> tuple[int, list[str]]:
    from landscape.interpolate import main
    code, lines = call(main, argv)
    return code, [line for line in lines if not line.startswith("python -m ")]  # the echo


@pytest.fixture
def ckpts(tmp_path):
    """Two tiny convnet checkpoints; `--metrics norm` needs no data, so scans take ms."""
    paths = []
    for seed, name in enumerate("AB"):
        model = create_model("convnet", num_classes=4, width=0.125, in_channels=1, seed=seed)
        paths.append(str(save_checkpoint(tmp_path / f"{name}.pt", model, 0)))
    return paths


def norm_argv(ckpts, out, grid="0:1:3"):
    return [*ckpts, "--metrics", "norm", "--grid", grid, "--device", "cpu", "--out", str(out)]


def foreign_files(tmp_path) -> dict:
    """Files --overwrite must never replace, by what they are."""
    files = {"checkpoint": tmp_path / "x.pt", "npz": tmp_path / "d.npz",
             "text": tmp_path / "notes.txt", "hdf5": tmp_path / "foreign.h5",
             "other analysis": tmp_path / "probe.h5"}
    torch.save({"state": torch.zeros(3)}, files["checkpoint"])
    np.savez(files["npz"], x_train=np.zeros((2, 4, 4), np.uint8))
    files["text"].write_text("keep me\n")
    with h5py.File(files["hdf5"], "w") as file:
        file["data"] = np.arange(4)
    with open_scan(files["other analysis"]) as result:  # an 'interpolate' result ...
        fill(result, result.missing()[:1])
    with h5py.File(files["other analysis"], "r+") as file:
        file.attrs["analysis"] = "probe"  # ... relabelled as another analysis
    return files


def test_overwrite_refuses_every_foreign_file_and_leaves_its_bytes(ckpts, tmp_path):
    for kind, path in foreign_files(tmp_path).items():
        before = path.read_bytes()
        for flags in ([], ["--overwrite"]):
            code, lines = interpolate([*norm_argv(ckpts, path), *flags])
            assert code == 2 and len(lines) == 1, (kind, lines)
            assert lines[0].startswith(f"error: {path} ") and \
                "--overwrite replaces only this toolkit's own 'interpolate'" in lines[0], kind
            assert "pass --overwrite" not in lines[0]
            assert path.read_bytes() == before, kind
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*.tmp"))


def test_overwrite_replaces_the_same_analysis_and_keeps_a_symlink(ckpts, tmp_path):
    out = tmp_path / "path.h5"
    assert interpolate(norm_argv(ckpts, out))[0] == 0
    link = tmp_path / "link.h5"
    link.symlink_to(out)
    argv = norm_argv(ckpts, link, grid="0:1:5")
    code, lines = interpolate(argv)
    assert code == 2 and "different config" in lines[-1] and "--overwrite" in lines[-1]
    assert interpolate([*argv, "--overwrite"])[0] == 0
    assert link.is_symlink() and len(open_result(out).coords["alpha"]) == 5


def test_a_folder_is_refused_with_and_without_overwrite(ckpts, tmp_path):
    folder = tmp_path / "results"
    (folder / "keep").mkdir(parents=True)
    for flags in ([], ["--overwrite"]):
        code, lines = interpolate([*norm_argv(ckpts, folder), *flags])
        assert code == 2 and len(lines) == 1
        assert lines[0] == (f"error: {folder} is a folder, not a result file; give a file "
                            f"path such as {folder / 'interpolate.h5'}")
    assert (folder / "keep").is_dir() and not list(folder.parent.glob("*.lock"))


def test_empty_out_and_out_below_a_file_are_one_line(ckpts, tmp_path):
    code, lines = interpolate(norm_argv(ckpts, ""))
    assert code == 2 and len(lines) == 1 and "the result path is empty (--out '')" in lines[0]
    (tmp_path / "plain.txt").write_text("x")
    below = tmp_path / "plain.txt" / "sub" / "r.h5"
    code, lines = interpolate(norm_argv(ckpts, below))
    assert code == 2 and len(lines) == 1
    assert lines[0] == (f"error: cannot write {below}: {tmp_path / 'plain.txt'} is a file, "
                        f"not a folder")
    assert (tmp_path / "plain.txt").read_text() == "x"


def test_merge_and_library_refuse_foreign_outputs(tmp_path):
    shards = []
    for i in range(2):
        with open_scan(shard_path(tmp_path / "s.h5", i, 2), shard=(i, 2)) as result:
            fill(result, result.missing())
            shards.append(result.path)
    files = foreign_files(tmp_path)
    for kind, path in files.items():
        before = path.read_bytes()
        code, lines = call(results_main, ["merge", str(path), *shards, "--overwrite"])
        assert code == 2 and len(lines) == 1 and "replaces only" in lines[0], (kind, lines)
        assert path.read_bytes() == before
        with pytest.raises(UserError, match="replaces only this toolkit's own"):
            open_scan(path, overwrite=True)
        assert path.read_bytes() == before
    assert merge_results(tmp_path / "m.h5", shards).done.all()
    assert merge_results(tmp_path / "m.h5", shards, overwrite=True).done.all()


def test_a_damaged_result_of_ours_can_still_be_overwritten(tmp_path):
    path = tmp_path / "r.h5"
    with open_scan(path) as result:
        fill(result, result.missing())
    with open(path, "rb+") as file:
        file.truncate(path.stat().st_size // 2)
    with pytest.raises(UserError, match="cannot be resumed.*pass --overwrite"):
        open_scan(path)
    with open_scan(path, overwrite=True) as result:
        assert len(result.missing()) == 12
