"""Triton row kernels (see ``caad_kernels.backends`` for the contract).

One program handles one row and walks the vocabulary in ``BLOCK_V`` tiles, keeping only float32
scalars per row: nothing of size ``[rows x V]`` is ever allocated besides the student gradient.

Per row, with ``a = z_hat / tau`` (cut-off and ``z_pos = -inf`` tokens at ``-inf``) and
``b = s / tau``, the forward kernel runs these sweeps over the vocabulary:

0. only with the plausibility cutoff: ``zmax = max(z_pos)`` over the student's vocabulary;
1. the main sweep, always: online logsumexp of ``a``, of ``b`` and of ``s`` (temperature 1, for
   the CE; shared with ``b`` when ``tau == 1``), plus, for forward KL,
   ``W = sum_v exp(a_v - m_a) ((a_v - m_a) - (b_v - m_b))`` under running maxima
   ``m_a, m_b``. When a tile moves the maxima to ``(m_a', m_b')`` with ``da = m_a - m_a'`` and
   ``db = m_b - m_b'``, ``W' = exp(da) (W + S_a (da - db))`` before the tile's own terms are
   added, and at the end ``KL(p||q) = W / S_a - log S_a + log S_b``. Reverse KL is the same
   recurrence with the roles of ``a`` and ``b`` swapped, so both take one sweep;
2. only for the mixture (``0 < beta < 1``): ``KL(p||m)`` and ``KL(q||m)`` in the log domain,
   which need ``lse_a`` and ``lse_b`` from sweep 1.

The label's logit ``s[y]`` is loaded directly. With ``WRITE_GRAD`` (``loss_and_grad_rows``, for
callers that know the coefficients before the loss, such as the fused-linear op) the same launch
ends with the gradient sweep; ``backward_rows`` runs that sweep alone from the saved statistics.
The gradient sweep loads a tile of ``s``/``z_pos``/``z_neg`` and stores the same tile of ``grad``
and never reads a tile of its own row again, so ``grad`` may alias the student logits.

Terms whose weight is zero (``p = 0`` in ``KL(p||.)``, ``q = 0`` in ``KL(q||.)``) are dropped with
``tl.where`` before any ``0 * inf`` can form, and ignored rows are zeroed with ``tl.where``, never
by multiplying by 0, so no NaN leaks from them.

Dtypes: float16, bfloat16 and float32 inputs are read as they are and every quantity is computed
in float32. float64 inputs are accepted and also computed in float32 (``backend="auto"`` sends
float64 to the torch backend, which keeps float64); the gradient is stored in the student's dtype.

Launch configuration: on CUDA the tile grows with the vocabulary up to 4096 columns (16 warps);
under ``TRITON_INTERPRET=1`` tiles are at most 128 columns so the tests stay fast. Every entry
point takes an optional ``block_v`` (a power of two) to override the choice.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from caad_kernels.options import RowParams
from caad_kernels.rows import RowView

_DIVERGENCE_CODE = {"forward": 0, "reverse": 1, "mixture": 2}
_STATS_COLUMNS = 5
_MIN_BLOCK_V = 16
_INTERPRET_MAX_BLOCK_V = 128


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_function(fn: Callable) -> Callable:
    """``triton.jit`` for a helper called from the kernels; the plain function under the interpreter.

    The interpreter re-patches ``triton.language`` on every call of a nested jit function (about
    1 ms, per tile here), which made up half of the test time; a plain function runs the same
    code with the patched language of the enclosing kernel.
    """
    return fn if _interpreting() else triton.jit(fn)


@_device_function
def _row_offset(row, T, stride_b, stride_t):
    """Element offset of row ``row`` (int64) in a ``[B, T, V]`` view with these strides."""
    b_idx = row // T
    return b_idx * stride_b + (row - b_idx * T) * stride_t


@_device_function
def _load_tile(
    s_ptr,
    t_ptr,
    n_ptr,
    s_off,
    t_off,
    n_off,
    cols,
    mask,
    one_plus_alpha,
    alpha,
    inv_tau,
    threshold,
    HAS_NEGATIVE: tl.constexpr,
    HAS_CUTOFF: tl.constexpr,
):
    """One tile of ``s`` and ``a = z_hat / tau`` in float32; masked columns are ``-inf`` in both."""
    s = tl.load(s_ptr + s_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
    z_pos = tl.load(t_ptr + t_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_NEGATIVE:
        z_neg = tl.load(n_ptr + n_off + cols, mask=mask, other=0.0).to(tl.float32)
        # z_pos = -inf stays -inf whatever z_neg is (no inf - inf)
        z_hat = tl.where(z_pos == float("-inf"), z_pos, one_plus_alpha * z_pos - alpha * z_neg)
    else:
        z_hat = z_pos
    if HAS_CUTOFF:
        z_hat = tl.where(z_pos >= threshold, z_hat, float("-inf"))
    return s, z_hat * inv_tau


@_device_function
def _log_mixture(log_p, log_q, log_beta, log_one_minus_beta):
    """``log m = logaddexp(log beta + log p, log(1 - beta) + log q)``, ``-inf`` when both are."""
    x = log_beta + log_p
    y = log_one_minus_beta + log_q
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi_safe)))


@_device_function
def _grad_sweep(
    s_ptr,
    t_ptr,
    n_ptr,
    grad_ptr,
    s_off,
    t_off,
    n_off,
    g_off,
    V,
    y,
    valid,
    m_a,
    log_sum_a,
    m_b,
    log_sum_b,
    m_s,
    log_sum_s,
    kl_aux,
    c_kd,
    c_ce,
    one_plus_alpha,
    alpha,
    inv_tau,
    threshold,
    beta,
    log_beta,
    log_one_minus_beta,
    HAS_NEGATIVE: tl.constexpr,
    HAS_CUTOFF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``grad = c_kd * dkd/ds + c_ce * dce/ds`` for one row: load a tile, store the same tile.

    The logsumexps come split as ``lse = m + log_sum``: ``log p = (a - m_a) - log_sum_a`` keeps
    the precision of a shifted log-softmax when the logits are large (``a - lse_a`` would lose
    ``ulp(lse_a)``). ``backward_rows`` only has ``lse`` and passes ``(lse, 0)``.
    """
    kd_on = c_kd != 0.0
    ce_on = c_ce != 0.0
    c_kd_tau = c_kd * inv_tau
    m_a = tl.where(m_a == float("-inf"), 0.0, m_a)
    m_b = tl.where(m_b == float("-inf"), 0.0, m_b)
    m_s = tl.where(m_s == float("-inf"), 0.0, m_s)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        s, a = _load_tile(
            s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, cols, mask,
            one_plus_alpha, alpha, inv_tau, threshold, HAS_NEGATIVE, HAS_CUTOFF,
        )  # fmt: skip
        log_q = (s * inv_tau - m_b) - log_sum_b
        q = tl.exp(log_q)
        log_p = (a - m_a) - log_sum_a
        if DIVERGENCE == 0:
            d_kd = q - tl.exp(log_p)
        elif DIVERGENCE == 1:
            d_kd = tl.where(q > 0.0, q * (log_q - log_p - kl_aux), 0.0)
        else:
            log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
            d_kd = tl.where(q > 0.0, (1.0 - beta) * q * (log_q - log_m - kl_aux), 0.0)
        g = tl.where(kd_on, c_kd_tau * d_kd, 0.0)
        if HAS_LABELS:
            d_ce = tl.exp((s - m_s) - log_sum_s) - tl.where((cols == y) & valid, 1.0, 0.0)
            g += tl.where(ce_on, c_ce * d_ce, 0.0)
        tl.store(grad_ptr + g_off + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    s_ptr,
    t_ptr,
    n_ptr,
    labels_ptr,
    kd_ptr,
    ce_ptr,
    stats_ptr,
    coef_kd_ptr,
    coef_ce_ptr,
    grad_ptr,
    V,
    s_T,
    s_stride_b,
    s_stride_t,
    t_T,
    t_stride_b,
    t_stride_t,
    n_T,
    n_stride_b,
    n_stride_t,
    g_stride,
    one_plus_alpha,
    alpha,
    inv_tau,
    log_plausibility,
    beta,
    log_beta,
    log_one_minus_beta,
    ignore_index,
    HAS_NEGATIVE: tl.constexpr,
    HAS_CUTOFF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    TAU_IS_ONE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """kd, ce and stats of one row (program ``r`` = row ``r``); the gradient too with ``WRITE_GRAD``."""
    row = tl.program_id(0).to(tl.int64)
    s_off = _row_offset(row, s_T, s_stride_b, s_stride_t)
    t_off = _row_offset(row, t_T, t_stride_b, t_stride_t)
    n_off = _row_offset(row, n_T, n_stride_b, n_stride_t)
    lanes = tl.arange(0, BLOCK_V)

    # sweep 0: zmax = max(z_pos) for the plausibility cutoff
    if HAS_CUTOFF:
        zmax_lanes = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            z_pos = tl.load(t_ptr + t_off + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            zmax_lanes = tl.maximum(zmax_lanes, z_pos)
        zmax = tl.max(zmax_lanes, axis=0)
        threshold = zmax + log_plausibility
    else:
        zmax = 0.0
        threshold = 0.0

    # sweep 1: online logsumexp of a, b, s and the one-sweep KL accumulator W
    m_a = float("-inf")
    m_b = float("-inf")
    m_s = float("-inf")
    sum_a = 0.0
    sum_b = 0.0
    sum_s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        s, a = _load_tile(
            s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, cols, mask,
            one_plus_alpha, alpha, inv_tau, threshold, HAS_NEGATIVE, HAS_CUTOFF,
        )  # fmt: skip
        b = s * inv_tau
        tile_max_s = tl.max(s, axis=0)
        new_m_a = tl.maximum(m_a, tl.max(a, axis=0))
        # max(s) * inv_tau == max(s * inv_tau) exactly: rounding is monotone
        new_m_b = tl.maximum(m_b, tile_max_s * inv_tau)
        # shifts of the old sums; 0 while the old maximum is -inf (the old sums are then 0)
        da = tl.where(m_a == float("-inf"), 0.0, m_a - new_m_a)
        db = tl.where(m_b == float("-inf"), 0.0, m_b - new_m_b)
        shift_a = tl.where(new_m_a == float("-inf"), 0.0, new_m_a)
        shift_b = tl.where(new_m_b == float("-inf"), 0.0, new_m_b)
        e_a = tl.exp(a - shift_a)
        e_b = tl.exp(b - shift_b)
        if DIVERGENCE == 0:
            terms = tl.where(e_a > 0.0, e_a * ((a - shift_a) - (b - shift_b)), 0.0)
            w_new = tl.exp(da) * (w + sum_a * (da - db)) + tl.sum(terms, axis=0)
            # an infinite KL stays infinite (exp(da) may underflow to 0: no 0 * inf)
            w = tl.where(w == float("inf"), w, w_new)
        elif DIVERGENCE == 1:
            terms = tl.where(e_b > 0.0, e_b * ((b - shift_b) - (a - shift_a)), 0.0)
            w_new = tl.exp(db) * (w + sum_b * (db - da)) + tl.sum(terms, axis=0)
            w = tl.where(w == float("inf"), w, w_new)
        sum_a = sum_a * tl.exp(da) + tl.sum(e_a, axis=0)
        sum_b = sum_b * tl.exp(db) + tl.sum(e_b, axis=0)
        m_a = new_m_a
        m_b = new_m_b
        if not TAU_IS_ONE:
            new_m_s = tl.maximum(m_s, tile_max_s)
            ds = tl.where(m_s == float("-inf"), 0.0, m_s - new_m_s)
            shift_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
            sum_s = sum_s * tl.exp(ds) + tl.sum(tl.exp(s - shift_s), axis=0)
            m_s = new_m_s

    log_sum_a = tl.log(sum_a)
    log_sum_b = tl.log(sum_b)
    lse_a = m_a + log_sum_a
    lse_b = m_b + log_sum_b
    if TAU_IS_ONE:
        m_s = m_b
        log_sum_s = log_sum_b
    else:
        log_sum_s = tl.log(sum_s)
    lse_s = m_s + log_sum_s
    base_a = tl.where(m_a == float("-inf"), 0.0, m_a)
    base_b = tl.where(m_b == float("-inf"), 0.0, m_b)

    if DIVERGENCE == 0:
        kd = w / sum_a - log_sum_a + log_sum_b
        kl_aux = 0.0
    elif DIVERGENCE == 1:
        kd = w / sum_b - log_sum_b + log_sum_a
        kl_aux = kd
    else:
        # sweep 2: the mixture needs the normalised log-probabilities
        kl_pm_lanes = tl.zeros([BLOCK_V], tl.float32)
        kl_qm_lanes = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            mask = cols < V
            s, a = _load_tile(
                s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, cols, mask,
                one_plus_alpha, alpha, inv_tau, threshold, HAS_NEGATIVE, HAS_CUTOFF,
            )  # fmt: skip
            log_p = (a - base_a) - log_sum_a
            log_q = (s * inv_tau - base_b) - log_sum_b
            log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            kl_pm_lanes += tl.where(p > 0.0, p * (log_p - log_m), 0.0)
            kl_qm_lanes += tl.where(q > 0.0, q * (log_q - log_m), 0.0)
        kl_aux = tl.sum(kl_qm_lanes, axis=0)
        kd = beta * tl.sum(kl_pm_lanes, axis=0) + (1.0 - beta) * kl_aux

    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        in_range = valid & (y >= 0) & (y < V)
        s_y = tl.load(s_ptr + s_off + tl.where(in_range, y, 0), mask=in_range, other=0.0).to(tl.float32)
        kd = tl.where(valid, kd, 0.0)
        ce = tl.where(valid, (m_s - s_y) + log_sum_s, 0.0)
    else:
        y = -1
        valid = True
        ce = 0.0

    tl.store(kd_ptr + row, kd)
    tl.store(ce_ptr + row, ce)
    stats_row = stats_ptr + row * 5
    tl.store(stats_row + 0, lse_a)
    tl.store(stats_row + 1, lse_b)
    tl.store(stats_row + 2, lse_s)
    tl.store(stats_row + 3, kl_aux)
    tl.store(stats_row + 4, zmax)

    if WRITE_GRAD:
        c_kd = tl.load(coef_kd_ptr + row)
        if HAS_LABELS:
            c_ce = tl.load(coef_ce_ptr + row)
        else:
            c_ce = 0.0
        _grad_sweep(
            s_ptr, t_ptr, n_ptr, grad_ptr, s_off, t_off, n_off, row * g_stride, V, y, valid,
            m_a, log_sum_a, m_b, log_sum_b, m_s, log_sum_s, kl_aux, c_kd, c_ce,
            one_plus_alpha, alpha, inv_tau, threshold,
            beta, log_beta, log_one_minus_beta, HAS_NEGATIVE, HAS_CUTOFF, HAS_LABELS, DIVERGENCE, BLOCK_V,
        )  # fmt: skip


@triton.jit
def _backward_kernel(
    s_ptr,
    t_ptr,
    n_ptr,
    labels_ptr,
    stats_ptr,
    coef_kd_ptr,
    coef_ce_ptr,
    grad_ptr,
    V,
    s_T,
    s_stride_b,
    s_stride_t,
    t_T,
    t_stride_b,
    t_stride_t,
    n_T,
    n_stride_b,
    n_stride_t,
    g_stride,
    one_plus_alpha,
    alpha,
    inv_tau,
    log_plausibility,
    beta,
    log_beta,
    log_one_minus_beta,
    ignore_index,
    HAS_NEGATIVE: tl.constexpr,
    HAS_CUTOFF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The gradient of one row from its saved statistics: a single sweep over the vocabulary."""
    row = tl.program_id(0).to(tl.int64)
    s_off = _row_offset(row, s_T, s_stride_b, s_stride_t)
    t_off = _row_offset(row, t_T, t_stride_b, t_stride_t)
    n_off = _row_offset(row, n_T, n_stride_b, n_stride_t)
    stats_row = stats_ptr + row * 5
    lse_a = tl.load(stats_row + 0)
    lse_b = tl.load(stats_row + 1)
    lse_s = tl.load(stats_row + 2)
    kl_aux = tl.load(stats_row + 3)
    threshold = tl.load(stats_row + 4) + log_plausibility
    c_kd = tl.load(coef_kd_ptr + row)
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        c_ce = tl.load(coef_ce_ptr + row)
    else:
        y = -1
        valid = True
        c_ce = 0.0
    _grad_sweep(
        s_ptr, t_ptr, n_ptr, grad_ptr, s_off, t_off, n_off, row * g_stride, V, y, valid,
        lse_a, 0.0, lse_b, 0.0, lse_s, 0.0, kl_aux, c_kd, c_ce, one_plus_alpha, alpha, inv_tau, threshold,
        beta, log_beta, log_one_minus_beta, HAS_NEGATIVE, HAS_CUTOFF, HAS_LABELS, DIVERGENCE, BLOCK_V,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def launch_config(vocab: int, device: torch.device, block_v: int | None = None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab`` columns on ``device``.

    On CUDA: tiles of up to 4096 columns, 4 warps up to 1024 columns, 8 up to 2048, 16 above
    (8 values per thread and tensor). Under the interpreter: at most 128 columns.
    """
    if block_v is not None:
        if block_v < 1 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two, got {block_v}")
        tile = block_v
    else:
        cap = 4096 if device.type == "cuda" and not _interpreting() else _INTERPRET_MAX_BLOCK_V
        tile = min(cap, max(_MIN_BLOCK_V, triton.next_power_of_2(max(vocab, 1))))
    num_warps = 4 if tile <= 1024 else 8 if tile <= 2048 else 16
    return tile, num_warps


def _check_device(student: RowView) -> None:
    device = student.data.device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
            f"got tensors on {device}"
        )


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' own GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _common_args(
    student: RowView, teacher: RowView, negative: RowView | None, params: RowParams
) -> tuple[list[object], dict[str, object]]:
    """Shape, stride and scalar arguments shared by both kernels, and their constexpr flags."""
    if teacher.rows != student.rows or (negative is not None and negative.rows != student.rows):
        raise ValueError("student, teacher and negative must have the same number of rows")
    if teacher.width < params.vocab_size or student.width != params.vocab_size:
        raise ValueError(
            f"student width {student.width} and teacher width {teacher.width} do not fit the vocabulary "
            f"size {params.vocab_size}"
        )
    if params.has_negative and negative is None:
        raise ValueError("params.has_negative is True but no negative logits were given")
    has_negative = params.has_negative
    neg = negative if has_negative else teacher
    beta = params.beta
    divergence = params.divergence
    log_beta = math.log(beta) if divergence == "mixture" else 0.0
    log_one_minus_beta = math.log1p(-beta) if divergence == "mixture" else 0.0
    # each view keeps its own [B, T] folding (as_rows may fold a contiguous teacher into one
    # row dimension but not a sliced student): rows are located per tensor
    args: list[object] = [
        params.vocab_size,
        student.seq,
        student.stride_b,
        student.stride_t,
        teacher.seq,
        teacher.stride_b,
        teacher.stride_t,
        neg.seq,
        neg.stride_b,
        neg.stride_t,
    ]
    scalars: list[object] = [
        1.0 + params.alpha,
        params.alpha,
        params.inv_temperature,
        params.log_plausibility if params.log_plausibility is not None else 0.0,
        beta,
        log_beta,
        log_one_minus_beta,
        params.ignore_index,
    ]
    flags = dict(
        HAS_NEGATIVE=has_negative,
        HAS_CUTOFF=params.log_plausibility is not None,
        HAS_LABELS=params.has_labels,
        DIVERGENCE=_DIVERGENCE_CODE[divergence],
    )
    return args + scalars, flags


def _row_vector(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    return values.to(device=device, dtype=torch.float32).contiguous()


def _check_grad(grad: torch.Tensor, rows: int, vocab: int) -> None:
    if tuple(grad.shape) != (rows, vocab) or (vocab > 1 and grad.stride(1) != 1):
        raise ValueError(f"grad must be a [rows, V] = [{rows}, {vocab}] tensor with unit column stride")


def _run_forward(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    params: RowParams,
    coef_kd: torch.Tensor | None,
    coef_ce: torch.Tensor | None,
    grad: torch.Tensor | None,
    block_v: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(student)
    rows, vocab = student.rows, params.vocab_size
    device = student.data.device
    kd = torch.zeros(rows, dtype=torch.float32, device=device)
    ce = torch.zeros(rows, dtype=torch.float32, device=device)
    stats = torch.zeros(rows, _STATS_COLUMNS, dtype=torch.float32, device=device)
    if rows == 0:
        return kd, ce, stats
    args, flags = _common_args(student, teacher, negative, params)
    write_grad = grad is not None
    if write_grad:
        _check_grad(grad, rows, vocab)
        coef_kd = _row_vector(coef_kd, device)
        coef_ce = _row_vector(coef_ce, device) if params.has_labels else coef_kd
    tile, num_warps = launch_config(vocab, device, block_v)
    labels_arg = labels.to(torch.int64).contiguous() if params.has_labels else kd
    neg_data = negative.data if flags["HAS_NEGATIVE"] else teacher.data
    with _device_guard(device):
        _forward_kernel[(rows,)](
            student.data,
            teacher.data,
            neg_data,
            labels_arg,
            kd,
            ce,
            stats,
            coef_kd if write_grad else kd,
            coef_ce if write_grad else kd,
            grad if write_grad else kd,
            *args[:10],
            grad.stride(0) if write_grad else 0,
            *args[10:],
            **flags,
            TAU_IS_ONE=params.inv_temperature == 1.0,
            WRITE_GRAD=write_grad,
            BLOCK_V=tile,
            num_warps=num_warps,
        )
    return kd, ce, stats


def forward_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    params: RowParams,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row divergence, CE and statistics.

    Args:
        student, teacher, negative: ``[B, T, V]`` / ``[B, T, V_t]`` row views (fp16, bf16, fp32;
            fp64 is computed in fp32), ``negative`` may be ``None``.
        labels: contiguous int64 ``[rows]`` or ``None`` when ``params.has_labels`` is False.
        params: the row parameters.
        block_v: optional tile width (a power of two) instead of the automatic choice.

    Returns:
        ``(kd, ce, stats)``: float32 ``[rows]``, ``[rows]``, ``[rows, 5]`` as in the contract.
    """
    return _run_forward(student, teacher, negative, labels, params, None, None, None, block_v)


def loss_and_grad_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    coef_kd: torch.Tensor,
    coef_ce: torch.Tensor,
    params: RowParams,
    grad: torch.Tensor,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_rows` and :func:`backward_rows` in one launch, for coefficients known in advance.

    ``coef_kd``/``coef_ce`` are float32 ``[rows]`` (as for ``backward_rows``); ``grad`` is a
    ``[rows, V]`` tensor with unit column stride in the student's dtype, and may alias the student
    logits: every row is read in full before its gradient sweep, which reads each tile before
    overwriting it. Returns ``(kd, ce, stats)`` exactly as :func:`forward_rows`.
    """
    return _run_forward(student, teacher, negative, labels, params, coef_kd, coef_ce, grad, block_v)


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
    block_v: int | None = None,
) -> None:
    """Write ``grad[i, v] = coef_kd[i] * dkd_i/ds_iv + coef_ce[i] * dce_i/ds_iv``.

    Args:
        student, teacher, negative, labels, params: as for :func:`forward_rows`.
        stats: float32 ``[rows, 5]`` from :func:`forward_rows` (of any backend).
        coef_kd, coef_ce: float32 ``[rows]``, zero on ignored rows.
        grad: ``[rows, V]`` with unit column stride in the student's dtype; may alias the student.
        block_v: optional tile width (a power of two).
    """
    _check_device(student)
    rows, vocab = student.rows, params.vocab_size
    if rows == 0:
        return
    _check_grad(grad, rows, vocab)
    device = student.data.device
    args, flags = _common_args(student, teacher, negative, params)
    stats = stats.to(device=device, dtype=torch.float32).contiguous()
    coef_kd = _row_vector(coef_kd, device)
    coef_ce = _row_vector(coef_ce, device) if params.has_labels else coef_kd
    labels_arg = labels.to(torch.int64).contiguous() if params.has_labels else coef_kd
    tile, num_warps = launch_config(vocab, device, block_v)
    neg_data = negative.data if flags["HAS_NEGATIVE"] else teacher.data
    with _device_guard(device):
        _backward_kernel[(rows,)](
            student.data,
            teacher.data,
            neg_data,
            labels_arg,
            stats,
            coef_kd,
            coef_ce,
            grad,
            *args[:10],
            grad.stride(0),
            *args[10:],
            **flags,
            BLOCK_V=tile,
            num_warps=num_warps,
        )
