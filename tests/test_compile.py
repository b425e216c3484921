"""torch.compile paths compute what the eager path computes: a compiled training run (the
CUDA-graph mode reduce-overhead, which on CPU compiles without graphs) follows the eager
run's loss curve and ends at the same weights within float tolerance."""

import shutil

import pytest
import torch

from runs.checkpoint import read_checkpoint
from runs.engines.engine import COMPILE_MODES, add_runtime_args
from runs.engines.train import TrainConfig, train

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")

CFG = TrainConfig(model="convnet", width=0.125, dataset="toy", val_size=32, batch_size=32,
                  num_steps=10, lr=0.05, eval_every=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from torch._dynamo.utils import counters
    eager = train(CFG, tmp_path_factory.mktemp("eager"), device="cpu")
    before = counters["stats"]["unique_graphs"]
    compiled = train(CFG, tmp_path_factory.mktemp("compiled"), device="cpu",
                     compile_model="reduce-overhead")
    assert counters["stats"]["unique_graphs"] > before, "nothing was compiled"
    return eager, compiled


@pytest.mark.slow
def test_compiled_training_matches_eager(runs):
    logs = [[(r["step"], r["train_loss"], r["val_loss"]) for r in run.metrics()] for run in runs]
    assert [s for s, *_ in logs[0]] == [s for s, *_ in logs[1]] == [7, 10]
    torch.testing.assert_close(torch.tensor(logs[1]), torch.tensor(logs[0]), rtol=1e-4,
                               atol=1e-5)
    eager, compiled = (read_checkpoint(r.ckpt_path(CFG.num_steps)) for r in runs)
    weights = eager["model"]["state"], compiled["model"]["state"]
    assert weights[0].keys() == weights[1].keys()  # no _orig_mod prefixes
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-3, atol=1e-4)


def test_compile_flag_takes_a_mode():
    import argparse
    p = argparse.ArgumentParser()
    add_runtime_args(p)
    assert p.parse_args([]).compile is None
    assert p.parse_args(["--compile"]).compile == "default"
    assert p.parse_args(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert "reduce-overhead" in COMPILE_MODES
    with pytest.raises(SystemExit):
        p.parse_args(["--compile", "fast"])
