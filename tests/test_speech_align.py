"""caad.models.speech_align: what it trains, what it leaves alone, that it learns, and what it refuses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from caad.data.manifest import read_manifest
from caad.models import load_speech_lm
from caad.models.speech_align import align_speech_student, row_transcript


@pytest.fixture
def student(method_models, one_thread):
    return load_speech_lm(method_models.student)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_trains_encoder_and_projector_only(student, method_models):
    parts = ("language_model", "audio_encoder", "projector")
    lm, encoder, projector = (_snapshot(getattr(student.model, name)) for name in parts)
    flags = {name: p.requires_grad for name, p in student.model.named_parameters()}
    metrics = align_speech_student(
        student, method_models.train, steps=4, batch_size=3, lr=1e-2, seed=0, progress=False, ctc_fraction=0.5,
        eval_clips=2,
    )
    for name, p in student.model.language_model.named_parameters():
        assert torch.equal(p, lm[name]), name  # bit-identical
    assert any(not torch.equal(p, encoder[n]) for n, p in student.model.audio_encoder.named_parameters())
    assert any(not torch.equal(p, projector[n]) for n, p in student.model.projector.named_parameters())
    assert {name: p.requires_grad for name, p in student.model.named_parameters()} == flags
    assert not student.training
    assert metrics["ctc_steps"] == 2 and metrics["lm_steps"] == 2
    assert all(math.isfinite(metrics[k]) for k in ("ctc_loss", "lm_loss", "agreement_before", "agreement_after"))


def test_ctc_loss_decreases(student, method_models):
    metrics = align_speech_student(
        student, method_models.train, steps=40, batch_size=9, lr=1e-2, seed=0, progress=False, ctc_fraction=1.0,
        spec_augment=False, eval_clips=0,
    )
    assert metrics["lm_steps"] == 0 and math.isnan(metrics["lm_loss"])
    assert metrics["ctc_loss"] < 0.7 * metrics["ctc_loss_start"]


def test_behaviour_loss_decreases(student, method_models):
    metrics = align_speech_student(
        student, method_models.train, steps=30, batch_size=9, lr=1e-2, seed=0, progress=False, ctc_fraction=0.0,
        eval_clips=0,
    )
    assert metrics["ctc_steps"] == 0
    assert metrics["lm_loss"] < 0.7 * metrics["lm_loss_start"]


def test_transcript_comes_from_metadata_or_text_query(method_models):
    row = read_manifest(method_models.train)[0]
    assert row_transcript(row) == row.metadata["transcript"]
    no_metadata = dataclasses.replace(row, metadata={})
    assert row_transcript(no_metadata) == row.extra["text_query"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(ctc_fraction=1.5), "ctc_fraction"),
        (dict(ctc_space="decoder"), "ctc_space"),
        (dict(blank="pad"), "blank"),
        (dict(commitment=-0.1), "commitment"),
        (dict(eval_clips=-1), "eval_clips"),
    ],
)
def test_bad_arguments_refused_before_training(student, method_models, overrides, match):
    before = _snapshot(student.model)
    kwargs = dict(steps=2, batch_size=3, lr=1e-2, seed=0, progress=False) | overrides
    with pytest.raises(ValueError, match=match):
        align_speech_student(student, method_models.train, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in student.model.named_parameters())


def test_manifest_without_transcripts_refused(student, method_models):
    rows = read_manifest(method_models.train)
    rows[-1] = dataclasses.replace(rows[-1], metadata={}, extra={})
    before = _snapshot(student.model)
    with pytest.raises(ValueError, match=f"train_manifest: row {rows[-1].id!r} has no transcript"):
        align_speech_student(student, rows, steps=2, batch_size=3, lr=1e-2, seed=0, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in student.model.named_parameters())
    with pytest.raises(ValueError, match="train_manifest is empty"):
        align_speech_student(student, [], steps=2, batch_size=3, lr=1e-2, seed=0, progress=False)


def test_not_a_composite_student_refused(method_models):
    with pytest.raises(TypeError, match="student must be a composite SpeechLM"):
        align_speech_student(torch.nn.Linear(2, 2), method_models.train, steps=2, lr=1e-2, seed=0, progress=False)
