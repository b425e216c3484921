"""Every ablation model of issue #18 trains a step and survives a checkpoint bit-exactly."""

import pytest
import torch
import torch.nn.functional as F

from runs.checkpoint import save_checkpoint
from runs.models import create_model
from runs.refs import load_model

ABLATIONS = [
    ("vgg11", {"pool": "max"}), ("vgg11", {"pool": "avg"}),
    *[("vgg11", {"norm": n}) for n in ("none", "batch", "layer", "group", "instance")],
    *[("resnet18", {"norm": n}) for n in ("batch", "layer", "group", "instance", "none")],
    ("vgg11_bn", {}),
    ("resnet20", {"shortcut": "projection"}), ("resnet20", {"shortcut": "A"}),
    ("vit_tiny", {"pool": "cls"}), ("vit_tiny", {"pool": "mean"}),
    ("vit_tiny", {"impl": "standard"}),
]


def ident(case) -> str:
    name, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


@pytest.mark.parametrize("name, options", ABLATIONS, ids=map(ident, ABLATIONS))
def test_ablation_trains_and_round_trips(tmp_path, name, options):
    width = 0.1 if name.startswith("vit") else 0.125
    model = create_model(name, num_classes=5, width=width, seed=1, **options)
    assert all(model.spec[k] == v for k, v in options.items())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
    opt.step()
    assert torch.isfinite(loss)

    path = save_checkpoint(tmp_path / "step_1.pt", model, 1)
    loaded = load_model(str(path)).model
    assert loaded.spec == model.spec
    state, again = model.state_dict(), loaded.state_dict()
    assert list(state) == list(again)
    for key in state:
        assert torch.equal(state[key], again[key]), key
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
