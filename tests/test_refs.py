"""Checkpoint references: every documented form parses, resolves and loads the right weights."""

import hashlib
from dataclasses import dataclass

import pytest
import torch

from runs.checkpoint import module_entry, save_checkpoint
from runs.config import arg
from runs.errors import UserError
from runs.importers import import_state_dict
from runs.models import create_model
from runs.refs import Ref, load_model, parse_ref
from runs.store import open_run

STEPS_PER_EPOCH = 10


@dataclass(frozen=True)
class Cfg:
    lr: float = arg(0.1, "peak learning rate")
    seed: int = arg(0, "init seed")


def tiny(seed=0, num_classes=4):
    return create_model("convnet", width=0.125, num_classes=num_classes, seed=seed)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def differs(a, b) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     b.state_dict().values()))


@pytest.fixture
def run_dir(tmp_path):
    """A run with checkpoints at steps 0, 10, 20 (weights from seeds 100, 110, 120)."""
    def make(steps=(0, 10, 20), extra=None, teacher=None):
        extra = {"steps_per_epoch": STEPS_PER_EPOCH, "model_spec": tiny().spec} \
            if extra is None else extra
        run = open_run(tmp_path / "store", "train", Cfg(lr=0.2), seed=0, extra=extra)
        modules = {"teacher": module_entry(teacher, with_state=False)} if teacher else None
        for step in steps:
            save_checkpoint(run.ckpt_path(step), tiny(seed=100 + step), step,
                            config={"lr": 0.2, "seed": 0}, modules=modules)
        return run
    return make


# --- parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ref", [
    ("runs/ckpt/step_0001000.pt", Ref("runs/ckpt/step_0001000.pt", "runs/ckpt/step_0001000.pt")),
    ("store/train_ab12cd34/seed_0@last",
     Ref("store/train_ab12cd34/seed_0@last", "store/train_ab12cd34/seed_0", step="last")),
    ("RUN@1000", Ref("RUN@1000", "RUN", step="1000")),
    ("RUN@2ep", Ref("RUN@2ep", "RUN", step="2ep")),
    ("RUN@init", Ref("RUN@init", "RUN", step="init")),
    ("RUN@last:encoder", Ref("RUN@last:encoder", "RUN", step="last", parts=("encoder",))),
    ("RUN@last:teacher", Ref("RUN@last:teacher", "RUN", step="last", parts=("teacher",))),
    ("RUN:teacher:encoder", Ref("RUN:teacher:encoder", "RUN", parts=("teacher", "encoder"))),
    ("resnet18=weights.pt", Ref("resnet18=weights.pt", "weights.pt", arch="resnet18")),
    ("dinopl=dino.ckpt:student",
     Ref("dinopl=dino.ckpt:student", "dino.ckpt", arch="dinopl", parts=("student",))),
    (" ./a/b.pt ", Ref(" ./a/b.pt ", "./a/b.pt")),
])
def test_parse_ref_forms(text, ref):
    assert parse_ref(text) == ref


def test_unknown_part_lists_valid_ones():
    with pytest.raises(UserError, match="unknown part 'head'; valid: encoder, student, teacher"):
        parse_ref("RUN@last:head")


@pytest.mark.parametrize("text", ["", "@last", "RUN@", "RUN:Encoder", "RUN:", "RUN@last:"])
def test_unparseable_ref_shows_an_example(text):
    with pytest.raises(UserError, match="cannot parse checkpoint reference .*e.g. "):
        parse_ref(text)


# --- files and run steps ---------------------------------------------------------------------

def test_load_a_checkpoint_file(run_dir):
    run = run_dir()
    path = run.ckpt_path(10)
    loaded = load_model(str(path))
    assert_same_state(loaded.model, tiny(seed=110))
    assert loaded.path == path and loaded.step == 10 and loaded.ref == str(path)
    assert loaded.config == {"lr": 0.2, "seed": 0} and loaded.payload["step"] == 10


@pytest.mark.parametrize("suffix, step", [("", 20), ("@last", 20), ("@10", 10), ("@0", 0),
                                          ("@1ep", 10), ("@2ep", 20), ("@init", 0)])
def test_run_steps(run_dir, suffix, step):
    run = run_dir()
    for source in (run.path, run.path.parent):  # seed dir, or kind dir holding one seed
        loaded = load_model(f"{source}{suffix}")
        assert loaded.step == step and loaded.path == run.ckpt_path(step)
        assert_same_state(loaded.model, tiny(seed=100 + step))


def test_unsaved_step_lists_the_saved_ones(run_dir):
    run = run_dir()
    with pytest.raises(UserError, match="no checkpoint at step 15; saved steps: 0, 10, 20"):
        load_model(f"{run.path}@15")
    with pytest.raises(UserError, match="step 5"):
        load_model(f"{run.path}@0.5ep")
    with pytest.raises(UserError, match="@STEP: cannot parse 'latest'"):
        load_model(f"{run.path}@latest")


def test_epochs_need_steps_per_epoch(run_dir):
    run = run_dir(extra={})
    with pytest.raises(UserError, match="steps_per_epoch"):
        load_model(f"{run.path}@2ep")
    assert load_model(f"{run.path}@20").step == 20


def test_run_without_checkpoints(run_dir):
    run = run_dir(steps=())
    with pytest.raises(UserError, match="no checkpoints yet"):
        load_model(f"{run.path}@last")


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "step_0000010.pt"
    with pytest.raises(UserError, match=f"no file or run at {missing}"):
        load_model(str(missing))
    with pytest.raises(UserError, match="no run at"):
        load_model(f"{tmp_path}@last")  # a directory, but not a run


def test_step_on_a_file_is_an_error(run_dir):
    path = run_dir().ckpt_path(10)
    with pytest.raises(UserError, match="@STEP applies to run directories"):
        load_model(f"{path}@last")


def test_foreign_file_without_name_suggests_one(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(tiny().encoder.state_dict(), path)
    with pytest.raises(UserError, match=r"not a checkpoint of this toolkit.*resnet18="):
        load_model(str(path))


# --- parts -----------------------------------------------------------------------------------

def test_encoder_keeps_weights_and_draws_a_fresh_fc(run_dir):
    run = run_dir()
    full = load_model(f"{run.path}@10").model
    a = load_model(f"{run.path}@10:encoder", num_classes=7, fc_seed=3).model
    b = load_model(f"{run.path}@10:encoder", num_classes=7, fc_seed=3).model
    c = load_model(f"{run.path}@10:encoder", num_classes=7, fc_seed=4).model
    assert_same_state(a.encoder, full.encoder)
    assert a.fc.out_features == 7 and a.spec["num_classes"] == 7
    assert_same_state(a, b)  # the fresh fc is a function of fc_seed
    assert differs(a.fc, c.fc)
    same_width = load_model(f"{run.path}@10:encoder", fc_seed=3).model
    assert same_width.fc.out_features == 4 and differs(same_width.fc, full.fc)


def test_num_classes_alone(run_dir):
    run = run_dir()
    kept = load_model(f"{run.path}@10", num_classes=4).model  # matches: fc kept
    assert_same_state(kept, tiny(seed=110))
    swapped = load_model(f"{run.path}@10", num_classes=6, fc_seed=1).model
    assert swapped.fc.out_features == 6
    assert_same_state(swapped.encoder, kept.encoder)


def test_teacher_rebuilds_from_its_seed(run_dir):
    teacher = create_model("convnet", width=0.25, num_classes=4, seed=42)
    run = run_dir(teacher=teacher)
    loaded = load_model(f"{run.path}@20:teacher")
    assert loaded.model.spec == teacher.spec
    assert_same_state(loaded.model, teacher)
    student = load_model(f"{run.path}@20:student").model  # the main model
    assert_same_state(student, tiny(seed=120))
    encoder = load_model(f"{run.path}@20:teacher:encoder", num_classes=9).model
    assert_same_state(encoder.encoder, teacher.encoder) and encoder.fc.out_features == 9


def test_missing_teacher_lists_parts(run_dir):
    run = run_dir()
    with pytest.raises(UserError, match="holds no teacher; parts it has: student"):
        load_model(f"{run.path}@20:teacher")


# --- @init -----------------------------------------------------------------------------------

def test_init_without_its_starting_state_fails_naming_the_file(run_dir):
    """RUN@init is the state the run began from: with that file gone it fails naming it,
    never rebuilt from a seed (which a run started from --init or --rewind never was)."""
    run = run_dir(steps=(10,))
    with pytest.raises(UserError, match=r"lacks its starting state ckpt/step_0000000\.pt "
                                        r"\(step 0.*never rebuilt from a seed; saved steps: 10"):
        load_model(f"{run.path}@init")
    assert load_model(f"{run.path}@last").step == 10


def test_init_before_any_checkpoint_fails(run_dir):
    run = run_dir(steps=())
    with pytest.raises(UserError, match="lacks its starting state.*no checkpoint saved"):
        load_model(f"{run.path}@init")


def test_init_is_the_recorded_starting_step(run_dir):
    """A --rewind run starts at the rewound step K: RUN@init names its checkpoint there."""
    run = run_dir(steps=(10, 20), extra={"steps_per_epoch": STEPS_PER_EPOCH, "init_step": 10})
    loaded = load_model(f"{run.path}@init")
    assert loaded.step == 10 and loaded.path == run.ckpt_path(10)
    assert_same_state(loaded.model, tiny(seed=110))
    run.ckpt_path(10).unlink()
    with pytest.raises(UserError, match=r"step_0000010\.pt \(step 10"):
        load_model(f"{run.path}@init")


def test_init_of_a_rewind_run_made_before_init_step_is_its_first_checkpoint(tmp_path):
    @dataclass(frozen=True)
    class Old:
        rewind: str = arg("", "rewind reference")
        seed: int = arg(0, "init seed")
    run = open_run(tmp_path, "train", Old(rewind="elsewhere@10"))
    for step in (10, 20):
        save_checkpoint(run.ckpt_path(step), tiny(seed=100 + step), step)
    assert load_model(f"{run.path}@init").step == 10


def test_a_distill_teacher_at_init_comes_from_any_checkpoint(tmp_path):
    """The teacher is built from its seed by design (stored without weights): RUN@init:teacher
    stays valid when the step-0 file is gone; the student's init does not."""
    teacher = create_model("convnet", width=0.125, num_classes=4, seed=42)
    run = open_run(tmp_path, "distill", Cfg(), extra={"init_step": 0})
    for step in (0, 10):
        save_checkpoint(run.ckpt_path(step), tiny(seed=100 + step), step,
                        modules={"teacher": module_entry(teacher, with_state=False)})
    run.ckpt_path(0).unlink()
    assert_same_state(load_model(f"{run.path}@init:teacher").model, teacher)
    with pytest.raises(UserError, match="lacks its starting state"):
        load_model(f"{run.path}@init")


# --- provenance --------------------------------------------------------------------------------

def test_input_record(run_dir):
    pytest.importorskip("runs.results")
    from runs.refs import ref_record
    run = run_dir()
    path = run.ckpt_path(10)
    record = load_model(f"{run.path}@10").input_record()
    assert record == {"ref": f"{run.path}@10", "path": str(path), "step": 10,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "run": {"kind": "train"}}  # the run's kind, from its config.json
    assert ref_record(f"{run.path}@10") == record  # the same, without loading weights
    init = run.ckpt_path(0)
    assert ref_record(f"{run.path}@init")["sha256"] == hashlib.sha256(
        init.read_bytes()).hexdigest()


def test_input_record_names_the_runs_data_and_alpha(tmp_path):
    """A distillation checkpoint's record says what the student saw and where it started,
    so figures can name a noise-input student; files outside a run carry no summary."""
    from runs.refs import ref_record

    @dataclass(frozen=True)
    class Distilled:
        dataset: str = "noise"
        alpha: float = 0.5

    run = open_run(tmp_path / "store", "distill", Distilled(), seed=0,
                   extra={"model_spec": tiny().spec})
    save_checkpoint(run.ckpt_path(4), tiny(seed=1), 4, config={"seed": 0})
    assert ref_record(f"{run.path}@4")["run"] == {"kind": "distill", "dataset": "noise",
                                                  "alpha": 0.5}
    loose = tmp_path / "weights.pt"
    loose.write_bytes(run.ckpt_path(4).read_bytes())
    assert "run" not in ref_record(str(loose))


# --- plain state dicts -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """Full-width resnet18 weights in torchvision's layout, with and without fc."""
    folder = tmp_path_factory.mktemp("plain")
    model = create_model("resnet18", num_classes=7, seed=3)
    encoder_state = model.encoder.state_dict()
    assert "conv1.weight" in encoder_state and "layer4.1.bn2.running_var" in encoder_state
    torch.save(encoder_state, folder / "encoder.pt")
    torch.save({**encoder_state, **{f"fc.{k}": v for k, v in model.fc.state_dict().items()}},
               folder / "with_fc.pt")
    return model, folder


def test_plain_state_dict_with_fc(resnet18_files):
    model, folder = resnet18_files
    loaded = load_model(f"resnet18={folder / 'with_fc.pt'}")
    assert loaded.model.fc.out_features == 7  # read off fc.weight
    assert_same_state(loaded.model, model)
    assert loaded.step is None and loaded.path == folder / "with_fc.pt"


def test_plain_state_dict_without_fc(resnet18_files):
    model, folder = resnet18_files
    loaded = load_model(f"resnet18={folder / 'encoder.pt'}", num_classes=5, fc_seed=1)
    assert_same_state(loaded.model.encoder, model.encoder)
    assert loaded.model.fc.out_features == 5 and loaded.model.spec["seed"] == 1


def test_plain_state_dict_for_another_arch_names_keys(resnet18_files):
    _, folder = resnet18_files
    path = folder / "encoder.pt"
    with pytest.raises(UserError) as err:
        load_model(f"vgg11={path}")
    message = str(err.value)
    assert str(path) in message and "vgg11" in message
    assert "missing keys: encoder.0.weight" in message
    assert "unexpected keys: encoder.conv1.weight" in message
    # ResNet20 (projection shortcuts, as the paper's code) shares ResNet18's key names: the
    # message names the keys either lacks and the shapes that differ.
    with pytest.raises(UserError) as err:
        load_model(f"resnet20={path}")
    message = str(err.value)
    assert "missing keys: encoder.layer1.2.conv1.weight" in message
    assert "unexpected keys: encoder.layer4.0.conv1.weight" in message
    assert "shape mismatch (file vs model): encoder.conv1.weight (64, 3, 3, 3) vs " \
        "(16, 3, 3, 3)" in message


def test_imagenet_stem_names_the_shape_mismatch(tmp_path):
    model = create_model("resnet18", width=0.0625, seed=0)
    state = dict(model.encoder.state_dict(), **{"conv1.weight": torch.zeros(4, 3, 7, 7)})
    torch.save(state, tmp_path / "imagenet.pt")
    with pytest.raises(UserError, match=r"imagenet.pt .*encoder.conv1.weight "
                                        r"\(4, 3, 7, 7\) vs \(4, 3, 3, 3\)"):
        import_state_dict(tmp_path / "imagenet.pt", "resnet18", width=0.0625)


def test_import_variants(tmp_path):
    model = create_model("resnet18", width=0.0625, num_classes=3, in_channels=1, seed=8)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ours.pt")  # encoder.* keys
    imported, payload = import_state_dict(tmp_path / "ours.pt", "resnet18", width=0.0625)
    assert imported.spec["in_channels"] == 1 and imported.spec["num_classes"] == 3
    assert_same_state(imported, model)
    mlp = create_model("mlp", width=0.125, image_size=8, seed=1)  # no conv to read channels off
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    imported, _ = import_state_dict(tmp_path / "mlp.pt", "mlp", width=0.125, image_size=8)
    assert_same_state(imported, mlp)


def test_import_rejects_bad_names_and_files(tmp_path):
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="not a plain state dict"):
        import_state_dict(tmp_path / "odd.pt", "resnet18")
    with pytest.raises(UserError, match="unknown model 'resnet9'; valid: .*resnet18"):
        load_model(f"resnet9={tmp_path / 'odd.pt'}")
