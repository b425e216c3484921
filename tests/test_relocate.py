"""Relocatable stores: a run is named by what its files hold, not by how their paths are
spelled, and its config.json keeps paths inside the store relative to it. A store copied
to another folder, or named `store` one day and `/abs/store` the next, resumes: nothing
trains again and every reference resolves (issue #19, item 4)."""

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from runs.checkpoint import save_checkpoint
from runs.config import arg
from runs.errors import UserError
from runs.models import create_model
from runs.refs import content_ref, load_model
from runs.store import Run, identity, open_run, run_path

DIGITS = ["--model", "convnet", "--width", "0.125", "--dataset", "digits", "--subset", "20",
          "--batch-size", "50", "--crop-padding", "0", "--no-flip", "--device", "cpu"]
TRAIN = ["runs.train", *DIGITS, "--steps", "4", "--save-at", "2"]
IMP = ["tickets.imp", *DIGITS, "--steps", "4", "--levels", "2", "--rewind", "init@2",
       "--seeds", "0"]


def run_main(module: str, argv: list[str]) -> int:
    import importlib
    main = importlib.import_module(module).main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def base_run(store: str) -> str:
    """The supervised run started from a seed (the first command's)."""
    for config in sorted(Path(store).glob("train_*/seed_0/config.json")):
        record = json.loads(config.read_text())
        if record["config"]["save_at"] == [2] and not record["config"]["init"]:
            return f"{store}/{config.parent.relative_to(store)}"
    raise AssertionError(f"no base run in {store}")


def run_all(store: str, out: str, fresh: str = "") -> None:
    """The study: a supervised run, a run from its step-2 weights (--init), a 2-level IMP
    (rewinding, masks), every path spelled through `store` and `out`. `fresh`: the IMP
    again into a new result FRESH.h5, so every cell looks its runs up in the store."""
    assert run_main("runs.train", [*TRAIN[1:], "--store", store]) == 0
    init = ["--steps", "4", "--init", f"{base_run(store)}@2", "--store", store]
    assert run_main("runs.train", [*DIGITS, *init]) == 0
    for name in ("imp", fresh):
        if name:
            argv = [*IMP[1:], "--store", store, "--out", f"{out}/{name}.h5"]
            assert run_main("tickets.imp", argv) == 0, name


def checkpoints(root: Path) -> dict[Path, int]:
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*.pt")}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study run once in ROOT/a, its paths absolute (as run configs held them)."""
    root = tmp_path_factory.mktemp("relocate")
    (root / "a").mkdir()
    with contextlib.chdir(root / "a"):
        run_all(str(root / "a" / "store"), str(root / "a" / "results"))
    return root


def no_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr("runs.engines.train.fit", refuse)


@pytest.mark.slow
def test_a_copied_store_resumes_everything_and_its_refs_resolve(study, monkeypatch):
    copy = study / "copy"
    shutil.copytree(study / "a", copy)
    before = checkpoints(copy)
    no_training(monkeypatch)
    monkeypatch.chdir(copy)
    run_all(str(copy / "store"), str(copy / "results"), fresh="again")
    assert checkpoints(copy) == before  # no new checkpoint file, none rewritten
    assert checkpoints(copy) == checkpoints(study / "a")
    # references into the copy resolve there; masked runs read their masks there
    for config in (copy / "store").glob("train_*/seed_0/config.json"):
        run = Run(config.parent)
        assert load_model(f"{run.path}@last").path.is_relative_to(copy)
        assert load_model(f"{run.path}@init").step in (0, 2)
        mask = run.config()["config"]["mask"]
        assert not mask or Path(mask).is_file() and Path(mask).is_relative_to(copy / "store")


@pytest.mark.slow
def test_relative_and_absolute_store_spellings_are_one_store(study, monkeypatch):
    """`--store /abs/store` then `--store store` (and other relative spellings, from the
    parent folder too): the same runs, the same mask folder, the result resumes."""
    before = checkpoints(study / "a")
    no_training(monkeypatch)
    for n, (cwd, store, out) in enumerate(((study / "a", "store", "results"),
                                           (study, "a/store", "a/results"),
                                           (study / "a", "./store/", "./results"))):
        monkeypatch.chdir(cwd)
        run_all(store, out, fresh=f"spelling{n}")
        assert checkpoints(study / "a") == before, store
    assert len(list((study / "a" / "store").glob("imp_*"))) == 1


def test_config_json_keeps_store_paths_relative(tmp_path):
    """A mask inside the store is recorded relative to it (`store_relative`), and read back
    joined to wherever the store is now; a file outside the store stays as given."""
    store = tmp_path / "store"
    mask = store / "masks" / "m.pt"
    mask.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(2, dtype=torch.bool)}, mask)
    run = open_run(store, "train", Masked(mask=str(mask)))
    record = json.loads((run.path / "config.json").read_text())
    assert record["config"]["mask"] == "masks/m.pt" and record["store_relative"] == ["mask"]
    assert run.config()["config"]["mask"] == str(mask)
    shutil.move(store, tmp_path / "moved")
    moved = Run(tmp_path / "moved" / run.path.relative_to(store))
    assert moved.config()["config"]["mask"] == str(tmp_path / "moved" / "masks" / "m.pt")
    outside = tmp_path / "m2.pt"
    shutil.copy(tmp_path / "moved" / "masks" / "m.pt", outside)
    record = open_run(store, "train", Masked(mask=str(outside), lr=0.5)).config()
    assert record["config"]["mask"] == str(outside) and "store_relative" not in record


@dataclasses.dataclass(frozen=True)
class Masked:
    lr: float = arg(0.1, "peak learning rate")
    mask: str = arg("", "mask file", content="file")
    init: str = arg("", "a checkpoint reference", content="ref")
    seed: int = arg(0, "init seed")


def test_a_run_is_named_by_its_files_content_not_their_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m.pt").write_bytes(b"mask one")
    spellings = ["m.pt", "./m.pt", str(tmp_path / "m.pt")]
    assert len({run_path("store", "train", Masked(mask=m), 0) for m in spellings}) == 1
    first = run_path("store", "train", Masked(mask="m.pt"), 0)
    Path("m.pt").write_bytes(b"mask two")  # other content: another run
    assert run_path("store", "train", Masked(mask="m.pt"), 0) != first
    with pytest.raises(UserError, match="--mask gone.pt: no such file"):
        run_path("store", "train", Masked(mask="gone.pt"), 0)


def test_a_checkpoint_is_named_by_its_state_not_its_bytes(tmp_path):
    """Checkpoint bytes hold the process's random RNG state: two saves of one state differ
    in bytes, never in what names the runs that start from them."""
    model = create_model("convnet", width=0.125, num_classes=4, seed=0)
    paths = [tmp_path / "a" / "step_0000000.pt", tmp_path / "b.pt"]
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        save_checkpoint(path, model, 0)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    assert content_ref(str(paths[0])) == content_ref(f"x:={paths[1]}")  # a LABEL names a row
    assert content_ref(f"{paths[0]}:encoder").endswith(":encoder")
    other = create_model("convnet", width=0.125, num_classes=4, seed=1)
    save_checkpoint(paths[1], other, 0)
    assert content_ref(str(paths[0])) != content_ref(str(paths[1]))
    assert identity("train", Masked(init=str(paths[0]))) == {
        "init": content_ref(str(paths[0]))}


def test_runs_made_before_keep_their_folders(tmp_path, monkeypatch):
    """A run made when identities spelled paths (its folder hashed over `mask` as written)
    is found and reopened under the same spelling; a new run gets a content-named one."""
    import hashlib
    monkeypatch.chdir(tmp_path)
    Path("m.pt").write_bytes(b"mask")
    cfg = Masked(mask="m.pt")
    old_identity = {"mask": "m.pt"}
    name = hashlib.sha256(json.dumps(old_identity, sort_keys=True).encode()).hexdigest()[:8]
    old = tmp_path / "store" / f"train_{name}" / "seed_0"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({
        "kind": "train", "seed": 0, "identity": old_identity,
        "config": {"lr": 0.1, "mask": "m.pt", "init": "", "seed": 0}}))
    assert run_path("store", "train", cfg, 0) == Path("store") / f"train_{name}" / "seed_0"
    assert open_run("store", "train", cfg).path.resolve() == old.resolve()
    fresh = open_run("store", "train", Masked(mask="m.pt", lr=0.2))
    assert json.loads((fresh.path / "config.json").read_text())["identity"]["mask"] \
        .startswith("sha256:")


TOY = ["--model", "convnet", "--width", "0.125", "--dataset", "toy", "--batch-size", "32",
       "--steps", "2", "--device", "cpu"]


@pytest.mark.parametrize("module, argv", [
    ("runs.train", TOY),
    ("runs.distill", [*TOY, "--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "8"]),
    ("tickets.imp", [*TOY, "--levels", "1", "--out", "{tmp}/imp.h5"]),
])
def test_a_file_as_store_is_one_line(tmp_path, capsys, module, argv):
    import importlib
    store = tmp_path / "store"
    store.write_text("a file")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert importlib.import_module(module).main([*argv, "--store", str(store)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"error: --store {store}: a file, not a folder; give the run store's "
                      f"folder"]
    assert store.read_text() == "a file" and sorted(tmp_path.iterdir()) == [store]


def test_a_border_scan_resumes_in_a_moved_store(tmp_path, monkeypatch):
    """A border result, its folder moved and renamed, re-run there under the new --store:
    the result is accepted as the same (its children are named relative to the store), its
    children's runs are found and nothing trains again."""
    argv = ["random", "--model", "convnet", "--width", "0.125", "--dataset", "digits",
            "--batch-size", "128", "--children", "2", "--steps", "3", "--grid", "0:1:3",
            "--bn-samples", "64", "--device", "cpu"]
    first, moved = tmp_path / "a", tmp_path / "elsewhere"
    assert run_main("landscape.border", [*argv, "--store", str(first / "store"), "--out",
                                         str(first / "b.h5")]) == 0
    shutil.move(first, moved)
    before = checkpoints(moved / "store")
    no_training(monkeypatch)
    assert run_main("landscape.border", [*argv, "--store", str(moved / "store"), "--out",
                                         str(moved / "b.h5")]) == 0
    assert checkpoints(moved / "store") == before
