"""The answer-token distillation loss shared by the text-teacher methods, through the fused-linear op.

Per answer row ``i`` (teacher and student rows line up: :mod:`caad.methods.crossmodal.batch`), with
``p = softmax(z_t / tau)`` the teacher's distribution and ``q = softmax(s / tau)`` the student's::

    loss_i = kd_weight * D(p_i || q_i) [* tau^2] + ce_weight * CE(s_i, y_i)

``D`` is forward KL at ``beta = 0`` (docs/math.md). The op takes the final hidden states on the
answer rows and both ``lm_head`` weights, so no ``[rows x vocab]`` logits exist; the teacher's
vocabulary may be larger than the student's (its extra columns are dropped), its width may differ.
Without a teacher (``kd_weight: 0``) the KD term has weight 0 against the student itself: CE only.
"""

from __future__ import annotations

from typing import Any

import torch

from caad.methods.crossmodal.config import AnswerKDConfig
from caad.methods.crossmodal.teacher import Head
from caad_kernels import fused_linear_contrastive_kd_loss

__all__ = ["answer_kd_loss"]


def answer_kd_loss(
    student_hidden: torch.Tensor,
    student_head: Head,
    teacher_hidden: torch.Tensor | None,
    teacher_head: Head | None,
    labels: torch.Tensor,
    config: AnswerKDConfig,
    num_items: int | None,
    *,
    kd_weight: float | None = None,
    ce_weight: float | None = None,
    reduction: str = "mean",
) -> Any:
    """The loss on ``[N, H_s]`` student and ``[N, H_t]`` teacher answer rows with ``[N]`` labels.

    Returns the op's ``KDLossOutput`` (``loss``, ``kd_loss``, ``ce_loss``): with ``reduction="mean"``
    each is a sum over the rows divided by ``num_items`` (the answer rows of the global batch; ``None``:
    these rows); with ``"none"``, ``[N]`` per-row values (gradients flow through each). ``kd_weight`` /
    ``ce_weight`` override the config's. ``teacher_hidden`` ``None``: CE only (KD weight forced to 0).
    """
    kd = config.kd_weight if kd_weight is None else kd_weight
    ce = config.ce_weight if ce_weight is None else ce_weight
    if teacher_hidden is None or teacher_head is None:
        kd = 0.0
        teacher_hidden = student_hidden.detach()
        bias = None if student_head.bias is None else student_head.bias.detach()
        teacher_head = Head(student_head.weight.detach(), bias, student_head.scale, student_head.softcap)
    return fused_linear_contrastive_kd_loss(
        student_hidden,
        student_head.weight,
        teacher_hidden,
        teacher_head.weight,
        None,
        labels.to(student_hidden.device),
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        alpha=0.0,
        temperature=config.temperature,
        beta=config.beta,
        kd_weight=kd,
        ce_weight=ce,
        temperature_scaling=config.temperature_scaling,
        reduction=reduction,
        num_items_in_batch=num_items if reduction != "none" else None,
        chunk_size=config.loss_chunk_size,
        accum_dtype=torch.float32 if student_hidden.dtype != torch.float32 else None,
        backend=config.loss_backend,
        return_components=True,
        check_finite=False,
        student_logit_scale=student_head.scale,
        teacher_logit_scale=teacher_head.scale,
        student_softcap=student_head.softcap,
        teacher_softcap=teacher_head.softcap,
    )
