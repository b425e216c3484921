"""Analyse your own checkpoints: two networks built here, not from the toolkit's store.

A notebook-style script (`# %%` cells run one by one in VS Code, Jupyter or Spyder; run
it whole with `python docs/examples/analyse_your_checkpoint.py`). It builds two small
torchvision-style classifiers (`features` -> `avgpool` -> `fc`), trains them briefly from
two seeds on the embedded digits, then:

1. probes their embeddings (k-NN and a linear probe, with the raw pixels as a baseline);
2. scans the linear path between them and the plane through them and the first one's init;
3. computes the error and loss barriers of the path;
4. saves both scans as HDF5 results and draws the toolkit's figures from them.

EXAMPLE_OUT (default example_out) is where results and figures go; EXAMPLE_STEPS (default
300) the SGD steps per network (the tests run it with a few).
"""

# %% Setup
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import landscape
import probes
import runs
from figures.__main__ import draw
from runs.data import load_dataset

OUT = Path(os.environ.get("EXAMPLE_OUT", "example_out"))
STEPS = int(os.environ.get("EXAMPLE_STEPS", "300"))
torch.set_num_threads(min(2, torch.get_num_threads()))


# %% Two torchvision-style models, built in the script
class SmallNet(nn.Module):
    """torchvision's classifier layout: features (conv, BN, ReLU), avgpool, fc."""

    def __init__(self, channels: int = 1, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def small_net(seed: int) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


# %% Data: the embedded digits (1797 8x8 grey images) as plain tensors
train = load_dataset("digits", split="train")
test = load_dataset("digits", split="test")
# The toolkit takes uint8 pixels (normalised with the training images' statistics) or float
# images it uses as they are; here we normalise ourselves and pass floats, as a notebook would.
mean, std = train.x.float().mean() / 255, train.x.float().std() / 255
to_float = lambda data: ((data.x.float() / 255 - mean) / std, data.y)  # noqa: E731
train_xy, test_xy = to_float(train), to_float(test)


# %% Train two networks from two seeds (a plain PyTorch loop: the toolkit is not needed)
def fit(model: nn.Module, seed: int, steps: int = STEPS, batch_size: int = 64) -> nn.Module:
    x, y = train_xy
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(y), (batch_size,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model.eval()


init_a = small_net(seed=0)
net_a = fit(small_net(seed=0), seed=0)
net_b = fit(small_net(seed=1), seed=1)

# %% 1. Probe the embeddings: the output of `avgpool`, named by the caller
probed = probes.evaluate_model({"net A": net_a, "net B": net_b, "pixels": "pixels"},
                               train_xy, test_xy, probes=("knn", "linear-lbfgs"), seeds=(0,),
                               embed="avgpool")
print(probed["accuracy"].sel(features="raw", seed=0).to_pandas().round(4))

# %% 2. The linear path between the two networks, and a plane through A's init, A and B
path = landscape.path(net_a, net_b, train_xy, np.linspace(-0.25, 1.25, 13), test=test_xy,
                      metrics=("supervised", "knn", "norm"), embed="avgpool",
                      names=("net A", "net B"), bn_samples=512)
grid = np.linspace(-0.25, 1.25, 7)
plane = landscape.plane(init_a, net_a, net_b, train_xy, grid, grid, test=test_xy,
                        metrics=("supervised",), names=("init A", "net A", "net B"),
                        bn_samples=512)
print(path["error"].sel(split="test").to_pandas().round(4))

# %% 3. Barriers of the path (DESIGN.md's definitions)
print(landscape.barriers(path).to_dataframe().round(4))

# %% 4. Save as HDF5 results and draw the toolkit's figures from them
results = OUT / "results"
runs.save(path, results / "path_a_b.h5", overwrite=True)
runs.save(plane, results / "plane_init_a_b.h5", overwrite=True)
probed_file = runs.save(probed, results / "probe.h5", overwrite=True)
for figure in ("interpolate-1d", "plane"):
    for drawn in draw(figure, results, OUT / "figures"):
        print("drew", drawn)
