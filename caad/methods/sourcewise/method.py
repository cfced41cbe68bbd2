"""Source-wise distillation as a method on the shared trainer.

arXiv 2509.18579 (source-wise dimension): a *textual* teacher (a text LM reading the question as text,
optionally with the audio's labels as text) and an *acoustic* teacher (a speech LM hearing the audio)
each supervise what they know best. Per micro-batch (:meth:`SourceWiseMethod.loss_step`):

1. the textual teacher reads ``text prompt + answer``, the acoustic teacher ``audio prompt + answer``,
   both under ``no_grad``; their answer rows line up with the student's (shared vocabulary);
2. the student hears the spoken query (``s2t``), with gradient;
3. per answer row, weights ``(w_text, w_acoustic)`` by the rule ``weighting`` (:mod:`~caad.methods.sourcewise.blend`);
4. ``loss = sum_rows [kd_weight * (w_text KD_text + w_acoustic KD_acoustic) + ce_weight * CE] / N`` with
   ``N`` the answer rows of the global batch. Each KD is the fused-linear op per row (``reduction="none"``:
   the per-row weights multiply the rows' losses and their gradients; the op keeps the teachers' answer
   rows, not logits, for backward).

Components: ``text_kd_loss`` and ``acoustic_kd_loss`` (each teacher's KD, unweighted), ``ce_loss``, and
``text_weight`` / ``acoustic_weight`` (the mean weight per answer row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from caad.cli import UserError
from caad.data.manifest import ManifestRow
from caad.methods import register_method
from caad.methods.crossmodal.batch import PairedBatch, build_paired_batch, speech_teacher_batch
from caad.methods.crossmodal.loss import answer_kd_loss
from caad.methods.crossmodal.method import load_paired_examples
from caad.methods.crossmodal.teacher import (
    head_of,
    head_parameters,
    load_text_teacher,
    shared_vocabulary,
    text_answer_states,
)
from caad.methods.sourcewise.blend import category_weights, confidence_weights, label_probability, rows_per_example
from caad.methods.sourcewise.config import SourceWiseConfig
from caad.models import SpeechBatch, SpeechLM
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext

__all__ = ["SourceWiseBatch", "SourceWiseMethod"]


@dataclass
class SourceWiseBatch:
    """``paired``: the student's spoken sequence and the textual teacher's; ``acoustic``: the acoustic
    teacher's spoken sequence (``None`` without it)."""

    paired: PairedBatch
    acoustic: SpeechBatch | None


@register_method
class SourceWiseMethod(Method):
    """A textual and an acoustic teacher blended per answer token, plus CE."""

    name = "sourcewise"
    section = "sourcewise"
    config_class = SourceWiseConfig
    resume_keys = ("text_teacher", "acoustic_teacher", "weighting", "text_weight", "acoustic_weight", "kd_weight")
    checkpoint_keys = ("text_teacher", "acoustic_teacher")
    config: SourceWiseConfig

    def describe(self) -> str:
        return f"source-wise KD ({self.config.weighting})" if self.config.needs_teacher else "CE fine-tuning"

    def load_examples(self, path: str, key: str) -> list[ManifestRow]:
        return load_paired_examples(path, key, self.config.text_metadata)

    def build_teachers(self, ctx: SetupContext) -> None:
        cfg = self.config
        self.student: SpeechLM = ctx.student
        self.dtype = ctx.dtype
        self.text_teacher: Any = None
        self.acoustic_teacher: Any = None
        self.text_tokenizer = None
        try:
            if cfg.needs_text_teacher:
                self.text_teacher = ctx.load_frozen(cfg.text_teacher, loader=load_text_teacher)
                self.text_tokenizer = shared_vocabulary(
                    self.text_teacher, cfg.text_teacher, self.student, self.key("text_teacher")
                )
            if cfg.needs_acoustic_teacher:
                self.acoustic_teacher = ctx.load_frozen(cfg.acoustic_teacher)
                shared_vocabulary(
                    self.acoustic_teacher, cfg.acoustic_teacher, self.student, self.key("acoustic_teacher")
                )
        except ValueError as error:
            raise UserError(str(error)) from None

    def build_batch(self, examples: Sequence[ManifestRow], info: BatchInfo, device: torch.device) -> SourceWiseBatch:
        paired = build_paired_batch(
            examples,
            self.student,
            self.text_tokenizer,
            ["s2t"],
            device=device,
            dtype=self.dtype,
            with_metadata=self.config.text_metadata,
        )
        acoustic = None
        if self.acoustic_teacher is not None:
            acoustic = speech_teacher_batch(self.acoustic_teacher, paired, device=device, dtype=self.dtype)
        return SourceWiseBatch(paired, acoustic)

    def num_items(self, batch: SourceWiseBatch) -> int:
        return batch.paired.num_items

    def num_tokens(self, batch: SourceWiseBatch) -> int:
        return batch.paired.num_tokens

    def teacher_weights(
        self, batch: SourceWiseBatch, text_hidden: torch.Tensor | None, acoustic_hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N], [N])`` per-row weights of the textual and the acoustic teacher (read the heads inside a gather)."""
        cfg = self.config
        labels = batch.paired.labels
        rows = labels.shape[0]
        fixed = (cfg.text_weight, cfg.acoustic_weight)
        if cfg.weighting == "confidence" and text_hidden is not None and acoustic_hidden is not None:
            chunk = cfg.loss_chunk_size or 1024
            text = label_probability(text_hidden, head_of(self.text_teacher), labels, chunk)
            acoustic = label_probability(acoustic_hidden, head_of(self.acoustic_teacher), labels, chunk)
            return confidence_weights(text, acoustic)
        if cfg.weighting == "category":
            return category_weights(
                batch.paired.categories,
                rows_per_example(batch.paired.student["s2t"].labels),
                text_categories=cfg.text_categories,
                acoustic_categories=cfg.acoustic_categories,
                lead=cfg.lead_weight,
                default=fixed,
            )
        device = labels.device
        return torch.full((rows,), fixed[0], device=device), torch.full((rows,), fixed[1], device=device)

    def loss_step(self, batch: SourceWiseBatch, step: StepContext) -> LossOutput:
        cfg = self.config
        text_out = None if self.text_teacher is None else text_answer_states(self.text_teacher, batch.paired.teacher)
        acoustic_out = None
        if self.acoustic_teacher is not None:
            with torch.no_grad():
                acoustic_out = self.acoustic_teacher.target_hidden_states(batch.acoustic)
        student_out = step.student(batch.paired.student["s2t"])
        student: Any = step.model
        gather = [
            *head_parameters(student),
            *head_parameters(self.text_teacher),
            *head_parameters(self.acoustic_teacher),
        ]
        with step.gathered(*gather):
            student_head = head_of(student)
            w_text, w_acoustic = self.teacher_weights(
                batch,
                None if text_out is None else text_out.hidden,
                None if acoustic_out is None else acoustic_out.hidden,
            )
            w_text, w_acoustic = w_text.to(student_out.hidden.device), w_acoustic.to(student_out.hidden.device)
            terms: dict[str, torch.Tensor] = {}
            ce = None
            weights = {"text": w_text, "acoustic": w_acoustic}
            for name, teacher, out in (
                ("text", self.text_teacher, text_out),
                ("acoustic", self.acoustic_teacher, acoustic_out),
            ):
                if teacher is None or out is None:
                    continue
                rows = answer_kd_loss(
                    student_out.hidden,
                    student_head,
                    out.hidden,
                    head_of(teacher),
                    student_out.labels,
                    cfg,
                    None,
                    kd_weight=1.0,
                    ce_weight=1.0 if ce is None else 0.0,
                    reduction="none",
                )
                terms[name] = rows.kd_loss
                if ce is None:
                    ce = rows.ce_loss
            if ce is None:  # no teacher at all (kd_weight 0): CE only
                ce = answer_kd_loss(
                    student_out.hidden, student_head, None, None, student_out.labels, cfg, None, reduction="none"
                ).ce_loss
            kd = sum((weights[name] * rows).sum() for name, rows in terms.items())
            loss = (cfg.kd_weight * kd + cfg.ce_weight * ce.sum()) / step.num_items
            step.backward(loss)
        if not step.with_components:
            return LossOutput(loss)
        n = step.num_items
        components: dict[str, Any] = {"ce_loss": ce.detach().sum() / n}
        for name, rows in terms.items():
            components[f"{name}_kd_loss"] = rows.detach().sum() / n
        components["text_weight"] = w_text.sum() / n
        components["acoustic_weight"] = w_acoustic.sum() / n
        return LossOutput(loss, components)
