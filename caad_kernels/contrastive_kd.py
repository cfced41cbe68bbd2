"""The logits-level contrastive KD loss: ``contrastive_kd_loss`` and ``ContrastiveKDLoss``.

Forward stores O(rows) statistics, never a ``[rows x V]`` float32 tensor; backward recomputes the
per-token terms from the logits and the statistics and writes the student gradient directly in
the student's dtype. The teacher is dense logits (``teacher_logits``, optionally the negative path)
or a sparse top-k (``teacher_topk_indices`` / ``teacher_topk_logprobs``, :mod:`caad_kernels.topk`).

Host synchronisation: at most one per call, at the end of forward, and only when there is
something data-dependent to check (labels, a ``mask``, ``check_finite``, a tensor
``num_items_in_batch``, a per-row ``alpha`` or a top-k teacher): the kernels' row flags and those
values are read in a single ``.tolist()``. On CUDA with ``check_finite=False`` and no labels there
is none: bad values give NaN instead (:mod:`caad_kernels.validation`).

Two autograd paths share the forward and backward below (:func:`logits_forward`,
:func:`logits_backward`): eagerly a ``torch.autograd.Function``; under ``torch.compile`` the
``torch.library`` custom ops of :mod:`caad_kernels.custom_ops`, which trace with no graph break.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from caad_kernels import custom_ops
from caad_kernels import topk as topk_rows
from caad_kernels.autograd import once_differentiable
from caad_kernels.backends import resolve_backend
from caad_kernels.options import (
    KDOptions,
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


class KDLossOutput(NamedTuple):
    """``loss = kd_weight * kd_loss + ce_weight * ce_loss``; ``kd_loss`` includes ``tau**2`` when scaling."""

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor


NAMES = ("student_logits", "teacher_logits", "teacher_negative_logits")


def validate_logits_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_negative_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    opts: KDOptions,
    mask: torch.Tensor | None = None,
    names: tuple[str, str, str] = NAMES,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Shape, dtype and device checks of the logits-level op (the values are checked by the kernels)."""
    student_name, teacher_name, negative_name = names
    check_logits(student_name, student_logits)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    if topk is not None:
        check_topk_options(teacher_logits, teacher_negative_logits, opts, (teacher_name, negative_name))
        topk_rows.check_topk(*topk, lead, student_logits.device, student_name)
    elif teacher_logits is None:
        raise ValueError(f"{teacher_name} is required (or a sparse teacher: teacher_topk_indices and "
                         "teacher_topk_logprobs)")
    else:
        check_logits(teacher_name, teacher_logits)
    tensors = [] if teacher_logits is None else [(teacher_name, teacher_logits)]
    if teacher_negative_logits is not None:
        check_logits(negative_name, teacher_negative_logits)
        tensors.append((negative_name, teacher_negative_logits))
    for name, tensor in tensors:
        if tensor.shape[:-1] != lead:
            raise ValueError(
                f"{name} must have the leading shape of {student_name} {tuple(lead)}, got {tuple(tensor.shape[:-1])}"
            )
        if tensor.shape[-1] < vocab:
            raise ValueError(
                f"{name} has a vocabulary of {tensor.shape[-1]}, smaller than the student's {vocab}: "
                "the teacher's vocabulary must be at least the student's"
            )
        if tensor.device != student_logits.device:
            raise ValueError(f"{name} must be on {student_logits.device}, got {tensor.device}")
    if teacher_negative_logits is not None and teacher_negative_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{negative_name} must have the shape of {teacher_name} {tuple(teacher_logits.shape)}, "
            f"got {tuple(teacher_negative_logits.shape)}"
        )
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError("labels are required when ce_weight > 0")
    else:
        check_labels(labels, lead, student_logits.device)
    check_mask(mask, lead, student_logits.device, student_name)
    check_alpha_tensor(opts.alpha, lead, student_logits.device, student_name)


def check_topk_options(teacher: object, negative: object, opts: KDOptions, names: tuple[str, str]) -> None:
    """What a sparse top-k teacher cannot be combined with (each is a clear error)."""
    teacher_name, negative_name = names
    if teacher is not None:
        raise ValueError(f"give either {teacher_name} or a top-k teacher (teacher_topk_indices, "
                         "teacher_topk_logprobs), not both")
    if negative is not None:
        raise ValueError(
            f"{negative_name} cannot be combined with a top-k teacher: z_hat = z_pos + alpha (z_pos - z_neg) "
            "needs every logit of both paths; compute the contrastive teacher's top-k offline instead "
            "(caad_kernels.topk_offline: the top k of log_softmax(z_hat / tau) of the full logits)"
        )
    if opts.plausibility > 0:
        raise ValueError("plausibility > 0 cannot be combined with a top-k teacher: apply the cutoff before taking "
                         "the top k offline (caad_kernels.topk_offline; cut tokens get log-probability -inf, i.e. "
                         "empty slots)")
    if opts.teacher_logit_scale != 1.0 or opts.teacher_softcap is not None:
        raise ValueError("teacher_logit_scale / teacher_softcap apply to teacher logits; a top-k teacher gives "
                         "log-probabilities that already include the model's transform: leave them at 1.0 / None")


def row_labels(
    labels: torch.Tensor | None, mask: torch.Tensor | None, ignore_index: int
) -> torch.Tensor | None:
    """Flat int64 labels with masked rows set to ``ignore_index``; without labels, a mask's row marks.

    Without labels the non-ignored rows hold a value that is not ``ignore_index`` (the kernels do
    not read it as a class, ``RowParams.has_labels`` being False).
    """
    if labels is None and mask is None:
        return None
    if labels is None:
        keep = 0 if ignore_index != 0 else 1
        flat = torch.full(mask.shape, keep, dtype=torch.int64, device=mask.device)
    else:
        flat = labels.to(torch.int64)
    if mask is not None:
        flat = torch.where(mask, flat, torch.full((), ignore_index, dtype=torch.int64, device=flat.device))
    return flat.reshape(-1).contiguous()


def flat_alpha(opts: KDOptions) -> torch.Tensor | None:
    """A per-row ``alpha`` as the kernels take it: flat, contiguous, float32 (float64 kept for the torch backend)."""
    if not opts.per_row_alpha:
        return None
    dtype = torch.float64 if opts.alpha.dtype == torch.float64 else torch.float32
    return opts.alpha.detach().reshape(-1).to(dtype).contiguous()


def add_value_checks(
    checks: HostChecks, num_items_in_batch: object, alpha_rows: torch.Tensor | None, valid: torch.Tensor | None
) -> None:
    """Queue the checks of a tensor ``num_items_in_batch`` and of a per-row alpha's values."""
    if isinstance(num_items_in_batch, torch.Tensor):
        checks.add("num_items_in_batch", num_items_in_batch.detach())
    if alpha_rows is not None:
        bad = ~((alpha_rows >= 0) & (alpha_rows < float("inf")))
        if valid is not None:
            bad = bad & valid
        checks.add("alpha_bad", bad.sum())


def reduction_denominator(
    valid: torch.Tensor | None, rows: int, num_items_in_batch: object, device: torch.device
) -> torch.Tensor:
    """What ``reduction="mean"`` divides by: ``num_items_in_batch`` or the valid rows (at least 1), float32.

    ``num_items_in_batch == 0`` (no item in the whole accumulated batch) becomes ``inf``, so the
    loss and every gradient are 0; a negative or NaN value becomes NaN (an error wherever the op
    reads its checks back, a NaN loss where it does not).
    """
    if num_items_in_batch is not None:
        items = torch.as_tensor(num_items_in_batch, device=device).detach().to(torch.float32).reshape(())
        inf = torch.full((), float("inf"), device=device)
        return torch.where(items > 0, items, torch.where(items == 0, inf, torch.full_like(inf, float("nan"))))
    if valid is None:
        return torch.tensor(float(max(rows, 1)), device=device)
    return valid.sum().clamp(min=1).to(torch.float32)


def reduce_rows(
    values: torch.Tensor, reduction: str, denominator: torch.Tensor, lead_shape: torch.Size
) -> torch.Tensor:
    if reduction == "none":
        return values.reshape(lead_shape)
    total = values.sum()
    return total / denominator if reduction == "mean" else total


def row_coefficients(
    grad_loss: torch.Tensor | None,
    grad_component: torch.Tensor | None,
    weight: float,
    scale: float,
    reduction: str,
    denominator: torch.Tensor,
    valid: torch.Tensor | None,
    rows: int,
    device: torch.device,
) -> torch.Tensor:
    """Per-row factor on ``d(row term)/d s`` from the upstream gradients of ``loss`` and the component.

    Computed in float32 (an upstream gradient in a half dtype is upcast first, never the reverse).
    """
    coef = torch.zeros(rows, dtype=torch.float32, device=device)
    if grad_loss is not None and weight != 0:
        coef = coef + weight * grad_loss.reshape(-1).float()
    if grad_component is not None:
        coef = coef + grad_component.reshape(-1).float()
    coef = coef * scale
    if reduction == "mean":
        coef = coef / denominator
    if valid is not None:
        coef = coef * valid
    return coef


def stats_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype of the per-row statistics: float64 when an input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def logits_forward(student: torch.Tensor, teacher: torch.Tensor | None, negative: torch.Tensor | None,
                   labels: torch.Tensor | None, alpha_rows: torch.Tensor | None, num_items_in_batch: object,
                   topk: tuple[torch.Tensor, torch.Tensor] | None, opts: KDOptions, has_labels: bool,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kd_loss, ce_loss, stats, denominator)`` of the logits op, without autograd.

    ``labels`` are the row labels of :func:`row_labels` (flat int64, masked rows at
    ``ignore_index``), ``alpha_rows`` those of :func:`flat_alpha`, ``topk`` the flat ``[rows, k]``
    indices and logprobs of :func:`caad_kernels.topk.flat_topk` (then ``teacher`` is ``None``).
    Raises for what the one host synchronisation finds (when it is allowed).
    """
    device = student.device
    with torch.autocast(device.type, enabled=False):
        lead = student.shape[:-1]
        vocab = student.shape[-1]
        params = opts.row_params(vocab, negative is not None and topk is None, has_labels)
        alpha_rows = alpha_rows if params.per_row_alpha else None
        sync = host_sync_allowed(device, opts.check_finite, has_labels)
        if alpha_rows is not None and not sync:  # no host check: a bad alpha gives its row a NaN loss
            alpha_rows = torch.where((alpha_rows >= 0) & (alpha_rows < float("inf")), alpha_rows, float("nan"))
        if topk is not None:
            (s_rows,) = as_row_views(student)
            kd, ce, stats, flags = topk_rows.forward_rows(s_rows, *topk, labels, params)
        else:
            backend = resolve_backend(opts.backend, device, student.dtype)
            s_rows, t_rows, n_rows = as_row_views(student, teacher, negative if params.has_negative else None)
            kd, ce, stats, flags = backend.forward_rows(s_rows, t_rows, n_rows, labels, params, alpha_rows=alpha_rows)

        valid = None if labels is None else labels != opts.ignore_index
        checks = HostChecks()
        if sync:
            # labels out of range and malformed top-k rows always raise; non-finite inputs with check_finite
            bits = list(FLAG_BITS) if opts.check_finite else ([FLAG_LABEL] if has_labels else [])
            if topk is not None:
                bits.append(FLAG_TOPK)
            checks.add_first_flagged_rows(flags, tuple(bits))
            add_value_checks(checks, num_items_in_batch, alpha_rows, valid)
        teacher_message = ("teacher_topk_logprobs holds NaN or +inf" if topk is not None
                           else f"{NAMES[1]} holds NaN or +inf")
        check_host_values(
            checks.read(), check_finite=opts.check_finite, labels=labels, vocab=vocab,
            ignore_index=opts.ignore_index,
            flag_names={FLAG_STUDENT: f"{NAMES[0]} holds NaN or +inf",
                        FLAG_TEACHER: teacher_message,
                        FLAG_NEGATIVE: f"{NAMES[2]} holds NaN or +inf, or -inf where {NAMES[1]} is finite "
                                       "(z_hat would be +inf)"},
        )  # fmt: skip

        denominator = reduction_denominator(valid, s_rows.rows, num_items_in_batch, device)
        kd = kd * opts.kd_scale
        kd_loss = reduce_rows(kd, opts.reduction, denominator, lead)
        ce_loss = reduce_rows(ce, opts.reduction, denominator, lead)
        loss = opts.kd_weight * kd_loss + opts.ce_weight * ce_loss
        out_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        return (loss.to(out_dtype), kd_loss.to(out_dtype), ce_loss.to(out_dtype),
                stats.to(stats_dtype(student, teacher, None if topk is None else topk[1])), denominator)


def logits_backward(grad_loss: torch.Tensor | None, grad_kd: torch.Tensor | None, grad_ce: torch.Tensor | None,
                    student: torch.Tensor, teacher: torch.Tensor | None, negative: torch.Tensor | None,
                    labels: torch.Tensor | None, alpha_rows: torch.Tensor | None,
                    topk: tuple[torch.Tensor, torch.Tensor] | None, stats: torch.Tensor, denominator: torch.Tensor,
                    opts: KDOptions, has_labels: bool) -> torch.Tensor:
    """The student gradient for upstream gradients of ``(loss, kd_loss, ce_loss)`` (``None``: no gradient)."""
    device = student.device
    with torch.autocast(device.type, enabled=False):
        params = opts.row_params(student.shape[-1], negative is not None and topk is None, has_labels)
        alpha_rows = alpha_rows if params.per_row_alpha else None
        rows = stats.shape[0]
        valid = None if labels is None else (labels != opts.ignore_index).float()
        common = dict(reduction=opts.reduction, denominator=denominator, valid=valid, rows=rows, device=device)
        coef_kd = row_coefficients(grad_loss, grad_kd, opts.kd_weight, opts.kd_scale, **common)
        coef_ce = row_coefficients(grad_loss, grad_ce, opts.ce_weight, 1.0, **common)
        grad = torch.empty(student.shape, dtype=student.dtype, device=device)
        if topk is not None:
            (s_rows,) = as_row_views(student)
            topk_rows.backward_rows(s_rows, *topk, labels, stats, coef_kd, coef_ce, params,
                                    grad.view(-1, student.shape[-1]))
            return grad
        backend = resolve_backend(opts.backend, device, student.dtype)
        s_rows, t_rows, n_rows = as_row_views(student, teacher, negative if params.has_negative else None)
        backend.backward_rows(
            s_rows, t_rows, n_rows, labels, stats, coef_kd, coef_ce, params, grad.view(-1, student.shape[-1]),
            alpha_rows=alpha_rows,
        )  # fmt: skip
        return grad


class _ContrastiveKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, negative, labels, alpha_rows, opts, num_items_in_batch, has_labels,
                topk_indices, topk_logprobs):
        ctx.set_materialize_grads(False)
        topk = None if topk_indices is None else (topk_indices, topk_logprobs)
        loss, kd_loss, ce_loss, stats, denominator = logits_forward(
            student, teacher, negative, labels, alpha_rows, num_items_in_batch, topk, opts, has_labels)
        params = opts.row_params(student.shape[-1], negative is not None and topk is None, has_labels)
        saved_negative = negative if params.has_negative else None
        saved_alpha = alpha_rows if params.per_row_alpha else None
        ctx.save_for_backward(student, teacher, saved_negative, labels, saved_alpha, stats, denominator,
                              topk_indices, topk_logprobs)
        ctx.opts, ctx.has_labels = opts, has_labels
        return loss, kd_loss, ce_loss

    @staticmethod
    @once_differentiable("contrastive_kd_loss")
    def backward(ctx, grad_loss, grad_kd, grad_ce):
        student, teacher, negative, labels, alpha_rows, stats, denominator, topk_indices, topk_logprobs = \
            ctx.saved_tensors
        none = (None,) * 9
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        topk = None if topk_indices is None else (topk_indices, topk_logprobs)
        grad = logits_backward(grad_loss, grad_kd, grad_ce, student, teacher, negative, labels, alpha_rows, topk,
                               stats, denominator, ctx.opts, ctx.has_labels)
        return (grad, *none)


def contrastive_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_negative_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
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
    check_finite: bool = True,
    mask: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
) -> torch.Tensor | KDLossOutput:
    """Contrastive knowledge-distillation loss on logits, without materialising distributions.

    Args:
        student_logits: ``[..., V]`` float16/bfloat16/float32/float64; the only input that gets a
            gradient (returned in its dtype). Any leading dims; slices such as ``logits[:, :-1]``
            are read in place.
        teacher_logits: ``[..., V_t]`` with ``V_t >= V``, the audio-aware (positive) path
            ``z_pos``; columns past ``V`` are dropped before the softmax. ``None`` with a top-k
            teacher.
        teacher_negative_logits: ``[..., V_t]``, the text-only (negative) path ``z_neg``, or
            ``None`` for plain KD against ``z_pos``.
        labels: ``[...]`` integer pseudo-GT for the CE term; rows equal to ``ignore_index``
            contribute nothing to either term. Required when ``ce_weight > 0``. A label outside
            ``[0, V)`` raises a ValueError on every backend (found by the kernels).
        alpha: contrastive strength in ``z_hat = z_pos + alpha (z_pos - z_neg)`` (0: plain KD);
            a float, or a floating tensor of the leading shape ``[...]`` with one value ``>= 0``
            per row (adaptive alpha; no ``[N x V]`` tensor is formed).
        temperature: ``tau`` of ``p = softmax(z_hat / tau)`` and ``q = softmax(s / tau)``.
        beta: 0 forward ``KL(p||q)``, 1 reverse ``KL(q||p)``, otherwise the generalised JSD
            ``beta KL(p||m) + (1-beta) KL(q||m)``, ``m = beta p + (1-beta) q`` (TRL's convention).
        plausibility: adaptive plausibility cutoff in ``[0, 1)``: tokens with
            ``softmax(z_pos) < plausibility * max softmax(z_pos)`` get ``z_hat = -inf``; costs an
            extra sweep over the teacher. 0 disables it.
        kd_weight, ce_weight: ``loss = kd_weight * kd_loss + ce_weight * ce_loss``.
        temperature_scaling: multiply the divergence by ``tau**2`` (Hinton, CAAD); TRL and
            Liger-Kernel do not.
        reduction: ``"mean"`` over valid rows (or ``num_items_in_batch``), ``"sum"``, or
            ``"none"`` (per row, shape ``[...]``).
        num_items_in_batch: denominator of ``"mean"`` for correct gradient accumulation; a number
            or a scalar tensor, ``>= 0`` (a tensor's value is checked in the one host sync); ``0``
            (no item in the accumulated batch) gives a zero loss and zero gradients. Under
            ``torch.compile`` pass a tensor (a Python number is a compile-time constant).
        return_components: return ``KDLossOutput(loss, kd_loss, ce_loss)`` instead of ``loss``.
        backend: ``"auto"`` (triton on CUDA, cpp on CPU, torch otherwise), ``"triton"``,
            ``"cpp"`` or ``"torch"``.
        check_finite: raise a ValueError naming the tensor when an input row holds NaN or ``+inf``
            (or ``z_neg = -inf`` where ``z_pos`` is finite, which would make ``z_hat = +inf``),
            detected by the kernels while they read the rows (no extra pass). With False such
            rows give a NaN loss and NaN gradients on every backend. ``-inf`` logits (masked
            tokens) are allowed everywhere else.
        mask: optional bool ``[...]`` tensor: False rows contribute nothing (no loss, zero
            gradient, not counted in the mean), like ``ignore_index``; combinable with
            ``labels`` and usable without them (KD-only masking).
        student_logit_scale, teacher_logit_scale: each path's logits are multiplied by it first
            (Cohere's ``logit_scale``; Granite's ``logits_scaling`` is ``1 / x``); ``> 0``.
        student_softcap, teacher_softcap: ``None`` or ``cap > 0``: ``cap * tanh(z / cap)`` after
            the scale, per path (both teacher paths) before the contrastive combination (Gemma-2's
            ``final_logit_softcapping``); ``-inf`` stays ``-inf``; the student's gradient goes
            through the ``tanh``. CE and the cutoff use the transformed logits.
        teacher_topk_indices, teacher_topk_logprobs: a sparse teacher instead of
            ``teacher_logits``: ``[..., k]`` token indices (integer) and the teacher's
            log-probabilities at the loss temperature (``log_softmax(z_hat / tau)``); the rest of
            the teacher's mass is one tail bucket matched against the student's mass on the other
            tokens (:mod:`caad_kernels.topk`; ``-inf`` slots are empty). Not with a negative path,
            ``plausibility`` or teacher scales/softcaps (compute them offline).

    Returns:
        float32 loss tensors (float64 for float64 inputs): scalars, or ``[...]`` with ``"none"``.

    Host synchronisation: one, at the end of forward, when labels, a mask, ``check_finite``, a
    tensor ``num_items_in_batch``, a tensor ``alpha`` or a top-k teacher is given; none otherwise,
    and none on CUDA with ``check_finite=False`` and no labels (bad values then give NaN).

    Under ``torch.compile`` the op is a ``torch.library`` custom op (:mod:`caad_kernels.custom_ops`):
    ``fullgraph=True`` traces it; backward through it works, double backward does not.

    Example:
        >>> s, t, n = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10), torch.randn(4, 10)
        >>> loss = contrastive_kd_loss(s, t, n, torch.tensor([1, 2, 3, -100]), alpha=2.0, temperature=2.0,
        ...                            kd_weight=0.7, ce_weight=0.3, backend="torch")
        >>> loss.backward()
    """
    opts = KDOptions(
        alpha=alpha,
        temperature=temperature,
        beta=beta,
        plausibility=plausibility,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        temperature_scaling=temperature_scaling,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        check_finite=check_finite,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
    )
    check_num_items(num_items_in_batch, reduction)
    topk = None
    if teacher_topk_indices is not None or teacher_topk_logprobs is not None:
        topk = (teacher_topk_indices, teacher_topk_logprobs)
    validate_logits_inputs(student_logits, teacher_logits, teacher_negative_logits, labels, opts, mask, topk=topk)
    flat = None if topk is None else topk_rows.flat_topk(*topk)
    args = (
        student_logits,
        None if teacher_logits is None else teacher_logits.detach(),
        None if teacher_negative_logits is None else teacher_negative_logits.detach(),
        row_labels(labels, mask, opts.ignore_index),
        flat_alpha(opts),
        opts,
        num_items_in_batch,
        labels is not None,
        None if flat is None else flat[0],
        None if flat is None else flat[1].detach(),
    )
    if custom_ops.active():
        loss, kd_loss, ce_loss = custom_ops.contrastive_kd(*args)
    else:
        loss, kd_loss, ce_loss = _ContrastiveKDFunction.apply(*args)
    if return_components:
        return KDLossOutput(loss, kd_loss, ce_loss)
    return loss


class ContrastiveKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`contrastive_kd_loss`; options are fixed at construction.

    ``forward(student_logits, teacher_logits, teacher_negative_logits=None, labels=None,
    num_items_in_batch=None, mask=None, alpha=None, teacher_topk_indices=None,
    teacher_topk_logprobs=None)``: ``mask`` and the top-k teacher as in the function; ``alpha``,
    when given, replaces the constructor's for this call (a float or a per-row tensor).
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.return_components = bool(options.pop("return_components", False))
        self.options = KDOptions(**options)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_negative_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        alpha: float | torch.Tensor | None = None,
        teacher_topk_indices: torch.Tensor | None = None,
        teacher_topk_logprobs: torch.Tensor | None = None,
    ) -> torch.Tensor | KDLossOutput:
        options = dict(self.options.__dict__)
        if alpha is not None:
            options["alpha"] = alpha
        return contrastive_kd_loss(
            student_logits,
            teacher_logits,
            teacher_negative_logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            return_components=self.return_components,
            mask=mask,
            teacher_topk_indices=teacher_topk_indices,
            teacher_topk_logprobs=teacher_topk_logprobs,
            **options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.__dict__.items())
