"""Assertions and data writers shared by several test modules."""

import contextlib
import hashlib
import importlib
import io
import pickle

import numpy as np
import torch
import torchvision

from runs.data import CIFAR10_CLASSES


def assert_same(a, b, where="payload"):
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def scaled_digits(train_per_class: int = 12, test_per_class: int = 6):
    """Float digits images in [-0.5, 0.5] with labels, ((x, y) train, (x, y) test): what the
    landscape API tests pass as in-memory data (1 x 8 x 8, 10 classes)."""
    from runs.data import load_dataset
    train = load_dataset("digits", split="train", subset=train_per_class)
    test = load_dataset("digits", split="test", subset=test_per_class)
    return tuple((d.x.float() / 255 - 0.5, d.y) for d in (train, test))


# ---------------------------------------------------------------- CIFAR (python pickles)

def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def pickle_file(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root, monkeypatch, per_batch=3, test_count=4):
    """cifar-10-batches-py with 5 train batches and a test batch; md5s patched to match."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_count if name == "test_batch" else per_batch
        images[name] = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, count).tolist()
        # official row layout: 1024 red (row-major), 1024 green, 1024 blue
        pickle_file(folder / name, {"batch_label": name, "labels": labels[name],
                                "data": images[name].reshape(count, 3072),
                                "filenames": [f"{name}_{i}.png" for i in range(count)]})
    pickle_file(folder / "batches.meta", {"label_names": list(CIFAR10_CLASSES),
                                      "num_cases_per_batch": per_batch, "num_vis": 3072})
    patch_md5s(monkeypatch, torchvision.datasets.CIFAR10, folder, names[:5], names[5:],
                "batches.meta")
    return folder, images, labels


def patch_md5s(monkeypatch, cls, folder, train, test, meta):
    """Make torchvision's md5 lists describe our tiny files (its checks then run for real)."""
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n in train])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n in test])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / meta)})


def run_cli(main, argv: list[str]) -> tuple[int, list[str]]:
    """Run a command's main (a callable, or a module name such as "runs.train") on argv with
    stdout silenced: its exit status (argparse's SystemExit too) and its stderr lines."""
    if isinstance(main, str):
        main = importlib.import_module(main).main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue().strip().splitlines()


@contextlib.contextmanager
def killed_on_call(owner, name: str, call: int):
    """`owner.name` raises KeyboardInterrupt (a kill) on its `call`-th call; yields the list
    of every call's arguments; the real function is back afterwards."""
    import pytest
    real, calls = getattr(owner, name), []

    def killing(*args):
        calls.append(args)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args)

    setattr(owner, name, killing)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield calls
    finally:
        setattr(owner, name, real)
