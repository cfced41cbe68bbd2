"""Fused-linear contrastive KD: hidden states and ``lm_head`` weights in, loss out.

The ``[N x V]`` logits of the three paths are never materialised: rows are processed in chunks of
``chunk_size``; for each chunk the student GEMM and one batched teacher GEMM (positive and
negative hidden states stacked) produce ``chunk_size x V`` logits per path, the row kernel of the
chosen backend computes the per-row losses and writes the student gradient *in place* of the
student chunk logits, and two more GEMMs turn it into the gradients of the hidden states and of
the weight (accumulated across chunks). Teacher rows past the student's vocabulary are never
computed.

With ``reduction`` "mean" or "sum" the gradients of the total loss are computed during the
forward pass with a unit upstream gradient and scaled in backward: the teacher GEMMs run once.
Only when backward finds gradients flowing into the returned components too, or with
``reduction="none"``, does it recompute the chunks with the right per-row coefficients.

There is no host synchronisation inside the chunk loop: the mean's denominator stays a device
tensor. ``check_finite`` (off by default here, unlike the logits-level op, because it syncs)
checks the inputs for NaN first.
"""

from __future__ import annotations

import math

import torch

from caad_kernels.backends import resolve_backend
from caad_kernels.contrastive_kd import KDLossOutput, reduce_rows, reduction_denominator, row_coefficients
from caad_kernels.options import (
    KDOptions,
    check_label_range,
    check_labels,
    check_logits,
    check_no_nan,
    check_num_items,
)
from caad_kernels.rows import as_row_views

CPU_CHUNK_ELEMENTS = 1 << 22  # logits per path per chunk on the CPU: 16 MiB in float32
GPU_CHUNK_FRACTION = 0.05  # share of free device memory the three chunk buffers may take


def default_chunk_size(rows: int, vocab: int, hidden: int, device: torch.device, element_size: int) -> int:
    """Rows per chunk: a power of two that keeps ``3 x chunk x V`` logits small but GEMMs efficient.

    On the CPU the budget is ``CPU_CHUNK_ELEMENTS`` logits per path; on CUDA a fraction of the free
    memory (at least 128 rows, at most 4096). Never more rows than there are.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_CHUNK_FRACTION) // (3 * max(vocab, 1) * element_size)
        chunk = min(max(budget, 128), 4096)
    else:
        chunk = max(CPU_CHUNK_ELEMENTS // max(vocab, 1), 16)
    # GEMMs of a few rows against a wide weight waste most of the matrix unit
    chunk = max(chunk, min(64, max(hidden // 8, 1)))
    chunk = 1 << int(math.floor(math.log2(chunk)))
    return max(1, min(chunk, rows))


def _linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


def _rows_backend_name(backend: str, device: torch.device) -> str:
    # "torch" means chunked PyTorch GEMMs; its elementwise work runs in C++ on the CPU when built
    if backend == "torch":
        return "auto" if device.type == "cpu" else "torch"
    return backend


class _FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                teacher_negative_hidden, teacher_bias, labels, opts, num_items_in_batch, chunk_size,
                accum_dtype):
        ctx.set_materialize_grads(False)
        lead = student_hidden.shape[:-1]
        vocab = student_weight.shape[0]
        h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        h_n = None
        params = opts.row_params(vocab, teacher_negative_hidden is not None, labels is not None)
        if params.has_negative:
            h_n = teacher_negative_hidden.reshape(-1, teacher_negative_hidden.shape[-1])
        rows = h_s.shape[0]
        flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
        device = h_s.device
        backend = resolve_backend(_rows_backend_name(opts.backend, device), device, h_s.dtype)
        if chunk_size is None:
            chunk_size = default_chunk_size(rows, vocab, h_s.shape[1], device, max(h_s.element_size(), 4))
        w_t = teacher_weight[:vocab]
        b_t = None if teacher_bias is None else teacher_bias[:vocab]
        valid = None if flat_labels is None else flat_labels != opts.ignore_index
        denominator = reduction_denominator(valid, rows, num_items_in_batch, device)

        needs = ctx.needs_input_grad
        want_grads = any(needs[:3])
        # gradients in the forward pass when a unit upstream gradient on `loss` scales them exactly; should
        # the returned components be differentiated too, backward recomputes instead
        eager = want_grads and opts.reduction != "none"
        coef_kd = coef_ce = None
        if eager:
            unit = torch.ones((), device=device)
            common = dict(reduction=opts.reduction, denominator=denominator, valid=None if valid is None
                          else valid.float(), rows=rows, device=device)
            coef_kd = row_coefficients(unit, None, opts.kd_weight, opts.kd_scale, **common)
            coef_ce = row_coefficients(unit, None, opts.ce_weight, 1.0, **common)

        ctx.chunk = dict(h_s=h_s, w_s=student_weight, b_s=student_bias, h_t=h_t, h_n=h_n, w_t=w_t, b_t=b_t,
                         labels=flat_labels, params=params, backend=backend, chunk_size=chunk_size,
                         accum_dtype=accum_dtype, needs=needs[:3])
        kd, ce, grads = _chunk_loop(**ctx.chunk, coef_kd=coef_kd, coef_ce=coef_ce)
        kd = kd * opts.kd_scale
        kd_loss = reduce_rows(kd, opts.reduction, denominator, lead)
        ce_loss = reduce_rows(ce, opts.reduction, denominator, lead)
        loss = opts.kd_weight * kd_loss + opts.ce_weight * ce_loss

        ctx.opts, ctx.eager, ctx.lead = opts, eager, lead
        ctx.shapes = (student_hidden.shape, student_weight.shape)
        ctx.valid, ctx.denominator, ctx.grads = valid, denominator, grads
        out_dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        return loss.to(out_dtype), kd_loss.to(out_dtype), ce_loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        none = (None,) * 9
        if ctx.eager and grad_kd is None and grad_ce is None:
            grad_h, grad_w, grad_b = ctx.grads
            scale = torch.zeros((), device=ctx.denominator.device) if grad_loss is None else grad_loss
        else:
            opts = ctx.opts
            rows = ctx.chunk["h_s"].shape[0]
            common = dict(reduction=opts.reduction, denominator=ctx.denominator,
                          valid=None if ctx.valid is None else ctx.valid.float(), rows=rows,
                          device=ctx.denominator.device)
            coef_kd = row_coefficients(grad_loss, grad_kd, opts.kd_weight, opts.kd_scale, **common)
            coef_ce = row_coefficients(grad_loss, grad_ce, opts.ce_weight, 1.0, **common)
            _, _, (grad_h, grad_w, grad_b) = _chunk_loop(**ctx.chunk, coef_kd=coef_kd, coef_ce=coef_ce)
            scale = None
        ctx.chunk = ctx.grads = None
        out = []
        for grad, shape in ((grad_h, ctx.shapes[0]), (grad_w, None), (grad_b, None)):
            if grad is not None:
                if scale is not None:  # the buffers are the op's own: scale them in place
                    grad = grad.mul_(scale.to(grad.dtype))
                if shape is not None:
                    grad = grad.reshape(shape)
            out.append(grad)
        return (*out, *none)


def _chunk_logits(h_s, w_s, b_s, h_t, h_n, w_t, b_t, start, stop):
    """The three paths' logits for rows ``[start, stop)``: ``chunk x V`` each, teacher paths in one GEMM."""
    with torch.no_grad():
        logits = _linear(h_s[start:stop], w_s, b_s)
        if h_n is None:
            return logits, _linear(h_t[start:stop], w_t, b_t), None
        both = _linear(torch.cat([h_t[start:stop], h_n[start:stop]]), w_t, b_t)
        return logits, both[: stop - start], both[stop - start :]


def _chunk_loop(h_s, w_s, b_s, h_t, h_n, w_t, b_t, labels, params, backend, chunk_size, accum_dtype, needs,
                coef_kd, coef_ce):
    """One pass over the row chunks: per-row losses, and the gradients when coefficients are given.

    Each chunk's logits are dropped before the next chunk's are made, so at most one chunk of each
    path is alive at a time.
    """
    rows = h_s.shape[0]
    device = h_s.device
    loss_dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    kd = torch.empty(rows, dtype=loss_dtype, device=device)
    ce = torch.empty(rows, dtype=loss_dtype, device=device)
    with_grad = coef_kd is not None
    grad_h = torch.empty_like(h_s) if with_grad and needs[0] else None
    grad_w = torch.zeros(w_s.shape, dtype=accum_dtype or w_s.dtype, device=device) \
        if with_grad and needs[1] else None
    grad_b = torch.zeros(b_s.shape, dtype=accum_dtype or b_s.dtype, device=device) \
        if with_grad and b_s is not None and needs[2] else None
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        chunk_labels = None if labels is None else labels[start:stop]
        logits, z_pos, z_neg = _chunk_logits(h_s, w_s, b_s, h_t, h_n, w_t, b_t, start, stop)
        views = as_row_views(logits, z_pos, z_neg)
        if not with_grad:
            kd[start:stop], ce[start:stop], _ = backend.forward_rows(*views, chunk_labels, params)
        else:
            # the gradient overwrites the student logits of this chunk: they are not needed afterwards
            coefs = (coef_kd[start:stop], coef_ce[start:stop])
            if hasattr(backend, "loss_and_grad_rows"):  # one pass, each chunk read once
                kd_c, ce_c, _ = backend.loss_and_grad_rows(*views, chunk_labels, *coefs, params, logits)
            else:
                kd_c, ce_c, stats = backend.forward_rows(*views, chunk_labels, params)
                backend.backward_rows(*views, chunk_labels, stats, *coefs, params, logits)
            kd[start:stop], ce[start:stop] = kd_c, ce_c
            _accumulate_grads(logits, h_s[start:stop], w_s, grad_h, grad_w, grad_b, start, stop)
        del logits, z_pos, z_neg, views
    # autograd hands parameters gradients of their own dtype: accum_dtype only sets the precision of the
    # sum across chunks
    grad_w = None if grad_w is None else grad_w.to(w_s.dtype)
    grad_b = None if grad_b is None else grad_b.to(b_s.dtype)
    return kd, ce, (grad_h, grad_w, grad_b)


def _accumulate_grads(grad_logits, h_chunk, w_s, grad_h, grad_w, grad_b, start, stop):
    """Hidden-state gradient rows of this chunk; weight and bias gradients summed across chunks."""
    if grad_h is not None:
        torch.mm(grad_logits, w_s, out=grad_h[start:stop])
    if grad_w is not None:
        if grad_w.dtype == grad_logits.dtype:
            grad_w.addmm_(grad_logits.T, h_chunk)
        else:
            grad_w.add_(grad_logits.T @ h_chunk)
    if grad_b is not None:
        grad_b.add_(grad_logits.sum(0, dtype=grad_b.dtype))


def _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden, labels,
              student_bias, teacher_bias, chunk_size, accum_dtype, opts):
    for name, tensor in (("student_hidden", student_hidden), ("student_weight", student_weight),
                         ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        check_logits(name, tensor)
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError(
            f"student_weight and teacher_weight must be [vocab, hidden], got {tuple(student_weight.shape)} and "
            f"{tuple(teacher_weight.shape)}"
        )
    vocab, hidden_s = student_weight.shape
    vocab_t, hidden_t = teacher_weight.shape
    if student_hidden.shape[-1] != hidden_s:
        raise ValueError(f"student_hidden must end in the student hidden size {hidden_s} (student_weight is "
                         f"[{vocab}, {hidden_s}]), got {tuple(student_hidden.shape)}")
    if teacher_hidden.shape[-1] != hidden_t:
        raise ValueError(f"teacher_hidden must end in the teacher hidden size {hidden_t} (teacher_weight is "
                         f"[{vocab_t}, {hidden_t}]), got {tuple(teacher_hidden.shape)}")
    if vocab_t < vocab:
        raise ValueError(f"teacher_weight has a vocabulary of {vocab_t}, smaller than the student's {vocab}: "
                         "the teacher's vocabulary must be at least the student's")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden must have the leading shape of student_hidden {tuple(lead)}, "
                         f"got {tuple(teacher_hidden.shape[:-1])}")
    if teacher_negative_hidden is not None:
        check_logits("teacher_negative_hidden", teacher_negative_hidden)
        if teacher_negative_hidden.shape != teacher_hidden.shape:
            raise ValueError(f"teacher_negative_hidden must have the shape of teacher_hidden "
                             f"{tuple(teacher_hidden.shape)}, got {tuple(teacher_negative_hidden.shape)}")
    for name, bias, size in (("student_bias", student_bias, vocab), ("teacher_bias", teacher_bias, vocab_t)):
        if bias is not None:
            check_logits(name, bias)
            if bias.shape != (size,):
                raise ValueError(f"{name} must have shape ({size},), got {tuple(bias.shape)}")
    device = student_hidden.device
    tensors = dict(student_weight=student_weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                   teacher_negative_hidden=teacher_negative_hidden, student_bias=student_bias,
                   teacher_bias=teacher_bias)
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} must be on {device} like student_hidden, got {tensor.device}")
    if student_weight.dtype != student_hidden.dtype:
        raise TypeError(f"student_weight must have the dtype of student_hidden ({student_hidden.dtype}), "
                        f"got {student_weight.dtype}")
    if teacher_weight.dtype != teacher_hidden.dtype:
        raise TypeError(f"teacher_weight must have the dtype of teacher_hidden ({teacher_hidden.dtype}), "
                        f"got {teacher_weight.dtype}")
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError("labels are required when ce_weight > 0")
    else:
        check_labels(labels, lead, device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if accum_dtype is not None and accum_dtype not in (torch.float32, torch.float64, student_weight.dtype):
        raise TypeError(f"accum_dtype must be None or torch.float32, got {accum_dtype}")
    if opts.check_finite:
        check_no_nan(dict(student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                          teacher_negative_hidden=teacher_negative_hidden))
        if labels is not None:
            check_label_range(labels, vocab, opts.ignore_index)


def fused_linear_contrastive_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_negative_hidden: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    alpha: float = 1.0,
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
) -> torch.Tensor | KDLossOutput:
    """Contrastive KD from final hidden states and ``lm_head`` weights, with no logits materialised.

    Same value and student gradients as ``contrastive_kd_loss(student_hidden @ student_weight.T +
    student_bias, teacher_hidden @ teacher_weight.T + teacher_bias, teacher_negative_hidden @
    teacher_weight.T + teacher_bias, labels, ...)``; every option means what it means there.

    Args:
        student_hidden: ``[..., H_s]`` (fp32/bf16/fp16); gets a gradient.
        student_weight: ``[V, H_s]`` student ``lm_head`` weight, same dtype; gets a gradient.
        teacher_hidden: ``[..., H_t]`` audio-aware path; ``H_t`` may differ from ``H_s``.
        teacher_weight: ``[V_t, H_t]`` with ``V_t >= V``; rows past ``V`` are never used.
        teacher_negative_hidden: ``[..., H_t]`` text-only path, or ``None`` for plain KD.
        labels: ``[...]`` integer pseudo-GT (``ignore_index`` rows contribute nothing).
        student_bias, teacher_bias: optional ``[V]`` / ``[V_t]``; the student's gets a gradient.
        chunk_size: rows per chunk; at most ``chunk_size x V`` logits per path are alive at once.
            ``None`` chooses it from N, V, H (and the free memory on a GPU).
        accum_dtype: dtype in which the weight (and bias) gradient is summed across chunks, e.g.
            ``torch.float32`` for bf16 weights (one ``[V, H]`` buffer of that dtype); the result is
            returned in the weight's dtype, as autograd requires.
        backend: "auto" (Triton elementwise kernels on CUDA; C++ on the CPU when it builds, else
            PyTorch), "triton", "cpp" or "torch" (PyTorch, with the C++ elementwise kernels on the
            CPU when built). GEMMs always go through ``torch.matmul``.
        check_finite: check the hidden states for NaN (and the label range) first: one host sync.

    Teacher tensors never receive gradients. Under DeepSpeed ZeRO-3 the ``lm_head`` weights are
    partitioned: gather them around the call, e.g.::

        with deepspeed.zero.GatheredParameters([student.lm_head.weight], modifier_rank=None):
            loss = fused_linear_contrastive_kd_loss(h_s, student.lm_head.weight, h_t, teacher_w, h_n, y)
            engine.backward(loss)   # inside the context, so the weight's gradient reaches its partition

    (the teacher's weight is read-only: gather it the same way, or keep an unpartitioned copy).

    Returns:
        float32 ``loss`` (scalar, or ``[...]`` with ``reduction="none"``), or ``KDLossOutput``.
    """
    opts = KDOptions(alpha=alpha, temperature=temperature, beta=beta, plausibility=plausibility,
                     kd_weight=kd_weight, ce_weight=ce_weight, temperature_scaling=temperature_scaling,
                     ignore_index=ignore_index, reduction=reduction, backend=backend, check_finite=check_finite)
    check_num_items(num_items_in_batch, reduction)
    _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden, labels,
              student_bias, teacher_bias, chunk_size, accum_dtype, opts)
    loss, kd_loss, ce_loss = _FusedLinearFunction.apply(
        student_hidden, student_weight, student_bias,
        teacher_hidden.detach(), teacher_weight.detach(),
        None if teacher_negative_hidden is None else teacher_negative_hidden.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        labels, opts, num_items_in_batch, chunk_size, accum_dtype,
    )
    if return_components:
        return KDLossOutput(loss, kd_loss, ce_loss)
    return loss


class FusedLinearContrastiveKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_linear_contrastive_kd_loss`; options fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
    teacher_negative_hidden=None, labels=None, student_bias=None, teacher_bias=None,
    num_items_in_batch=None)``.
    """

    def __init__(self, *, chunk_size: int | None = None, accum_dtype: torch.dtype | None = None,
                 return_components: bool = False, check_finite: bool = False, **options: object) -> None:
        super().__init__()
        self.chunk_size, self.accum_dtype, self.return_components = chunk_size, accum_dtype, return_components
        self.options = KDOptions(check_finite=check_finite, **options)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden=None,
                labels=None, student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return fused_linear_contrastive_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_negative_hidden, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype, num_items_in_batch=num_items_in_batch,
            return_components=self.return_components, **self.options.__dict__,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.__dict__.items())
