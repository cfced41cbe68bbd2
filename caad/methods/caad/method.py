"""CAAD Stage 2 as a method on the shared trainer: synchronised teacher forcing, contrastive distillation.

Per micro-batch (:meth:`CAADMethod.loss_step`), as in the paper:

1. the sequence is ``prompt + pseudo-GT`` (Stage 1's answer) for the student and both teacher paths;
2. the teacher runs its positive path (the real audio) and its negative path (the audio hidden:
   ``negative_mode``) in ONE forward, under ``no_grad``;
3. the student runs its positive path, with gradient;
4. the loss is ``kd_weight * D(softmax(z_hat / tau) || softmax(s / tau)) + ce_weight * CE`` with
   ``z_hat = (1 + alpha) z_pos - alpha z_neg``, on the target hidden states through the fused-linear
   op (both ``lm_head`` weights gathered under ZeRO-3), summed over the target tokens and divided by
   the target tokens of the whole global batch (:meth:`CAADMethod.num_items`).

``alpha: 0`` is standard KD (the teacher runs the positive path only); ``kd_weight: 0`` is CE-only
fine-tuning with no teacher (``caad run`` warms the tiny teacher up this way). Config: the ``stage2``
section (:class:`caad.config.Stage2Config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from caad.cli import UserError
from caad.config import Stage2Config
from caad.data.checks import fit_max_length
from caad.data.manifest import ManifestRow
from caad.methods import register_method
from caad.methods.caad.batch import PseudoGTDataset, StepBatch, build_batch, prompt_length
from caad.methods.caad.loss import distillation_loss, teacher_forward
from caad.models import SpeechLM
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext

__all__ = ["CAADMethod"]


@register_method
class CAADMethod(Method):
    """Contrastive audio-aware distillation (CAAD Stage 2); plain KD with ``alpha: 0``; CE only with
    ``kd_weight: 0``."""

    name = "caad"
    section = "stage2"
    config_class = Stage2Config
    resume_keys = ("teacher", "alpha")
    checkpoint_keys = ("teacher",)
    required_fields = ("pseudo_gt",)
    config: Stage2Config

    def describe(self) -> str:
        cfg = self.config
        if not cfg.needs_teacher:
            return "CE fine-tuning"
        return f"CAAD (alpha={cfg.alpha:g})" if cfg.alpha > 0 else "KD"

    def load_examples(self, path: str, key: str) -> PseudoGTDataset:
        """The Stage 1 manifest's rows; every row must hold a ``pseudo_gt``."""
        return PseudoGTDataset(path)

    def build_teachers(self, ctx: SetupContext) -> None:
        """The frozen teacher (none with ``kd_weight: 0``); its vocabulary must cover the student's."""
        self.student: SpeechLM = ctx.student  # for tokenising (the engine owns its parameters)
        self.device, self.dtype = ctx.device, ctx.dtype
        self.teacher: SpeechLM | None = None
        if self.config.needs_teacher:
            self.teacher = ctx.load_frozen(self.config.teacher)
            if self.teacher.vocab_size < self.student.vocab_size:
                raise UserError(
                    f"{self.key('teacher')}: the teacher's vocabulary ({self.teacher.vocab_size}) is smaller "
                    f"than the student's ({self.student.vocab_size}); the teacher must cover every student token"
                )
            if self.teacher.uses_chat_template != self.student.uses_chat_template:
                raise UserError(
                    f"{self.key('chat_template')}: the teacher "
                    f"{'uses' if self.teacher.uses_chat_template else 'does not use'} a chat template and the "
                    "student does not match; both must build the same prompt convention (set chat_template "
                    "true or false explicitly)"
                )
        # clips longer than a model's audio window are cut to the shortest window (as the processor does)
        self.max_samples = min(m.max_audio_samples for m in (self.student, self.teacher) if m is not None)

    def fit_examples(self, examples: Sequence[ManifestRow], split: str, ctx: SetupContext) -> Sequence[ManifestRow]:
        """``max_length``: every example's ``prompt + audio tokens + pseudo-GT`` within the limit for the
        student and the teacher (``max_length_policy``: truncate the pseudo-GT, drop, or stop); counted
        and reported. No limit: the examples as they are."""
        cfg = self.config
        if cfg.max_length is None:
            return examples
        models = [m for m in (self.student, self.teacher) if m is not None]
        try:
            kept, report = fit_max_length(
                list(examples),
                self.student.tokenizer,
                cfg.max_length,
                policy=cfg.max_length_policy,
                prompt_tokens=lambda row: max(prompt_length(model, row, self.max_samples) for model in models),
            )
        except ValueError as error:
            raise UserError(f"{self.key('max_length')}: {error}") from error
        if ctx.rank == 0:
            print(f"{self.describe()} [{split}]: {report.summary()}", flush=True)
        if not kept:
            raise UserError(f"{self.key('max_length')}: no {split} example fits in {cfg.max_length} tokens")
        return kept

    def build_batch(self, examples: Sequence[ManifestRow], info: BatchInfo, device: torch.device) -> StepBatch:
        """``prompt + pseudo-GT`` for the student and the teacher's paths (no negative path at alpha 0)."""
        cfg = self.config
        return build_batch(
            examples,
            self.student,
            self.teacher,
            negative_mode=cfg.negative_mode if cfg.alpha > 0 else None,
            noise_seed=cfg.noise_seed + info.index,
            silence_seconds=cfg.silence_seconds,
            max_samples=self.max_samples,
            device=device,
            student_dtype=self.dtype,
        )

    def num_items(self, batch: StepBatch) -> int:
        """Target (pseudo-GT) tokens: the loss is a mean over them."""
        return batch.num_targets

    def num_tokens(self, batch: StepBatch) -> int:
        return batch.num_tokens

    def loss_step(self, batch: StepBatch, step: StepContext) -> LossOutput:
        """Teacher (both paths, one forward), student, the fused-linear CAAD loss, its backward."""
        teacher_out = teacher_forward(self.teacher, batch)
        student_out = step.student(batch.student)
        student: Any = step.model
        with step.gathered(*_lm_head_parameters(student), *_lm_head_parameters(self.teacher)):
            out = distillation_loss(
                student_out, student, teacher_out, self.teacher, self.config, step.num_items, step.with_components
            )
            loss = out.loss if step.with_components else out
            step.backward(loss)  # inside the gather: the lm_head gradient reaches its ZeRO-3 partition
        if not step.with_components:
            return LossOutput(loss)
        return LossOutput(loss, {"kd_loss": out.kd_loss, "ce_loss": out.ce_loss})


def _lm_head_parameters(model: Any) -> list[torch.Tensor | None]:
    """Every parameter the model's ``lm_head_weight``/``lm_head_bias`` read (adapters too), to gather."""
    if model is None:
        return []
    if hasattr(model, "lm_head_parameters"):
        return list(model.lm_head_parameters())
    return [model.lm_head_weight, model.lm_head_bias]
