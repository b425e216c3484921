"""Data parallel under torchrun: 2 CPU processes (gloo) equal 1 process on the same global
batch. VGG has no BatchNorm, whose statistics would stay per rank on CPU (SyncBatchNorm,
used on CUDA, needs GPUs)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs.checkpoint import read_checkpoint
from runs.engines.distributed import World, rank_slice
from runs.errors import UserError
from runs.gpu_loader import Augment, GPULoader

TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = ["--model", "vgg11", "--width", "0.0625", "--dataset", "toy", "--batch-size", "32",
        "--steps", "6"]
pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or shutil.which("true") is None,
                                reason="torchrun not installed")


def launch(module: str, argv: list, processes: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if processes == 1:
        cmd = [sys.executable, "-m", module, *argv]
    else:
        cmd = [str(TORCHRUN), "--nproc_per_node", str(processes), "--master_port",
               str(29500 + os.getpid() % 1000), "-m", module, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def final_state(store: Path, kind: str) -> dict:
    (ckpt,) = store.glob(f"{kind}_*/seed_0/ckpt/step_0000006.pt")
    payload = read_checkpoint(ckpt)
    head = payload["modules"].get("head", {}).get("state") or {}
    return {**payload["model"]["state"], **{f"head.{k}": v for k, v in head.items()}}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ranks_split_every_global_batch(tiny_images):
    x, y = tiny_images
    whole = GPULoader(x, torch.arange(16), [0.0] * 3, [1.0] * 3, 8, augment=Augment(True, 2),
                      data_seed=3)
    parts = [GPULoader(x, torch.arange(16), [0.0] * 3, [1.0] * 3, 8, augment=Augment(True, 2),
                       data_seed=3, part=rank_slice(8, World(r, 2))) for r in range(2)]
    for full, *halves in zip(whole.epoch(1), *(p.epoch(1) for p in parts)):
        torch.testing.assert_close(torch.cat([h[0] for h in halves]), full[0])
        assert torch.equal(torch.cat([h[1] for h in halves]), full[1])


def test_batch_must_divide_among_ranks():
    with pytest.raises(UserError, match="divisible by the 3 processes"):
        rank_slice(32, World(0, 3))


@pytest.mark.slow
def test_two_process_training_equals_one(tmp_path):
    argv = [*TINY, "--eval-every", "0", "--lr", "0.05"]
    launch("runs.train", [*argv, "--store", str(tmp_path / "one")], 1)
    out = launch("runs.train", [*argv, "--store", str(tmp_path / "two")], 2)
    assert out.stdout.count("train ") == 1  # rank 0 alone reports
    assert_close(final_state(tmp_path / "one", "train"), final_state(tmp_path / "two", "train"))
    assert (next((tmp_path / "two").glob("train_*/seed_0")) / "DONE").exists()


@pytest.mark.slow
def test_two_process_distillation_equals_one(tmp_path):
    argv = [*TINY, "--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "8",
            "--alpha", "0.5", "--centering"]
    launch("runs.distill", [*argv, "--store", str(tmp_path / "one")], 1)
    launch("runs.distill", [*argv, "--store", str(tmp_path / "two")], 2)
    assert_close(final_state(tmp_path / "one", "distill"),
                 final_state(tmp_path / "two", "distill"))
