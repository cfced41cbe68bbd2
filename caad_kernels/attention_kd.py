"""Attention-map distillation (TinyWave's attention term) without materialising ``[B, heads, T, T]``.

Per student head ``h``, sequence ``b`` and valid query row ``i``:

- student logits ``s_ij = softcap_s(scale_s * q_s[i] . k_s[j])`` over the keys ``j`` visible to
  ``i`` (valid in ``attention_mask`` and, when ``causal``, ``j <= i``); ``q_i = softmax(s_i / tau)``;
- teacher distribution ``p_i``: with a head **map** (student head ``h`` <- one teacher head ``g``)
  ``p_i = softmax(z_gi / tau)``, ``z_gij = softcap_t(scale_t * q_t[g, i] . k_t[g, j])``; with head
  **averaging** (student head ``h`` <- a group ``G_h`` of teacher heads) the *probabilities* are
  averaged: ``p_i = mean_{g in G_h} softmax(z_gi / tau)`` (each teacher head normalised over the
  same visible keys first, then the mean; never an average of logits or of scores);
- the divergence per row chosen by ``beta`` as in the other ops (0: forward ``KL(p || q)``, 1:
  reverse ``KL(q || p)``, else the ``beta``-mixture), times ``tau**2`` when ``temperature_scaling``
  (no effect at the default ``tau = 1``);
- ``reduction="mean"``: the sum over valid query rows and student heads divided by their number
  (``n_valid_rows * H_s``); ``"sum"``; ``"none"``: ``[B, H_s, T]`` with 0 on padded rows.

How: row by row this is the fused-linear KD problem with the queries as hidden states and the
keys as ``lm_head`` weights. Padded positions are dropped first (each sequence's valid tokens are
read in place when they form one run, as with left or right padding, else gathered in order; either
way any key-padding mask becomes a prefix of the keys), then the query rows of one sequence are
processed in chunks: one batched GEMM per chunk gives the
``[H_s, chunk, W]`` student logits (``W`` = the keys up to the chunk's last row when causal, so the
upper triangle is skipped chunk by chunk) and another the teacher's; the row kernels of the chosen
backend (``caad_kernels.backends``) take a per-row column limit (``i + 1`` when causal) so no mask
tensor is built, compute each row's divergence and write the gradient w.r.t. the student logits in
place of them; two more GEMMs turn it into the gradients of the student's queries
(``grad_s @ K``) and keys (``grad_s^T @ Q``, accumulated in float32 over chunks and over the
query heads that share a key head). Memory: O(T x d) per head (the float32 gradient buffers) plus
one chunk of ``(H_s + H_t) x chunk x T`` logits; never ``T x T`` per head.

GQA: query head ``h`` of a model with ``H_kv`` key heads uses key head ``h // (H / H_kv)``, as
Hugging Face's ``repeat_kv`` does (the GEMM groups the query heads of a key head instead of
repeating the keys). Teacher and student may differ in head count, head size, GQA grouping and
dtype; only ``B`` and ``T`` are shared.

Gradients: with "mean"/"sum" (and a student input requiring grad under grad mode) they are
computed during the forward pass at unit weight and scaled in float32 in backward; nothing of the
teacher is kept. With "none", backward recomputes the chunks with the per-row upstream gradients
(the inputs are kept). Teacher tensors never get gradients. Backward is once-differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from caad_kernels.backends import resolve_backend
from caad_kernels.options import KDOptions, RowParams
from caad_kernels.rows import as_row_views

CPU_CHUNK_ELEMENTS = 1 << 22  # student + teacher logits per chunk on the CPU (16 MiB in float32)
CUDA_CHUNK_BYTES = 1 << 28  # bytes of student + teacher logits per chunk on CUDA
ROW_ALIGN = 16  # chunk logits rows are padded to a multiple of this many elements (aligned kernel loads)
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class HeadPlan:
    """Which teacher heads feed each student head.

    ``index``: for a map, the ``[H_s]`` teacher head of each student head (``None`` when it is the
    identity); ``groups``: for averaging, the teacher heads of each student head (``None`` for a
    map); ``uniform``: every group has the same size (one vectorised mean).
    """

    index: tuple[int, ...] | None
    groups: tuple[tuple[int, ...], ...] | None

    @property
    def averaged(self) -> bool:
        return self.groups is not None

    @property
    def uniform(self) -> bool:
        return self.groups is not None and len({len(g) for g in self.groups}) == 1


def head_plan(teacher_heads: object, student_heads: int, teacher_count: int) -> HeadPlan:
    """Validate ``teacher_heads`` and turn it into a :class:`HeadPlan`.

    ``None``: the identity when the head counts are equal, else (``H_t`` a multiple of ``H_s``) the
    average over consecutive groups of ``H_t / H_s`` teacher heads; a sequence of ``H_s`` ints: a
    map; a sequence of ``H_s`` non-empty sequences of ints: averaging over those teacher heads.
    """
    if teacher_heads is None:
        if teacher_count == student_heads:
            return HeadPlan(None, None)
        if teacher_count % student_heads:
            raise ValueError(
                f"teacher_heads is required when the teacher's {teacher_count} query heads are not a multiple of "
                f"the student's {student_heads}: pass one teacher head per student head (a map) or one group of "
                "teacher heads per student head (averaged)"
            )
        size = teacher_count // student_heads
        return HeadPlan(None, tuple(tuple(range(h * size, (h + 1) * size)) for h in range(student_heads)))
    if isinstance(teacher_heads, (str, bytes)) or not isinstance(teacher_heads, Sequence):
        raise TypeError(f"teacher_heads must be None or a sequence (one entry per student head), got "
                        f"{type(teacher_heads).__name__}")
    if len(teacher_heads) != student_heads:
        raise ValueError(f"teacher_heads must have one entry per student head ({student_heads}), got "
                         f"{len(teacher_heads)}")

    def head(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < teacher_count:
            raise ValueError(f"teacher_heads entries must be teacher head indices in [0, {teacher_count}), got "
                             f"{value!r}")
        return int(value)

    if all(isinstance(h, int) and not isinstance(h, bool) for h in teacher_heads):
        index = tuple(head(h) for h in teacher_heads)
        return HeadPlan(None if index == tuple(range(teacher_count)) else index, None)
    groups = []
    for entry in teacher_heads:
        if isinstance(entry, int) and not isinstance(entry, bool):
            groups.append((head(entry),))
        elif isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and len(entry) > 0:
            groups.append(tuple(head(h) for h in entry))
        else:
            raise ValueError(f"teacher_heads entries must be a teacher head index or a non-empty sequence of them, "
                             f"got {entry!r}")
    return HeadPlan(None, tuple(groups))


def default_chunk_size(seq: int, heads: int, device: torch.device, element_size: int) -> int:
    """Query rows per chunk from the shape, dtype and device only (reproducible summation order).

    ``heads`` counts the student and teacher heads whose ``chunk x T`` logits coexist. A power of
    two, at least 16 and at most ``T`` (rounded up to a power of two).
    """
    width = max(seq, 1) * max(heads, 1)
    if device.type == "cuda":
        chunk = max(CUDA_CHUNK_BYTES // (width * max(element_size, 1)), 64)
    else:
        chunk = max(CPU_CHUNK_ELEMENTS // width, 16)
    chunk = 1 << int(math.floor(math.log2(chunk)))
    return max(1, min(chunk, 1 << max(0, math.ceil(math.log2(max(seq, 1))))))


def _grouped_scores(query: torch.Tensor, key: torch.Tensor, rows: slice, width: int) -> torch.Tensor:
    """``[H, rows, width]`` raw scores ``q k^T`` of one sequence; ``query [H, L, d]``, ``key [H_kv, L, d]``.

    The query heads of one key head are stacked as rows of one GEMM (no repeated keys); the last
    dimension is padded to ``ROW_ALIGN`` in memory (the result is a view).
    """
    heads, kv = query.shape[0], key.shape[0]
    group = heads // kv
    q = query[:, rows]
    count = q.shape[1]
    q = q.reshape(kv, group * count, q.shape[-1])
    padded = -(-width // ROW_ALIGN) * ROW_ALIGN
    out = torch.empty(kv, group * count, padded, dtype=query.dtype, device=query.device)[..., :width]
    torch.bmm(q, key[:, :width].transpose(1, 2), out=out)
    return out.view(heads, count, width)


_BMM_OUT_DTYPE_WORKS: bool | None = None


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` (batched) into a float32/float64 buffer, with half operands accumulated in float32."""
    global _BMM_OUT_DTYPE_WORKS
    if acc.dtype == a.dtype:
        acc.baddbmm_(a, b)
        return
    if acc.is_cuda and _BMM_OUT_DTYPE_WORKS is not False:
        try:
            torch.baddbmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _BMM_OUT_DTYPE_WORKS = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _BMM_OUT_DTYPE_WORKS = False
    acc.baddbmm_(a.to(acc.dtype), b.to(acc.dtype))


def _teacher_rows(scores: torch.Tensor, plan: HeadPlan, limits: torch.Tensor | None, first: int,
                  opts: KDOptions) -> torch.Tensor:
    """The ``[H_s, rows, W]`` teacher input of the row kernels from the ``[H_t, rows, W]`` raw scores.

    ``limits``: the rows' column limits (``None``: every column is visible), all ``>= first``.

    A map selects heads (the kernels apply the teacher's scale and softcap). Averaging forms
    ``tau * log(mean_g softmax(z_g / tau))`` in float32 (float64 for float64 inputs) over the
    visible keys, in the log domain (``logaddexp`` over the group: no underflow to ``p = 0``), which
    the kernels (teacher scale 1, no cap) turn back into ``p`` exactly. ``scores`` is consumed.
    """
    if not plan.averaged:
        return scores if plan.index is None else scores[list(plan.index)]
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    z = scores.to(compute)  # the same tensor when it is already float32: modified in place below
    if opts.teacher_softcap is None:
        z.mul_(opts.teacher_logit_scale / opts.temperature)
    else:
        z.mul_(opts.teacher_logit_scale / opts.teacher_softcap).tanh_().mul_(opts.teacher_softcap / opts.temperature)
    if limits is not None:
        block = z[..., first:]  # the columns some row hides: the diagonal block
        hidden = torch.arange(first, z.shape[-1], device=z.device).unsqueeze(0) >= limits.unsqueeze(1)
        block.masked_fill_(hidden, float("-inf"))
    log_p = torch.log_softmax(z, dim=-1)
    del z
    if plan.uniform:
        size = len(plan.groups[0])
        flat = [h for group in plan.groups for h in group]
        consecutive = flat == list(range(len(flat))) and len(flat) == log_p.shape[0]
        picked = (log_p if consecutive else log_p[flat]).view(len(plan.groups), size, *log_p.shape[1:])
        mixed = picked[:, 0]
        for member in range(1, size):
            mixed = torch.logaddexp(mixed, picked[:, member])
    else:
        mixed = torch.stack([torch.logsumexp(log_p[list(g)], dim=0) for g in plan.groups])
        size = None
    if size is not None:
        mixed = mixed - math.log(size)
    else:
        mixed = mixed - torch.tensor([math.log(len(g)) for g in plan.groups], dtype=mixed.dtype,
                                     device=mixed.device).view(-1, 1, 1)
    return mixed.mul_(opts.temperature) if opts.temperature != 1.0 else mixed


@dataclass
class _Sequence:
    """One sequence's valid tokens: ``q_s [H_s, L, d_s]``, ``k_s [H_kv_s, L, d_s]``, teacher likewise."""

    q_s: torch.Tensor
    k_s: torch.Tensor
    q_t: torch.Tensor
    k_t: torch.Tensor


def _sequence_pass(seq: _Sequence, plan: HeadPlan, opts: KDOptions, base: RowParams, backend, chunk: int,
                   causal: bool, coef: torch.Tensor | None, grads: tuple[torch.Tensor, torch.Tensor] | None,
                   loss_dtype: torch.dtype) -> torch.Tensor:
    """Per-row divergences ``[H_s, L]`` of one sequence; with ``coef`` (``[H_s, L]``) also adds
    ``sum coef * kd`` 's gradients into ``grads = (grad_q [H_s, L, d_s], grad_k [H_kv_s, L, d_s])`` (float32/64)."""
    heads, length = seq.q_s.shape[0], seq.q_s.shape[1]
    kv = seq.k_s.shape[0]
    group = heads // kv
    device = seq.q_s.device
    kd = torch.empty(heads, length, dtype=loss_dtype, device=device)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        rows, count = slice(start, stop), stop - start
        width = stop if causal else length
        limits = torch.arange(start + 1, stop + 1, device=device) if causal else None
        student = _grouped_scores(seq.q_s, seq.k_s, rows, width)
        teacher = _teacher_rows(_grouped_scores(seq.q_t, seq.k_t, rows, width), plan, limits, start + 1, opts)
        views = as_row_views(student, teacher)
        params = replace(base, vocab_size=width)
        col_limit = None if limits is None else limits.repeat(heads)
        if coef is None:
            out = backend.forward_rows(views[0], views[1], None, None, params, col_limit=col_limit)
        else:
            grad = student.view(heads * count, width)  # the gradient overwrites the scores (a view, padded rows)
            coef_kd = coef[:, rows].reshape(-1)  # float32 (float64 for float64 inputs: the torch rows keep it)
            coef_ce = torch.zeros_like(coef_kd)
            if hasattr(backend, "loss_and_grad_rows"):
                out = backend.loss_and_grad_rows(views[0], views[1], None, None, coef_kd, coef_ce, params, grad,
                                                 col_limit=col_limit)
            else:
                out = backend.forward_rows(views[0], views[1], None, None, params, col_limit=col_limit)
                backend.backward_rows(views[0], views[1], None, None, out[2], coef_kd, coef_ce, params, grad,
                                      col_limit=col_limit)
            grad_q, grad_k = grads
            g = student.view(kv, group * count, width)
            q_chunk = seq.q_s[:, rows].reshape(kv, group * count, seq.q_s.shape[-1])
            grad_q[:, rows] = torch.bmm(g, seq.k_s[:, :width]).view(heads, count, -1).to(grad_q.dtype)
            _accumulate(grad_k[:, :width], g.transpose(1, 2), q_chunk)
        kd[:, rows] = out[0].view(heads, count).to(loss_dtype)
        del student, teacher, views, out
    return kd


def _compaction(mask: torch.Tensor | None, batch: int, seq: int) -> list[slice | torch.Tensor]:
    """Per sequence, where its valid tokens are: a ``slice`` when they are one run (right or left
    padding: read in place), else the index tensor of their positions (gathered).

    One host synchronisation when a mask is given (plus one per sequence with padding inside it),
    none otherwise.
    """
    if mask is None:
        return [slice(0, seq)] * batch
    valid = mask.bool()
    lengths = valid.sum(1)
    first = valid.to(torch.int32).argmax(1).to(lengths.dtype)
    positions = torch.arange(seq, device=valid.device).unsqueeze(0)
    run = (positions >= first.unsqueeze(1)) & (positions < (first + lengths).unsqueeze(1))
    one_run = (valid == run).all(1)
    host = torch.stack([lengths, first, one_run.to(lengths.dtype)], 1).tolist()
    return [slice(int(start), int(start + n)) if ok else valid[b].nonzero().squeeze(1)
            for b, (n, start, ok) in enumerate(host)]


def _take(x: torch.Tensor, b: int, where: slice | torch.Tensor) -> torch.Tensor:
    return x[b, :, where] if isinstance(where, slice) else x[b].index_select(1, where)


def _length(where: slice | torch.Tensor) -> int:
    return where.stop - where.start if isinstance(where, slice) else int(where.numel())


def _run(inputs, plan, opts, backend_name, chunk_size, causal, mask_plan, coef_full, want_grads):
    """The whole batch: per-row kd ``[B, H_s, T]`` and, with ``coef_full``, float32 grads (full ``T``)."""
    q_s, k_s, q_t, k_t = inputs
    batch, heads, seq_len, dim = q_s.shape
    device = q_s.device
    backend = resolve_backend(backend_name, device, q_s.dtype)
    base = opts.row_params(max(seq_len, 1), has_negative=False, has_labels=False)
    if plan.averaged:
        base = replace(base, teacher_scale=1.0, teacher_softcap=None)
    loss_dtype = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    kd_full = torch.zeros(batch, heads, seq_len, dtype=loss_dtype, device=device)
    grad_q = grad_k = None
    if want_grads:
        accum = torch.float64 if q_s.dtype == torch.float64 else torch.float32
        grad_q = torch.zeros(q_s.shape, dtype=accum, device=device)
        grad_k = torch.zeros(k_s.shape, dtype=accum, device=device)
    element = q_s.element_size()
    for b, where in enumerate(mask_plan):
        length = _length(where)
        if length == 0:
            continue
        chunk = chunk_size or default_chunk_size(length, heads + q_t.shape[1], device, element)
        part = _Sequence(_take(q_s, b, where), _take(k_s, b, where), _take(q_t, b, where), _take(k_t, b, where))
        grads = None
        coef = None
        if want_grads:
            grads = (torch.zeros(heads, length, dim, dtype=grad_q.dtype, device=device),
                     torch.zeros(k_s.shape[1], length, dim, dtype=grad_k.dtype, device=device))
            coef = _take(coef_full, b, where) if coef_full is not None else \
                torch.ones(heads, length, dtype=loss_dtype, device=device)
        kd = _sequence_pass(part, plan, opts, base, backend, chunk, causal, coef, grads, loss_dtype)
        if isinstance(where, slice):
            kd_full[b, :, where] = kd
            if grads is not None:
                grad_q[b, :, where], grad_k[b, :, where] = grads
        else:
            kd_full[b].index_copy_(1, where, kd)
            if grads is not None:
                grad_q[b].index_copy_(1, where, grads[0])
                grad_k[b].index_copy_(1, where, grads[1])
    return kd_full, grad_q, grad_k


class _AttentionKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, mask, plan, opts, backend, chunk_size, causal, reduction, want_grads):
        ctx.set_materialize_grads(False)
        batch, heads, seq_len, _ = q_s.shape
        mask_plan = _compaction(mask, batch, seq_len)
        count = sum(_length(w) for w in mask_plan) * heads
        ctx.dtypes = (q_s.dtype, k_s.dtype)
        ctx.reduction = reduction
        eager = want_grads and reduction != "none"
        kd, grad_q, grad_k = _run((q_s, k_s, q_t, k_t), plan, opts, backend, chunk_size, causal, mask_plan, None,
                                  eager)
        scale = opts.kd_scale
        if reduction == "none":
            out = kd * scale
            ctx.rerun = (plan, opts, backend, chunk_size, causal, mask_plan)
            if want_grads:
                ctx.save_for_backward(q_s, k_s, q_t, k_t)
            return out.float() if out.dtype != torch.float64 else out
        total = kd.sum() * scale
        factor = scale if reduction == "sum" else scale / max(count, 1)
        loss = total if reduction == "sum" else total / max(count, 1)
        ctx.factor = factor
        if eager:
            ctx.save_for_backward(grad_q, grad_k)
        return loss.float() if loss.dtype != torch.float64 else loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        none = (None,) * 8  # mask and the options
        if grad_out is None:
            return None, None, None, None, *none
        q_dtype, k_dtype = ctx.dtypes
        if ctx.reduction == "none":
            q_s, k_s, q_t, k_t = ctx.saved_tensors
            plan, opts, backend, chunk_size, causal, mask_plan = ctx.rerun
            coef = grad_out.to(torch.float64 if q_s.dtype == torch.float64 else torch.float32) * opts.kd_scale
            _, grad_q, grad_k = _run((q_s, k_s, q_t, k_t), plan, opts, backend, chunk_size, causal, mask_plan, coef,
                                     True)
            return grad_q.to(q_dtype), grad_k.to(k_dtype), None, None, *none
        grad_q, grad_k = ctx.saved_tensors
        factor = grad_out.to(grad_q.dtype) * ctx.factor
        return (grad_q * factor).to(q_dtype), (grad_k * factor).to(k_dtype), None, None, *none


def _check(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {tensor.dtype}")
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be [batch, heads, T, head_dim] (post-RoPE, as the attention layer sees it), "
                         f"got shape {tuple(tensor.shape)}")
    return tensor


def _validate(q_s, k_s, q_t, k_t, attention_mask, chunk_size, reduction) -> None:
    for name, tensor in (("student_query", q_s), ("student_key", k_s), ("teacher_query", q_t),
                         ("teacher_key", k_t)):
        _check(name, tensor)
    batch, _, seq_len, _ = q_s.shape
    for role, q, k in (("student", q_s, k_s), ("teacher", q_t, k_t)):
        if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]:
            raise ValueError(f"{role}_key must be [batch, kv_heads, T, head_dim] matching {role}_query "
                             f"{tuple(q.shape)} in batch, T and head_dim, got {tuple(k.shape)}")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"{role}_query's {q.shape[1]} heads must be a multiple of {role}_key's {k.shape[1]} "
                             "key heads (GQA)")
        if k.dtype != q.dtype:
            raise TypeError(f"{role}_key must have the dtype of {role}_query ({q.dtype}), got {k.dtype}")
    if q_t.shape[0] != batch or q_t.shape[2] != seq_len:
        raise ValueError(f"teacher_query must share batch and T with student_query {tuple(q_s.shape)}, got "
                         f"{tuple(q_t.shape)}")
    for name, tensor in (("student_key", k_s), ("teacher_query", q_t), ("teacher_key", k_t)):
        if tensor.device != q_s.device:
            raise ValueError(f"{name} must be on {q_s.device} like student_query, got {tensor.device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a [batch, T] tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != (batch, seq_len):
            raise ValueError(f"attention_mask must be [batch, T] = [{batch}, {seq_len}] (1/True = a real token), got "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool or integer (1 = a real token), got {attention_mask.dtype}")
        if attention_mask.device != q_s.device:
            raise ValueError(f"attention_mask must be on {q_s.device}, got {attention_mask.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def attention_kd_loss(
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
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Divergence between the teacher's and the student's attention maps of one layer, never forming them.

    Args:
        student_query: ``[B, H_s, T, d_s]`` post-RoPE queries (fp32/bf16/fp16/fp64); get a gradient.
        student_key: ``[B, H_kv_s, T, d_s]`` post-RoPE keys, ``H_s`` a multiple of ``H_kv_s`` (GQA);
            same dtype; get a gradient.
        teacher_query, teacher_key: the teacher's, ``[B, H_t, T, d_t]`` and ``[B, H_kv_t, T, d_t]``
            (own head count, size and dtype); never get gradients.
        attention_mask: optional ``[B, T]`` bool/int, 1 for real tokens (any padding side): padded
            positions are neither queries nor keys.
        teacher_heads: ``None`` (identity when ``H_t == H_s``, else the probabilities averaged over
            consecutive groups of ``H_t / H_s`` teacher heads), ``H_s`` teacher head indices (a map:
            student head ``h`` <- teacher head ``teacher_heads[h]``), or ``H_s`` groups of indices
            (student head ``h`` <- the mean of the attention probabilities of those teacher heads).
        causal: keys ``j <= i`` only (decoder self-attention); ``False``: every valid key.
        student_scale, teacher_scale: score scales, default ``1 / sqrt(head_dim)`` (pass the model's
            ``attention.scaling`` when it differs).
        student_softcap, teacher_softcap: ``cap * tanh(score / cap)`` after the scale (Gemma-2's
            ``attn_logit_softcapping``), or ``None``.
        temperature, beta, temperature_scaling: as in ``contrastive_kd_loss`` (``tau`` divides both
            logits; ``beta`` 0 forward KL teacher || student, 1 reverse KL, else the mixture).
        reduction: "mean" (over valid query rows and student heads), "sum" or "none" (``[B, H_s, T]``).
        chunk_size: query rows per chunk (``None``: from the shape and device, :func:`default_chunk_size`).
        backend: row kernels: "auto", "torch", "cpp" or "triton" (``caad_kernels.backends``).

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``[B, H_s, T]`` with ``reduction="none"``.

    Host synchronisation: one when ``attention_mask`` is given (where each sequence's tokens are; one
    more per sequence with padding between its tokens), none otherwise.
    """
    _validate(student_query, student_key, teacher_query, teacher_key, attention_mask, chunk_size, reduction)
    plan = head_plan(teacher_heads, student_query.shape[1], teacher_query.shape[1])
    opts = KDOptions(
        temperature=temperature, beta=beta, temperature_scaling=temperature_scaling, backend=backend,
        student_logit_scale=float(student_query.shape[-1] ** -0.5 if student_scale is None else student_scale),
        teacher_logit_scale=float(teacher_query.shape[-1] ** -0.5 if teacher_scale is None else teacher_scale),
        student_softcap=student_softcap, teacher_softcap=teacher_softcap,
    )  # validates the options
    want_grads = torch.is_grad_enabled() and (student_query.requires_grad or student_key.requires_grad)
    return _AttentionKDFunction.apply(
        student_query, student_key, teacher_query.detach(), teacher_key.detach(), attention_mask, plan, opts,
        backend, chunk_size, causal, reduction, want_grads,
    )


class AttentionKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`attention_kd_loss`; options fixed at construction.

    ``forward(student_query, student_key, teacher_query, teacher_key, attention_mask=None)``.
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = dict(options)

    def forward(self, student_query, student_key, teacher_query, teacher_key, attention_mask=None):
        return attention_kd_loss(student_query, student_key, teacher_query, teacher_key, attention_mask,
                                 **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
