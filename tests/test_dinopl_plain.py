"""NAME=FILE imports of plain state dicts build the network the file was saved from: the
paper's ResNet20 (projection shortcuts) by default, this toolkit's earlier option-A ResNet20
when the keys are its nn.Sequential's."""

import pytest
import torch

from runs.importers import import_state_dict
from runs.models import create_model


@pytest.mark.parametrize("shortcut", ["projection", "A"])
def test_resnet20_layout_is_read_off_the_keys(tmp_path, shortcut):
    model = create_model("resnet20", width=0.25, seed=3, shortcut=shortcut).eval()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    imported, _ = import_state_dict(path, "resnet20", width=0.25)
    assert imported.spec["shortcut"] == shortcut
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(imported.eval().encoder(x), model.encoder(x))


def test_vgg_file_imports_with_the_pool_asked_for(tmp_path):
    model = create_model("vgg11", width=0.125, seed=1, pool="avg").eval()
    path = tmp_path / "vgg.pt"
    torch.save(model.state_dict(), path)
    assert import_state_dict(path, "vgg11", width=0.125)[0].spec["pool"] == "max"
    imported, _ = import_state_dict(path, "vgg11", width=0.125, pool="avg")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(imported.eval().encoder(x), model.encoder(x))
