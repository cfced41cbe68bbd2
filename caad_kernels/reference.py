"""Naive, materialising references that read like docs/math.md.

They build full ``[rows x vocab]`` distributions and let autograd differentiate, so they are slow
and memory-hungry by design: every backend is tested against them. ``compute_dtype`` picks the
precision (float64 for the tightest checks).
"""

from __future__ import annotations

import math

import torch

from caad_kernels.options import KDOptions


def softcap(logits: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """``cap * tanh(scale * logits / cap)`` (just ``scale * logits`` without a cap); ``-inf`` stays ``-inf``."""
    z = logits * scale if scale != 1.0 else logits
    if cap is None:
        return z
    return torch.where(torch.isneginf(z), z, cap * torch.tanh(z / cap))


def contrastive_teacher_logits(
    teacher_logits: torch.Tensor,
    teacher_negative_logits: torch.Tensor | None,
    alpha: float | torch.Tensor,
    plausibility: float,
) -> torch.Tensor:
    """``z_hat = z_pos + alpha * (z_pos - z_neg)``, with the plausibility cutoff applied.

    ``alpha`` is a float or a tensor of the leading shape (one value per row). A token with
    ``z_pos = -inf`` stays at ``-inf`` whatever ``z_neg`` says (no ``inf - inf``).
    """
    z_pos = teacher_logits
    per_row = isinstance(alpha, torch.Tensor)
    if teacher_negative_logits is None or (not per_row and alpha == 0):
        z_hat = z_pos.clone()
    else:
        a = alpha.to(z_pos.dtype).unsqueeze(-1) if per_row else alpha
        z_hat = z_pos + a * (z_pos - teacher_negative_logits)
        z_hat = torch.where(torch.isneginf(z_pos), z_pos, z_hat)
    if plausibility > 0:
        cutoff = z_pos.amax(dim=-1, keepdim=True) + math.log(plausibility)
        z_hat = z_hat.masked_fill(z_pos < cutoff, float("-inf"))
    return z_hat


def divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row divergence in TRL's ``beta`` convention, from log-probabilities ``[..., V]``."""

    def kl(log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
        # sum_v p_v (log p_v - log r_v), with 0 * anything = 0 where p_v = 0
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p)).sum(-1)

    if beta == 0:
        return kl(teacher_log_probs, student_log_probs)
    if beta == 1:
        return kl(student_log_probs, teacher_log_probs)
    mixture_log_probs = torch.logaddexp(teacher_log_probs + math.log(beta), student_log_probs + math.log(1 - beta))
    return beta * kl(teacher_log_probs, mixture_log_probs) + (1 - beta) * kl(student_log_probs, mixture_log_probs)


def contrastive_kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_negative_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialising reference of ``contrastive_kd_loss``; returns ``(loss, kd_loss, ce_loss)``.

    Differentiable with respect to ``student_logits`` through plain autograd. The loss is
    returned in ``compute_dtype``. ``mask`` (bool, leading shape) drops rows like ``ignore_index``.
    """
    opts = KDOptions(**{k: v for k, v in options.items() if k not in ("return_components",)})
    vocab = student_logits.shape[-1]
    s = softcap(student_logits.to(compute_dtype), opts.student_logit_scale, opts.student_softcap)

    def teacher_path(logits: torch.Tensor | None) -> torch.Tensor | None:
        if logits is None:
            return None
        return softcap(logits[..., :vocab].to(compute_dtype), opts.teacher_logit_scale, opts.teacher_softcap)

    z_pos, z_neg = teacher_path(teacher_logits), teacher_path(teacher_negative_logits)
    alpha = opts.alpha.to(compute_dtype) if opts.per_row_alpha else opts.alpha
    z_hat = contrastive_teacher_logits(z_pos, z_neg, alpha, opts.plausibility)
    tau = opts.temperature
    teacher_log_probs = torch.log_softmax(z_hat / tau, dim=-1)
    student_log_probs = torch.log_softmax(s / tau, dim=-1)
    kd = divergence(teacher_log_probs, student_log_probs, opts.beta) * opts.kd_scale

    return _reduce(s, kd, labels, mask, num_items_in_batch, opts, compute_dtype)


def _reduce(s: torch.Tensor, kd: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None,
            num_items_in_batch: object, opts: KDOptions, compute_dtype: torch.dtype):
    """CE on the transformed student logits ``s``, the valid rows, the reductions and the weights."""
    valid = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device)
    if mask is not None:
        valid = valid & mask
    if labels is None:
        ce = torch.zeros(s.shape[:-1], dtype=compute_dtype, device=s.device)
    else:
        valid = valid & (labels != opts.ignore_index)
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
        ce = torch.logsumexp(s, dim=-1) - s.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=compute_dtype, device=s.device)
    kd = torch.where(valid, kd, zero)
    ce = torch.where(valid, ce, zero)

    if opts.reduction == "none":
        kd_loss, ce_loss = kd, ce
    elif opts.reduction == "sum":
        kd_loss, ce_loss = kd.sum(), ce.sum()
    else:
        if num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch, dtype=compute_dtype, device=s.device)
            denominator = torch.where(denominator == 0, float("inf"), denominator)  # no items: a zero loss
        else:
            denominator = valid.sum().clamp(min=1).to(compute_dtype)
        kd_loss, ce_loss = kd.sum() / denominator, ce.sum() / denominator
    loss = opts.kd_weight * kd_loss + opts.ce_weight * ce_loss
    return loss, kd_loss, ce_loss


def fused_linear_contrastive_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_negative_hidden: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialising reference of the fused-linear op: full logits (two teacher GEMMs), then the logits reference."""

    def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
        return out if bias is None else out + bias.to(compute_dtype)

    options = {k: v for k, v in options.items() if k not in ("chunk_size", "accum_dtype")}
    student_logits = linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        teacher_logits = linear(teacher_hidden, teacher_weight, teacher_bias)
        negative_logits = (
            None if teacher_negative_hidden is None else linear(teacher_negative_hidden, teacher_weight, teacher_bias)
        )
    return contrastive_kd_loss_reference(
        student_logits, teacher_logits, negative_logits, labels, compute_dtype=compute_dtype, **options
    )


def topk_kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
    tail_floor: float = 1e-6,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialising reference of the top-k teacher (:mod:`caad_kernels.topk`): ``(loss, kd_loss, ce_loss)``.

    Builds the two ``(k+1)``-outcome distributions explicitly (the ``k`` slots, then the tail
    bucket, whose student mass is summed over a dense mask of the tokens outside the top k) and
    lets autograd differentiate the divergence of :func:`divergence` on them. Slots whose
    log-probability is ``-inf`` are empty. ``tail_floor`` as ``caad_kernels.topk.TAIL_FLOOR``.
    """
    opts = KDOptions(**{k: v for k, v in options.items() if k not in ("return_components",)})
    vocab = student_logits.shape[-1]
    s = softcap(student_logits.to(compute_dtype), opts.student_logit_scale, opts.student_softcap)
    log_q = torch.log_softmax(s / opts.temperature, dim=-1)
    log_p = teacher_topk_logprobs.to(compute_dtype)
    filled = log_p > float("-inf")
    index = torch.where(filled, teacher_topk_indices.long(), torch.zeros_like(teacher_topk_indices.long()))
    one_hot = torch.nn.functional.one_hot(index, vocab).to(torch.bool) & filled.unsqueeze(-1)  # [..., k, V]
    in_top = one_hot.any(dim=-2)
    log_q_slots = torch.where(filled, log_q.gather(-1, index), float("-inf"))
    q_tail = torch.where(in_top, torch.zeros_like(log_q), log_q.exp()).sum(-1)
    tail_exists = ~in_top.all(-1)
    log_q_tail = torch.where(tail_exists & (q_tail > 0), torch.log(torch.where(q_tail > 0, q_tail, 1.0)),
                             float("-inf"))
    r = (1 - torch.where(filled, log_p.exp(), 0.0).sum(-1)).clamp(min=0)
    r = torch.where(tail_exists & (q_tail > 0), r.clamp(min=tail_floor), torch.where(tail_exists, r, 0.0))
    log_r = torch.where(r > 0, torch.log(torch.where(r > 0, r, 1.0)), float("-inf"))
    teacher_coarse = torch.cat([torch.where(filled, log_p, float("-inf")), log_r.unsqueeze(-1)], dim=-1)
    student_coarse = torch.cat([log_q_slots, log_q_tail.unsqueeze(-1)], dim=-1)
    kd = divergence(teacher_coarse, student_coarse, opts.beta) * opts.kd_scale
    return _reduce(s, kd, labels, mask, num_items_in_batch, opts, compute_dtype)


def fused_linear_topk_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused op with a top-k teacher: full student logits, then :func:`topk_kd_loss_reference`."""
    options = {k: v for k, v in options.items() if k not in ("chunk_size", "accum_dtype", "compact")}
    logits = student_hidden.to(compute_dtype) @ student_weight.to(compute_dtype).T
    if student_bias is not None:
        logits = logits + student_bias.to(compute_dtype)
    return topk_kd_loss_reference(logits, teacher_topk_indices, teacher_topk_logprobs, labels,
                                  compute_dtype=compute_dtype, **options)
