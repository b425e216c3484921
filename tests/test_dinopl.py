"""Importing safelix/dinopl Lightning checkpoints: a faithful fake of their layout, built from
our own models through the inverse key mapping, must come back bit-equal."""

import functools
import json
from collections import OrderedDict

import pytest
import torch

from runs.dinopl import head_forward_theirs, import_dinopl, import_dinopl_head
from runs.errors import UserError
from runs.models import create_model
from runs.models.head import create_head
from runs.refs import load_model

WIDTH = 0.125
HEAD = dict(hidden_dim=32, bottleneck_dim=16, out_dim=64)


def their_encoder_keys(arch: str, role: str, state: dict) -> dict:
    """Our encoder state (model.encoder's keys) under their names: ResNets keep torchvision's
    names, VGG's conv indices move under `features.`."""
    out = {}
    for key, value in state.items():
        name = key if arch.startswith("resnet") else f"features.{key}"
        out[f"{role}.enc.{name}"] = value.clone()
    return out


def their_head_keys(role: str, head, weight_norm: bool = False) -> dict:
    """Our head under their names: L2Bottleneck era, or the earlier weight-norm layout."""
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


def with_bn_stats(model):
    """Move BN running stats off their defaults so bit-equality of buffers means something."""
    model.train()
    with torch.no_grad():
        model.encoder(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7)))
    return model.eval()


def config_json(arch: str, dataset: str = "CIFAR10") -> dict:
    """The keys of their config.json that matter here, as dino.py writes them."""
    return {"enc": arch, "tiny_input": True, "enc_norm_layer": None, "dataset": dataset,
            "n_classes": 10, "ds_classes": 10, "hid_dims": [HEAD["hidden_dim"]] * 2,
            "l2bot_dim": HEAD["bottleneck_dim"], "l2bot_cfg": "-/lb/fn/wn/l/-",
            "out_dim": HEAD["out_dim"], "mlp_bn": False, "mlp_act": "GELU", "mc": "1x32"}


@functools.cache
def their_state(arch: str, weight_norm: bool = False):
    """Their state_dict for a student and a teacher of ours; built once per layout."""
    models, state = {}, OrderedDict()
    for seed, role in enumerate(("student", "teacher"), start=1):
        model = with_bn_stats(create_model(arch, width=WIDTH, seed=seed))
        head = create_head(in_dim=model.embed_dim, seed=10 + seed, **HEAD)
        state.update(their_encoder_keys(arch, role, model.encoder.state_dict()))
        state.update(their_head_keys(role, head, weight_norm))
        models[role] = (model, head)
    return state, models


def write_ckpt(tmp_path, arch: str, where: str = "json", weight_norm: bool = False,
               dataset: str = "CIFAR10"):
    """A Lightning checkpoint in their layout; returns (path, {role: (model, head)})."""
    state, models = their_state(arch, weight_norm)
    ckpt = {"epoch": 2, "global_step": 390, "pytorch-lightning_version": "1.9.4",
            "state_dict": state, "loops": {}, "callbacks": {}, "optimizer_states": [],
            "lr_schedulers": []}
    if where == "hparams":
        ckpt["hyper_parameters"] = config_json(arch, dataset)
    run_dir = tmp_path / "DINO" / "ab12cd34"
    run_dir.mkdir(parents=True)
    if where == "json":
        (run_dir / "config.json").write_text(json.dumps(config_json(arch, dataset)))
    path = run_dir / "last.ckpt"
    torch.save(ckpt, path)
    return path, models


def assert_same_encoder(loaded, original):
    ours, theirs = loaded.encoder.state_dict(), original.encoder.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.eval().encoder(x), original.eval().encoder(x))


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_roles_load_bit_equal(tmp_path, arch):
    path, models = write_ckpt(tmp_path, arch)
    for role in ("student", "teacher"):
        loaded = load_model(f"dinopl={path}:{role}")
        assert_same_encoder(loaded.model, models[role][0])
        assert loaded.model.spec["name"] == arch and loaded.model.spec["width"] == WIDTH
        assert loaded.payload["role"] == role and loaded.payload["fresh_fc"]
        assert loaded.payload["config_source"].endswith("config.json")
        assert loaded.payload["global_step"] == 390


def test_default_role_is_student_and_encoder_part_draws_fc(tmp_path):
    path, models = write_ckpt(tmp_path, "resnet18")
    plain = load_model(f"dinopl={path}").model
    assert_same_encoder(plain, models["student"][0])
    fresh = load_model(f"dinopl={path}:student:encoder", num_classes=7, fc_seed=3).model
    assert_same_encoder(fresh, models["student"][0])
    assert fresh.fc.out_features == 7


@pytest.mark.parametrize("where", ["hparams", "none"])
def test_config_from_hparams_or_inferred(tmp_path, where):
    path, models = write_ckpt(tmp_path, "vgg11", where=where)
    model, payload = import_dinopl(path, ("teacher",))
    assert_same_encoder(model, models["teacher"][0])
    assert payload["config_source"] == {"hparams": "hyper_parameters",
                                        "none": "inferred from state_dict keys"}[where]


def test_cifar100_gets_100_classes_despite_their_metadata(tmp_path):
    path, _ = write_ckpt(tmp_path, "resnet18", dataset="CIFAR100")
    model, payload = import_dinopl(path, ())
    assert model.fc.out_features == 100 and payload["their_num_classes"] == 10


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_head_outputs_equal(tmp_path, role):
    path, models = write_ckpt(tmp_path, "resnet18")
    model, head = models[role]
    imported = import_dinopl_head(path, role)
    for key, value in head.state_dict().items():
        assert torch.equal(imported.state_dict()[key], value), key
    emb = torch.randn(5, model.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(imported(emb), head(emb))
        # their buggy layer used the raw weight: output i is ours times the row norm
        norms = head.last.weight.norm(dim=1)
        torch.testing.assert_close(head_forward_theirs(imported, emb), head(emb) * norms)


def test_weight_norm_head_layout(tmp_path):
    path, models = write_ckpt(tmp_path, "vgg11", weight_norm=True)
    _, head = models["student"]
    imported = import_dinopl_head(path, "student")
    emb = torch.randn(5, head.mlp[0].in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(imported(emb), head(emb))


def test_missing_key_is_named(tmp_path):
    path, _ = write_ckpt(tmp_path, "resnet18")
    ckpt = torch.load(path, weights_only=False)
    del ckpt["state_dict"]["student.enc.layer2.1.bn1.running_var"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"last\.ckpt.*student\.enc\.layer2\.1\.bn1\.running_var"):
        load_model(f"dinopl={path}:student")
    load_model(f"dinopl={path}:teacher")  # the other role is intact


def test_extra_encoder_key_is_named(tmp_path):
    path, _ = write_ckpt(tmp_path, "vgg11")
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"]["teacher.enc.features.1.running_mean"] = torch.zeros(8)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"teacher\.enc\.features\.1\.running_mean"):
        import_dinopl(path, ("teacher",))


def test_unknown_encoder_lists_supported(tmp_path):
    path, _ = write_ckpt(tmp_path, "resnet18")
    config = path.with_name("config.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), "enc": "vit_tiny"}))
    with pytest.raises(UserError, match=r"'vit_tiny'.*supported: resnet18, resnet34"):
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
