"""The last partial batch under torchrun (kept by default, as the paper's code): 2 CPU
processes (gloo) split it evenly and equal 1 process, as they do on full batches."""

import pytest

from tests import test_distributed
from tests.test_distributed import TINY, assert_close, final_state, launch

pytestmark = [pytest.mark.slow, test_distributed.pytestmark]  # skipped without torchrun


def test_two_processes_share_the_last_partial_batch(tmp_path):
    # toy: 256 images at batch 48 = 5 full batches and one of 16 (8 a process): step 6 is it
    argv = [*TINY, "--batch-size", "48", "--out-dim", "64", "--hidden-dim", "32",
            "--bottleneck-dim", "8", "--alpha", "0.5"]
    assert TINY[TINY.index("--steps") + 1] == "6"
    launch("runs.distill", [*argv, "--store", str(tmp_path / "one")], 1)
    launch("runs.distill", [*argv, "--store", str(tmp_path / "two")], 2)
    assert_close(final_state(tmp_path / "one", "distill"),
                 final_state(tmp_path / "two", "distill"))
    config = next((tmp_path / "two").glob("distill_*/seed_0/config.json")).read_text()
    assert '"steps_per_epoch": 6' in config
