"""The paper's code's models (issue #18): raw head, max-pooled VGG, projection ResNet20,
ViTs, and the option machinery (recorded options, legacy fill, --model-option parsing)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from runs.checkpoint import module_entry, read_checkpoint, rebuild, save_checkpoint
from runs.errors import UserError
from runs.models import create_head, create_model, parse_options
from runs.models.base import build
from runs.models.head import RECIPE_ALPHA
from runs.models.norms import groups_of

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- head -------------------------------------------------------------------------------

HEAD = dict(in_dim=12, out_dim=64, hidden_dim=16, bottleneck_dim=8, seed=3)


def test_recipe_alpha_is_zero():
    assert RECIPE_ALPHA == 0.0  # the paper's main figures: the student starts at its teacher


def test_raw_head_multiplies_by_the_raw_weight():
    head = create_head(**HEAD)
    assert head.spec["last"] == "raw"
    x = randn(5, 12)
    with torch.no_grad():
        z = F.normalize(head.mlp(x), dim=-1)  # (5, 8): the L2 bottleneck
        expected = z @ head.last.weight.T  # the raw (64, 8) weight, as the paper's code
        torch.testing.assert_close(head(x), expected, rtol=0, atol=1e-6)
    # trunc-normal(0.02) rows: norms about 0.02 * sqrt(8), far from 1
    assert head.last.weight.norm(dim=1).mean() < 0.2
    assert 0.015 < head.last.weight.std() < 0.025


def test_normed_head_has_unit_rows_and_the_same_weights():
    raw, normed = create_head(**HEAD), create_head(**HEAD, last="normed")
    assert_same_state(raw, normed)  # `last` changes the function, not the draw
    rows = normed.last.effective_weight().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones(64))
    x = randn(5, 12)
    with torch.no_grad():
        scale = raw.last.weight.norm(dim=1)  # output i of raw = normed output i * ||w_i||
        torch.testing.assert_close(raw(x), normed(x) * scale, rtol=1e-5, atol=1e-7)


def test_old_head_spec_rebuilds_normed():
    spec = dict(registry="head", name="dino_head", **HEAD)  # written before `last` existed
    head = build(spec)
    assert head.last.normed and head.spec["last"] == "normed"
    assert_same_state(head, create_head(**HEAD))


def test_head_without_bottleneck():
    head = create_head(**{**HEAD, "bottleneck_dim": 0})
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU]
    assert head.last.weight.shape == (64, 16)
    x = randn(5, 12)
    with torch.no_grad():  # no L2 normalisation of the hidden features
        torch.testing.assert_close(head(x), head.mlp(x) @ head.last.weight.T, rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("last", ["raw", "normed"])
def test_linear_head(last):
    head = create_head("linear", in_dim=12, out_dim=64, seed=1, last=last)
    assert [name for name, _ in head.named_parameters()] == ["last.weight"]  # no bias
    x = randn(5, 12)
    weight = head.last.weight if last == "raw" else F.normalize(head.last.weight, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ weight.T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"last": "normed"}, {"bottleneck_dim": 0},
                                     {"bottleneck_dim": 0, "last": "normed"},
                                     {"name": "linear"}, {"name": "linear", "last": "normed"},
                                     {"out_dim": 32, "hidden_dim": 24}])
def test_head_variants_round_trip_through_a_checkpoint(tmp_path, options):
    head = create_head(**{**HEAD, **options})
    with torch.no_grad():
        head.last.weight.mul_(1.5)  # trained weights, not the seed's
    model = create_model("convnet", width=0.125)
    path = save_checkpoint(tmp_path / "c.pt", model, 3, modules={"head": module_entry(head)})
    loaded = rebuild(read_checkpoint(path)["modules"]["head"], str(path))
    assert loaded.spec == head.spec and type(loaded) is type(head)
    assert_same_state(loaded, head)
    x = randn(4, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))


def test_head_options_are_checked():
    with pytest.raises(UserError, match="unknown head 'mlp'; valid: dino_head, linear"):
        create_head("mlp")
    with pytest.raises(UserError, match="last='unit'.*raw, normed"):
        create_head(last="unit")


# ---- VGG --------------------------------------------------------------------------------

def vgg_by_hand(encoder: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The paper's VGG11 forward: conv + ReLU, 2x2 max-pools (the last one too), flatten."""
    convs = [m for m in encoder if isinstance(m, nn.Conv2d)]
    plan = [1, "M", 1, "M", 1, 1, "M", 1, 1, "M", 1, 1, "M"]
    it = iter(convs)
    for item in plan:
        if item == "M":
            x = F.max_pool2d(x, 2)
        else:
            conv = next(it)
            x = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    return x.flatten(1)


def test_vgg11_embedding_is_the_papers_last_max_pool():
    model = create_model("vgg11", width=0.25, seed=1)
    assert model.spec["pool"] == "max"
    x = randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), vgg_by_hand(model.encoder, x), rtol=0,
                                   atol=1e-6)


def test_vgg_avg_pool_option():
    model = create_model("vgg11", width=0.25, pool="avg", seed=1)
    x = randn(2, 3, 64, 64)
    with torch.no_grad():
        last_map = model.encoder[:-1](x)  # (2, 128, 4, 4)
        torch.testing.assert_close(model.encoder(x), last_map.mean((2, 3)))
        assert create_model("vgg11", width=0.25, seed=1).encoder(x).shape == (2, 128)


@pytest.mark.parametrize("norm, kind", [("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm),
                                        ("group", nn.GroupNorm), ("instance", nn.GroupNorm)])
def test_vgg_norm_layers_follow_each_conv(norm, kind):
    encoder = create_model("vgg11", width=0.25, norm=norm).encoder
    for i, m in enumerate(encoder):
        if isinstance(m, nn.Conv2d):
            layer = encoder[i + 1]
            assert type(layer) is kind and isinstance(encoder[i + 2], nn.ReLU)
            c = m.out_channels
            groups = {"layer": 1, "group": groups_of(c), "instance": c}.get(norm)
            if groups is not None:
                assert layer.num_groups == groups and layer.num_channels == c


def test_group_norm_groups_of_eight_channels():
    assert [groups_of(c) for c in (8, 16, 64, 512, 4, 12, 19)] == [1, 2, 8, 64, 1, 1, 1]


def test_vgg_bn_is_torchvisions_layout():
    ours = create_model("vgg11_bn").encoder
    theirs = torchvision.models.vgg11_bn().features  # ends in the max-pool ours replaces
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert params(ours) == params(theirs)
    assert_same_state(create_model("vgg13_bn", width=0.125, seed=4).encoder,
                      create_model("vgg13", width=0.125, seed=4, norm="batch").encoder)


# ---- ResNets ----------------------------------------------------------------------------

def test_resnet20_projection_layout():
    encoder = create_model("resnet20").encoder
    assert params(encoder) == 271_824
    for stage, (cin, cout) in ((2, (16, 32)), (3, (32, 64))):
        conv, norm = encoder.get_submodule(f"layer{stage}.0.downsample")
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == \
            (cin, cout, (1, 1), (2, 2)) and conv.bias is None
        assert isinstance(norm, nn.BatchNorm2d) and norm.num_features == cout
    keys = [k for k in encoder.state_dict() if "downsample" in k]
    assert {k.split(".downsample")[0] for k in keys} == {"layer2.0", "layer3.0"}
    assert len([k for k in encoder.state_dict() if k.endswith("conv2.weight")]) == 9


def test_resnet20_matches_a_block_by_hand():
    encoder = create_model("resnet20", width=0.5, seed=2).encoder.eval()
    block = encoder.layer2[0]  # stride 2, projection shortcut
    x = randn(2, 8, 8, 8)
    with torch.no_grad():
        out = F.relu(block.bn1(F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
        out = block.bn2(F.conv2d(out, block.conv2.weight, padding=1))
        short = block.downsample[1](F.conv2d(x, block.downsample[0].weight, stride=2))
        torch.testing.assert_close(block(x), F.relu(out + short))


def test_old_resnet20_spec_rebuilds_option_a():
    spec = dict(name="resnet20", num_classes=10, width=0.25, in_channels=3, seed=1)
    model = build(spec)
    assert model.spec["shortcut"] == "A" and model.spec["norm"] == "batch"
    assert params(model.encoder) == params(create_model("resnet20", width=0.25, shortcut="A")
                                           .encoder)
    assert "3.conv1.weight" in model.encoder.state_dict()  # the earlier Sequential layout


@pytest.mark.parametrize("norm", ["layer", "group", "instance", "none"])
def test_resnet18_norm_option(norm):
    encoder = create_model("resnet18", width=0.125, norm=norm).encoder
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    kinds = {type(encoder.bn1), type(encoder.layer2[0].bn2), type(encoder.layer2[0].downsample[1])}
    assert kinds == {nn.Identity if norm == "none" else nn.GroupNorm}
    if norm == "layer":
        assert encoder.layer4[1].bn1.num_groups == 1
    if norm == "instance":
        assert encoder.layer4[1].bn1.num_groups == encoder.layer4[1].bn1.num_channels


# ---- ViT --------------------------------------------------------------------------------

def vit_by_hand(encoder, x, pool):
    """Embedding, CLS and position embedding, the blocks, final LayerNorm, then the pool."""
    tokens = encoder.embedder.proj(x).flatten(2).transpose(1, 2)  # (B, N, E)
    tokens = torch.cat([encoder.cls_token.expand(len(x), -1, -1), tokens], 1)
    tokens = tokens + encoder.pos_embed
    blocks = [encoder.block] * 12 if encoder.dinopl else list(encoder.blocks)
    for block in blocks:
        tokens = block(tokens)
    tokens = encoder.layer_norm(tokens)
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)


@pytest.mark.parametrize("impl", ["dinopl", "standard"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pools(impl, pool):
    model = create_model("vit_tiny", width=0.1, pool=pool, impl=impl, image_size=16)
    x = randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), vit_by_hand(model.encoder, x, pool))


def test_vit_sizes_and_shared_block():
    dims = [create_model(name, width=w).embed_dim
            for name, w in (("vit_tiny", 1.0), ("vit_small", 1.0), ("vit_tiny", 0.1),
                            ("vit_small", 0.1), ("vit_base", 0.1))]
    assert dims == [192, 384, 18, 36, 72]  # width 0.1: multiples of the heads
    dinopl = create_model("vit_tiny", width=0.25).encoder
    standard = create_model("vit_tiny", width=0.25, impl="standard").encoder
    one_block = params(dinopl.block)
    assert params(standard) - params(dinopl) == 11 * one_block  # 12 blocks versus one
    assert one_block == 12 * 48 ** 2 + 13 * 48  # dim 48: qkv, proj, fc1, fc2, 2 LayerNorms


def test_vit_standard_attention_is_scaled_dot_product():
    attn = create_model("vit_small", width=0.25, impl="standard").encoder.blocks[0].attention
    x = randn(2, 5, 96)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 6, 16).permute(2, 0, 3, 1, 4)  # (B, H, L, E')
    expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 96)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(expected), rtol=1e-5, atol=1e-6)


def test_vit_dinopl_attention_mixes_heads_per_token():
    attn = create_model("vit_tiny", width=0.25).encoder.block.attention  # 3 heads of 16
    x = randn(2, 5, 48)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 16).unbind(2)  # each (B, L, H, E')
    scores = torch.einsum("blhe,blge->blhg", q, k) / 4.0  # (B, L, H, H): heads, not tokens
    out = torch.einsum("blhg,blge->blhe", scores.softmax(-1), v)  # (B, L, H, E')
    out = out.permute(0, 2, 1, 3).reshape(2, 5, 48)  # their (B, H, L, E') -> (B, L, E) view
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(out), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["dinopl", "standard"])
def test_vit_runs_under_vmap_over_parameter_sets(impl):
    models = [create_model("vit_tiny", width=0.1, image_size=16, impl=impl, seed=s).eval()
              for s in (0, 1)]
    stacked, buffers = stack_module_state(models)  # name -> (2, *shape)
    x = randn(3, 3, 16, 16)
    call = vmap(lambda p, b, x: functional_call(models[0], (p, b), (x,)), in_dims=(0, 0, None))
    with torch.no_grad():
        out = call(stacked, buffers, x)  # (2, 3, classes)
        for i, model in enumerate(models):
            torch.testing.assert_close(out[i], model(x), rtol=1e-5, atol=1e-6)


def test_vit_input_size_errors():
    model = create_model("vit_tiny", width=0.1)
    with pytest.raises(UserError, match=r"ViT built for 32x32 images got 16x16.*image_size=16"):
        model.encoder(torch.zeros(1, 3, 16, 16))
    with pytest.raises(UserError, match="image_size=30 must be a positive multiple of patch=8"):
        create_model("vit_tiny", width=0.1, image_size=30)
    assert create_model("vit_tiny", width=0.1, image_size=64, patch=4).encoder(
        torch.zeros(1, 3, 64, 64)).shape == (1, 18)


# ---- options: recorded, legacy-filled, parsed -------------------------------------------

def test_create_model_records_every_option():
    assert create_model("vgg11", width=0.125).spec == dict(
        name="vgg11", num_classes=10, width=0.125, in_channels=3, seed=0, pool="max",
        norm="none")
    spec = create_model("vit_tiny", width=0.1, pool="mean").spec
    assert {k: spec[k] for k in ("patch", "pool", "image_size", "impl")} == \
        dict(patch=8, pool="mean", image_size=32, impl="dinopl")


def test_old_vgg_spec_rebuilds_average_pooling():
    old = dict(name="vgg11", num_classes=10, width=0.125, in_channels=3, seed=2)
    model = build(old)
    assert model.spec["pool"] == "avg" and model.spec["norm"] == "none"
    x = randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), model.encoder[:-1](x).mean((2, 3)))
    assert build({**old, "pool": "max"}).spec["pool"] == "max"  # a recorded option is kept


def test_bad_options_name_the_valid_ones():
    with pytest.raises(UserError, match=r"pool='sum': model vgg11 takes pool in max, avg"):
        create_model("vgg11", pool="sum")
    with pytest.raises(UserError, match=r"shape: model resnet20 has no option 'shape'; "
                                        r"valid: shortcut, norm"):
        create_model("resnet20", shape="A")


def test_parse_options_types_and_errors():
    assert parse_options("vit_small", ("patch=4", "pool=mean", "image_size=64")) == \
        dict(patch=4, pool="mean", image_size=64)
    assert parse_options("resnet20", ("shortcut=A",)) == {"shortcut": "A"}
    assert parse_options("convnet", ()) == {}
    with pytest.raises(UserError, match=r"--model-option foo: model vgg11 has no option "
                                        r"'foo'; valid: pool, norm"):
        parse_options("vgg11", ("foo=1",))
    with pytest.raises(UserError, match=r"--model-option norm='batchnorm': model vgg11 takes "
                                        r"norm in none, batch, layer, group, instance"):
        parse_options("vgg11", ("norm=batchnorm",))
    with pytest.raises(UserError, match=r"--model-option 'pool': expected key=value"):
        parse_options("vgg11", ("pool",))
    with pytest.raises(UserError, match=r"--model-option patch=big: expected an integer"):
        parse_options("vit_tiny", ("patch=big",))
    with pytest.raises(UserError, match=r"--model-option width: set width with --width"):
        parse_options("vgg11", ("width=2",))
    with pytest.raises(UserError, match="unknown model"):
        parse_options("vgg12", ("pool=max",))


def test_user_factory_options_and_legacy():
    from runs.models import MODELS, Classifier, register
    from runs.models.base import _user_names, legacy

    @register(name="fidelity_test_net")
    @legacy(depth=1)
    def net(num_classes=10, width=1.0, in_channels=3, depth=2, act=nn.ReLU):
        return Classifier(nn.Sequential(*[act() for _ in range(depth)]), 4, num_classes)

    try:
        model = create_model("fidelity_test_net", num_classes=3)
        assert model.spec["depth"] == 2 and "act" not in model.spec  # JSON-plain defaults only
        assert parse_options("fidelity_test_net", ("depth=5",)) == {"depth": 5}
        old = {k: v for k, v in model.spec.items() if k != "depth"}
        assert build(old).spec["depth"] == 1
    finally:  # leave the registry as other tests list it
        MODELS._entries.pop("fidelity_test_net")
        _user_names.discard("fidelity_test_net")
