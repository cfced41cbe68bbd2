"""Cross-modal knowledge distillation from a text teacher, as a method on the shared trainer.

arXiv 2509.14930: a speech LM forgets textual knowledge (catastrophic forgetting) and answers spoken
queries worse than the same queries as text (modality inequivalence). A text teacher supervises the
student through two channels, each on or off with its weight (:class:`CrossModalConfig`):

- ``t2t`` (text-to-text): the teacher and the student both read the text query: keeps the student's
  text ability;
- ``s2t`` (speech-to-text): the teacher reads the text query, the student hears the same query spoken:
  carries the teacher's answer distribution over to speech.

Per micro-batch (:meth:`CrossModalMethod.loss_step`):

1. the teacher reads ``text prompt + answer`` once (both channels share its sequence), under ``no_grad``;
2. the student runs every channel that is on in ONE forward (the t2t and s2t sequences stacked);
3. per channel, on the answer rows only (they line up with the teacher's whatever the prompts:
   :mod:`~caad.methods.crossmodal.batch`), ``kd_weight * KL(p_teacher || q_student) * tau^2 +
   ce_weight * CE(answer)`` through the fused-linear op (:mod:`~caad.methods.crossmodal.loss`);
4. ``loss = sum_c weight_c * loss_c`` over the channels, summed over answer rows and divided by the
   answer rows of the global batch; ``{channel}_kd_loss`` and ``{channel}_ce_loss`` logged (unweighted).

``kd_weight: 0`` is CE-only fine-tuning on the channels (no teacher): the "distillation off" baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from caad.cli import UserError
from caad.data.manifest import ManifestError, ManifestRow, read_manifest
from caad.methods import register_method
from caad.methods.crossmodal.batch import PairedBatch, build_paired_batch, reference_answer, text_query
from caad.methods.crossmodal.config import CrossModalConfig
from caad.methods.crossmodal.loss import answer_kd_loss
from caad.methods.crossmodal.teacher import (
    head_of,
    head_parameters,
    load_text_teacher,
    shared_vocabulary,
    text_answer_states,
)
from caad.models import SpeechLM, TargetHiddenStates
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext

__all__ = ["CrossModalMethod", "load_paired_examples", "student_answer_states"]


def load_paired_examples(path: str, key: str, with_metadata: bool = False) -> list[ManifestRow]:
    """The rows of manifest ``path``, each checked to have the question as text and an answer."""
    rows = read_manifest(path)
    if not rows:
        raise ManifestError(f"has no rows ({key})", path)
    for number, row in enumerate(rows, start=1):
        try:
            text_query(row, with_metadata)
            reference_answer(row)
        except ValueError as error:
            raise ManifestError(f"{error} ({key})", path, number) from None
    return rows


def student_answer_states(step: StepContext, batches: Sequence[Any]) -> list[TargetHiddenStates]:
    """The student's answer rows of each batch (the same answers) in ONE forward through the engine."""

    def forward(student: SpeechLM, extra: Any, parts: list[Any]) -> list[TargetHiddenStates]:
        if len(parts) == 1:
            return [student.target_hidden_states(parts[0])]
        if len(parts) == 2:
            return list(student.paired_target_hidden_states(parts[0], parts[1]))
        raise ValueError(f"at most two student batches per forward, got {len(parts)}")

    return step.run(forward, list(batches))


@register_method
class CrossModalMethod(Method):
    """Cross-modal KD (t2t and s2t channels) from a text teacher, plus CE on the answer."""

    name = "crossmodal"
    section = "crossmodal"
    config_class = CrossModalConfig
    resume_keys = ("teacher", "t2t", "s2t", "t2t_weight", "s2t_weight", "kd_weight", "ce_weight", "temperature")
    checkpoint_keys = ("teacher",)
    config: CrossModalConfig

    def describe(self) -> str:
        channels = "+".join(self.config.channels)
        return f"cross-modal KD ({channels})" if self.config.needs_teacher else f"CE fine-tuning ({channels})"

    def load_examples(self, path: str, key: str) -> list[ManifestRow]:
        return load_paired_examples(path, key)

    def build_teachers(self, ctx: SetupContext) -> None:
        """The frozen text teacher (none with ``kd_weight: 0``); its vocabulary must cover the student's."""
        self.student: SpeechLM = ctx.student  # to tokenise (the engine owns its parameters)
        self.dtype = ctx.dtype
        self.teacher: Any = None
        self.teacher_tokenizer = None
        if self.config.needs_teacher:
            self.teacher = ctx.load_frozen(self.config.teacher, loader=load_text_teacher)
            try:
                self.teacher_tokenizer = shared_vocabulary(
                    self.teacher, self.config.teacher, self.student, self.key("teacher")
                )
            except ValueError as error:
                raise UserError(str(error)) from None

    def build_batch(self, examples: Sequence[ManifestRow], info: BatchInfo, device: torch.device) -> PairedBatch:
        return build_paired_batch(
            examples, self.student, self.teacher_tokenizer, list(self.config.channels), device=device, dtype=self.dtype
        )

    def num_items(self, batch: PairedBatch) -> int:
        """Answer tokens (with the end token): the loss is a mean over them."""
        return batch.num_items

    def num_tokens(self, batch: PairedBatch) -> int:
        return batch.num_tokens

    def loss_step(self, batch: PairedBatch, step: StepContext) -> LossOutput:
        channels = self.config.channels
        teacher_out = None if self.teacher is None else text_answer_states(self.teacher, batch.teacher)
        student_out = dict(zip(channels, student_answer_states(step, [batch.student[c] for c in channels])))
        student: Any = step.model
        components: dict[str, Any] = {}
        with step.gathered(*head_parameters(student), *head_parameters(self.teacher)):
            student_head = head_of(student)
            teacher_head = None if self.teacher is None else head_of(self.teacher)
            loss = None
            for channel, weight in channels.items():
                out = answer_kd_loss(
                    student_out[channel].hidden,
                    student_head,
                    None if teacher_out is None else teacher_out.hidden,
                    teacher_head,
                    student_out[channel].labels,
                    self.config,
                    step.num_items,
                )
                loss = weight * out.loss if loss is None else loss + weight * out.loss
                components[f"{channel}_kd_loss"] = out.kd_loss.detach()
                components[f"{channel}_ce_loss"] = out.ce_loss.detach()
            assert loss is not None
            step.backward(loss)  # inside the gather: the lm_head gradient reaches its ZeRO-3 partition
        return LossOutput(loss, components if step.with_components else {})
