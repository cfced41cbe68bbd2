"""Paired text and speech batches: the teacher's text sequence and the student's text or spoken one.

An example is a manifest row with audio, an instruction, the question as text and a reference answer
(the built-in spoken-QA set, :mod:`caad.data.spoken_qa`, has all four; see :func:`text_query` and
:func:`reference_answer` for other manifests). The sequences of one micro-batch:

========  ======================================================  ==========================================
who       prompt                                                  reads
========  ======================================================  ==========================================
teacher   ``text_prompt(text query)``                             the text query (a text LM)
``t2t``   the student's text-only prompt of the text query         the same tokens as the teacher
``s2t``   the student's audio prompt with the row's instruction   the spoken query (audio tokens)
========  ======================================================  ==========================================

Every sequence ends with ``answer + end token``, tokenised separately from the prompt, so the packed
answer rows (``labels[:, 1:] != -100``, row-major) line up across all three whatever the prompts'
lengths: row ``i`` of each predicts the same answer token. :func:`build_paired_batch` checks this
(a shared vocabulary) and refuses a batch where it fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from caad.data.audio import load_audio
from caad.data.manifest import ManifestRow
from caad.models import IGNORE_INDEX, SAMPLING_RATE, SpeechBatch, SpeechLM
from caad.models.text_lm import TextBatch, build_text_batch

__all__ = [
    "CHANNELS",
    "PairedBatch",
    "answer_ids",
    "build_paired_batch",
    "reference_answer",
    "speech_teacher_batch",
    "text_query",
]

#: The channels of the cross-modal paper: text-to-text and speech-to-text.
CHANNELS: tuple[str, ...] = ("t2t", "s2t")
#: Metadata keys rendered into the text view of a row (``with_metadata``): what an acoustic label says.
_METADATA_KEYS = ("speaker", "gender", "emotion", "speed", "pitch", "environment", "accent", "age")


def text_query(row: ManifestRow, with_metadata: bool = False) -> str:
    """The question of ``row`` as text: its ``text_query`` (spoken-QA rows), else its transcript
    followed by the instruction. ``with_metadata`` appends the row's acoustic labels (speaker, emotion,
    speed, ...) as text: what a textual teacher can know of the audio. A ``ValueError`` if neither
    ``text_query`` nor ``metadata.transcript`` is there."""
    query = row.extra.get("text_query")
    if not query:
        transcript = row.metadata.get("transcript")
        if not transcript:
            raise ValueError(
                f"row {row.id!r} has neither text_query nor metadata.transcript: the text teacher needs the "
                "question as text"
            )
        query = f"{transcript}\n{row.instruction}"
    if with_metadata:
        labels = [f"{key}: {row.metadata[key]}" for key in _METADATA_KEYS if isinstance(row.metadata.get(key), str)]
        if labels:
            query = f"{query}\n({'; '.join(labels)})"
    return str(query)


def reference_answer(row: ManifestRow) -> str:
    """The answer the student learns: the row's ``pseudo_gt``, else its ``label``; a ``ValueError`` if none."""
    answer = row.pseudo_gt or row.label
    if not answer:
        raise ValueError(f"row {row.id!r} has neither pseudo_gt nor label: no answer to learn")
    return str(answer)


def answer_ids(labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` the answer token ids in packed row order (``labels[:, 1:]`` without ``-100``)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


@dataclass
class PairedBatch:
    """One micro-batch of paired sequences (module docstring).

    ``teacher``: the text teacher's batch (``None`` without a text teacher). ``student``: the student's
    batch per channel (``"t2t"``, ``"s2t"``), only the channels asked for. ``audio``/``instructions``/
    ``queries``/``answers``/``categories``: the examples (for teachers that build their own inputs).
    ``num_items``: answer rows of one sequence set (the same in every channel).
    """

    teacher: TextBatch | None
    student: dict[str, SpeechBatch]
    num_items: int
    num_tokens: int
    audio: list[np.ndarray] = field(repr=False, default_factory=list)
    instructions: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)

    @property
    def labels(self) -> torch.Tensor:
        """``[N]`` answer token ids (packed row order), shared by every sequence of the batch."""
        return answer_ids(next(iter(self.student.values())).labels)


def _cast(batch: SpeechBatch, dtype: torch.dtype) -> SpeechBatch:
    if batch.input_features is None or batch.input_features.dtype == dtype:
        return batch
    return replace(batch, input_features=batch.input_features.to(dtype))


def build_paired_batch(
    rows: Sequence[ManifestRow],
    student: SpeechLM,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    channels: Sequence[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    with_metadata: bool = False,
) -> PairedBatch:
    """Tokenise the teacher's text sequence and the student's sequence per channel, on ``device``.

    ``teacher_tokenizer`` ``None`` builds no teacher batch. ``channels``: a non-empty subset of
    :data:`CHANNELS`. A ``ValueError`` if the sequences' answer tokens differ (no shared vocabulary).
    """
    unknown = [c for c in channels if c not in CHANNELS]
    if not channels or unknown:
        raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {list(channels)}")
    audio = [load_audio(row.audio_path, SAMPLING_RATE) for row in rows]
    queries = [text_query(row, with_metadata) for row in rows]
    answers = [reference_answer(row) for row in rows]
    instructions = [row.instruction for row in rows]
    students = {}
    for channel in channels:
        if channel == "t2t":
            built = student.build_inputs(audio, queries, answers, audio_mode="remove")
        else:
            built = student.build_inputs(audio, instructions, answers)
        students[channel] = built
    reference = answer_ids(next(iter(students.values())).labels)
    teacher = None
    if teacher_tokenizer is not None:
        teacher = build_text_batch(teacher_tokenizer, queries, answers)
        if not torch.equal(answer_ids(teacher.labels), reference):
            raise ValueError(
                "the text teacher and the student tokenize the answers differently; distillation needs a shared "
                "vocabulary (the same answer token ids) for both models"
            )
        teacher = teacher.to(device)
    return PairedBatch(
        teacher=teacher,
        student={c: _cast(b.to(device), dtype) for c, b in students.items()},
        num_items=int(reference.numel()),
        num_tokens=int(sum(int(b.attention_mask.sum()) for b in students.values())),
        audio=audio,
        instructions=instructions,
        queries=queries,
        answers=answers,
        categories=[row.category or row.task for row in rows],
    )


def speech_teacher_batch(
    teacher: SpeechLM, batch: PairedBatch, *, device: torch.device, dtype: torch.dtype
) -> SpeechBatch:
    """A speech teacher's batch for ``batch``'s examples: the spoken query with the row's instruction and
    the answer (the student's ``s2t`` sequence in the teacher's tokens), on ``device``. A ``ValueError``
    if its answer tokens differ from the student's."""
    built = teacher.build_inputs(batch.audio, batch.instructions, batch.answers)
    if not torch.equal(answer_ids(built.labels).to(batch.labels.device), batch.labels):
        raise ValueError(
            "the speech teacher and the student tokenize the answers differently; distillation needs a shared "
            "vocabulary (the same answer token ids) for both models"
        )
    return _cast(built.to(device), dtype)
