import pytest
import torch

from runs.errors import UserError
from runs.models import MODELS, create_model
from runs.models.base import check_input_size

# Golden encoder parameter counts (without fc) of the paper's encoders and He et al.'s nets.
# ResNet20: the paper's code's projection shortcuts (PAPER.md: 271,824); option A: 269,072.
GOLDEN = {"resnet18": 11_168_832, "vgg11": 9_220_480, "resnet20": 271_824,
          "resnet50": 23_500_352, "resnet34": 21_276_992, "vgg11_bn": 9_225_984}


def encoder_params(model) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_runs(name):
    sized = name == "mlp" or name.startswith("vit")  # built for one input size
    model = create_model(name, num_classes=7, width=0.125, image_size=16) if sized \
        else create_model(name, num_classes=7, width=0.125)
    x = torch.randn(2, 3, 16, 16)
    emb = model.encoder(x)
    assert emb.shape == (2, model.embed_dim)
    assert model(x).shape == (2, 7)
    assert model.fc.in_features == model.embed_dim
    assert model.spec["name"] == name


@pytest.mark.parametrize("name, count", GOLDEN.items())
def test_golden_parameter_counts(name, count):
    assert encoder_params(create_model(name)) == count


def test_resnet20_option_a_count():
    assert encoder_params(create_model("resnet20", shortcut="A")) == 269_072


def test_paper_counts_match_text():
    # PAPER.md: ResNet18 11.17M and VGG11 9.22M parameters without fc.
    assert round(encoder_params(create_model("resnet18")) / 1e6, 2) == 11.17
    assert round(encoder_params(create_model("vgg11")) / 1e6, 2) == 9.22


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "convnet", "resnet20"])
def test_same_seed_same_weights(name):
    a, b = create_model(name, seed=5, width=0.25), create_model(name, seed=5, width=0.25)
    c = create_model(name, seed=6, width=0.25)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key
    differs = [not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(),
                                                         c.state_dict().values())
               if va.is_floating_point() and va.numel() > 1 and va.std() > 0]
    assert all(differs)


def test_seeded_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_model("convnet", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_vgg_embedding_is_512_at_64x64():
    model = create_model("vgg11", width=0.25)
    assert model.encoder(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    assert create_model("vgg11").embed_dim == 512


def test_width_scales_channels_and_in_channels():
    model = create_model("resnet18", width=0.5, in_channels=1)
    assert model.embed_dim == 256
    assert model.encoder.conv1.in_channels == 1
    assert model.encoder.conv1.kernel_size == (3, 3) and model.encoder.conv1.stride == (1, 1)
    assert isinstance(model.encoder.maxpool, torch.nn.Identity)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown model 'resnet9'; valid: .*resnet18.*vgg11"):
        create_model("resnet9")


def test_input_size_check_fails_cleanly():
    model = create_model("mlp", image_size=8, width=0.1)
    with pytest.raises(UserError, match="cannot take images of shape"):
        check_input_size(model, 3, (16, 16))
    check_input_size(model, 3, (8, 8))
    with pytest.raises(UserError, match="cannot take"):
        check_input_size(create_model("convnet", width=0.1), 1, (8, 8))
