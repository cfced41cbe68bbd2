"""Stage 2 data: pseudo-GT examples, the deterministic data order, and the model inputs of one step.

The order is a pure function of ``(seed, epoch)``, and an optimizer step's examples a pure function
of ``(seed, step, world size, batch size, grad_accum)``: resuming at step ``k`` sees exactly the
examples an uninterrupted run would. A step takes the next ``batch_size x world_size x grad_accum``
examples of the epoch's permutation (the last incomplete window of an epoch is dropped); micro-step
``m`` of rank ``r`` takes ``batch_size`` consecutive examples at offset
``(m x world_size + r) x batch_size`` of that window. So one process with ``batch_size=4`` and two
with ``batch_size=2`` see the same examples in the same optimizer step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from caad.data.audio import load_audio
from caad.data.manifest import ManifestError, ManifestRow, read_manifest
from caad.models import IGNORE_INDEX, SAMPLING_RATE, SpeechBatch, SpeechLM

__all__ = ["PseudoGTDataset", "StepBatch", "StepPlan", "build_step_batch"]


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

    def examples(self, indices: list[int]) -> tuple[list[np.ndarray], list[str], list[str]]:
        """``(audio clips at 16 kHz, instructions, pseudo-GT targets)`` of the rows at ``indices``."""
        rows = [self.rows[i] for i in indices]
        audio = [load_audio(row.audio_path, SAMPLING_RATE) for row in rows]
        return audio, [row.instruction for row in rows], [str(row.pseudo_gt) for row in rows]


@dataclass(frozen=True)
class StepPlan:
    """Which examples each optimizer step, micro-step and rank uses (module docstring)."""

    num_examples: int
    batch_size: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    epochs: int
    max_steps: int | None = None

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all ranks and micro-steps."""
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: ``max_steps`` when set, else ``epochs x steps_per_epoch``."""
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        """The permutation of the examples for ``epoch`` (same on every rank)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's example indices for each micro-step of optimizer step ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        window = self.order(epoch)[position * self.global_batch : (position + 1) * self.global_batch]
        out = []
        for micro in range(self.grad_accum):
            start = (micro * self.world_size + self.rank) * self.batch_size
            out.append(window[start : start + self.batch_size])
        return out


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
) -> StepBatch:
    """Tokenize ``prompt + pseudo-GT`` for the student and the teacher's paths, on ``device``.

    ``negative_mode`` ``None`` builds no negative path (plain KD). The teacher's and the student's
    labels must be the same token sequence (a shared tokenizer), else a ``ValueError``.
    """
    audio, instructions, targets = dataset.examples(indices)
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
                positive, audio, instructions, targets, audio_mode=negative_mode, noise_seed=noise_seed
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
