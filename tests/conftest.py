"""Shared fixtures: tiny models and data, GPU skipping, a quiet CPU."""

import os

import pytest
import torch

# Tiny models: thread start-up costs more than it saves, and `make test` runs two
# pytest workers (xdist) on two cores. The commands tests start as subprocesses inherit one
# thread too: two workers each with a child of 2 spinning OpenMP threads on 2 cores ran the
# docs examples 10x slower than alone.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_user_modules():
    """Modules a test allows (--import, @register) and files it trusts (--trust-pickle) stay
    that test's: the lists are process-wide, and xdist runs many tests in one process."""
    from runs import usercode
    before, trusted = set(usercode._allowed), set(usercode._trusted)
    yield
    usercode._allowed.clear()
    usercode._allowed.update(before)
    usercode._trusted.clear()
    usercode._trusted.update(trusted)


@pytest.fixture
def tiny_images():
    """16 random uint8 images (16, 3, 8, 8) with labels 0..3."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen)
    return x, torch.arange(16) % 4
