"""The naive attention-map divergence: materialises ``[B, heads, T, T]`` (checks :mod:`caad_kernels.attention_kd`).

Plain PyTorch autograd in the inputs' dtype (pass float64 tensors for an exact reference); it builds
every attention map in full, so memory grows as ``T**2``. Same arguments and conventions as
:func:`caad_kernels.attention_kd.attention_kd_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _repeat_kv(key: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, H_kv, T, d]`` -> ``[B, heads, T, d]``: query head ``h`` uses key head ``h // (heads / H_kv)``."""
    return key.repeat_interleave(heads // key.shape[1], dim=1)


def _transform(x: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    x = x * scale
    return x if cap is None else cap * torch.tanh(x / cap)


def _head_groups(teacher_heads, student_count: int, teacher_count: int) -> list[list[int]]:
    if teacher_heads is None:
        if teacher_count == student_count:
            return [[h] for h in range(student_count)]
        group = teacher_count // student_count
        return [list(range(h * group, (h + 1) * group)) for h in range(student_count)]
    return [[int(h)] if isinstance(h, int) else [int(x) for x in h] for h in teacher_heads]


def attention_kd_loss_reference(
    student_query: torch.Tensor,
    student_key: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_key: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    teacher_heads: Sequence[int] | Sequence[Sequence[int]] | None = None,
    causal: bool = True,
    student_scale: float | None = None,
    teacher_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    temperature_scaling: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Attention-map divergence with every ``[B, H, T, T]`` map materialised.

    Student logits ``s = softcap(scale_s * q_s k_s^T)``, the teacher's likewise per teacher head;
    key ``j`` is visible to query ``i`` iff both are valid in ``attention_mask`` and (``causal``)
    ``j <= i``; ``q = softmax(s / tau)``; the teacher distribution of student head ``h`` is the
    mean over its teacher heads of ``softmax(z / tau)`` (one head: that head's). The divergence
    per valid query row is chosen by ``beta`` (docs/math.md), times ``tau**2`` when
    ``temperature_scaling``; "mean" averages over valid query rows and student heads, "sum" adds,
    "none" returns ``[B, H_s, T]`` (0 on padded rows).
    """
    batch, heads_s, seq, dim_s = student_query.shape
    heads_t, dim_t = teacher_query.shape[1], teacher_query.shape[3]
    scale_s = dim_s**-0.5 if student_scale is None else student_scale
    scale_t = dim_t**-0.5 if teacher_scale is None else teacher_scale
    device = student_query.device
    valid = torch.ones(batch, seq, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    visible = valid[:, None, None, :] & valid[:, None, :, None]
    if causal:
        visible = visible & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    s = _transform(student_query @ _repeat_kv(student_key, heads_s).transpose(-1, -2), scale_s, student_softcap)
    z = _transform(teacher_query @ _repeat_kv(teacher_key, heads_t).transpose(-1, -2), scale_t, teacher_softcap)
    ninf = torch.finfo(s.dtype).min  # a finite fill: padded rows (no visible key) stay finite
    log_q = torch.log_softmax(s.masked_fill(~visible, ninf) / temperature, dim=-1)
    p_heads = torch.softmax(z.masked_fill(~visible, ninf) / temperature, dim=-1)
    p = torch.stack([p_heads[:, group].mean(dim=1) for group in _head_groups(teacher_heads, heads_s, heads_t)], 1)
    p = p.to(log_q.dtype).masked_fill(~visible, 0.0)
    q = log_q.exp().masked_fill(~visible, 0.0)
    log_p = torch.where(p > 0, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    log_q = torch.where(visible, log_q, torch.zeros_like(log_q))
    if beta == 0.0:
        kd = (p * (log_p - log_q)).sum(-1)
    elif beta == 1.0:
        kd = (q * (log_q - log_p)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        log_m = torch.where(m > 0, m.clamp_min(1e-300).log(), torch.zeros_like(m))
        kd = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    if temperature_scaling:
        kd = kd * temperature**2
    kd = kd.masked_fill(~valid[:, None, :], 0.0)
    if reduction == "none":
        return kd
    total = kd.sum()
    if reduction == "sum":
        return total
    return total / max(1, int(valid.sum()) * heads_s)


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float | None = None,
                            attention_mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """``softmax(scale * q k^T)`` over the visible keys: ``[B, H, T, T]`` (a helper for tests and plots).

    ``scale`` defaults to ``1 / sqrt(d)``; padded query rows are all zeros.
    """
    batch, heads, seq, dim = query.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    valid = torch.ones(batch, seq, dtype=torch.bool, device=query.device) if attention_mask is None \
        else attention_mask.bool()
    visible = valid[:, None, None, :] & valid[:, None, :, None]
    if causal:
        visible = visible & torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
    logits = (query @ _repeat_kv(key, heads).transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~visible, torch.finfo(logits.dtype).min), dim=-1)
    return probs.masked_fill(~visible, 0.0)
