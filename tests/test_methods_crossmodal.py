"""Cross-modal KD (caad.methods.crossmodal): paired batches whose answer rows line up, the loss against a
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

from caad.cli import UserError
from caad.config import ConfigError
from caad.data import read_manifest
from caad.data.spoken_qa import SPOKEN_INSTRUCTION
from caad.methods import get_method
from caad.methods.crossmodal import CrossModalConfig, CrossModalMethod
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


def _method(models, tmp_path, **overrides):
    settings = trainer_settings(models, tmp_path / "out", teacher=str(models.text_teacher))
    settings.update(overrides)
    method = CrossModalMethod(CrossModalConfig(**settings), "crossmodal")
    student = load_speech_lm(models.student)
    method.build_teachers(setup_context(student))
    return method, student


def test_channels_line_up_on_the_answer_rows(models, tmp_path):
    method, student = _method(models, tmp_path)
    rows = read_manifest(models.train)[:3]
    batch = method.build_batch(rows, INFO, torch.device("cpu"))
    teacher, t2t, s2t = batch.teacher, batch.student["t2t"], batch.student["s2t"]
    # t2t: the student reads exactly the teacher's tokens; s2t: the spoken prompt (audio tokens, no question)
    assert torch.equal(t2t.input_ids, teacher.input_ids) and torch.equal(t2t.labels, teacher.labels)
    assert t2t.input_features is None and s2t.input_features is not None
    assert bool((s2t.input_ids == student.audio_token_id).any())
    assert [r.instruction for r in rows] == [SPOKEN_INSTRUCTION] * 3
    # the answer rows, found independently from the token ids: each sequence ends with answer + end token
    tokenizer = student.tokenizer
    for b, row in enumerate(rows):
        answer = tokenizer(row.pseudo_gt, add_special_tokens=False)["input_ids"] + [student.end_of_turn_id]
        for seq in (teacher, t2t, s2t):
            real = seq.input_ids[b][seq.attention_mask[b] == 1].tolist()
            assert real[-len(answer) :] == answer
            assert seq.labels[b][seq.labels[b] != -100].tolist() == answer
    assert batch.num_items == sum(len(tokenizer(r.pseudo_gt, add_special_tokens=False)["input_ids"]) + 1 for r in rows)

    # the packed teacher rows are the teacher's hidden states at the positions before each answer token
    from caad.methods.crossmodal.teacher import text_answer_states

    packed = text_answer_states(method.teacher, teacher)
    with torch.no_grad():
        full = method.teacher(
            input_ids=teacher.input_ids,
            attention_mask=teacher.attention_mask,
            position_ids=teacher.position_ids,
            output_hidden_states=True,
        ).hidden_states[-1]
    expected = []
    for b in range(len(rows)):
        length = int(teacher.attention_mask[b].sum())
        count = int((teacher.labels[b] != -100).sum())
        expected.append(full[b, length - count - 1 : length - 1])
    assert torch.allclose(packed.hidden, torch.cat(expected), atol=1e-5)
    assert torch.equal(packed.labels, batch.labels)


@pytest.mark.parametrize("channels", [("t2t", "s2t"), ("s2t",), ("t2t",)])
def test_loss_equals_a_materialising_reference(models, tmp_path, channels):
    weights = {"t2t": 0.3, "s2t": 1.7}
    overrides = {c: c in channels for c in ("t2t", "s2t")}
    method, student = _method(
        models, tmp_path, temperature=2.0, kd_weight=0.7, ce_weight=0.3, t2t_weight=0.3, s2t_weight=1.7, **overrides
    )
    batch = method.build_batch(read_manifest(models.train)[:3], INFO, torch.device("cpu"))
    total = 2 * batch.num_items + 1  # the global batch is larger than this micro-batch
    step = FakeStep(student, num_items=total)
    out = method.loss_step(batch, step)
    assert step.backward_done
    got_grad = student.lm_head_weight.grad.clone()
    student.zero_grad()

    with torch.no_grad():
        t_logits = text_logits(method.teacher, batch.teacher)[:, :-1][answer_positions(batch.teacher.labels)]
    reference = 0.0
    for channel in channels:
        inputs = batch.student[channel]
        s_logits = student.logits(inputs)[:, :-1][answer_positions(inputs.labels)]
        rows, kd, ce = naive_answer_loss(s_logits, t_logits, batch.labels, tau=2.0, kd_weight=0.7, ce_weight=0.3)
        reference = reference + weights[channel] * rows.sum() / total
        assert out.components[f"{channel}_kd_loss"] == pytest.approx(float(kd.detach().sum() / total), rel=1e-5)
        assert out.components[f"{channel}_ce_loss"] == pytest.approx(float(ce.detach().sum() / total), rel=1e-5)
    assert set(out.components) == {f"{c}_{t}_loss" for c in channels for t in ("kd", "ce")}
    assert float(out.loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    reference.backward()
    assert torch.allclose(got_grad, student.lm_head_weight.grad.float(), atol=1e-6, rtol=1e-4)


def test_ce_only_needs_no_teacher(models, tmp_path):
    method, student = _method(models, tmp_path, kd_weight=0.0, ce_weight=1.0, teacher=None, t2t=False)
    assert method.teacher is None
    batch = method.build_batch(read_manifest(models.train)[:2], INFO, torch.device("cpu"))
    assert batch.teacher is None and list(batch.student) == ["s2t"]
    out = method.loss_step(batch, FakeStep(student, num_items=batch.num_items))
    inputs = batch.student["s2t"]
    s_logits = student.logits(inputs)[:, :-1][answer_positions(inputs.labels)]
    ce = torch.nn.functional.cross_entropy(s_logits.double(), batch.labels)
    assert float(out.loss.detach()) == pytest.approx(float(ce), rel=1e-5)


def test_bad_configs_name_the_key(models, tmp_path):
    base = trainer_settings(models, tmp_path / "out", teacher=str(models.text_teacher))
    cases = [
        (dict(t2t=False, s2t=False), "crossmodal.t2t .*turn at least one channel on"),
        (dict(s2t_weight=0.0), "crossmodal.s2t_weight is 0 with the channel on"),
        (dict(t2t_weight=-1.0), "crossmodal.t2t_weight must be >= 0"),
        (dict(kd_weight=0.0, ce_weight=0.0), "crossmodal.kd_weight"),
        (dict(temperature=0.0), "crossmodal.temperature must be > 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            CrossModalConfig(**{**base, **overrides}).validate("crossmodal")
    with pytest.raises(ConfigError, match="crossmodal.teacher is required"):
        CrossModalConfig(**{**base, "teacher": None}).check_paths("crossmodal")
    with pytest.raises(ConfigError, match="crossmodal.teacher: checkpoint folder not found"):
        CrossModalConfig(**{**base, "teacher": str(tmp_path / "none")}).check_paths("crossmodal")
    with pytest.raises(TypeError, match="needs a CrossModalConfig"):
        CrossModalMethod(get_method("caad").config_class())


def test_a_teacher_with_another_vocabulary_is_refused(models, tmp_path):
    from caad.models import train_tokenizer
    from caad.models.text_lm import build_tiny_text_lm, save_text_lm

    other = train_tokenizer(["completely different words about boats and harbours"] * 20, vocab_size=300)
    save_text_lm(build_tiny_text_lm(other), other, tmp_path / "other")
    with pytest.raises(UserError, match="crossmodal.teacher: .*do not line up"):
        _method(models, tmp_path, teacher=str(tmp_path / "other"))


def test_registry_finds_the_method():
    assert get_method("crossmodal") is CrossModalMethod


@pytest.mark.slow
def test_tiny_run_through_the_trainer(models, tmp_path):
    config = CrossModalConfig(
        **trainer_settings(models, tmp_path / "run", teacher=str(models.text_teacher), t2t_weight=0.5)
    )
    result = train(CrossModalMethod(config, "crossmodal"))
    records = read_metrics(result.metrics)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        per_channel = {
            c: config.kd_weight * r[f"{c}_kd_loss"] + config.ce_weight * r[f"{c}_ce_loss"] for c in ("t2t", "s2t")
        }
        assert r["loss"] == pytest.approx(0.5 * per_channel["t2t"] + per_channel["s2t"], rel=1e-5)
    assert load_speech_lm(result.final_model).state_dict().keys() == load_speech_lm(models.student).state_dict().keys()
