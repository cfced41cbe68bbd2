"""Fused-linear contrastive KD: hidden states and ``lm_head`` weights in, loss out.

The ``[N x V]`` logits of the three paths are never materialised. Per call:

1. **Compaction.** Rows that are ignored (label ``ignore_index`` or ``mask`` False) are dropped
   before any GEMM: the op reads the number of valid rows (together with every other
   data-dependent check: labels in range, a tensor ``num_items_in_batch``, a per-row ``alpha``)
   in **one host synchronisation**, then gathers the valid rows. Without labels, mask, tensor
   ``num_items_in_batch`` or tensor ``alpha`` there is no synchronisation at all. ``compact=False``
   skips the compaction: on CUDA with ``check_finite=False`` and no labels (a ``mask`` only) the
   call then never waits for the device (ignored rows go through the GEMMs and the row kernels
   skip them; bad values give NaN).
2. **Chunks.** The valid rows are processed in chunks of ``chunk_size``; for each chunk the
   student GEMM and the teacher GEMM produce ``chunk x V`` logits per path (rows padded to a
   multiple of 16 elements so the kernels' loads are aligned). Without the plausibility cutoff and
   without a teacher softcap, the contrastive teacher is linear in the hidden states,
   ``z_hat = W_t h_hat + b_t`` with ``h_hat = h_pos + alpha (h_pos - h_neg)`` (formed in fp32,
   per-row ``alpha`` included): **one teacher GEMM** instead of two. Otherwise both teacher paths
   go through one stacked GEMM. With a sparse top-k teacher (:mod:`caad_kernels.topk`) there is
   no teacher GEMM at all. The row kernel of the chosen backend computes the per-row losses
   and writes the student gradient *in place of* the student chunk logits, and two more GEMMs
   turn it into the gradients of the hidden states and of the weight. Teacher rows past the
   student's vocabulary are never computed.
3. **Gradients in forward.** With ``reduction`` "mean" or "sum" (and gradients wanted: grad mode
   on and a student tensor requiring grad) the gradients of ``loss`` are computed during the
   forward pass at a unit upstream gradient *without* the mean's denominator (so fp16 values stay
   far from underflow) and scaled in float32 in backward; the weight gradient is accumulated
   across chunks in float32 for half-precision weights (``accum_dtype``) through GEMMs that add
   into the float32 buffer (no ``[V, H]`` temporary per chunk). Nothing of the teacher is kept
   for backward. With ``reduction="none"`` backward recomputes the chunks with the per-row
   upstream gradients (normalised by their largest magnitude for the half-precision GEMMs), so
   that path keeps the inputs.

**Dtypes.** Each path's GEMM runs in one dtype: under ``torch.autocast`` (for the hidden states'
device type) the autocast dtype, as autocast runs an ``nn.Linear`` (hidden states, weight and bias
cast to it; a float64 weight is left alone); otherwise the weight's dtype (the hidden states,
the smaller tensor, are cast to it; the weight is never copied). So float32 hidden states with a
bfloat16 weight run a bfloat16 GEMM. Every sum of the row kernels is in float32, the loss is
float32 (float64 for float64 inputs), the weight gradient is summed in ``accum_dtype`` (float32
by default), and each gradient comes back in its own input's dtype (float32 hidden states get a
float32 gradient, a float32 master weight a float32 weight gradient).

Non-finite values are detected by the row kernels (row flags): a NaN/inf row gives NaN; with
``check_finite=True`` the flags are read after the chunk loop (a second host synchronisation)
and raise a ValueError naming the arguments.

Two autograd paths share :func:`fused_forward` and the backward functions: eagerly a
``torch.autograd.Function``; under ``torch.compile`` the custom ops of
:mod:`caad_kernels.custom_ops` (no graph break).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from caad_kernels import custom_ops
from caad_kernels import topk as topk_rows
from caad_kernels.autograd import once_differentiable
from caad_kernels.backends import resolve_backend
from caad_kernels.contrastive_kd import (
    KDLossOutput,
    add_value_checks,
    check_topk_options,
    flat_alpha,
    reduction_denominator,
    row_labels,
)
from caad_kernels.options import (
    KDOptions,
    RowParams,
    check_alpha_tensor,
    check_labels,
    check_logits,
    check_mask,
    check_num_items,
)
from caad_kernels.rows import as_row_views
from caad_kernels.validation import (
    FLAG_BITS,
    FLAG_LABEL,
    FLAG_NEGATIVE,
    FLAG_STUDENT,
    FLAG_TEACHER,
    FLAG_TOPK,
    HostChecks,
    check_host_values,
    host_sync_allowed,
)

CPU_CHUNK_ELEMENTS = 1 << 22  # logits per path per chunk on the CPU: 16 MiB in float32
CUDA_CHUNK_BYTES = 1 << 28  # bytes of logits per path per chunk on CUDA (1024 rows of V = 128256 in bf16)
ROW_ALIGN = 16  # chunk logits rows are padded to a multiple of this many elements

FLAG_NAMES = {
    FLAG_STUDENT: "the student logits are not finite: student_hidden, student_weight or student_bias holds NaN or "
                  "inf (or the GEMM overflowed)",
    FLAG_TEACHER: "the teacher logits are not finite: teacher_hidden, teacher_weight or teacher_bias holds NaN or "
                  "inf (teacher_negative_hidden too in the one-GEMM form), or the GEMM overflowed",
    FLAG_NEGATIVE: "the negative-path logits are not finite (or -inf where the positive path is finite): "
                   "teacher_negative_hidden, teacher_weight or teacher_bias holds NaN or inf",
}
TOPK_FLAG_NAMES = {**FLAG_NAMES, FLAG_TEACHER: "teacher_topk_logprobs holds NaN or +inf"}


def default_chunk_size(rows: int, vocab: int, hidden: int, device: torch.device, element_size: int) -> int:
    """Rows per chunk from the shape, dtype and device only (so the summation order is reproducible).

    A power of two: on CUDA at most ``CUDA_CHUNK_BYTES`` of logits per path (between 128 and 4096
    rows), on the CPU ``CPU_CHUNK_ELEMENTS`` logits per path; never fewer rows than a GEMM needs
    to use the matrix unit (``min(64, hidden / 8)``), never more rows than there are. Free memory
    is deliberately not consulted: it depends on the caching allocator and differs across ranks
    and steps.
    """
    vocab = max(vocab, 1)
    if device.type == "cuda":
        chunk = min(max(CUDA_CHUNK_BYTES // (vocab * max(element_size, 1)), 128), 4096)
    else:
        chunk = max(CPU_CHUNK_ELEMENTS // vocab, 16)
    chunk = max(chunk, min(64, max(hidden // 8, 1)))
    chunk = 1 << int(math.floor(math.log2(chunk)))
    return max(1, min(chunk, rows))


def _padded_empty(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, vocab]`` view whose row stride is ``vocab`` rounded up to ``ROW_ALIGN``."""
    width = -(-vocab // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(rows, width, dtype=dtype, device=device)[:, :vocab]


def _linear_into(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = _padded_empty(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
    if bias is None:
        return torch.mm(hidden, weight.T, out=out)
    return torch.addmm(bias, hidden, weight.T, out=out)


def _rows_backend_name(backend: str, device: torch.device) -> str:
    # "torch" means chunked PyTorch GEMMs; its elementwise work runs in C++ on the CPU when built
    if backend == "torch":
        return "auto" if device.type == "cpu" else "torch"
    return backend


def gemm_dtype(weight_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a path's GEMM runs in: the autocast dtype (unless the weight is float64), else the weight's."""
    if autocast_dtype is not None and weight_dtype != torch.float64:
        return autocast_dtype
    return weight_dtype


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """The active autocast dtype for ``device``'s type, or ``None`` when autocast is off there."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _Rows(NamedTuple):
    """The (compacted) rows of one call and what the chunk loop needs to make their logits.

    The tensors are already in their path's GEMM dtype. With a top-k teacher ``h_t``/``w_t`` are
    ``None`` and ``topk_idx``/``topk_lp`` hold the ``[rows, k]`` teacher.
    """

    h_s: torch.Tensor
    w_s: torch.Tensor
    b_s: torch.Tensor | None
    h_t: torch.Tensor | None
    h_n: torch.Tensor | None
    w_t: torch.Tensor | None
    b_t: torch.Tensor | None
    labels: torch.Tensor | None
    alpha: torch.Tensor | float
    one_gemm: bool
    topk_idx: torch.Tensor | None = None
    topk_lp: torch.Tensor | None = None


def _teacher_logits(rows: _Rows, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z_pos, z_neg)`` of a chunk, or ``(z_hat, None)`` in the one-GEMM form.

    The GEMMs run in the teacher weight's dtype; the hidden states of a chunk are cast to it only
    here, so ``h_hat`` is formed from the inputs as given (e.g. float32 under bf16 autocast).
    """
    gemm = rows.w_t.dtype
    h_t = rows.h_t[start:stop]
    if rows.h_n is None:
        return _linear_into(h_t.to(gemm), rows.w_t, rows.b_t), None
    h_n = rows.h_n[start:stop]
    if rows.one_gemm:
        alpha = rows.alpha[start:stop].unsqueeze(1) if isinstance(rows.alpha, torch.Tensor) else rows.alpha
        compute = torch.float64 if torch.float64 in (h_t.dtype, gemm) else torch.float32
        h_pos = h_t.to(compute)
        h_hat = (h_pos + alpha * (h_pos - h_n.to(compute))).to(gemm)
        return _linear_into(h_hat, rows.w_t, rows.b_t), None
    both = _linear_into(torch.cat([h_t, h_n]).to(gemm), rows.w_t, rows.b_t)
    return both[: stop - start], both[stop - start :]


_ADDMM_OUT_DTYPE_WORKS: bool | None = None


def _add_weight_grad(grad_w: torch.Tensor, grad_logits: torch.Tensor, h_chunk: torch.Tensor) -> None:
    """``grad_w += grad_logits.T @ h_chunk`` into a buffer of possibly higher precision, no ``[V, H]`` temporary.

    Same dtype: ``addmm_``. A float32 buffer with half inputs on CUDA: cuBLAS accumulates the
    half GEMM in fp32 and adds into the buffer (``addmm(..., out_dtype=float32, out=grad_w)``);
    where that is unavailable (CPU, older torch) the chunk operands are upcast instead.
    """
    global _ADDMM_OUT_DTYPE_WORKS
    if grad_w.dtype == grad_logits.dtype:
        grad_w.addmm_(grad_logits.T, h_chunk)
        return
    if grad_w.is_cuda and _ADDMM_OUT_DTYPE_WORKS is not False:
        try:
            torch.addmm(grad_w, grad_logits.T, h_chunk, out_dtype=grad_w.dtype, out=grad_w)
            _ADDMM_OUT_DTYPE_WORKS = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE_WORKS = False
    grad_w.addmm_(grad_logits.T.to(grad_w.dtype), h_chunk.to(grad_w.dtype))


def _chunk_loop(rows: _Rows, params: RowParams, backend, chunk_size: int, needs: tuple[bool, bool, bool],
                accum_dtype: torch.dtype, coef_kd: torch.Tensor | None = None,
                coef_ce: torch.Tensor | None = None):
    """One pass over the row chunks: per-row ``(kd, ce, flags)``, and the gradients when coefficients are given.

    The gradients come back at the kernels' coefficients (the caller applies the remaining float32
    factor): ``grad_h`` ``[rows, H]`` in the hidden states' dtype, ``grad_w``/``grad_b`` in
    ``accum_dtype``. Each chunk's logits are dropped before the next chunk's are made, so at most
    one chunk of each path is alive at a time.
    """
    n = rows.h_s.shape[0]
    device = rows.h_s.device
    loss_dtype = torch.float64 if rows.h_s.dtype == torch.float64 else torch.float32
    kd = torch.empty(n, dtype=loss_dtype, device=device)
    ce = torch.empty(n, dtype=loss_dtype, device=device)
    flags = torch.empty(n, dtype=torch.int32, device=device)
    with_grad = coef_kd is not None
    grad_h = torch.empty(rows.h_s.shape, dtype=rows.h_s.dtype, device=device) if with_grad and needs[0] else None
    grad_w = torch.zeros(rows.w_s.shape, dtype=accum_dtype, device=device) if with_grad and needs[1] else None
    grad_b = (torch.zeros(rows.b_s.shape, dtype=accum_dtype, device=device)
              if with_grad and rows.b_s is not None and needs[2] else None)
    alpha_all = rows.alpha if params.per_row_alpha else None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        labels = None if rows.labels is None else rows.labels[start:stop]
        alpha = None if alpha_all is None else alpha_all[start:stop]
        logits = _linear_into(rows.h_s[start:stop], rows.w_s, rows.b_s)
        coefs = None if not with_grad else (coef_kd[start:stop], coef_ce[start:stop])
        if rows.topk_idx is not None:  # a sparse teacher: no teacher GEMM
            z_pos = z_neg = None
            views = as_row_views(logits)
            teacher = (rows.topk_idx[start:stop], rows.topk_lp[start:stop])
            if not with_grad:
                out = topk_rows.forward_rows(*views, *teacher, labels, params)
            else:
                out = topk_rows.loss_and_grad_rows(*views, *teacher, labels, *coefs, params, logits)
        else:
            z_pos, z_neg = _teacher_logits(rows, start, stop)
            views = as_row_views(logits, z_pos, z_neg)
            if not with_grad:
                out = backend.forward_rows(*views, labels, params, alpha_rows=alpha)
            elif hasattr(backend, "loss_and_grad_rows"):  # one pass, each chunk read once
                out = backend.loss_and_grad_rows(*views, labels, *coefs, params, logits, alpha_rows=alpha)
            else:
                out = backend.forward_rows(*views, labels, params, alpha_rows=alpha)
                backend.backward_rows(*views, labels, out[2], *coefs, params, logits, alpha_rows=alpha)
        if with_grad:  # the gradient has overwritten the student logits of this chunk
            if grad_h is not None:
                torch.mm(logits, rows.w_s, out=grad_h[start:stop])
            if grad_w is not None:
                _add_weight_grad(grad_w, logits, rows.h_s[start:stop])
            if grad_b is not None:
                grad_b.add_(logits.sum(0, dtype=grad_b.dtype))
        kd[start:stop], ce[start:stop], flags[start:stop] = out[0], out[1], out[3]
        del logits, z_pos, z_neg, views, out
    return kd, ce, flags, (grad_h, grad_w, grad_b)


def _scaled(grad: torch.Tensor | None, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``grad * factor`` computed in float32 (or float64), returned in ``dtype``; ``grad`` is left unchanged."""
    if grad is None:
        return None
    if grad.dtype in (torch.float32, torch.float64):
        out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
        return torch.mul(grad, factor.to(grad.dtype), out=out)
    return (grad.float() * factor.to(torch.float32)).to(dtype)


def _compaction_index(valid: torch.Tensor, n_valid: int) -> torch.Tensor:
    """Indices of the ``n_valid`` True entries of ``valid``, in order, without another host sync."""
    rows = valid.numel()
    position = torch.cumsum(valid, 0) - 1
    target = torch.where(valid, position, n_valid)
    index = torch.zeros(n_valid + 1, dtype=torch.int64, device=valid.device)
    index.scatter_(0, target, torch.arange(rows, device=valid.device))
    return index[:n_valid]


COMPONENT_GRAD_ERROR = (
    "fused_linear_contrastive_kd_loss: gradients through kd_loss and ce_loss separately are not available "
    "with a scalar reduction: the op computes the gradient of `loss` in the forward pass and keeps nothing "
    "of the teacher for backward. Differentiate `loss` only (the components are for logging), use "
    "reduction='none', or call the op once per term (kd_weight/ce_weight)."
)


def _component_factor(grad_loss, grad_kd, grad_ce, opts: KDOptions, has_labels: bool) -> torch.Tensor:
    """The factor on the gradients of ``loss`` computed in forward that gives the requested gradient.

    Only possible when the requested combination is proportional to ``kd_weight * kd + ce_weight * ce``.
    ``None`` upstream gradients (``set_materialize_grads(False)``) mean "not used".
    """
    device = next(g for g in (grad_loss, grad_kd, grad_ce) if g is not None).device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    g_loss = zero if grad_loss is None else grad_loss.double()
    kd_total = g_loss * opts.kd_weight + (zero if grad_kd is None else grad_kd.double())
    ce_total = g_loss * opts.ce_weight + (zero if grad_ce is None else grad_ce.double())
    ce_dead = not has_labels or (opts.ce_weight == 0 and grad_ce is None)
    if grad_kd is None and grad_ce is None:
        return g_loss
    if ce_dead and opts.kd_weight > 0:
        return kd_total / opts.kd_weight
    if opts.kd_weight == 0 and grad_kd is None and opts.ce_weight > 0:
        return ce_total / opts.ce_weight
    raise RuntimeError(COMPONENT_GRAD_ERROR)


class _Prepared(NamedTuple):
    """One call's rows, ready for the chunk loop, and what the reductions need."""

    rows: _Rows
    params: RowParams
    backend: object
    chunk_size: int
    accum_dtype: torch.dtype
    index: torch.Tensor | None  # the original row of each kernel row (None: no compaction)
    n_rows: int
    denominator: torch.Tensor
    flag_names: dict[int, str]


def _prepare(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_negative_hidden,
             teacher_bias, labels, mask, opts: KDOptions, num_items_in_batch, chunk_size, accum_dtype,
             autocast_dtype, compact: bool, topk) -> _Prepared:
    """Casts, the one host synchronisation (valid rows and every data-dependent check), compaction."""
    vocab = student_weight.shape[0]
    device = student_hidden.device
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_rows = h_s.shape[0]
    has_labels = labels is not None
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    alpha_rows = flat_alpha(opts)
    full_params = opts.row_params(vocab, teacher_negative_hidden is not None and topk is None, has_labels)

    valid = None if flat_labels is None else flat_labels != opts.ignore_index
    if mask is not None:
        valid = mask.reshape(-1) if valid is None else valid & mask.reshape(-1)
    compact = compact and valid is not None
    sync = compact or host_sync_allowed(device, opts.check_finite, has_labels)
    checks = HostChecks()
    if sync:
        if compact:
            checks.add("n_valid", valid.sum())
        if flat_labels is not None:
            checks.add_first_row(f"flag{FLAG_LABEL}", valid & ((flat_labels < 0) | (flat_labels >= vocab)))
        add_value_checks(checks, num_items_in_batch, alpha_rows if full_params.has_negative else None, valid)
    elif alpha_rows is not None:  # no host check: a bad alpha gives its row a NaN loss
        alpha_rows = torch.where((alpha_rows >= 0) & (alpha_rows < float("inf")), alpha_rows, float("nan"))
    values = checks.read()
    flag_names = TOPK_FLAG_NAMES if topk is not None else FLAG_NAMES
    check_host_values(values, check_finite=False, flag_names=flag_names, labels=flat_labels, vocab=vocab,
                      ignore_index=opts.ignore_index)
    n_valid = int(values["n_valid"]) if "n_valid" in values else n_rows
    index = _compaction_index(valid, n_valid) if n_valid < n_rows else None

    def take(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.reshape(n_rows, -1) if t.dim() > 1 else t.reshape(n_rows)
        t = t if index is None else t.index_select(0, index)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return t if t is None or t.dtype == dtype else t.to(dtype)

    # the student's hidden states are cast once (the gradient GEMMs read them); the teacher's per chunk
    s_dtype = gemm_dtype(student_weight.dtype, autocast_dtype)
    w_s, b_s = cast(student_weight, s_dtype), cast(student_bias, s_dtype)
    if topk is None:
        t_dtype = gemm_dtype(teacher_weight.dtype, autocast_dtype)
        h_t = take(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]))
        h_n = None
        if full_params.has_negative:
            h_n = take(teacher_negative_hidden.reshape(-1, teacher_negative_hidden.shape[-1]))
        w_t = cast(teacher_weight[:vocab], t_dtype)
        b_t = None if teacher_bias is None else cast(teacher_bias[:vocab], t_dtype)
        topk_idx = topk_lp = None
    else:
        h_t = h_n = w_t = b_t = None
        topk_idx, topk_lp = take(topk[0]), take(topk[1])
    one_gemm = (full_params.has_negative and full_params.log_plausibility is None
                and full_params.teacher_softcap is None)
    if not compact and valid is not None:
        kernel_labels = row_labels(labels, mask, opts.ignore_index)  # not compacted: mark the ignored rows
    else:
        kernel_labels = take(flat_labels) if has_labels else None
    rows = _Rows(h_s=take(h_s, s_dtype), w_s=w_s, b_s=b_s, h_t=h_t, h_n=h_n, w_t=w_t, b_t=b_t, labels=kernel_labels,
                 alpha=take(alpha_rows) if full_params.per_row_alpha else full_params.alpha, one_gemm=one_gemm,
                 topk_idx=topk_idx, topk_lp=topk_lp)
    params = opts.row_params(vocab, False, has_labels) if one_gemm else full_params
    backend = resolve_backend(_rows_backend_name(opts.backend, device), device, s_dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows.h_s.shape[0], vocab, h_s.shape[1], device, rows.h_s.element_size())
    if accum_dtype is None:
        accum_dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
    denominator = reduction_denominator(valid, n_rows, num_items_in_batch, device)
    return _Prepared(rows, params, backend, max(1, chunk_size), accum_dtype, index, n_rows, denominator, flag_names)


def _check_flags(flags: torch.Tensor, prep: _Prepared, opts: KDOptions, topk: bool, device: torch.device) -> None:
    """After the chunk loop: raise for what the row flags found (a second host synchronisation), when asked to."""
    bits = list(FLAG_BITS) if opts.check_finite else []
    if topk and host_sync_allowed(device, opts.check_finite):
        bits.append(FLAG_TOPK)  # malformed top-k rows are reported like out-of-range labels
    if bits:
        flag_checks = HostChecks()
        flag_checks.add_first_flagged_rows(flags, tuple(bits))
        check_host_values(flag_checks.read(), check_finite=opts.check_finite, flag_names=prep.flag_names,
                          row_index=prep.index, vocab=prep.rows.w_s.shape[0])


class FusedForward(NamedTuple):
    """What :func:`fused_forward` returns: the losses, and for backward the forward-pass gradients."""

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None  # full-size grad_h, w, b
    denominator: torch.Tensor


def fused_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_negative_hidden, teacher_bias, labels, mask, opts: KDOptions, num_items_in_batch,
                  chunk_size, accum_dtype, autocast_dtype, compact: bool, needs: tuple[bool, bool, bool],
                  topk) -> FusedForward:
    """The fused op's forward without autograd (see the module docstring).

    ``needs`` says which of ``(student_hidden, student_weight, student_bias)`` want a gradient;
    with a scalar reduction those gradients are computed here (at a unit upstream gradient and
    without the mean's denominator: :func:`fused_scale_grads` applies both) and returned in
    ``grads``: ``grad_h`` ``[rows, H]`` in the student GEMM's dtype with zeros on ignored rows,
    ``grad_w``/``grad_b`` in ``accum_dtype``. ``topk`` is the flat ``[rows, k]`` top-k teacher or ``None``.
    """
    device = student_hidden.device
    with torch.autocast(device.type, enabled=False):
        prep = _prepare(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                        teacher_negative_hidden, teacher_bias, labels, mask, opts, num_items_in_batch, chunk_size,
                        accum_dtype, autocast_dtype, compact, topk)
        rows, n = prep.rows, prep.rows.h_s.shape[0]
        has_labels = labels is not None
        eager = any(needs) and opts.reduction != "none"
        coef_kd = coef_ce = None
        if eager:  # unit upstream gradient, no denominator: the float32 factor is applied in backward
            coef_kd = torch.full((n,), opts.kd_weight * opts.kd_scale, device=device)
            coef_ce = torch.full((n,), opts.ce_weight if has_labels else 0.0, device=device)
        kd, ce, flags, grads = _chunk_loop(rows, prep.params, prep.backend, prep.chunk_size, needs, prep.accum_dtype,
                                           coef_kd, coef_ce)
        _check_flags(flags, prep, opts, topk is not None, device)

        index = prep.index
        kd = kd * opts.kd_scale
        if opts.reduction == "none":
            if index is not None:
                kd = torch.zeros(prep.n_rows, dtype=kd.dtype, device=device).index_copy_(0, index, kd)
                ce = torch.zeros(prep.n_rows, dtype=ce.dtype, device=device).index_copy_(0, index, ce)
            lead = student_hidden.shape[:-1]
            kd_loss, ce_loss = kd.reshape(lead), ce.reshape(lead)
        else:
            divide = prep.denominator if opts.reduction == "mean" else 1.0
            kd_loss, ce_loss = kd.sum() / divide, ce.sum() / divide
        loss = opts.kd_weight * kd_loss + opts.ce_weight * ce_loss
        out_dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
        if eager:
            grad_h, grad_w, grad_b = grads
            if grad_h is not None and index is not None:
                grad_h = torch.zeros((prep.n_rows, grad_h.shape[1]), dtype=grad_h.dtype, device=device).index_copy_(
                    0, index, grad_h)
            grads = (grad_h, grad_w, grad_b)
        else:
            grads = None
        return FusedForward(loss.to(out_dtype), kd_loss.to(out_dtype), ce_loss.to(out_dtype), grads,
                            prep.denominator)


def _materialized_factor(grad_loss, grad_kd, grad_ce, opts: KDOptions, has_labels: bool) -> torch.Tensor:
    """:func:`_component_factor` for upstream gradients that are always tensors (zeros when unused).

    That is what ``torch.library`` autograd passes (eagerly and under ``torch.compile``), so
    whether the request is proportional to ``loss`` is decided from the values: on the CPU a
    request that is not raises the same error; on CUDA (no host synchronisation) it gives NaN
    gradients.
    """
    g_loss, g_kd, g_ce = (g.double().reshape(()) for g in (grad_loss, grad_kd, grad_ce))
    kd_total = g_loss * opts.kd_weight + g_kd
    ce_total = g_loss * opts.ce_weight + g_ce
    if opts.kd_weight > 0:
        factor = kd_total / opts.kd_weight
        off = (ce_total - factor * opts.ce_weight).abs() if has_labels else torch.zeros_like(factor)
        scale = ce_total.abs() + (factor * opts.ce_weight).abs()
    elif has_labels and opts.ce_weight > 0:
        factor = ce_total / opts.ce_weight
        off, scale = kd_total.abs(), torch.zeros_like(factor)
    else:
        factor = torch.zeros_like(kd_total)
        off, scale = kd_total.abs() + (ce_total.abs() if has_labels else 0.0), torch.zeros_like(factor)
    inconsistent = off > 1e-9 * scale + 1e-30
    if factor.device.type != "cuda":
        if bool(inconsistent):
            raise RuntimeError(COMPONENT_GRAD_ERROR)
        return factor
    return torch.where(inconsistent, torch.full_like(factor, float("nan")), factor)


def fused_scale_grads(grad_loss, grad_kd, grad_ce, grads, denominator: torch.Tensor, opts: KDOptions,
                      has_labels: bool, dtypes: tuple[torch.dtype, torch.dtype, torch.dtype | None],
                      materialized: bool = False):
    """Backward of a scalar reduction: the forward-pass gradients times the float32 factor, in the inputs' dtypes."""
    grad_h, grad_w, grad_b = grads
    h_dtype, w_dtype, b_dtype = dtypes
    scale_dtype = torch.float64 if h_dtype == torch.float64 else torch.float32
    if materialized:
        factor = _materialized_factor(grad_loss, grad_kd, grad_ce, opts, has_labels)
    else:
        factor = _component_factor(grad_loss, grad_kd, grad_ce, opts, has_labels)
    factor = factor.to(scale_dtype)
    if opts.reduction == "mean":
        factor = factor / denominator.to(scale_dtype)
    return _scaled(grad_h, factor, h_dtype), _scaled(grad_w, factor, w_dtype), _scaled(grad_b, factor, b_dtype)


def fused_recompute_grads(grad_loss, grad_kd, grad_ce, student_hidden, student_weight, student_bias, teacher_hidden,
                          teacher_weight, teacher_negative_hidden, teacher_bias, labels, mask, opts: KDOptions,
                          num_items_in_batch, chunk_size, accum_dtype, autocast_dtype, compact: bool,
                          needs: tuple[bool, bool, bool], topk):
    """Backward of ``reduction="none"``: the chunks again, with the per-row upstream gradients."""
    device = student_hidden.device
    with torch.autocast(device.type, enabled=False):
        prep = _prepare(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                        teacher_negative_hidden, teacher_bias, labels, mask, opts, num_items_in_batch, chunk_size,
                        accum_dtype, autocast_dtype, compact, topk)
        rows, index = prep.rows, prep.index
        h_dtype = student_hidden.dtype
        scale_dtype = torch.float64 if h_dtype == torch.float64 else torch.float32

        def per_row(grad: torch.Tensor | None) -> torch.Tensor:
            if grad is None:
                return torch.zeros(rows.h_s.shape[0], dtype=scale_dtype, device=device)
            grad = grad.reshape(-1).to(scale_dtype)
            return grad if index is None else grad.index_select(0, index)

        coef_kd = (opts.kd_weight * per_row(grad_loss) + per_row(grad_kd)) * opts.kd_scale
        coef_ce = opts.ce_weight * per_row(grad_loss) + per_row(grad_ce)
        if labels is None:
            coef_ce = torch.zeros_like(coef_ce)
        if index is None and rows.labels is not None:  # not compacted: ignored rows get no gradient
            keep = (rows.labels != opts.ignore_index).to(scale_dtype)
            coef_kd, coef_ce = coef_kd * keep, coef_ce * keep
        # the kernels write half-precision gradients: keep the largest coefficient at 1 so none underflows
        factor = torch.maximum(coef_kd.abs().amax(), coef_ce.abs().amax()) if coef_kd.numel() else \
            torch.ones((), device=device)
        factor = torch.where(factor > 0, factor, torch.ones_like(factor))
        _, _, _, (grad_h, grad_w, grad_b) = _chunk_loop(rows, prep.params, prep.backend, prep.chunk_size, needs,
                                                        prep.accum_dtype, coef_kd / factor, coef_ce / factor)
        out_h = _scaled(grad_h, factor, h_dtype)
        if out_h is not None and index is not None:
            out_h = torch.zeros((prep.n_rows, out_h.shape[1]), dtype=h_dtype, device=device).index_copy_(0, index,
                                                                                                          out_h)
        if out_h is not None:
            out_h = out_h.reshape(student_hidden.shape)
        b_dtype = None if student_bias is None else student_bias.dtype
        return out_h, _scaled(grad_w, factor, student_weight.dtype), _scaled(grad_b, factor, b_dtype)


class _FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                teacher_negative_hidden, teacher_bias, labels, mask, opts, num_items_in_batch, chunk_size,
                accum_dtype, want_grads, autocast_dtype, compact, topk_indices, topk_logprobs, *anchors):
        ctx.set_materialize_grads(False)
        topk = None if topk_indices is None else (topk_indices, topk_logprobs)
        needs = tuple(bool(n) and want_grads for n in ctx.needs_input_grad[:3])
        out = fused_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                            teacher_negative_hidden, teacher_bias, labels, mask, opts, num_items_in_batch, chunk_size,
                            accum_dtype, autocast_dtype, compact, needs, topk)
        ctx.mode = "eager" if out.grads is not None else ("recompute" if any(needs) else "none")
        ctx.opts, ctx.has_labels = opts, labels is not None
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
        ctx.hidden_shape = student_hidden.shape
        # anchors: one-element copies of the student inputs, only so that a double backward reaches its error
        if ctx.mode == "eager":
            ctx.save_for_backward(*out.grads, out.denominator, *anchors)
        elif ctx.mode == "recompute":
            ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_negative_hidden, teacher_bias, labels, mask,
                                  opts.alpha if opts.per_row_alpha else None,
                                  num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None,
                                  topk_indices, topk_logprobs, *anchors)
            ctx.recompute = dict(num_items=num_items_in_batch, chunk_size=chunk_size, accum_dtype=accum_dtype,
                                 autocast_dtype=autocast_dtype, compact=compact, needs=needs)
        ctx.n_anchors = len(anchors)
        return out.loss, out.kd_loss, out.ce_loss

    @staticmethod
    @once_differentiable("fused_linear_contrastive_kd_loss")
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        none = (None,) * (15 + ctx.n_anchors)
        if ctx.mode == "none" or (grad_loss is None and grad_kd is None and grad_ce is None):
            return (None, None, None, *none)
        opts = ctx.opts
        if ctx.mode == "eager":
            grad_h, grad_w, grad_b, denominator = ctx.saved_tensors[:4]
            out_h, out_w, out_b = fused_scale_grads(grad_loss, grad_kd, grad_ce, (grad_h, grad_w, grad_b),
                                                    denominator, opts, ctx.has_labels, ctx.dtypes)
            if out_h is not None:
                out_h = out_h.reshape(ctx.hidden_shape)
            return (out_h, out_w, out_b, *none)
        saved = ctx.saved_tensors
        (h_s, w_s, b_s, h_t, w_t, h_n, b_t, labels, mask, alpha, num_items, topk_indices, topk_logprobs) = saved[:13]
        extra = ctx.recompute
        run_opts = opts.replace(alpha=alpha) if alpha is not None else opts
        num_items = num_items if num_items is not None else extra["num_items"]
        topk = None if topk_indices is None else (topk_indices, topk_logprobs)
        out_h, out_w, out_b = fused_recompute_grads(
            grad_loss, grad_kd, grad_ce, h_s, w_s, b_s, h_t, w_t, h_n, b_t, labels, mask, run_opts, num_items,
            extra["chunk_size"], extra["accum_dtype"], extra["autocast_dtype"], extra["compact"], extra["needs"],
            topk)
        return (out_h, out_w, out_b, *none)


def _anchor(tensor: torch.Tensor) -> torch.Tensor:
    """A one-element copy of ``tensor``'s first entry that keeps its autograd history, not its storage."""
    return tensor[(0,) * (tensor.dim() - 1)][:1].clone()


def _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden, labels,
              student_bias, teacher_bias, chunk_size, accum_dtype, mask, opts, topk=None, compact=True):
    for name, tensor in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        check_logits(name, tensor)
    if student_weight.dim() != 2:
        raise ValueError(f"student_weight must be [vocab, hidden], got {tuple(student_weight.shape)}")
    vocab, hidden_s = student_weight.shape
    if student_hidden.shape[-1] != hidden_s:
        raise ValueError(f"student_hidden must end in the student hidden size {hidden_s} (student_weight is "
                         f"[{vocab}, {hidden_s}]), got {tuple(student_hidden.shape)}")
    lead = student_hidden.shape[:-1]
    device = student_hidden.device
    if topk is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("give either teacher_hidden and teacher_weight or a top-k teacher (teacher_topk_indices, "
                             "teacher_topk_logprobs), not both")
        check_topk_options(None, teacher_negative_hidden, opts, ("teacher_hidden", "teacher_negative_hidden"))
        topk_rows.check_topk(*topk, lead, device, "student_hidden")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight are required (or a sparse teacher: "
                             "teacher_topk_indices and teacher_topk_logprobs)")
        _validate_teacher(teacher_hidden, teacher_weight, teacher_negative_hidden, teacher_bias, vocab, lead, device)
    if student_bias is not None:
        check_logits("student_bias", student_bias)
        if student_bias.shape != (vocab,):
            raise ValueError(f"student_bias must have shape ({vocab},), got {tuple(student_bias.shape)}")
    for name, tensor in (("student_weight", student_weight), ("student_bias", student_bias)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} must be on {device} like student_hidden, got {tensor.device}")
    # hidden states and weight may differ (the GEMM runs in the weight's or autocast's dtype); a bias may not
    if student_bias is not None and student_bias.dtype != student_weight.dtype:
        raise TypeError(f"student_bias must have the dtype of student_weight ({student_weight.dtype}), got "
                        f"{student_bias.dtype}")
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError("labels are required when ce_weight > 0")
    else:
        check_labels(labels, lead, device)
    check_mask(mask, lead, device, "student_hidden")
    check_alpha_tensor(opts.alpha, lead, device, "student_hidden")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    allowed = (None, torch.float32, torch.float64, student_weight.dtype)
    if accum_dtype not in allowed:
        raise TypeError(f"accum_dtype must be None, torch.float32, torch.float64 or the weight's dtype, got "
                        f"{accum_dtype}")
    if not isinstance(compact, bool):
        raise TypeError(f"compact must be a bool, got {type(compact).__name__}")


def _validate_teacher(teacher_hidden, teacher_weight, teacher_negative_hidden, teacher_bias, vocab, lead, device):
    check_logits("teacher_hidden", teacher_hidden)
    check_logits("teacher_weight", teacher_weight)
    if teacher_weight.dim() != 2:
        raise ValueError(f"teacher_weight must be [vocab, hidden], got {tuple(teacher_weight.shape)}")
    vocab_t, hidden_t = teacher_weight.shape
    if teacher_hidden.shape[-1] != hidden_t:
        raise ValueError(f"teacher_hidden must end in the teacher hidden size {hidden_t} (teacher_weight is "
                         f"[{vocab_t}, {hidden_t}]), got {tuple(teacher_hidden.shape)}")
    if vocab_t < vocab:
        raise ValueError(f"teacher_weight has a vocabulary of {vocab_t}, smaller than the student's {vocab}: "
                         "the teacher's vocabulary must be at least the student's")
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden must have the leading shape of student_hidden {tuple(lead)}, "
                         f"got {tuple(teacher_hidden.shape[:-1])}")
    if teacher_negative_hidden is not None:
        check_logits("teacher_negative_hidden", teacher_negative_hidden)
        if teacher_negative_hidden.shape != teacher_hidden.shape:
            raise ValueError(f"teacher_negative_hidden must have the shape of teacher_hidden "
                             f"{tuple(teacher_hidden.shape)}, got {tuple(teacher_negative_hidden.shape)}")
    if teacher_bias is not None:
        check_logits("teacher_bias", teacher_bias)
        if teacher_bias.shape != (vocab_t,):
            raise ValueError(f"teacher_bias must have shape ({vocab_t},), got {tuple(teacher_bias.shape)}")
    for name, tensor in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                         ("teacher_negative_hidden", teacher_negative_hidden), ("teacher_bias", teacher_bias)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} must be on {device} like student_hidden, got {tensor.device}")
    pairs = (("teacher_negative_hidden", teacher_negative_hidden, "teacher_hidden", teacher_hidden),
             ("teacher_bias", teacher_bias, "teacher_weight", teacher_weight))
    for name, tensor, other_name, other in pairs:
        if tensor is not None and tensor.dtype != other.dtype:
            raise TypeError(f"{name} must have the dtype of {other_name} ({other.dtype}), got {tensor.dtype}")


def fused_linear_contrastive_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_negative_hidden: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    alpha: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    beta: float = 0.0,
    plausibility: float = 0.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature_scaling: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_components: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    mask: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    compact: bool = True,
) -> torch.Tensor | KDLossOutput:
    """Contrastive KD from final hidden states and ``lm_head`` weights, with no logits materialised.

    Same value and student gradients as ``contrastive_kd_loss(student_hidden @ student_weight.T +
    student_bias, teacher_hidden @ teacher_weight.T + teacher_bias, teacher_negative_hidden @
    teacher_weight.T + teacher_bias, labels, ...)``; every option means what it means there
    (``alpha`` a float or a per-row tensor, ``mask``, the logit scales and softcaps).

    Args:
        student_hidden: ``[..., H_s]`` (fp32/bf16/fp16); gets a gradient (in its own dtype).
        student_weight: ``[V, H_s]`` student ``lm_head`` weight; gets a gradient. Its dtype may
            differ from the hidden states': without autocast the GEMM runs in the weight's dtype,
            under ``torch.autocast`` in the autocast dtype (module docstring, "Dtypes").
        teacher_hidden: ``[..., H_t]`` audio-aware path; ``H_t`` may differ from ``H_s``. ``None``
            with a top-k teacher.
        teacher_weight: ``[V_t, H_t]`` with ``V_t >= V``; rows past ``V`` are never used; its dtype
            may differ from ``teacher_hidden``'s (same rule). ``None`` with a top-k teacher.
        teacher_negative_hidden: ``[..., H_t]`` text-only path, or ``None`` for plain KD.
        labels: ``[...]`` integer pseudo-GT (``ignore_index`` rows contribute nothing and never
            reach a GEMM); a label outside ``[0, V)`` raises a ValueError.
        student_bias, teacher_bias: optional ``[V]`` / ``[V_t]`` of their weight's dtype; the
            student's gets a gradient.
        chunk_size: rows per chunk; at most ``chunk_size x V`` logits per path are alive at once.
            ``None`` chooses it from the shape, dtype and device only (:func:`default_chunk_size`).
        accum_dtype: dtype in which the weight (and bias) gradient is summed across chunks;
            ``None`` means float32 (float64 for float64 weights), also for bf16/fp16 weights; pass
            the weight's dtype for the old half-precision sum. The result is returned in the
            weight's dtype, as autograd requires.
        backend: "auto" (Triton elementwise kernels on CUDA; C++ on the CPU when it builds, else
            PyTorch), "triton", "cpp" or "torch" (PyTorch, with the C++ elementwise kernels on the
            CPU when built). GEMMs always go through ``torch.matmul``.
        check_finite: after the chunk loop, read the kernels' row flags (one more host sync) and
            raise a ValueError naming the arguments whose logits hold NaN/inf (NaN in the hidden
            states, weights or biases, or a GEMM overflow). Off: such rows give NaN.
        mask: optional bool ``[...]``; False rows are dropped like ``ignore_index`` rows.
        num_items_in_batch: as in ``contrastive_kd_loss``; ``0`` gives a zero loss and zero gradients.
        teacher_topk_indices, teacher_topk_logprobs: a sparse teacher (``[..., k]``, log-probabilities
            at the loss temperature; :mod:`caad_kernels.topk`) instead of ``teacher_hidden`` and
            ``teacher_weight``: no teacher GEMM at all. Not with a negative path, ``plausibility``
            or teacher scales/softcaps (compute the contrastive teacher's top-k offline).
        compact: gather the valid rows before the GEMMs (one host synchronisation when labels or a
            mask are given). ``False``: no compaction; on CUDA with ``check_finite=False`` and a
            ``mask`` but no labels the call then never synchronises (CUDA graphs, overlap), at the
            price of GEMMs on ignored rows (labels are always range-checked, which needs one).

    Host synchronisation: one (the valid-row count and the data checks) when labels are given, or
    a mask (with ``compact``), or on the CPU a tensor ``num_items_in_batch`` or ``alpha``; none
    otherwise; ``check_finite`` (or on the CPU a top-k teacher) adds one. Under
    ``torch.compile`` the op is a ``torch.library`` custom op (``fullgraph=True`` traces it; its
    synchronisation happens inside the op at run time).

    Under ``torch.no_grad()`` (or when no student tensor requires grad) no gradient work is done.
    Backward is once-differentiable. With a scalar reduction, ``kd_loss``/``ce_loss``
    (``return_components``) are for logging: backward through them alone is supported only when it
    is proportional to ``loss`` (e.g. ``ce_weight=0``), else it raises a clear error.

    Teacher tensors never receive gradients and are not kept for backward (except with
    ``reduction="none"``). Under DeepSpeed ZeRO-3 the ``lm_head`` weights are partitioned: gather
    them around the call, e.g.::

        with deepspeed.zero.GatheredParameters([student.lm_head.weight], modifier_rank=None):
            loss = fused_linear_contrastive_kd_loss(h_s, student.lm_head.weight, h_t, teacher_w, h_n, y)
            engine.backward(loss)   # inside the context, so the weight's gradient reaches its partition

    (the teacher's weight is read-only: gather it the same way, or keep an unpartitioned copy).

    Returns:
        float32 ``loss`` (scalar, or ``[...]`` with ``reduction="none"``), or ``KDLossOutput``.
    """
    opts = KDOptions(alpha=alpha, temperature=temperature, beta=beta, plausibility=plausibility,
                     kd_weight=kd_weight, ce_weight=ce_weight, temperature_scaling=temperature_scaling,
                     ignore_index=ignore_index, reduction=reduction, backend=backend, check_finite=check_finite,
                     student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                     student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    check_num_items(num_items_in_batch, reduction)
    topk = None
    if teacher_topk_indices is not None or teacher_topk_logprobs is not None:
        topk = (teacher_topk_indices, teacher_topk_logprobs)
    _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden, labels,
              student_bias, teacher_bias, chunk_size, accum_dtype, mask, opts, topk, compact)
    flat = None if topk is None else topk_rows.flat_topk(topk[0], topk[1].detach())
    student = (student_hidden, student_weight, student_bias)
    want_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    args = (student_hidden, student_weight, student_bias, detach(teacher_hidden), detach(teacher_weight),
            detach(teacher_negative_hidden), detach(teacher_bias), labels, mask, opts, num_items_in_batch,
            chunk_size, accum_dtype, want_grads, autocast_dtype_for(student_hidden.device), compact,
            None if flat is None else flat[0], None if flat is None else flat[1])
    if custom_ops.active():
        loss, kd_loss, ce_loss = custom_ops.fused_linear_contrastive_kd(*args)
    else:
        anchors = [_anchor(t) for t in student if want_grads and t is not None and t.requires_grad and t.numel()]
        loss, kd_loss, ce_loss = _FusedLinearFunction.apply(*args, *anchors)
    if return_components:
        return KDLossOutput(loss, kd_loss, ce_loss)
    return loss


class FusedLinearContrastiveKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_linear_contrastive_kd_loss`; options fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
    teacher_negative_hidden=None, labels=None, student_bias=None, teacher_bias=None,
    num_items_in_batch=None, mask=None, alpha=None, teacher_topk_indices=None,
    teacher_topk_logprobs=None)``: ``alpha``, when given, replaces the constructor's for this call
    (a float or a per-row tensor).
    """

    def __init__(self, *, chunk_size: int | None = None, accum_dtype: torch.dtype | None = None,
                 return_components: bool = False, check_finite: bool = False, compact: bool = True,
                 **options: object) -> None:
        super().__init__()
        self.chunk_size, self.accum_dtype, self.return_components = chunk_size, accum_dtype, return_components
        self.compact = compact
        self.options = KDOptions(check_finite=check_finite, **options)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden=None,
                labels=None, student_bias=None, teacher_bias=None, num_items_in_batch=None, mask=None, alpha=None,
                teacher_topk_indices=None, teacher_topk_logprobs=None):
        options = dict(self.options.__dict__)
        if alpha is not None:
            options["alpha"] = alpha
        return fused_linear_contrastive_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype, num_items_in_batch=num_items_in_batch,
            return_components=self.return_components, mask=mask, teacher_topk_indices=teacher_topk_indices,
            teacher_topk_logprobs=teacher_topk_logprobs, compact=self.compact, **options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.__dict__.items())
