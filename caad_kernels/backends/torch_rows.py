"""Chunked pure-PyTorch row kernels (see ``caad_kernels.backends`` for the contract).

Rows are processed in chunks of at most ``CHUNK_ELEMENTS / V`` rows, so the float32 temporaries
are bounded by a constant (``CHUNK_ELEMENTS`` elements, a few of them at once) whatever the number
of rows: O(rows) extra memory besides the student gradient. Labels are clamped before any gather,
so an out-of-range label is reported through the row flags (never a device-side assert on CUDA).
"""

from __future__ import annotations

import torch

from caad_kernels.options import RowParams
from caad_kernels.rows import RowView
from caad_kernels.validation import FLAG_LABEL, FLAG_NEGATIVE, FLAG_STUDENT, FLAG_TEACHER

CHUNK_ELEMENTS = 1 << 21  # 2M elements: 8 MiB per float32 temporary


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def transform(x: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """``cap * tanh(scale * x / cap)`` (``scale * x`` without a cap); ``-inf`` stays ``-inf``."""
    if scale != 1.0:
        x = x * scale
    if cap is None:
        return x
    return torch.where(torch.isneginf(x), x, cap * torch.tanh(x / cap))


def _teacher_terms(
    teacher: torch.Tensor,
    negative: torch.Tensor | None,
    alpha: torch.Tensor | float,
    params: RowParams,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(a, zmax)``: ``a = z_hat / tau`` with cut-off tokens at ``-inf``; ``zmax`` per row."""
    z_pos = transform(teacher.to(dtype), params.teacher_scale, params.teacher_softcap)
    if params.has_negative:
        z_neg = transform(negative.to(dtype), params.teacher_scale, params.teacher_softcap)
        z_hat = torch.where(torch.isneginf(z_pos), z_pos, z_pos + alpha * (z_pos - z_neg))
    else:
        z_hat = z_pos
    if params.log_plausibility is not None:
        zmax = z_pos.amax(dim=-1)
        z_hat = z_hat.masked_fill(z_pos < (zmax + params.log_plausibility).unsqueeze(-1), float("-inf"))
    else:
        zmax = torch.zeros(z_pos.shape[0], dtype=dtype, device=z_pos.device)
    return z_hat * params.inv_temperature, zmax


def _xlogy_terms(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``weight * log_ratio`` with zero where ``weight`` is 0 (no ``0 * inf``)."""
    return torch.where(weight > 0, weight * log_ratio, torch.zeros_like(weight))


def _chunk(
    student: RowView, teacher: RowView, negative: RowView | None, start: int, stop: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    s = student.row_slice(start, stop)
    t = teacher.row_slice(start, stop)[:, :vocab]
    n = None if negative is None else negative.row_slice(start, stop)[:, :vocab]
    return s, t, n


def _limits(col_limit: torch.Tensor | None, start: int, stop: int, vocab: int, device: torch.device):
    """``(limit, visible)`` of rows ``[start, stop)``: int64 ``[rows]`` limits clamped to ``[0, V]`` and the
    bool ``[rows, V]`` mask of the columns below them; ``(None, None)`` without a column limit."""
    if col_limit is None:
        return None, None
    limit = col_limit[start:stop].to(device=device, dtype=torch.int64).clamp(0, vocab)
    visible = torch.arange(vocab, device=device).unsqueeze(0) < limit.unsqueeze(1)
    return limit, visible


def _hide(x: torch.Tensor | None, visible: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with the columns at or past the row's limit set to ``-inf`` (so they are never used)."""
    if x is None or visible is None:
        return x
    return x.masked_fill(~visible, float("-inf"))


def _alpha(alpha_rows: torch.Tensor | None, params: RowParams, start: int, stop: int, dtype: torch.dtype):
    if params.per_row_alpha:
        if alpha_rows is None:
            raise ValueError("params.per_row_alpha is True but no alpha_rows were given")
        return alpha_rows[start:stop].to(dtype).unsqueeze(1)
    return params.alpha


def _row_flags(s_raw, z_pos, z_neg, y, valid, params: RowParams, limit=None) -> torch.Tensor:
    """The contract's flag bits of each row (see ``caad_kernels.validation``); with a column ``limit`` a label
    must lie below the row's limit."""
    inf = float("inf")
    flags = torch.where((~(s_raw < inf)).any(-1), FLAG_STUDENT, 0)
    flags = flags | torch.where((~(z_pos < inf)).any(-1), FLAG_TEACHER, 0)
    if z_neg is not None:
        bad_neg = ~(z_neg < inf) | (torch.isneginf(z_neg) & ~torch.isneginf(z_pos))
        flags = flags | torch.where(bad_neg.any(-1), FLAG_NEGATIVE, 0)
    if params.has_labels and y is not None:
        out_of_range = (y < 0) | (y >= (params.vocab_size if limit is None else limit))
        flags = flags | torch.where(out_of_range, FLAG_LABEL, 0)
    return torch.where(valid, flags, 0).to(torch.int32)


def forward_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    params: RowParams,
    *,
    alpha_rows: torch.Tensor | None = None,
    col_limit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = student.rows, params.vocab_size
    device = student.data.device
    dtype = _compute_dtype(student.data, teacher.data)
    kd = torch.zeros(rows, dtype=dtype, device=device)
    ce = torch.zeros(rows, dtype=dtype, device=device)
    stats = torch.zeros(rows, 5, dtype=dtype, device=device)
    flags = torch.zeros(rows, dtype=torch.int32, device=device)
    divergence = params.divergence
    negative = negative if params.has_negative else None
    for start, stop in student.chunks(_rows_per_chunk(vocab)):
        s_raw, t_raw, n_raw = _chunk(student, teacher, negative, start, stop, vocab)
        limit, visible = _limits(col_limit, start, stop, vocab, device)
        s_raw, t_raw, n_raw = _hide(s_raw, visible), _hide(t_raw, visible), _hide(n_raw, visible)
        s = transform(s_raw.to(dtype), params.student_scale, params.student_softcap)
        a, zmax = _teacher_terms(t_raw, n_raw, _alpha(alpha_rows, params, start, stop, dtype), params, dtype)
        b = s * params.inv_temperature
        log_p = torch.log_softmax(a, dim=-1)
        log_q = torch.log_softmax(b, dim=-1)
        lse_a = torch.logsumexp(a, dim=-1)
        lse_b = torch.logsumexp(b, dim=-1)
        lse_s = torch.logsumexp(s, dim=-1)
        kl_aux = torch.zeros_like(lse_a)
        if divergence == "forward":
            kd_chunk = _xlogy_terms(log_p.exp(), log_p - log_q).sum(-1)
        elif divergence == "reverse":
            kd_chunk = _xlogy_terms(log_q.exp(), log_q - log_p).sum(-1)
            kl_aux = kd_chunk
        else:
            beta = params.beta
            log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=dtype)),
                                    log_q + torch.log(torch.tensor(1 - beta, dtype=dtype)))
            kl_p_m = _xlogy_terms(log_p.exp(), log_p - log_m).sum(-1)
            kl_aux = _xlogy_terms(log_q.exp(), log_q - log_m).sum(-1)
            kd_chunk = beta * kl_p_m + (1 - beta) * kl_aux
        valid = torch.ones(stop - start, dtype=torch.bool, device=device)
        y = None
        ce_chunk = torch.zeros_like(kd_chunk)
        if labels is not None:
            y = labels[start:stop]
            valid = y != params.ignore_index
            if params.has_labels:
                safe = torch.where(valid & (y >= 0) & (y < vocab), y, torch.zeros_like(y))
                picked = s.gather(1, safe.unsqueeze(1)).squeeze(1)
                ce_chunk = lse_s - picked
        if limit is not None:
            valid = valid & (limit > 0)  # a row with no visible column is ignored
        row_flags = _row_flags(s_raw, t_raw, n_raw, y, valid, params, limit)
        bad = row_flags != 0
        nan = torch.full((), float("nan"), dtype=dtype, device=device)
        zero = torch.zeros((), dtype=dtype, device=device)
        kd[start:stop] = torch.where(bad, nan, torch.where(valid, kd_chunk, zero))
        ce[start:stop] = torch.where(bad, nan, torch.where(valid, ce_chunk, zero))
        chunk_stats = torch.stack([lse_a, lse_b, lse_s, kl_aux, zmax], dim=1)
        stats[start:stop] = torch.where(bad.unsqueeze(1), nan, chunk_stats)
        flags[start:stop] = row_flags
    return kd, ce, stats, flags


def backward_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    coef_kd: torch.Tensor,
    coef_ce: torch.Tensor,
    params: RowParams,
    grad: torch.Tensor,
    *,
    alpha_rows: torch.Tensor | None = None,
    col_limit: torch.Tensor | None = None,
) -> None:
    vocab = params.vocab_size
    dtype = _compute_dtype(student.data, teacher.data)
    divergence = params.divergence
    negative = negative if params.has_negative else None
    capped = params.student_softcap is not None
    for start, stop in student.chunks(_rows_per_chunk(vocab)):
        s_raw, t_raw, n_raw = _chunk(student, teacher, negative, start, stop, vocab)
        limit, visible = _limits(col_limit, start, stop, vocab, s_raw.device)
        s_raw, t_raw, n_raw = _hide(s_raw, visible), _hide(t_raw, visible), _hide(n_raw, visible)
        s = transform(s_raw.to(dtype), params.student_scale, params.student_softcap)
        lse_a, lse_b, lse_s, kl_aux = (stats[start:stop, i].to(dtype).unsqueeze(1) for i in range(4))
        a, _ = _teacher_terms(t_raw, n_raw, _alpha(alpha_rows, params, start, stop, dtype), params, dtype)
        log_p = a - lse_a
        log_q = s * params.inv_temperature - lse_b
        q = log_q.exp()
        zero = torch.zeros((), dtype=dtype, device=s.device)
        if divergence == "forward":
            d_kd = q - log_p.exp()
        elif divergence == "reverse":
            # q = 0 (a token both student and teacher mask) adds nothing: never 0 * (-inf - -inf)
            d_kd = torch.where(q > 0, q * (log_q - log_p - kl_aux), zero)
        else:
            beta = params.beta
            log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=dtype)),
                                    log_q + torch.log(torch.tensor(1 - beta, dtype=dtype)))
            d_kd = torch.where(q > 0, (1 - beta) * q * (log_q - log_m - kl_aux), zero)
        c_kd = coef_kd[start:stop].to(dtype).unsqueeze(1)
        # rows with a zero coefficient (ignored rows) get exactly 0, even where d_kd is not finite
        g = torch.where(c_kd != 0, c_kd * params.inv_temperature * d_kd, zero)
        valid = torch.ones(stop - start, 1, dtype=torch.bool, device=s.device)
        if labels is not None:
            y = labels[start:stop]
            valid = (y != params.ignore_index).unsqueeze(1)
            if params.has_labels:
                c_ce = coef_ce[start:stop].to(dtype).unsqueeze(1)
                d_ce = (s - lse_s).exp()
                in_range = valid.squeeze(1) & (y >= 0) & (y < (vocab if limit is None else limit))
                d_ce.scatter_add_(1, torch.where(in_range, y, torch.zeros_like(y)).unsqueeze(1),
                                  -in_range.to(dtype).unsqueeze(1))
                g = g + torch.where(c_ce != 0, c_ce * d_ce, zero)
        g = _chain_student(g, s, params, capped)
        if visible is not None:
            valid = valid & visible  # hidden columns (and rows with no visible column) get exactly 0
        grad[start:stop] = torch.where(valid, g, zero).to(grad.dtype)


def _chain_student(g: torch.Tensor, s: torch.Tensor, params: RowParams, capped: bool) -> torch.Tensor:
    """From ``d/ds'`` to ``d/d(raw student)`` through ``s' = cap tanh(scale x / cap)``."""
    if capped:
        factor = params.student_scale * (1 - (s / params.student_softcap) ** 2)
        return torch.where(torch.isneginf(s), torch.zeros_like(g), g * factor)
    if params.student_scale != 1.0:
        return g * params.student_scale
    return g
