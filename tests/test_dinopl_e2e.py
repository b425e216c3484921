"""A fake dinopl checkpoint (max-pool VGG11, raw last head layer) through the CLIs: the
probes see the embeddings their VGG computes, and the distillation landscape between its
teacher and student measures the KL of the heads as their code computes them (raw weight)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probes
from landscape.interpolate import main as interpolate_main
from probes.evaluate import main as probe_main
from runs.data import load_dataset
from runs.gpu_loader import normalize
from runs.results import open_result
from tests.test_dinopl import encoder_state, their_head, their_state, their_vgg, write_ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = write_ckpt(tmp_path_factory.mktemp("dinopl_e2e"), "vgg11")
    return path


def images(split: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images (N, 3, 32, 32), labels) of a toy split, as the CLIs load them."""
    data = load_dataset("toy", split=split, **options)
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in (data.info.mean, data.info.std))
    return normalize(data.x, mean, std), data.y


def kl(teacher_logits, student_logits) -> float:
    """Mean over the batch of KL(softmax(teacher) || softmax(student)), in nats."""
    log_t, log_s = F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def test_probes_evaluate_sees_their_vgg_embedding(ckpt, tmp_path):
    out = tmp_path / "probe.h5"
    assert probe_main([f"dinopl={ckpt}:student", "--dataset", "toy", "--size", "32",
                       "--probes", "knn", "--seeds", "0", "--device", "cpu",
                       "--out", str(out)]) == 0
    data = open_result(out, "probe")
    got = data.metrics["accuracy"][0, 0, list(data.coords["features"]).index("raw"), 0]
    state = encoder_state("vgg11", "student")
    (train_x, train_y), (test_x, test_y) = images("train", size=32), images("test", size=32)
    with torch.no_grad():
        bank, queries = their_vgg(state, train_x), their_vgg(state, test_x)
    assert got == pytest.approx(probes.knn(bank, train_y, queries, test_y, k=20), abs=1e-9)


def test_distillation_landscape_uses_the_raw_head(ckpt, tmp_path):
    """KL(teacher || point) on the path teacher -> student: 0 at the teacher; at the student
    the KL of their forward (max-pool VGG, raw lin2), 'by hand' from the file's tensors."""
    out = tmp_path / "path.h5"
    teacher = f"dinopl={ckpt}:teacher"
    assert interpolate_main([teacher, f"dinopl={ckpt}:student", "--metrics", "distill",
                             "--teacher", teacher, "--dataset", "toy", "--data-options",
                             "side=32", "--grid", "0,1", "--bn-mode", "keep", "--device",
                             "cpu", "--out", str(out)]) == 0
    data = open_result(out, "interpolate")
    measured = data.metrics["distill_kl"]  # (alpha, split)
    np.testing.assert_allclose(measured[0], 0, atol=1e-6)
    state, _ = their_state("vgg11")
    logits, normed = {}, {}
    x, _ = images("train", side=32)
    with torch.no_grad():
        for role in ("teacher", "student"):
            embedding = their_vgg(encoder_state("vgg11", role), x)
            logits[role] = their_head(state, role, embedding)
            unit = {**state, f"{role}.head.last_layer.lin2.weight": F.normalize(
                state[f"{role}.head.last_layer.lin2.weight"], dim=1)}
            normed[role] = their_head(unit, role, embedding)
    by_hand = kl(logits["teacher"], logits["student"])
    split = list(data.coords["split"]).index("train")
    assert measured[1, split] == pytest.approx(by_hand, rel=1e-4)
    assert by_hand > 0 and abs(kl(normed["teacher"], normed["student"]) - by_hand) > by_hand
