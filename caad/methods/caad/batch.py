"""CAAD's batches: ``prompt + pseudo-GT`` for the student and the teacher's two paths (synchronised
teacher forcing).

Every example of a Stage 1 manifest has audio, an instruction and a pseudo-GT answer. One micro-batch
is tokenised once per model: the student's positive path, the teacher's positive path (the real
audio) and its negative path (the audio hidden: ``negative_mode``). The three sequences share the
target tokens, so their target hidden states line up row by row (:mod:`caad.models.interface`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from caad.data.checks import load_clip
from caad.data.manifest import ManifestError, ManifestRow, read_manifest
from caad.models import IGNORE_INDEX, SAMPLING_RATE, SpeechBatch, SpeechLM
from caad.models.interface import DEFAULT_SILENCE_SECONDS, HOP_LENGTH

__all__ = ["PseudoGTDataset", "StepBatch", "build_batch", "build_step_batch", "prompt_length"]


class PseudoGTDataset:
    """The rows of a Stage 1 manifest (every row must have ``pseudo_gt``); audio is read on demand."""

    def __init__(self, manifest: str | os.PathLike[str]) -> None:
        self.path = Path(manifest)
        self.rows: list[ManifestRow] = read_manifest(self.path)
        if not self.rows:
            raise ManifestError("has no rows", self.path)
        for number, row in enumerate(self.rows, start=1):
            if not row.pseudo_gt:
                raise ManifestError(
                    f"row {row.id!r} has no pseudo_gt; run Stage 1 first (caad stage1) to write one per row",
                    self.path,
                    number,
                    "pseudo_gt",
                )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ManifestRow:
        return self.rows[index]

    def examples(self, indices: list[int]) -> tuple[list[np.ndarray], list[str], list[str]]:
        """``(audio clips at 16 kHz, instructions, pseudo-GT targets)`` of the rows at ``indices``."""
        return _examples([self.rows[i] for i in indices])


def _examples(
    rows: Sequence[ManifestRow], max_samples: int | None = None
) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Clips (cut to ``max_samples`` when longer, as the Qwen2-Audio processor does), instructions, targets."""
    audio = [load_clip(row.audio_path, SAMPLING_RATE, max_samples=max_samples)[0] for row in rows]
    return audio, [row.instruction for row in rows], [str(row.pseudo_gt) for row in rows]


def prompt_length(model: SpeechLM, row: ManifestRow, max_samples: int | None = None) -> int:
    """Tokens of ``row``'s prompt for ``model``: its prompt format (chat template included) with the audio
    placeholder expanded to the clip's audio tokens (the clip cut to ``max_samples``); the length is read
    from the file's header, not decoded."""
    import soundfile

    info = soundfile.info(str(row.audio_path))
    samples = int(round(info.frames * SAMPLING_RATE / info.samplerate))
    limit = model.max_audio_samples if max_samples is None else min(max_samples, model.max_audio_samples)
    mel_frames = -(-min(samples, limit) // HOP_LENGTH)
    audio_tokens = int(model.num_audio_tokens(torch.tensor([mel_frames]))[0])
    text = model.tokenizer(model.format_prompt(row.instruction), add_special_tokens=False)["input_ids"]
    return len(text) - 1 + audio_tokens


@dataclass
class StepBatch:
    """The inputs of one micro-step, built once from ``prompt + pseudo-GT``.

    ``student``: the student's positive path. ``teacher_positive`` / ``teacher_negative``: the
    teacher's two paths (``None`` without a teacher; the negative one also ``None`` when alpha is 0).
    ``num_targets``: label tokens (rows of the packed target hidden states).
    ``num_tokens``: real (non-padding) tokens in the student's batch, for throughput.
    """

    student: SpeechBatch
    teacher_positive: SpeechBatch | None
    teacher_negative: SpeechBatch | None
    num_targets: int
    num_tokens: int


def _target_ids(batch: SpeechBatch) -> torch.Tensor:
    shifted = batch.labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def _cast_features(batch: SpeechBatch, dtype: torch.dtype) -> SpeechBatch:
    if batch.input_features is None or batch.input_features.dtype == dtype:
        return batch
    return replace(batch, input_features=batch.input_features.to(dtype))


def build_step_batch(
    dataset: PseudoGTDataset,
    indices: list[int],
    student: SpeechLM,
    teacher: SpeechLM | None,
    *,
    negative_mode: str | None,
    noise_seed: int,
    device: torch.device,
    student_dtype: torch.dtype,
    teacher_dtype: torch.dtype | None = None,
    silence_seconds: float = DEFAULT_SILENCE_SECONDS,
    max_samples: int | None = None,
) -> StepBatch:
    """:func:`build_batch` on the rows of ``dataset`` at ``indices``."""
    return build_batch(
        [dataset[i] for i in indices],
        student,
        teacher,
        negative_mode=negative_mode,
        noise_seed=noise_seed,
        device=device,
        student_dtype=student_dtype,
        teacher_dtype=teacher_dtype,
        silence_seconds=silence_seconds,
        max_samples=max_samples,
    )


def build_batch(
    rows: Sequence[ManifestRow],
    student: SpeechLM,
    teacher: SpeechLM | None,
    *,
    negative_mode: str | None,
    noise_seed: int,
    device: torch.device,
    student_dtype: torch.dtype,
    teacher_dtype: torch.dtype | None = None,
    silence_seconds: float = DEFAULT_SILENCE_SECONDS,
    max_samples: int | None = None,
) -> StepBatch:
    """Tokenize ``prompt + pseudo-GT`` for the student and the teacher's paths, on ``device``.

    ``negative_mode`` ``None`` builds no negative path (plain KD); otherwise one of
    :data:`caad.models.NEGATIVE_MODES` (``silence_seconds``: the ``"silence_fixed_length"`` block).
    Clips longer than ``max_samples`` are cut to it. The teacher's and the student's labels must be
    the same token sequence (a shared tokenizer), else a ``ValueError``.
    """
    audio, instructions, targets = _examples(rows, max_samples)
    student_batch = student.build_inputs(audio, instructions, targets)
    positive = negative = None
    if teacher is not None:
        positive = teacher.build_inputs(audio, instructions, targets)
        if not torch.equal(_target_ids(student_batch), _target_ids(positive)):
            raise ValueError(
                "the teacher and the student tokenize the pseudo-GT differently; distillation needs a shared "
                "tokenizer (the same target token ids) for both models"
            )
        if negative_mode is not None:
            negative = teacher.negative_inputs(
                positive,
                audio,
                instructions,
                targets,
                audio_mode=negative_mode,
                noise_seed=noise_seed,
                silence_seconds=silence_seconds,
            )
        positive = _cast_features(positive.to(device), teacher_dtype or student_dtype)
        if negative is not None:
            negative = _cast_features(negative.to(device), teacher_dtype or student_dtype)
    return StepBatch(
        student=_cast_features(student_batch.to(device), student_dtype),
        teacher_positive=positive,
        teacher_negative=negative,
        num_targets=student_batch.num_target_tokens,
        num_tokens=int(student_batch.attention_mask.sum()),
    )
