"""CAAD's loss on one micro-batch: the teacher's two paths, then the fused-linear contrastive KD loss.

The contrastive teacher is ``z_hat = (1 + alpha) z_pos - alpha z_neg`` (``z_pos``: the teacher on the
real audio, ``z_neg``: on the text-only path), distilled at temperature ``tau`` into the student, plus
cross-entropy on the pseudo-GT (docs/math.md). The fused-linear op takes the final hidden states
at the target positions and both ``lm_head`` weights, so no ``[tokens x vocab]`` logits exist anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from caad.config import Stage2Config
from caad.methods.caad.batch import StepBatch
from caad.models import SpeechLM, TargetHiddenStates
from caad_kernels import fused_linear_contrastive_kd_loss

__all__ = ["distillation_loss", "teacher_forward"]


def teacher_forward(
    teacher: SpeechLM | None, batch: StepBatch
) -> tuple[TargetHiddenStates, TargetHiddenStates | None] | None:
    """The teacher's target hidden states under ``no_grad``: ``(positive, negative)``.

    Both paths run in ONE batched forward (:meth:`SpeechLM.paired_target_hidden_states`); without a
    negative batch (alpha 0) only the positive path runs and ``negative`` is ``None``; ``None``
    without a teacher.
    """
    if teacher is None:
        return None
    with torch.no_grad():
        if batch.teacher_negative is not None:
            return teacher.paired_target_hidden_states(batch.teacher_positive, batch.teacher_negative)
        return teacher.target_hidden_states(batch.teacher_positive), None


def distillation_loss(
    student_out: TargetHiddenStates,
    student: SpeechLM,
    teacher_out: tuple[TargetHiddenStates, TargetHiddenStates | None] | None,
    teacher: SpeechLM | None,
    config: Stage2Config,
    num_items: int | None = None,
    return_components: bool = True,
) -> Any:
    """The CAAD loss of one micro-batch from target hidden states and ``lm_head`` weights (no logits).

    ``fused_linear_contrastive_kd_loss`` with the student's and the teacher's ``lm_head`` weight and
    bias (gather them first under ZeRO-3), each model's own logit post-processing (``logit_scale``,
    ``final_softcap``: Cohere, Granite, Gemma-2) and the config's loss options; ``num_items`` is the
    label-token count of the whole accumulated batch over all ranks (``None``: this micro-batch's).
    Without a teacher (``kd_weight: 0``) the KD term has weight 0 and is computed against the student
    itself, so only CE remains. Returns a ``KDLossOutput`` (loss, kd_loss, ce_loss) with
    ``return_components``, else the loss tensor.
    """
    student_hidden = student_out.hidden
    labels = student_out.labels.to(student_hidden.device)
    if teacher_out is None:
        bias = student.lm_head_bias
        teacher_hidden, teacher_weight = student_hidden.detach(), student.lm_head_weight.detach()
        teacher_bias = None if bias is None else bias.detach()
        negative_hidden = None
    else:
        positive, negative = teacher_out
        teacher_hidden, teacher_weight, teacher_bias = (
            positive.hidden,
            teacher.lm_head_weight,
            teacher.lm_head_bias,
        )
        negative_hidden = None if negative is None else negative.hidden
    return fused_linear_contrastive_kd_loss(
        student_hidden,
        student.lm_head_weight,
        teacher_hidden,
        teacher_weight,
        negative_hidden,
        labels,
        student_bias=student.lm_head_bias,
        teacher_bias=teacher_bias,
        alpha=config.alpha if negative_hidden is not None else 0.0,
        temperature=config.temperature,
        beta=config.beta,
        plausibility=config.plausibility,
        kd_weight=config.kd_weight,
        ce_weight=config.ce_weight,
        temperature_scaling=config.temperature_scaling,
        num_items_in_batch=num_items,
        chunk_size=config.loss_chunk_size,
        accum_dtype=torch.float32 if student_hidden.dtype != torch.float32 else None,
        backend=config.loss_backend,
        student_logit_scale=student.logit_scale,
        student_softcap=student.final_softcap,
        teacher_logit_scale=student.logit_scale if teacher is None else teacher.logit_scale,
        teacher_softcap=student.final_softcap if teacher is None else teacher.final_softcap,
        return_components=return_components,
        check_finite=False,
    )
