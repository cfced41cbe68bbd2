"""Source-wise distillation (caad.methods.sourcewise): per-token teacher weights, the loss against a
materialising reference, bad configs, and a tiny run through the trainer."""

from __future__ import annotations

import pytest
import torch
from methods_fixtures import (
    FakeStep,
    answer_positions,
    naive_answer_loss,
    setup_context,
    text_logits,
    trainer_settings,
)

from caad.config import ConfigError
from caad.data import read_manifest
from caad.methods import get_method
from caad.methods.crossmodal.teacher import Head
from caad.methods.sourcewise import (
    SourceWiseConfig,
    SourceWiseMethod,
    category_weights,
    confidence_weights,
    label_probability,
)
from caad.models import load_speech_lm
from caad.train import BatchInfo, train
from caad.train.metrics import read_metrics

INFO = BatchInfo("train", 0, 0, 1, 0, 1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def models(method_models):
    return method_models


def test_category_weights_follow_each_example():
    text, acoustic = category_weights(
        ["arithmetic", "knowledge", "counting"],
        torch.tensor([2, 1, 3]),
        text_categories=["knowledge"],
        acoustic_categories=["arithmetic"],
        lead=0.9,
        default=(0.5, 0.25),
    )
    assert text.tolist() == pytest.approx([0.1, 0.1, 0.9, 0.5, 0.5, 0.5])
    assert acoustic.tolist() == pytest.approx([0.9, 0.9, 0.1, 0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="2 categories for 3 examples"):
        category_weights(["a", "b"], torch.tensor([1, 1, 1]), text_categories=[], acoustic_categories=[], lead=0.8,
                         default=(0.5, 0.5))  # fmt: skip


def test_confidences_and_their_weights():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=generator)
    head = Head(torch.randn(30, 16, generator=generator), torch.randn(30, generator=generator), 1.5, 4.0)
    labels = torch.randint(0, 30, (7,), generator=generator)
    logits = 4.0 * torch.tanh(1.5 * (hidden.double() @ head.weight.double().T + head.bias.double()) / 4.0)
    expected = torch.softmax(logits, dim=-1)[torch.arange(7), labels]
    got = label_probability(hidden, head, labels, chunk_rows=3)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    text, acoustic = confidence_weights(torch.tensor([0.6, 0.1, 0.0]), torch.tensor([0.2, 0.3, 0.0]))
    assert text.tolist() == pytest.approx([0.75, 0.25, 0.5]) and acoustic.tolist() == pytest.approx([0.25, 0.75, 0.5])


def _method(models, tmp_path, **overrides):
    settings = trainer_settings(
        models, tmp_path / "out", text_teacher=str(models.text_teacher), acoustic_teacher=str(models.acoustic_teacher)
    )
    settings.update(overrides)
    method = SourceWiseMethod(SourceWiseConfig(**settings), "sourcewise")
    student = load_speech_lm(models.student)
    method.build_teachers(setup_context(student))
    return method, student


@pytest.mark.parametrize("weighting", ["fixed", "category", "confidence"])
def test_loss_equals_a_materialising_reference(models, tmp_path, weighting):
    rows = read_manifest(models.train)[:3]
    categories = [r.category for r in rows]
    method, student = _method(
        models, tmp_path, weighting=weighting, text_weight=0.7, acoustic_weight=0.2, kd_weight=0.6, ce_weight=0.4,
        temperature=1.5, **(dict(text_categories=[categories[0]], lead_weight=0.9) if weighting == "category" else {}),
    )  # fmt: skip
    batch = method.build_batch(rows, INFO, torch.device("cpu"))
    total = batch.paired.num_items + 3
    out = method.loss_step(batch, FakeStep(student, num_items=total))
    grad = student.lm_head_weight.grad.clone()
    student.zero_grad()

    labels = batch.paired.labels
    inputs, text, acoustic = batch.paired.student["s2t"], batch.paired.teacher, batch.acoustic
    with torch.no_grad():
        t_text = text_logits(method.text_teacher, text)[:, :-1][answer_positions(text.labels)]
        t_acoustic = method.acoustic_teacher.logits(acoustic)[:, :-1][answer_positions(acoustic.labels)]
    s_logits = student.logits(inputs)[:, :-1][answer_positions(inputs.labels)]
    counts = (inputs.labels[:, 1:] != -100).sum(1).tolist()
    if weighting == "fixed":
        w_text, w_acoustic = (
            torch.full_like(labels, 0.7, dtype=torch.float64),
            torch.full_like(labels, 0.2, dtype=torch.float64),
        )
    elif weighting == "category":
        w_text = torch.tensor(sum(([0.9 if c == categories[0] else 0.7] * n for c, n in zip(categories, counts)), []))
        w_acoustic = torch.tensor(
            sum(([0.1 if c == categories[0] else 0.2] * n for c, n in zip(categories, counts)), [])
        )
    else:
        c_text = torch.softmax(t_text.double(), -1)[torch.arange(len(labels)), labels]
        c_acoustic = torch.softmax(t_acoustic.double(), -1)[torch.arange(len(labels)), labels]
        w_text = c_text / (c_text + c_acoustic)
        w_acoustic = 1 - w_text
    _, kd_text, ce = naive_answer_loss(s_logits, t_text, labels, tau=1.5, kd_weight=1.0, ce_weight=1.0)
    _, kd_acoustic, _ = naive_answer_loss(s_logits, t_acoustic, labels, tau=1.5, kd_weight=1.0, ce_weight=1.0)
    w_text, w_acoustic = w_text.double(), w_acoustic.double()
    reference = (0.6 * (w_text * kd_text + w_acoustic * kd_acoustic).sum() + 0.4 * ce.sum()) / total
    assert float(out.loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    c = out.components
    assert c["text_kd_loss"] == pytest.approx(float(kd_text.detach().sum() / total), rel=1e-5)
    assert c["acoustic_kd_loss"] == pytest.approx(float(kd_acoustic.detach().sum() / total), rel=1e-5)
    assert c["ce_loss"] == pytest.approx(float(ce.detach().sum() / total), rel=1e-5)
    assert float(c["text_weight"]) == pytest.approx(float(w_text.sum() / total), rel=1e-5)
    assert float(c["acoustic_weight"]) == pytest.approx(float(w_acoustic.sum() / total), rel=1e-5)
    reference.backward()
    assert torch.allclose(grad, student.lm_head_weight.grad, atol=1e-6, rtol=1e-4)


def test_a_teacher_with_weight_zero_is_not_loaded(models, tmp_path):
    method, _ = _method(models, tmp_path, text_weight=0.0, acoustic_weight=1.0, text_teacher=None)
    assert method.text_teacher is None and method.acoustic_teacher is not None


def test_bad_configs_name_the_key(models, tmp_path):
    base = trainer_settings(
        models, tmp_path / "out", text_teacher=str(models.text_teacher), acoustic_teacher=str(models.acoustic_teacher)
    )
    for overrides, message in [
        (dict(weighting="category", text_categories=["a"], acoustic_categories=["a", "b"]),
         r"sourcewise.acoustic_categories and text_categories both list \['a'\]"),
        (dict(text_categories=["a"]), "sourcewise.text_categories .*only with weighting: category"),
        (dict(lead_weight=1.5), r"sourcewise.lead_weight must be in \[0, 1\]"),
        (dict(text_weight=0.0, acoustic_weight=0.0), "sourcewise.text_weight"),
        (dict(acoustic_weight=-0.1), "sourcewise.acoustic_weight must be >= 0"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            SourceWiseConfig(**{**base, **overrides}).validate("sourcewise")
    with pytest.raises(ConfigError, match="sourcewise.acoustic_teacher is required"):
        SourceWiseConfig(**{**base, "acoustic_teacher": None}).check_paths("sourcewise")
    with pytest.raises(ConfigError, match="sourcewise.text_teacher: checkpoint folder not found"):
        SourceWiseConfig(**{**base, "text_teacher": str(tmp_path / "no")}).check_paths("sourcewise")
    SourceWiseConfig(**{**base, "acoustic_teacher": None, "acoustic_weight": 0.0}).check_paths("sourcewise")
    assert get_method("sourcewise") is SourceWiseMethod


@pytest.mark.slow
def test_tiny_run_logs_each_teacher(models, tmp_path):
    config = SourceWiseConfig(
        **trainer_settings(
            models,
            tmp_path / "run",
            text_teacher=str(models.text_teacher),
            acoustic_teacher=str(models.acoustic_teacher),
            weighting="confidence",
        )
    )
    result = train(SourceWiseMethod(config, "sourcewise"))
    for r in read_metrics(result.metrics):
        assert r["text_weight"] + r["acoustic_weight"] == pytest.approx(1.0, rel=1e-5)
        assert 0 < r["text_kd_loss"] and 0 < r["acoustic_kd_loss"] and r["ce_loss"] > 0
    assert load_speech_lm(result.final_model).state_dict().keys() == load_speech_lm(models.student).state_dict().keys()
