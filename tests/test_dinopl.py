"""Importing safelix/dinopl Lightning checkpoints: a fake in the paper's code's layout (their
key names, module indices, max-pool VGG, projection-shortcut CIFAR ResNets, the shared ViT
block, the raw last head layer) must come back bit-equal and compute what their code computed:
the VGG and ResNet20 embeddings equal hand-written forwards of their architectures, the head
equals F.normalize(bottleneck) @ lin2.weight.T with the RAW weight."""

import functools
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from runs.dinopl import NORMS, import_dinopl, import_dinopl_head
from runs.errors import UserError
from runs.models import create_model
from runs.models.head import create_head
from runs.refs import load_model

WIDTH = 0.125
HEAD = dict(hidden_dim=32, bottleneck_dim=16, out_dim=64)
VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]  # their cfgs["A"]
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def our_options(arch: str, norm: str = None) -> dict:
    """create_model options of the network their `arch` with --enc_norm_layer `norm` is."""
    if arch.startswith("vit"):
        return {"width": 0.25}
    if arch.endswith("_bn"):
        return {"width": WIDTH, "pool": "max"}
    if arch.startswith("vgg"):
        return {"width": WIDTH, "pool": "max", "norm": NORMS.get(norm, "none")}
    cifar = {"shortcut": "projection"} if arch in ("resnet20", "resnet56") else {}
    return {"width": 0.25 if cifar else WIDTH, "norm": NORMS.get(norm, "batch"), **cifar}


def their_vgg_indices(plan, norm: str = None) -> list[int]:
    """Indices in their `features` Sequential of the modules with state (conv, then norm), as
    their make_layers lays out conv [-> norm_layer] -> ReLU and max-pools."""
    out, index = [], 0
    for item in plan:
        if item == "M":
            index += 1
            continue
        out.append(index)  # the conv
        if norm is not None:
            if norm != "Identity":
                out.append(index + 1)  # the norm layer (Identity has no state)
            index += 1
        index += 2  # conv, ReLU
    return out


def their_encoder_keys(arch: str, role: str, model, norm: str = None) -> dict:
    """Our encoder state under their names: ResNets keep torchvision's names, VGG's modules
    move to their `features` indices, our ViT block is their `transformer.K` for K < 12."""
    state = model.encoder.state_dict()
    out = {}
    if arch.startswith("vgg"):
        ours = sorted({int(k.split(".")[0]) for k in state})
        theirs = their_vgg_indices(VGG11, "BatchNorm" if arch.endswith("_bn") else norm)
        index = dict(zip(ours, theirs))
        for key, value in state.items():
            i, param = key.split(".", 1)
            out[f"{role}.enc.features.{index[int(i)]}.{param}"] = value.clone()
    elif arch.startswith("vit"):
        for key, value in state.items():
            if key.startswith("block."):  # one shared tensor under 12 names, as torch saves it
                shared = value.clone()
                out.update({f"{role}.enc.transformer.{k}.{key[6:]}": shared for k in range(12)})
            else:
                out[f"{role}.enc.{key}"] = value.clone()
    else:
        out.update({f"{role}.enc.{k}": v.clone() for k, v in state.items()})
    return out


def their_head_keys(role: str, head, weight_norm: bool = False) -> dict:
    """Our head under their names: L2Bottleneck layout, or the earlier weight-norm layout."""
    s = head.state_dict()
    p = f"{role}.head."
    out = {p + "cent": torch.zeros(s["last.weight"].shape[0])}
    for i, ours in ((0, "mlp.0"), (1, "mlp.2")):
        out[f"{p}mlp.layer{i}.lin.weight"] = s[ours + ".weight"].clone()
        out[f"{p}mlp.layer{i}.lin.bias"] = s[ours + ".bias"].clone()
    if weight_norm:
        v = s["last.weight"]
        out.update({p + "mlp.bottleneck.lin.weight": s["mlp.4.weight"].clone(),
                    p + "mlp.bottleneck.lin.bias": s["mlp.4.bias"].clone(),
                    p + "mlp.bottleneck.weightnorm.weight_g": torch.ones(v.shape[0], 1),
                    p + "mlp.bottleneck.weightnorm.weight_v": v.clone()})
    else:
        out.update({p + "last_layer.lin1.weight": s["mlp.4.weight"].clone(),
                    p + "last_layer.lin1.bias": s["mlp.4.bias"].clone(),
                    p + "last_layer.lin2.weight": s["last.weight"].clone()})
    return out


def trained_looking(model):
    """BN running stats and norm affines moved off their defaults, so that bit-equality of
    every tensor and the forwards mean something."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.GroupNorm):
                module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))
        model.train()
        model.encoder(torch.randn(8, 3, 32, 32, generator=gen))
    return model.eval()


def config_json(arch: str, dataset: str = "CIFAR10", norm: str = None) -> dict:
    """The keys of their config.json that matter here, as dino.py writes them."""
    return {"enc": arch, "tiny_input": True, "enc_norm_layer": norm, "dataset": dataset,
            "n_classes": 10, "ds_classes": 10, "hid_dims": [HEAD["hidden_dim"]] * 2,
            "l2bot_dim": HEAD["bottleneck_dim"], "l2bot_cfg": "-/lb/fn/wn/l/-",
            "out_dim": HEAD["out_dim"], "mlp_bn": False, "mlp_act": "GELU", "mc": "1x32"}


@functools.cache
def their_state(arch: str, weight_norm: bool = False, norm: str = None):
    """Their state_dict for a student and a teacher of ours; built once per layout. Heads
    are the paper's (raw last layer), or the earliest layout's (unit rows)."""
    models, state = {}, OrderedDict()
    last = "normed" if weight_norm else "raw"
    for seed, role in enumerate(("student", "teacher"), start=1):
        model = trained_looking(create_model(arch, seed=seed, **our_options(arch, norm)))
        head = create_head(in_dim=model.embed_dim, seed=10 + seed, last=last, **HEAD)
        state.update(their_encoder_keys(arch, role, model, norm))
        state.update(their_head_keys(role, head, weight_norm))
        models[role] = (model, head)
    return state, models


def write_ckpt(tmp_path, arch: str, where: str = "json", weight_norm: bool = False,
               dataset: str = "CIFAR10", norm: str = None):
    """A Lightning checkpoint in their layout; returns (path, {role: (model, head)})."""
    state, models = their_state(arch, weight_norm, norm)
    ckpt = {"epoch": 2, "global_step": 390, "pytorch-lightning_version": "1.9.4",
            "state_dict": state, "loops": {}, "callbacks": {}, "optimizer_states": [],
            "lr_schedulers": []}
    if where == "hparams":
        ckpt["hyper_parameters"] = config_json(arch, dataset, norm)
    run_dir = tmp_path / "DINO" / "ab12cd34"
    run_dir.mkdir(parents=True, exist_ok=True)
    if where == "json":
        (run_dir / "config.json").write_text(json.dumps(config_json(arch, dataset, norm)))
    path = run_dir / "last.ckpt"
    torch.save(ckpt, path)
    return path, models


def assert_same_encoder(loaded, original):
    ours, theirs = loaded.encoder.state_dict(), original.encoder.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        assert torch.equal(loaded.eval().encoder(IMAGES), original.eval().encoder(IMAGES))


# --- hand-written forwards of their architectures (models/vgg.py, resnet.py at cd39e78) -----

def batch_norm(state: dict, prefix: str, x):
    return F.batch_norm(x, state[prefix + "running_mean"], state[prefix + "running_var"],
                        state[prefix + "weight"], state[prefix + "bias"], False, 0.0, 1e-5)


def their_vgg(state: dict, x, norm: str = None):
    """VGG.forward with num_classes=None: features (conv [-> norm] -> ReLU, max-pools, the
    last one included), flatten; fc = Identity. state: their `enc.` keys, prefix removed."""
    index = 0
    for item in VGG11:
        if item == "M":
            x, index = F.max_pool2d(x, 2), index + 1
            continue
        p = f"features.{index}."
        x = F.conv2d(x, state[p + "weight"], state[p + "bias"], padding=1)
        if norm == "BatchNorm":
            x = batch_norm(state, f"features.{index + 1}.", x)
        index += 3 if norm else 2
        x = F.relu(x)
    return x.flatten(1)  # (B, 512 x width): the last map is 1x1 at 32x32


def their_resnet20(state: dict, x):
    """ResNet(BasicBlock, [3, 3, 3], inplanes=16, tiny_input=True): 1x1 conv + BN downsample
    where the shape changes, global average pool."""
    x = F.relu(batch_norm(state, "bn1.", F.conv2d(x, state["conv1.weight"], padding=1)))
    for stage in (1, 2, 3):
        for block in range(3):
            p, stride = f"layer{stage}.{block}.", 2 if stage > 1 and block == 0 else 1
            out = F.conv2d(x, state[p + "conv1.weight"], stride=stride, padding=1)
            out = F.relu(batch_norm(state, p + "bn1.", out))
            out = batch_norm(state, p + "bn2.", F.conv2d(out, state[p + "conv2.weight"],
                                                         padding=1))
            if p + "downsample.0.weight" in state:
                x = F.conv2d(x, state[p + "downsample.0.weight"], stride=stride)
                x = batch_norm(state, p + "downsample.1.", x)
            x = F.relu(out + x)
    return x.mean((2, 3))


def their_head(state: dict, role: str, embedding):
    """DINOHead with the L2Bottleneck: Linear+GELU twice, lin1, L2-normalise, then lin2 with
    the RAW weight (their Linear multiplies by self.weight)."""
    p = f"{role}.head."
    x = embedding
    for i in (0, 1):
        x = F.gelu(F.linear(x, state[f"{p}mlp.layer{i}.lin.weight"],
                            state[f"{p}mlp.layer{i}.lin.bias"]))
    z = F.linear(x, state[p + "last_layer.lin1.weight"], state[p + "last_layer.lin1.bias"])
    return F.normalize(z, dim=-1) @ state[p + "last_layer.lin2.weight"].T


def encoder_state(arch, role, norm=None) -> dict:
    state, _ = their_state(arch, False, norm)
    prefix = f"{role}.enc."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet20", "vgg11", "vgg11_bn", "vit_tiny"])
def test_roles_load_bit_equal(tmp_path, arch):
    path, models = write_ckpt(tmp_path, arch)
    for role in ("student", "teacher"):
        loaded = load_model(f"dinopl={path}:{role}")
        assert_same_encoder(loaded.model, models[role][0])
        spec = loaded.model.spec
        assert spec["name"] == arch
        assert {k: spec[k] for k in our_options(arch)} == our_options(arch)
        assert loaded.payload["role"] == role and loaded.payload["fresh_fc"]
        assert loaded.payload["config_source"].endswith("config.json")
        assert loaded.payload["global_step"] == 390


@pytest.mark.parametrize("arch, norm", [("vgg11", None), ("vgg11_bn", None),
                                        ("vgg11", "Identity"), ("vgg11", "BatchNorm")])
def test_vgg_embedding_is_their_max_pool_forward(tmp_path, arch, norm):
    """Their VGG ends in the last max-pool and a flatten: the imported embedding equals a
    hand-written forward of their layers (indices shifted by their Identity norm too)."""
    path, _ = write_ckpt(tmp_path, arch, norm=norm)
    model, payload = import_dinopl(path, ("student",))
    assert payload["options"]["pool"] == "max"
    state = encoder_state(arch, "student", norm)
    theirs = their_vgg(state, IMAGES, "BatchNorm" if arch.endswith("_bn") else norm)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encoder(IMAGES), theirs, rtol=0, atol=1e-6)


def test_resnet20_is_their_projection_shortcut_forward(tmp_path):
    path, _ = write_ckpt(tmp_path, "resnet20")
    model, payload = import_dinopl(path, ("teacher",))
    assert payload["options"] == {"shortcut": "projection", "norm": "batch"}
    assert "layer2.0.downsample.0.weight" in encoder_state("resnet20", "teacher")
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encoder(IMAGES),
                                   their_resnet20(encoder_state("resnet20", "teacher"), IMAGES),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm, groups", [("LayerNorm", lambda c: 1),
                                          ("GroupNorm8", lambda c: c // 8),
                                          ("InstanceNorm", lambda c: c),
                                          ("Identity", None)])
def test_encoder_norm_layers(tmp_path, norm, groups):
    """Their --enc_norm_layer choices are GroupNorms of 1, C // 8 and C groups (or none)."""
    path, models = write_ckpt(tmp_path, "resnet18", norm=norm)
    model, payload = import_dinopl(path, ("student",))
    assert payload["options"]["norm"] == NORMS[norm]
    assert_same_encoder(model, models["student"][0])
    found = [m for m in model.encoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert (not found) if groups is None else \
        found and all(m.num_groups == groups(m.num_channels) for m in found)


def test_group_norms_need_the_config(tmp_path):
    path, _ = write_ckpt(tmp_path, "vgg11", where="none", norm="LayerNorm")
    with pytest.raises(UserError, match="config.json"):
        import_dinopl(path, ("student",))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_head_multiplies_by_the_raw_weight(tmp_path, role):
    path, models = write_ckpt(tmp_path, "vgg11")
    model, head = models[role]
    imported = import_dinopl_head(path, role)
    assert imported.spec["last"] == "raw"
    for key, value in head.state_dict().items():
        assert torch.equal(imported.state_dict()[key], value), key
    emb = torch.randn(5, model.embed_dim, generator=torch.Generator().manual_seed(1))
    state, _ = their_state("vgg11")
    lin2 = state[f"{role}.head.last_layer.lin2.weight"]
    assert not torch.allclose(lin2.norm(dim=1), torch.ones(len(lin2)))  # raw rows: not unit
    with torch.no_grad():
        torch.testing.assert_close(imported(emb), their_head(state, role, emb), rtol=0,
                                   atol=1e-6)
        z = F.normalize(imported.mlp(emb), dim=-1)
        torch.testing.assert_close(imported(emb), z @ lin2.T, rtol=0, atol=1e-7)


def test_weight_norm_head_layout_is_normed(tmp_path):
    """torch's weight norm (the earliest layout) multiplies by g v / |v| with g = 1."""
    path, models = write_ckpt(tmp_path, "vgg11", weight_norm=True)
    _, head = models["student"]
    imported = import_dinopl_head(path, "student")
    assert imported.spec["last"] == "normed"
    emb = torch.randn(5, head.mlp[0].in_features, generator=torch.Generator().manual_seed(2))
    v = head.last.weight
    with torch.no_grad():
        z = F.normalize(head.mlp(emb), dim=-1)
        torch.testing.assert_close(imported(emb), z @ (v / v.norm(dim=1, keepdim=True)).T)
    assert import_dinopl_head(path, "student", last="raw").spec["last"] == "raw"


def test_default_role_is_student_and_encoder_part_draws_fc(tmp_path):
    path, models = write_ckpt(tmp_path, "resnet18")
    plain = load_model(f"dinopl={path}").model
    assert_same_encoder(plain, models["student"][0])
    fresh = load_model(f"dinopl={path}:student:encoder", num_classes=7, fc_seed=3).model
    assert_same_encoder(fresh, models["student"][0])
    assert fresh.fc.out_features == 7


@pytest.mark.parametrize("where", ["hparams", "none"])
@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn", "resnet20", "vit_tiny"])
def test_config_from_hparams_or_inferred(tmp_path, where, arch):
    path, models = write_ckpt(tmp_path, arch, where=where)
    if arch == "vit_tiny" and where == "none":  # a 48-d ViT: only the config names it
        with pytest.raises(UserError, match="encoder of unknown layout"):
            import_dinopl(path, ("teacher",))
        return
    model, payload = import_dinopl(path, ("teacher",))
    assert_same_encoder(model, models["teacher"][0])
    assert model.spec["name"] == arch
    assert payload["config_source"] == {"hparams": "hyper_parameters",
                                        "none": "inferred from state_dict keys"}[where]


def test_cifar100_gets_100_classes_despite_their_metadata(tmp_path):
    path, _ = write_ckpt(tmp_path, "resnet18", dataset="CIFAR100")
    model, payload = import_dinopl(path, ())
    assert model.fc.out_features == 100 and payload["their_num_classes"] == 10


def test_missing_key_is_named(tmp_path):
    path, _ = write_ckpt(tmp_path, "resnet20")
    ckpt = torch.load(path, weights_only=False)
    del ckpt["state_dict"]["student.enc.layer2.0.downsample.1.running_var"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"last\.ckpt.*student\.enc\.layer2\.0\.downsample\.1"
                                        r"\.running_var"):
        load_model(f"dinopl={path}:student")
    load_model(f"dinopl={path}:teacher")  # the other role is intact


def test_extra_encoder_key_is_named(tmp_path):
    path, _ = write_ckpt(tmp_path, "vgg11")
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"]["teacher.enc.features.40.weight"] = torch.zeros(8)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"teacher\.enc\.features\.40\.weight"):
        import_dinopl(path, ("teacher",))


def test_vit_copies_of_the_shared_block_must_agree(tmp_path):
    path, _ = write_ckpt(tmp_path, "vit_tiny")
    ckpt = torch.load(path, weights_only=False)
    key = "student.enc.transformer.5.mlp.fc1.bias"
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"transformer\.5\.mlp\.fc1\.bias differs"):
        import_dinopl(path, ("student",))


@pytest.mark.parametrize("enc, match", [("vit_medium", "no vit_medium here"),
                                        ("convnet", "supported: resnet18, resnet34")])
def test_unknown_encoder_lists_supported(tmp_path, enc, match):
    path, _ = write_ckpt(tmp_path, "resnet18")
    config = path.with_name("config.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), "enc": enc}))
    with pytest.raises(UserError, match=match):
        import_dinopl(path, ("student",))


@pytest.mark.parametrize("content", ["state", "text"])
def test_not_a_lightning_file(tmp_path, content):
    path = tmp_path / "weights.pt"
    if content == "state":
        torch.save(create_model("convnet", width=WIDTH).state_dict(), path)
    else:
        path.write_text("not a checkpoint")
    with pytest.raises(UserError, match="weights.pt"):
        load_model(f"dinopl={path}:student")


def test_imagenet_stem_and_two_roles_are_refused(tmp_path):
    path, _ = write_ckpt(tmp_path, "resnet18")
    with pytest.raises(UserError, match="not both"):
        import_dinopl(path, ("student", "teacher"))
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"]["student.enc.conv1.weight"] = torch.zeros(8, 3, 7, 7)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="ImageNet stem"):
        import_dinopl(path, ("student",))


def test_unsupported_head_is_refused(tmp_path):
    path, _ = write_ckpt(tmp_path, "vgg11")
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"]["student.head.last_layer.lin2.bias"] = torch.zeros(HEAD["out_dim"])
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"student\.head\.|last_layer\.lin2\.bias"):
        import_dinopl_head(path, "student")
    import_dinopl_head(path, "teacher")
