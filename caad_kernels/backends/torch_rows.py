"""Chunked pure-PyTorch row kernels (see ``caad_kernels.backends`` for the contract).

Rows are processed in chunks of at most ``CHUNK_ELEMENTS / V`` rows, so the float32 temporaries
are bounded by a constant (``CHUNK_ELEMENTS`` elements, a few of them at once) whatever the number
of rows: O(rows) extra memory besides the student gradient.
"""

from __future__ import annotations

import torch

from caad_kernels.options import RowParams
from caad_kernels.rows import RowView

CHUNK_ELEMENTS = 1 << 21  # 2M elements: 8 MiB per float32 temporary


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _teacher_terms(
    teacher: torch.Tensor, negative: torch.Tensor | None, params: RowParams, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(a, zmax)``: ``a = z_hat / tau`` with cut-off tokens at ``-inf``; ``zmax`` per row."""
    z_pos = teacher.to(dtype)
    if params.has_negative:
        z_hat = (1 + params.alpha) * z_pos - params.alpha * negative.to(dtype)
        z_hat = torch.where(torch.isneginf(z_pos), z_pos, z_hat)
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


def forward_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    params: RowParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = student.rows, params.vocab_size
    device = student.data.device
    dtype = _compute_dtype(student.data, teacher.data)
    kd = torch.zeros(rows, dtype=dtype, device=device)
    ce = torch.zeros(rows, dtype=dtype, device=device)
    stats = torch.zeros(rows, 5, dtype=dtype, device=device)
    divergence = params.divergence
    for start, stop in student.chunks(_rows_per_chunk(vocab)):
        s_raw, z_pos, z_neg = _chunk(student, teacher, negative if params.has_negative else None, start, stop, vocab)
        s = s_raw.to(dtype)
        a, zmax = _teacher_terms(z_pos, z_neg, params, dtype)
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
        if labels is not None:
            y = labels[start:stop]
            valid = y != params.ignore_index
            picked = s.gather(1, torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)).squeeze(1)
            ce[start:stop] = torch.where(valid, lse_s - picked, torch.zeros_like(picked))
            kd_chunk = torch.where(valid, kd_chunk, torch.zeros_like(kd_chunk))
        kd[start:stop] = kd_chunk
        stats[start:stop] = torch.stack([lse_a, lse_b, lse_s, kl_aux, zmax], dim=1)
    return kd, ce, stats


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
) -> None:
    vocab = params.vocab_size
    dtype = _compute_dtype(student.data, teacher.data)
    divergence = params.divergence
    for start, stop in student.chunks(_rows_per_chunk(vocab)):
        s_raw, z_pos, z_neg = _chunk(student, teacher, negative if params.has_negative else None, start, stop, vocab)
        s = s_raw.to(dtype)
        lse_a, lse_b, lse_s, kl_aux = (stats[start:stop, i].to(dtype).unsqueeze(1) for i in range(4))
        a, _ = _teacher_terms(z_pos, z_neg, params, dtype)
        log_p = a - lse_a
        log_q = s * params.inv_temperature - lse_b
        q = log_q.exp()
        if divergence == "forward":
            d_kd = q - log_p.exp()
        elif divergence == "reverse":
            d_kd = q * (log_q - log_p - kl_aux)
        else:
            beta = params.beta
            log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=dtype)),
                                    log_q + torch.log(torch.tensor(1 - beta, dtype=dtype)))
            d_kd = (1 - beta) * q * (log_q - log_m - kl_aux)
        c_kd = coef_kd[start:stop].to(dtype).unsqueeze(1)
        # rows with a zero coefficient (ignored rows) get exactly 0, even where d_kd is not finite
        g = torch.where(c_kd != 0, c_kd * params.inv_temperature * d_kd, torch.zeros_like(d_kd))
        if labels is not None:
            y = labels[start:stop]
            valid = y != params.ignore_index
            c_ce = coef_ce[start:stop].to(dtype).unsqueeze(1)
            d_ce = (s - lse_s).exp()
            d_ce.scatter_add_(1, torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1),
                              -valid.to(dtype).unsqueeze(1))
            g = g + c_ce * d_ce
        grad[start:stop] = g.to(grad.dtype)
