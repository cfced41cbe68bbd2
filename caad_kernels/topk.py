"""A sparse top-k teacher: the row math when the teacher is given as ``k`` (index, log-probability) pairs per row.

Offline distillation stores, per token, the teacher's ``k`` most likely tokens and their
log-probabilities instead of ``V`` logits. The rest of the teacher's mass, ``r = 1 - sum_K P_v``,
goes to one **tail bucket** (the "other" outcome), and the student's distribution is collapsed the
same way, ``q_o = sum over the tokens not in K of q_u``; the divergence is computed on the two
``(k+1)``-outcome distributions:

    forward KL   sum_K P_v log(P_v / q_v) + r log(r / q_o)
    reverse KL   sum_K q_v log(q_v / P_v) + q_o log(q_o / r)
    mixture      beta KL(P || M) + (1 - beta) KL(Q || M) over the k+1 outcomes, M = beta P + (1 - beta) Q

This is the same value as the dense loss against the teacher that spreads ``r`` over the tail in
proportion to the student (``p_u = r q_u / q_o``), and its gradient with respect to the student
logits is that dense loss's gradient with this teacher held fixed: per row, ``q_u * c`` with one
coefficient ``c`` for every tail token, the usual closed forms on the ``k`` slots (e.g. forward KL:
``(q_v - P_v) / tau`` on the slots, ``q_u (1 - r / q_o) / tau`` on the tail). With ``k = V`` (or
whenever ``K`` covers the vocabulary) the tail is empty and the loss is the dense one.

Conventions:

- ``logprobs`` are the teacher's log-probabilities **at the loss temperature**
  (``log_softmax(z_hat / tau)``); the op does not rescale them (the student is divided by ``tau``
  as usual). A slot whose log-probability is ``-inf`` is empty: its index is not read and the
  token stays in the tail (so ``-inf`` padding of rows with fewer than ``k`` candidates is fine).
- ``r = max(1 - sum_K P_v, 0)`` (summed in float64). When the tail is not empty and the student
  puts mass on it, ``r`` is floored at :data:`TAIL_FLOOR` (about the rounding error of a float32
  sum of probabilities), so a teacher whose top-k carry all the mass to rounding precision gives
  a large but finite reverse KL instead of ``inf``; the floor changes a forward-KL value by less
  than ``1e-5``.
- Invalid input flags the row (:mod:`caad_kernels.validation`): NaN or ``+inf`` log-probabilities
  (``FLAG_TEACHER``); a non-empty slot whose index is outside ``[0, V)``, an index repeated among
  the non-empty slots, or probabilities that sum past ``1 + tolerance`` (:data:`SUM_TOLERANCE`,
  by the log-probabilities' dtype) (``FLAG_TOPK``). A flagged row has a NaN loss and gradient.

The functions follow the row-kernel contract of :mod:`caad_kernels.backends` with the teacher
replaced by ``indices``/``logprobs`` (``[rows, k]``, int64 and floating). They are chunked PyTorch
on any device (bounded float32 temporaries); stats are ``[rows, 5]``: ``lse_b``, ``lse_s``,
``kl_aux``, ``log r`` (the tail mass used) and ``log q_o``.
"""

from __future__ import annotations

import math

import torch

from caad_kernels.options import RowParams
from caad_kernels.rows import RowView
from caad_kernels.validation import FLAG_LABEL, FLAG_STUDENT, FLAG_TEACHER, FLAG_TOPK

TAIL_FLOOR = 1e-6
#: how far past 1 the top-k probabilities of a row may sum (rounding of the stored log-probabilities)
SUM_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CHUNK_ELEMENTS = 1 << 21  # elements per float32 temporary of one block of rows


def check_topk(indices: object, logprobs: object, leading_shape: torch.Size, device: torch.device,
               student_name: str) -> None:
    """Type, shape and device checks of a top-k teacher (values are checked by the row functions)."""
    if (indices is None) != (logprobs is None):
        raise ValueError("teacher_topk_indices and teacher_topk_logprobs must be given together")
    if indices is None:
        return
    for name, tensor in (("teacher_topk_indices", indices), ("teacher_topk_logprobs", logprobs)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on {device} like {student_name}, got {tensor.device}")
        if tensor.dim() != len(leading_shape) + 1 or tensor.shape[:-1] != leading_shape or tensor.shape[-1] < 1:
            raise ValueError(
                f"{name} must be [..., k] with the leading shape of {student_name} {tuple(leading_shape)} and k >= 1, "
                f"got {tuple(tensor.shape)}"
            )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"teacher_topk_indices must be an integer tensor, got {indices.dtype}")
    if logprobs.dtype not in SUM_TOLERANCE:
        raise TypeError(
            "teacher_topk_logprobs must be float16, bfloat16, float32 or float64 log-probabilities, got "
            f"{logprobs.dtype}"
        )
    if indices.shape != logprobs.shape:
        raise ValueError(
            f"teacher_topk_indices and teacher_topk_logprobs must have the same shape, got {tuple(indices.shape)} "
            f"and {tuple(logprobs.shape)}"
        )


def flat_topk(indices: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, k]`` contiguous int64 indices and logprobs (logprobs keep their dtype)."""
    k = indices.shape[-1]
    return indices.reshape(-1, k).to(torch.int64).contiguous(), logprobs.reshape(-1, k).contiguous()


def _transform(x: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    if scale != 1.0:
        x = x * scale
    if cap is None:
        return x
    return torch.where(torch.isneginf(x), x, cap * torch.tanh(x / cap))


def _xlogy(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``weight * log_ratio`` with 0 where ``weight`` is 0 (no ``0 * inf``)."""
    return torch.where(weight > 0, weight * log_ratio, torch.zeros((), dtype=weight.dtype, device=weight.device))


def _block(s_raw: torch.Tensor, idx: torch.Tensor, lp_in: torch.Tensor, y: torch.Tensor | None,
           params: RowParams, dtype: torch.dtype, coefs: tuple[torch.Tensor, torch.Tensor] | None):
    """Per-row ``(kd, ce, stats, flags)`` of one block of rows, and the student gradient when ``coefs`` are given."""
    rows, vocab = s_raw.shape[0], params.vocab_size
    device = s_raw.device
    inf = float("inf")
    zero = torch.zeros((), dtype=dtype, device=device)
    s = _transform(s_raw.to(dtype), params.student_scale, params.student_softcap)
    b = s * params.inv_temperature
    lse_b = torch.logsumexp(b, dim=-1)

    lp = lp_in.to(dtype)
    filled = lp > -inf  # NaN is not filled (and flagged below)
    in_range = (idx >= 0) & (idx < vocab)
    slot_ok = filled & in_range
    # K as a dense mask; empty and bad slots write into a dummy column
    in_k = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)
    in_k.scatter_(1, torch.where(slot_ok, idx, vocab), True)
    in_k = in_k[:, :vocab]
    safe = torch.where(slot_ok, idx, 0)

    log_p = torch.where(slot_ok, lp, -inf)
    sum_p = log_p.to(torch.float64).exp().sum(-1)
    key = torch.where(slot_ok, idx, -1 - torch.arange(idx.shape[1], device=device))
    ordered = key.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1) if idx.shape[1] > 1 else torch.zeros_like(sum_p, dtype=bool)
    topk_bad = (filled & ~in_range).any(-1) | repeated | (sum_p > 1 + SUM_TOLERANCE[lp_in.dtype])
    teacher_bad = (torch.isnan(lp) | (lp == inf)).any(-1)

    log_q_tail = torch.logsumexp(b.masked_fill(in_k, -inf), dim=-1) - lse_b  # -inf: empty tail (or all -inf)
    tail_exists = slot_ok.sum(-1) < vocab
    r = (1 - sum_p).clamp(min=0).to(dtype)
    r = torch.where(tail_exists & (log_q_tail > -inf), r.clamp(min=TAIL_FLOOR), torch.where(tail_exists, r, zero))
    log_r = torch.log(r)
    log_q_slot = torch.where(slot_ok, b.gather(1, safe) - lse_b.unsqueeze(1), -inf)

    # the (k+1)-outcome distributions: the k slots, then the tail bucket
    lp_c = torch.cat([log_p, log_r.unsqueeze(1)], dim=1)
    lq_c = torch.cat([log_q_slot, log_q_tail.unsqueeze(1)], dim=1)
    divergence = params.divergence
    kl_aux = torch.zeros_like(lse_b)
    lm_c = None
    if divergence == "forward":
        kd = _xlogy(lp_c.exp(), lp_c - lq_c).sum(-1)
    elif divergence == "reverse":
        kd = kl_aux = _xlogy(lq_c.exp(), lq_c - lp_c).sum(-1)
    else:
        beta = params.beta
        lm_c = torch.logaddexp(lp_c + math.log(beta), lq_c + math.log(1 - beta))
        kl_aux = _xlogy(lq_c.exp(), lq_c - lm_c).sum(-1)
        kd = beta * _xlogy(lp_c.exp(), lp_c - lm_c).sum(-1) + (1 - beta) * kl_aux

    valid = torch.ones(rows, dtype=torch.bool, device=device)
    ce = torch.zeros_like(kd)
    lse_s = torch.zeros_like(kd)
    label_bad = torch.zeros(rows, dtype=torch.bool, device=device)
    safe_y = None
    if y is not None:
        valid = y != params.ignore_index
        if params.has_labels:
            label_bad = (y < 0) | (y >= vocab)
            safe_y = torch.where(valid & ~label_bad, y, torch.zeros_like(y)).unsqueeze(1)
            lse_s = torch.logsumexp(s, dim=-1)
            ce = lse_s - s.gather(1, safe_y).squeeze(1)

    student_bad = (~(s_raw < inf)).any(-1)
    flags = (torch.where(student_bad, FLAG_STUDENT, 0) | torch.where(teacher_bad, FLAG_TEACHER, 0)
             | torch.where(topk_bad, FLAG_TOPK, 0) | torch.where(label_bad, FLAG_LABEL, 0))
    flags = torch.where(valid, flags, 0).to(torch.int32)
    bad = flags != 0
    nan = torch.full((), float("nan"), dtype=dtype, device=device)
    kd = torch.where(bad, nan, torch.where(valid, kd, zero))
    ce = torch.where(bad, nan, torch.where(valid, ce, zero))
    stats = torch.stack([lse_b, lse_s, kl_aux, log_r, log_q_tail], dim=1)
    stats = torch.where(bad.unsqueeze(1), nan, stats)
    if coefs is None:
        return kd, ce, stats, flags, None

    # d kd / d b: q_u * tail_coef on the tail, slot_grad on the slots
    q = (b - lse_b.unsqueeze(1)).exp()
    q_slot = log_q_slot.exp()
    has_tail = log_q_tail > -inf
    if divergence == "forward":
        tail_coef = 1 - (log_r - log_q_tail).exp()
        slot_grad = q_slot - log_p.exp()
    elif divergence == "reverse":
        tail_coef = log_q_tail - log_r - kl_aux
        slot_grad = _xlogy(q_slot, log_q_slot - log_p - kl_aux.unsqueeze(1))
    else:
        one_minus = 1 - params.beta
        tail_coef = one_minus * (log_q_tail - lm_c[:, -1] - kl_aux)
        slot_grad = one_minus * _xlogy(q_slot, log_q_slot - lm_c[:, :-1] - kl_aux.unsqueeze(1))
    tail_coef = torch.where(has_tail, tail_coef, zero)
    d_kd = torch.where(in_k, zero, q * tail_coef.unsqueeze(1))
    d_kd.scatter_add_(1, safe, torch.where(slot_ok, slot_grad, zero))

    coef_kd, coef_ce = (c.to(dtype).unsqueeze(1) for c in coefs)
    grad = torch.where(coef_kd != 0, coef_kd * params.inv_temperature * d_kd, zero)
    if safe_y is not None:
        d_ce = (s - lse_s.unsqueeze(1)).exp()
        d_ce.scatter_add_(1, safe_y, torch.where(valid & ~label_bad, -1.0, 0.0).to(dtype).unsqueeze(1))
        grad = grad + torch.where(coef_ce != 0, coef_ce * d_ce, zero)
    if params.student_softcap is not None:
        factor = params.student_scale * (1 - (s / params.student_softcap) ** 2)
        grad = torch.where(torch.isneginf(s), zero, grad * factor)
    elif params.student_scale != 1.0:
        grad = grad * params.student_scale
    grad = torch.where(bad.unsqueeze(1), nan, torch.where(valid.unsqueeze(1), grad, zero))
    return kd, ce, stats, flags, grad


def _compute_dtype(student: torch.Tensor, logprobs: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, logprobs.dtype) else torch.float32


def _run(student: RowView, indices: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor | None,
         params: RowParams, coefs: tuple[torch.Tensor, torch.Tensor] | None, grad: torch.Tensor | None):
    rows = student.rows
    device = student.data.device
    dtype = _compute_dtype(student.data, logprobs)
    kd = torch.zeros(rows, dtype=dtype, device=device)
    ce = torch.zeros(rows, dtype=dtype, device=device)
    stats = torch.zeros(rows, 5, dtype=dtype, device=device)
    flags = torch.zeros(rows, dtype=torch.int32, device=device)
    block = max(1, CHUNK_ELEMENTS // max(params.vocab_size, 1))
    for start, stop in student.chunks(block):
        y = None if labels is None else labels[start:stop]
        block_coefs = None if coefs is None else (coefs[0][start:stop], coefs[1][start:stop])
        out = _block(student.row_slice(start, stop), indices[start:stop], logprobs[start:stop], y, params, dtype,
                     block_coefs)
        kd[start:stop], ce[start:stop], stats[start:stop], flags[start:stop] = out[:4]
        if grad is not None:
            grad[start:stop] = out[4].to(grad.dtype)
    return kd, ce, stats, flags


def forward_rows(student: RowView, indices: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor | None,
                 params: RowParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kd, ce, stats, flags)`` per row (the backends' contract, with the top-k teacher; module docstring)."""
    return _run(student, indices, logprobs, labels, params, None, None)


def loss_and_grad_rows(student: RowView, indices: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor | None,
                       coef_kd: torch.Tensor, coef_ce: torch.Tensor, params: RowParams, grad: torch.Tensor):
    """``forward_rows`` and ``grad[i] = coef_kd[i] d kd_i / dx_i + coef_ce[i] d ce_i / dx_i`` in one pass.

    ``grad`` (``[rows, V]``, unit column stride, the student's dtype) may alias the student: each
    block of rows is read before it is written.
    """
    return _run(student, indices, logprobs, labels, params, (coef_kd, coef_ce), grad)


def backward_rows(student: RowView, indices: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor | None,
                  stats: torch.Tensor, coef_kd: torch.Tensor, coef_ce: torch.Tensor, params: RowParams,
                  grad: torch.Tensor) -> None:
    """Write the student gradient into ``grad`` (recomputed from the inputs; ``stats`` is not needed)."""
    del stats
    _run(student, indices, logprobs, labels, params, (coef_kd, coef_ce), grad)
