"""Triton row kernels (see ``caad_kernels.backends`` for the contract).

One program handles one row and walks the vocabulary in ``BLOCK_V`` tiles, keeping only float32
scalars per row: nothing of size ``[rows x V]`` is ever allocated besides the student gradient.

Per row, with ``s`` the student's and ``z`` each teacher path's logits after their scale and softcap,
``a = z_hat / tau`` (cut-off and ``z_pos = -inf`` tokens at ``-inf``) and ``b = s / tau``, the
forward kernel runs these sweeps over the vocabulary:

0. only with the plausibility cutoff: ``zmax = max(z_pos)`` over the student's vocabulary (the max
   of the raw logits, transformed: the transforms are monotone);
1. the main sweep, always: online logsumexp of ``a``, of ``b`` and of ``s`` (temperature 1, for
   the CE; shared with ``b`` when ``tau == 1``), plus, for forward KL,
   ``W = sum_v exp(a_v - m_a) ((a_v - m_a) - (b_v - m_b))`` under running maxima
   ``m_a, m_b``. When a tile moves the maxima to ``(m_a', m_b')`` with ``da = m_a - m_a'`` and
   ``db = m_b - m_b'``, ``W' = exp(da) (W + S_a (da - db))`` before the tile's own terms are
   added, and at the end ``KL(p||q) = W / S_a - log S_a + log S_b``. Reverse KL is the same
   recurrence with the roles of ``a`` and ``b`` swapped, so both take one sweep. The same sweep
   screens the raw tiles for the row flags (NaN/``+inf``; ``-inf`` in ``z_neg`` where ``z_pos`` is
   finite): no separate validation pass;
2. only for the mixture (``0 < beta < 1``): ``KL(p||m)`` and ``KL(q||m)`` in the log domain,
   which need ``lse_a`` and ``lse_b`` from sweep 1.

The label's logit ``s[y]`` is loaded directly (a label outside ``[0, V)`` is flagged, never read).
With ``WRITE_GRAD`` (``loss_and_grad_rows``, for callers that know the coefficients before the
loss, such as the fused-linear op) the same launch ends with the gradient sweep; ``backward_rows``
runs that sweep alone from the saved statistics. The gradient sweep loads a tile of
``s``/``z_pos``/``z_neg`` and stores the same tile of ``grad`` and never reads a tile of its own
row again, so ``grad`` may alias the student logits.

Ignored rows (label ``ignore_index``) exit early: every sweep's trip count is 0 for them (nothing
is read); the gradient launch only stores their zeros. Full tiles are loaded without a mask and
the last partial tile with one, so when the row strides are multiples of 16 elements (the
fused-linear op pads its chunk buffers so) the loads are vectorised whatever ``V`` is (32001,
50257 ...); tensors whose strides are not multiples of 16 fall back to narrower loads.

Terms whose weight is zero (``p = 0`` in ``KL(p||.)``, ``q = 0`` in ``KL(q||.)``) are dropped with
``tl.where`` before any ``0 * inf`` can form, and ignored rows are zeroed with ``tl.where``, never
by multiplying by 0, so no NaN leaks from them. A flagged row gets NaN loss, statistics and
gradient, like every backend.

Dtypes: float16, bfloat16 and float32 inputs are read as they are and every quantity is computed
in float32. float64 inputs are accepted and also computed in float32 (``backend="auto"`` sends
float64 to the torch backend, which keeps float64); the gradient is stored in the student's dtype,
rounded to nearest even when compiled (Triton's default). The CPU interpreter truncates float32 to
bfloat16 instead (an interpreter limitation, up to one bf16 ulp), which is why the interpreted bf16
gradients are compared with a tolerance of a few bf16 ulps.

Launch configuration (:func:`launch_config`): on CUDA the tile grows with the vocabulary up to
4096 columns for 2-byte inputs and 2048 for 4-byte ones (4 warps up to 1024 columns, 8 up to
2048, 16 above: about one 16-byte vector per thread and tensor); a starting point for the tuning
that ``bench/`` does on a GPU. Under ``TRITON_INTERPRET=1`` the automatic tile is at most 128
columns so the tests stay fast; every entry point takes ``block_v`` (a power of two) to force
another, e.g. the production 4096.
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
def _row_columns(row, labels_ptr, limit_ptr, V, ignore_index, HAS_LABELS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """``(y, valid, n_cols)`` of row ``row``: its label (-1 without labels), whether it counts, and how many
    columns its sweeps read.

    A row reads columns ``[0, V_row)``, ``V_row`` its column limit clamped to ``[0, V]`` (``V`` without
    limits). It is ignored when its label is ``ignore_index`` or it has no column; an ignored row gets
    ``n_cols = 0``, so it is never read: every sweep over it has zero trips.
    """
    if HAS_LIMIT:
        V_row = tl.minimum(tl.maximum(tl.load(limit_ptr + row), 0), V)
    else:
        V_row = V
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
    else:
        y = -1
        valid = True
    if HAS_LIMIT:
        valid = valid & (V_row > 0)
    if HAS_LABELS or HAS_LIMIT:
        n_cols = tl.where(valid, V_row, 0)
    else:
        n_cols = V
    return y, valid, n_cols


@_device_function
def _softcap(x, scale, cap, HAS_CAP: tl.constexpr):
    """``cap * tanh(scale * x / cap)`` (``scale * x`` without a cap); ``-inf`` stays ``-inf``.

    ``tanh(y) = sign(y) (1 - e) / (1 + e)`` with ``e = exp(-2|y|)``: exact at the saturation, about
    1e-7 absolute near 0 (the C++ kernels use the same formula).
    """
    xs = x * scale
    if HAS_CAP:
        y = xs / cap
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(y < 0.0, -t, t)
        xs = tl.where(xs == float("-inf"), xs, cap * t)
    return xs


@_device_function
def _load_tile(
    s_ptr,
    t_ptr,
    n_ptr,
    s_off,
    t_off,
    n_off,
    cols,
    V,
    alpha,
    inv_tau,
    threshold,
    s_scale,
    t_scale,
    s_cap,
    t_cap,
    MASKED: tl.constexpr,
    HAS_NEGATIVE: tl.constexpr,
    HAS_CUTOFF: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
):
    """One tile: ``(s, a, bad)`` with ``s`` the transformed student, ``a = z_hat / tau`` (float32),
    ``bad`` the int32 flag bits of each raw lane. ``MASKED``: the last, partial tile (masked columns
    are ``-inf`` in ``s`` and ``a``); full tiles load without a mask (vectorised)."""
    if MASKED:
        mask = cols < V
        x = tl.load(s_ptr + s_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z_pos = tl.load(t_ptr + t_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(s_ptr + s_off + cols).to(tl.float32)
        z_pos = tl.load(t_ptr + t_off + cols).to(tl.float32)
    bad = tl.where(x < float("inf"), 0, 1) | tl.where(z_pos < float("inf"), 0, 2)
    s = _softcap(x, s_scale, s_cap, S_CAP)
    z_pos = _softcap(z_pos, t_scale, t_cap, T_CAP)
    if HAS_NEGATIVE:
        if MASKED:
            z_neg = tl.load(n_ptr + n_off + cols, mask=cols < V, other=0.0).to(tl.float32)
        else:
            z_neg = tl.load(n_ptr + n_off + cols).to(tl.float32)
        bad_neg = (z_neg < float("inf")) & ((z_neg != float("-inf")) | (z_pos == float("-inf")))
        bad = bad | tl.where(bad_neg, 0, 4)
        z_neg = _softcap(z_neg, t_scale, t_cap, T_CAP)
        # z_pos = -inf stays -inf whatever z_neg is (no inf - inf)
        z_hat = tl.where(z_pos == float("-inf"), z_pos, z_pos + alpha * (z_pos - z_neg))
    else:
        z_hat = z_pos
    if HAS_CUTOFF:
        z_hat = tl.where(z_pos >= threshold, z_hat, float("-inf"))
    return s, z_hat * inv_tau, bad


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
def _main_tile(
    s, a, m_a, m_b, m_s, sum_a, sum_b, sum_s, w, inv_tau, DIVERGENCE: tl.constexpr, TAU_IS_ONE: tl.constexpr
):
    """One tile of sweep 1: the online softmax states of ``a``, ``b``, ``s`` and the KL accumulator."""
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
    if not TAU_IS_ONE:
        new_m_s = tl.maximum(m_s, tile_max_s)
        ds = tl.where(m_s == float("-inf"), 0.0, m_s - new_m_s)
        shift_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
        sum_s = sum_s * tl.exp(ds) + tl.sum(tl.exp(s - shift_s), axis=0)
        m_s = new_m_s
    return new_m_a, new_m_b, m_s, sum_a, sum_b, sum_s, w


@_device_function
def _mixture_tile(s, a, base_a, log_sum_a, base_b, log_sum_b, inv_tau, log_beta, log_one_minus_beta):
    """One tile of sweep 2: the lanes of ``p log(p/m)`` and ``q log(q/m)``."""
    log_p = (a - base_a) - log_sum_a
    log_q = (s * inv_tau - base_b) - log_sum_b
    log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    return tl.where(p > 0.0, p * (log_p - log_m), 0.0), tl.where(q > 0.0, q * (log_q - log_m), 0.0)


@_device_function
def _grad_tile(
    s, a, cols, y, valid, m_a, log_sum_a, m_b, log_sum_b, m_s, log_sum_s, kl_aux, kd_on, ce_on, c_kd_tau, c_ce,
    inv_tau, beta, log_beta, log_one_minus_beta, s_scale, s_cap,
    HAS_CE: tl.constexpr, DIVERGENCE: tl.constexpr, S_CAP: tl.constexpr,
):
    """``c_kd * dkd/dx + c_ce * dce/dx`` of one tile (``x`` the raw student logits), float32."""
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
    if HAS_CE:
        d_ce = tl.exp((s - m_s) - log_sum_s) - tl.where((cols == y) & valid, 1.0, 0.0)
        g += tl.where(ce_on, c_ce * d_ce, 0.0)
    # the chain rule through s = cap tanh(scale x / cap): scale (1 - (s / cap)^2); 0 where s = -inf
    if S_CAP:
        t = s / s_cap
        g = tl.where(s == float("-inf"), 0.0, g * (s_scale * (1.0 - t * t)))
    else:
        g = g * s_scale
    return g


@_device_function
def _grad_sweep(
    s_ptr, t_ptr, n_ptr, grad_ptr, s_off, t_off, n_off, g_off, V, n_cols, y, valid,
    m_a, log_sum_a, m_b, log_sum_b, m_s, log_sum_s, kl_aux, c_kd, c_ce,
    alpha, inv_tau, threshold, beta, log_beta, log_one_minus_beta, s_scale, t_scale, s_cap, t_cap,
    HAS_NEGATIVE: tl.constexpr, HAS_CUTOFF: tl.constexpr, HAS_CE: tl.constexpr, DIVERGENCE: tl.constexpr,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``grad = c_kd * dkd/dx + c_ce * dce/dx`` for one row: load a tile, store the same tile.

    ``n_cols`` is the number of columns the row reads: ``V`` for a valid row (its column limit when
    one is given), 0 for an ignored one; the columns ``[n_cols, V)`` only get zeros (nothing is
    loaded there). The logsumexps come split as ``lse = m + log_sum``:
    ``log p = (a - m_a) - log_sum_a`` keeps the precision of a shifted log-softmax when the logits
    are large (``a - lse_a`` would lose ``ulp(lse_a)``). ``backward_rows`` only has ``lse`` and
    passes ``(lse, 0)``.
    """
    kd_on = c_kd != 0.0
    ce_on = c_ce != 0.0
    c_kd_tau = c_kd * inv_tau
    m_a = tl.where(m_a == float("-inf"), 0.0, m_a)
    m_b = tl.where(m_b == float("-inf"), 0.0, m_b)
    m_s = tl.where(m_s == float("-inf"), 0.0, m_s)
    lanes = tl.arange(0, BLOCK_V)
    n_full = (n_cols // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        cols = start + lanes
        s, a, _ = _load_tile(
            s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, cols, V, alpha, inv_tau, threshold,
            s_scale, t_scale, s_cap, t_cap, False, HAS_NEGATIVE, HAS_CUTOFF, S_CAP, T_CAP,
        )  # fmt: skip
        g = _grad_tile(
            s, a, cols, y, valid, m_a, log_sum_a, m_b, log_sum_b, m_s, log_sum_s, kl_aux, kd_on, ce_on, c_kd_tau,
            c_ce, inv_tau, beta, log_beta, log_one_minus_beta, s_scale, s_cap, HAS_CE, DIVERGENCE, S_CAP,
        )  # fmt: skip
        tl.store(grad_ptr + g_off + cols, g.to(grad_ptr.dtype.element_ty))
    for start in range(n_full, n_cols, BLOCK_V):
        cols = start + lanes
        s, a, _ = _load_tile(
            s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, cols, n_cols, alpha, inv_tau, threshold,
            s_scale, t_scale, s_cap, t_cap, True, HAS_NEGATIVE, HAS_CUTOFF, S_CAP, T_CAP,
        )  # fmt: skip
        g = _grad_tile(
            s, a, cols, y, valid, m_a, log_sum_a, m_b, log_sum_b, m_s, log_sum_s, kl_aux, kd_on, ce_on, c_kd_tau,
            c_ce, inv_tau, beta, log_beta, log_one_minus_beta, s_scale, s_cap, HAS_CE, DIVERGENCE, S_CAP,
        )  # fmt: skip
        tl.store(grad_ptr + g_off + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)
    # an ignored row, and the columns past a row's limit: zeros, without reading them
    zeros = tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty)
    for start in range(n_cols, V, BLOCK_V):
        cols = start + lanes
        tl.store(grad_ptr + g_off + cols, zeros, mask=cols < V)


@triton.jit
def _forward_kernel(
    s_ptr,
    t_ptr,
    n_ptr,
    labels_ptr,
    alpha_ptr,
    limit_ptr,
    kd_ptr,
    ce_ptr,
    stats_ptr,
    flags_ptr,
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
    alpha,
    inv_tau,
    log_plausibility,
    beta,
    log_beta,
    log_one_minus_beta,
    ignore_index,
    s_scale,
    t_scale,
    s_cap,
    t_cap,
    HAS_NEGATIVE: tl.constexpr,
    HAS_CUTOFF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    PER_ROW_ALPHA: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    TAU_IS_ONE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """kd, ce, stats and flags of one row (program ``r`` = row ``r``); the gradient too with ``WRITE_GRAD``."""
    row = tl.program_id(0).to(tl.int64)
    s_off = _row_offset(row, s_T, s_stride_b, s_stride_t)
    t_off = _row_offset(row, t_T, t_stride_b, t_stride_t)
    n_off = _row_offset(row, n_T, n_stride_b, n_stride_t)
    lanes = tl.arange(0, BLOCK_V)
    y, valid, n_cols = _row_columns(row, labels_ptr, limit_ptr, V, ignore_index, HAS_LABELS, HAS_LIMIT)
    n_full = (n_cols // BLOCK_V) * BLOCK_V
    if PER_ROW_ALPHA:
        alpha = tl.load(alpha_ptr + row)

    # sweep 0: zmax = max(z_pos) for the plausibility cutoff (transforms are monotone)
    if HAS_CUTOFF:
        zmax_lanes = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lanes
            z_pos = tl.load(t_ptr + t_off + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            zmax_lanes = tl.maximum(zmax_lanes, z_pos)
        zmax = _softcap(tl.max(zmax_lanes, axis=0), t_scale, t_cap, T_CAP)
        threshold = zmax + log_plausibility
    else:
        zmax = 0.0
        threshold = 0.0

    # sweep 1: online logsumexp of a, b, s, the one-sweep KL accumulator W and the row flags
    m_a = float("-inf")
    m_b = float("-inf")
    m_s = float("-inf")
    sum_a = 0.0
    sum_b = 0.0
    sum_s = 0.0
    w = 0.0
    bad_lanes = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, n_full, BLOCK_V):
        s, a, bad = _load_tile(
            s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, start + lanes, V, alpha, inv_tau, threshold,
            s_scale, t_scale, s_cap, t_cap, False, HAS_NEGATIVE, HAS_CUTOFF, S_CAP, T_CAP,
        )  # fmt: skip
        bad_lanes = bad_lanes | bad
        m_a, m_b, m_s, sum_a, sum_b, sum_s, w = _main_tile(
            s, a, m_a, m_b, m_s, sum_a, sum_b, sum_s, w, inv_tau, DIVERGENCE, TAU_IS_ONE
        )
    for start in range(n_full, n_cols, BLOCK_V):
        s, a, bad = _load_tile(
            s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, start + lanes, n_cols, alpha, inv_tau, threshold,
            s_scale, t_scale, s_cap, t_cap, True, HAS_NEGATIVE, HAS_CUTOFF, S_CAP, T_CAP,
        )  # fmt: skip
        bad_lanes = bad_lanes | tl.where(start + lanes < n_cols, bad, 0)
        m_a, m_b, m_s, sum_a, sum_b, sum_s, w = _main_tile(
            s, a, m_a, m_b, m_s, sum_a, sum_b, sum_s, w, inv_tau, DIVERGENCE, TAU_IS_ONE
        )
    flags = tl.max(bad_lanes & 1, axis=0) | tl.max(bad_lanes & 2, axis=0) | tl.max(bad_lanes & 4, axis=0)

    log_sum_a = tl.log(sum_a)
    log_sum_b = tl.log(sum_b)
    if TAU_IS_ONE:
        m_s = m_b
        log_sum_s = log_sum_b
    else:
        log_sum_s = tl.log(sum_s)
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
        for start in range(0, n_full, BLOCK_V):
            s, a, _ = _load_tile(
                s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, start + lanes, V, alpha, inv_tau, threshold,
                s_scale, t_scale, s_cap, t_cap, False, HAS_NEGATIVE, HAS_CUTOFF, S_CAP, T_CAP,
            )  # fmt: skip
            pm, qm = _mixture_tile(s, a, base_a, log_sum_a, base_b, log_sum_b, inv_tau, log_beta, log_one_minus_beta)
            kl_pm_lanes += pm
            kl_qm_lanes += qm
        for start in range(n_full, n_cols, BLOCK_V):
            s, a, _ = _load_tile(
                s_ptr, t_ptr, n_ptr, s_off, t_off, n_off, start + lanes, n_cols, alpha, inv_tau, threshold,
                s_scale, t_scale, s_cap, t_cap, True, HAS_NEGATIVE, HAS_CUTOFF, S_CAP, T_CAP,
            )  # fmt: skip
            pm, qm = _mixture_tile(s, a, base_a, log_sum_a, base_b, log_sum_b, inv_tau, log_beta, log_one_minus_beta)
            kl_pm_lanes += pm
            kl_qm_lanes += qm
        kl_aux = tl.sum(kl_qm_lanes, axis=0)
        kd = beta * tl.sum(kl_pm_lanes, axis=0) + (1.0 - beta) * kl_aux

    if HAS_CE:
        in_range = valid & (y >= 0) & (y < n_cols)  # n_cols = V_row on a valid row
        flags = flags | tl.where(valid & ~in_range, 8, 0)
        x_y = tl.load(s_ptr + s_off + tl.where(in_range, y, 0), mask=in_range, other=0.0).to(tl.float32)
        ce = (m_s - _softcap(x_y, s_scale, s_cap, S_CAP)) + log_sum_s
    else:
        ce = 0.0
    # a flagged row: NaN loss, statistics and (through NaN offsets) gradient
    nan_if_bad = tl.where(flags != 0, float("nan"), 0.0)
    kd = tl.where(valid, kd, 0.0) + nan_if_bad
    ce = tl.where(valid, ce, 0.0) + nan_if_bad
    lse_a = tl.where(valid, m_a + log_sum_a, 0.0) + nan_if_bad
    lse_b = tl.where(valid, m_b + log_sum_b, 0.0) + nan_if_bad
    lse_s = tl.where(valid, m_s + log_sum_s, 0.0) + nan_if_bad
    kl_aux = tl.where(valid, kl_aux, 0.0) + nan_if_bad

    tl.store(kd_ptr + row, kd)
    tl.store(ce_ptr + row, ce)
    tl.store(flags_ptr + row, tl.where(valid, flags, 0))
    stats_row = stats_ptr + row * 5
    tl.store(stats_row + 0, lse_a)
    tl.store(stats_row + 1, lse_b)
    tl.store(stats_row + 2, lse_s)
    tl.store(stats_row + 3, kl_aux)
    tl.store(stats_row + 4, tl.where(valid, zmax, 0.0))

    if WRITE_GRAD:
        c_kd = tl.load(coef_kd_ptr + row)
        if HAS_CE:
            c_ce = tl.load(coef_ce_ptr + row)
        else:
            c_ce = 0.0
        _grad_sweep(
            s_ptr, t_ptr, n_ptr, grad_ptr, s_off, t_off, n_off, row * g_stride, V, n_cols, y, valid,
            m_a, log_sum_a + nan_if_bad, m_b, log_sum_b + nan_if_bad, m_s, log_sum_s + nan_if_bad, kl_aux,
            c_kd, c_ce, alpha, inv_tau, threshold, beta, log_beta, log_one_minus_beta, s_scale, t_scale, s_cap, t_cap,
            HAS_NEGATIVE, HAS_CUTOFF, HAS_CE, DIVERGENCE, S_CAP, T_CAP, BLOCK_V,
        )  # fmt: skip


@triton.jit
def _backward_kernel(
    s_ptr,
    t_ptr,
    n_ptr,
    labels_ptr,
    alpha_ptr,
    limit_ptr,
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
    alpha,
    inv_tau,
    log_plausibility,
    beta,
    log_beta,
    log_one_minus_beta,
    ignore_index,
    s_scale,
    t_scale,
    s_cap,
    t_cap,
    HAS_NEGATIVE: tl.constexpr,
    HAS_CUTOFF: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    PER_ROW_ALPHA: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
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
    y, valid, n_cols = _row_columns(row, labels_ptr, limit_ptr, V, ignore_index, HAS_LABELS, HAS_LIMIT)
    if HAS_CE:
        c_ce = tl.load(coef_ce_ptr + row)
    else:
        c_ce = 0.0
    if PER_ROW_ALPHA:
        alpha = tl.load(alpha_ptr + row)
    _grad_sweep(
        s_ptr, t_ptr, n_ptr, grad_ptr, s_off, t_off, n_off, row * g_stride, V, n_cols, y, valid,
        lse_a, 0.0, lse_b, 0.0, lse_s, 0.0, kl_aux, c_kd, c_ce, alpha, inv_tau, threshold,
        beta, log_beta, log_one_minus_beta, s_scale, t_scale, s_cap, t_cap,
        HAS_NEGATIVE, HAS_CUTOFF, HAS_CE, DIVERGENCE, S_CAP, T_CAP, BLOCK_V,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def launch_config(
    vocab: int, device: torch.device, block_v: int | None = None, element_size: int = 2
) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab`` columns of ``element_size`` bytes on ``device``.

    On CUDA: tiles of up to 4096 columns for 2-byte inputs (2048 for 4-byte ones, the same 16-byte
    vectors per thread), 4 warps up to 1024 columns, 8 up to 2048, 16 above. Under the interpreter:
    at most 128 columns unless ``block_v`` forces another tile (a power of two).
    """
    if block_v is not None:
        if block_v < 1 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two, got {block_v}")
        tile = block_v
    else:
        if device.type == "cuda" and not _interpreting():
            cap = 4096 if element_size <= 2 else 2048
        else:
            cap = _INTERPRET_MAX_BLOCK_V
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
) -> tuple[list[object], list[object], dict[str, object]]:
    """Shape/stride arguments, scalar arguments and constexpr flags shared by both kernels."""
    if teacher.rows != student.rows or (negative is not None and negative.rows != student.rows):
        raise ValueError("student, teacher and negative must have the same number of rows")
    if teacher.width < params.vocab_size or student.width != params.vocab_size:
        raise ValueError(
            f"student width {student.width} and teacher width {teacher.width} do not fit the vocabulary "
            f"size {params.vocab_size}"
        )
    if params.has_negative and negative is None:
        raise ValueError("params.has_negative is True but no negative logits were given")
    neg = negative if params.has_negative else teacher
    divergence = params.divergence
    # each view keeps its own [B, T] folding (as_rows may fold a contiguous teacher into one
    # row dimension but not a sliced student): rows are located per tensor
    shapes: list[object] = [
        params.vocab_size,
        student.seq, student.stride_b, student.stride_t,
        teacher.seq, teacher.stride_b, teacher.stride_t,
        neg.seq, neg.stride_b, neg.stride_t,
    ]  # fmt: skip
    scalars: list[object] = [
        params.alpha,
        params.inv_temperature,
        params.log_plausibility if params.log_plausibility is not None else 0.0,
        params.beta,
        math.log(params.beta) if divergence == "mixture" else 0.0,
        math.log1p(-params.beta) if divergence == "mixture" else 0.0,
        params.ignore_index,
        params.student_scale,
        params.teacher_scale,
        params.student_softcap or 1.0,
        params.teacher_softcap or 1.0,
    ]
    flags = dict(
        HAS_NEGATIVE=params.has_negative,
        HAS_CUTOFF=params.log_plausibility is not None,
        HAS_CE=params.has_labels,
        PER_ROW_ALPHA=params.per_row_alpha,
        S_CAP=params.student_softcap is not None,
        T_CAP=params.teacher_softcap is not None,
        DIVERGENCE=_DIVERGENCE_CODE[divergence],
    )
    return shapes, scalars, flags


def _row_vector(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    return values.to(device=device, dtype=torch.float32).contiguous()


def _check_grad(grad: torch.Tensor, rows: int, vocab: int) -> None:
    if tuple(grad.shape) != (rows, vocab) or (vocab > 1 and grad.stride(1) != 1):
        raise ValueError(f"grad must be a [rows, V] = [{rows}, {vocab}] tensor with unit column stride")


def _limit_arg(col_limit: torch.Tensor | None, rows: int, device: torch.device, fallback: torch.Tensor) -> torch.Tensor:
    """The int64 ``[rows]`` column limits on ``device`` (``fallback``, never read, without them)."""
    if col_limit is None:
        return fallback
    if col_limit.numel() != rows or col_limit.dtype.is_floating_point or col_limit.dtype == torch.bool:
        raise ValueError(f"col_limit must be an integer tensor of {rows} elements (one per row), got "
                         f"{col_limit.dtype} with {col_limit.numel()} elements")
    return col_limit.to(device=device, dtype=torch.int64).reshape(-1).contiguous()


def _alpha_arg(alpha_rows: torch.Tensor | None, params: RowParams, fallback: torch.Tensor) -> torch.Tensor:
    if not params.per_row_alpha:
        return fallback
    if alpha_rows is None:
        raise ValueError("params.per_row_alpha is True but no alpha_rows were given")
    return _row_vector(alpha_rows, fallback.device)


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
    alpha_rows: torch.Tensor | None,
    col_limit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(student)
    rows, vocab = student.rows, params.vocab_size
    device = student.data.device
    kd = torch.zeros(rows, dtype=torch.float32, device=device)
    ce = torch.zeros(rows, dtype=torch.float32, device=device)
    stats = torch.zeros(rows, _STATS_COLUMNS, dtype=torch.float32, device=device)
    flags = torch.zeros(rows, dtype=torch.int32, device=device)
    if rows == 0:
        return kd, ce, stats, flags
    shapes, scalars, flag_args = _common_args(student, teacher, negative, params)
    write_grad = grad is not None
    if write_grad:
        _check_grad(grad, rows, vocab)
        coef_kd = _row_vector(coef_kd, device)
        coef_ce = _row_vector(coef_ce, device) if params.has_labels else coef_kd
    tile, num_warps = launch_config(vocab, device, block_v, student.data.element_size())
    labels_arg = labels.to(torch.int64).contiguous() if labels is not None else kd
    neg_data = negative.data if flag_args["HAS_NEGATIVE"] else teacher.data
    with _device_guard(device):
        _forward_kernel[(rows,)](
            student.data,
            teacher.data,
            neg_data,
            labels_arg,
            _alpha_arg(alpha_rows, params, kd),
            _limit_arg(col_limit, rows, device, flags),
            kd,
            ce,
            stats,
            flags,
            coef_kd if write_grad else kd,
            coef_ce if write_grad else kd,
            grad if write_grad else kd,
            *shapes,
            grad.stride(0) if write_grad else 0,
            *scalars,
            **flag_args,
            HAS_LABELS=labels is not None,
            HAS_LIMIT=col_limit is not None,
            TAU_IS_ONE=params.inv_temperature == 1.0,
            WRITE_GRAD=write_grad,
            BLOCK_V=tile,
            num_warps=num_warps,
        )
    return kd, ce, stats, flags


def forward_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    params: RowParams,
    *,
    alpha_rows: torch.Tensor | None = None,
    block_v: int | None = None,
    col_limit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row divergence, CE, statistics and flags.

    Args:
        student, teacher, negative: ``[B, T, V]`` / ``[B, T, V_t]`` row views (fp16, bf16, fp32;
            fp64 is computed in fp32), ``negative`` may be ``None``.
        labels: contiguous int64 ``[rows]`` or ``None`` (ignored rows marked ``ignore_index``).
        params: the row parameters.
        alpha_rows: float32 ``[rows]`` when ``params.per_row_alpha``.
        block_v: optional tile width (a power of two) instead of the automatic choice.
        col_limit: optional integer ``[rows]``: row ``r`` reads only columns ``[0, col_limit[r])``
            (the contract in ``caad_kernels.backends``).

    Returns:
        ``(kd, ce, stats, flags)``: float32 ``[rows]``, ``[rows]``, ``[rows, 5]``, int32 ``[rows]``.
    """
    return _run_forward(student, teacher, negative, labels, params, None, None, None, block_v, alpha_rows, col_limit)


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
    alpha_rows: torch.Tensor | None = None,
    block_v: int | None = None,
    col_limit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_rows` and :func:`backward_rows` in one launch, for coefficients known in advance.

    ``coef_kd``/``coef_ce`` are float32 ``[rows]`` (as for ``backward_rows``); ``grad`` is a
    ``[rows, V]`` tensor with unit column stride in the student's dtype, and may alias the student
    logits: every row is read in full before its gradient sweep, which reads each tile before
    overwriting it. Returns ``(kd, ce, stats, flags)`` exactly as :func:`forward_rows`.
    """
    return _run_forward(
        student, teacher, negative, labels, params, coef_kd, coef_ce, grad, block_v, alpha_rows, col_limit
    )


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
    block_v: int | None = None,
    col_limit: torch.Tensor | None = None,
) -> None:
    """Write ``grad[i, v] = coef_kd[i] * dkd_i/dx_iv + coef_ce[i] * dce_i/dx_iv``.

    Args:
        student, teacher, negative, labels, params, alpha_rows: as for :func:`forward_rows`.
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
    shapes, scalars, flag_args = _common_args(student, teacher, negative, params)
    stats = stats.to(device=device, dtype=torch.float32).contiguous()
    coef_kd = _row_vector(coef_kd, device)
    coef_ce = _row_vector(coef_ce, device) if params.has_labels else coef_kd
    labels_arg = labels.to(torch.int64).contiguous() if labels is not None else coef_kd
    tile, num_warps = launch_config(vocab, device, block_v, student.data.element_size())
    neg_data = negative.data if flag_args["HAS_NEGATIVE"] else teacher.data
    with _device_guard(device):
        _backward_kernel[(rows,)](
            student.data,
            teacher.data,
            neg_data,
            labels_arg,
            _alpha_arg(alpha_rows, params, coef_kd),
            _limit_arg(col_limit, rows, device, labels_arg),
            stats,
            coef_kd,
            coef_ce,
            grad,
            *shapes,
            grad.stride(0),
            *scalars,
            **flag_args,
            HAS_LABELS=labels is not None,
            HAS_LIMIT=col_limit is not None,
            BLOCK_V=tile,
            num_warps=num_warps,
        )
