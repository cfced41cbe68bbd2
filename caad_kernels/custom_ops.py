"""``torch.library`` custom ops of both losses, so ``torch.compile(fullgraph=True)`` traces them.

Registered ops (namespace ``caad_kernels``), each with a fake (meta) implementation that gives
the output shapes from the input shapes alone:

==========================================  ==============================================================
op                                          computes
==========================================  ==============================================================
``contrastive_kd``                          the logits op's forward: ``(loss, kd_loss, ce_loss, stats,
                                            denominator)``
``contrastive_kd_backward``                 the student logits' gradient
``fused_linear_contrastive_kd``             the fused op's forward: ``(loss, kd_loss, ce_loss, grad_h,
                                            grad_w, grad_b, denominator)``; with a scalar reduction the
                                            three gradients at unit scale (empty tensors otherwise)
``fused_linear_contrastive_kd_scale``       backward of a scalar reduction: those gradients times the
                                            float32 upstream factor, in the inputs' dtypes
``fused_linear_contrastive_kd_recompute``   backward of ``reduction="none"``: the chunks again
==========================================  ==============================================================

Autograd is registered on the forward ops (``torch.library.register_autograd``). Each op runs the
same code as the eager ``torch.autograd.Function`` path (:func:`caad_kernels.contrastive_kd.logits_forward`,
:func:`caad_kernels.fused_linear.fused_forward`, ...); the host synchronisation of an op (its
checks, the fused op's compaction) happens inside the op at run time, where Dynamo does not see
it, so the traced graph has no break. The loss options are passed as the ops' scalar arguments
(constants of the graph); a per-row ``alpha``, a ``num_items_in_batch`` (converted to a tensor
here, so a new value does not recompile) and a top-k teacher as tensors.

Used under ``torch.compile`` (``torch.compiler.is_compiling()``); :func:`eager_custom_ops` makes
eager calls use them too (the tests compare both paths). Differences from the eager path: the
upstream gradients of unused outputs arrive as zeros, so the fused op decides whether a backward
through ``kd_loss``/``ce_loss`` is proportional to ``loss`` from the values (an error on the CPU,
NaN gradients on CUDA when it is not); double backward is not supported.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import fields

import torch

from caad_kernels.options import KDOptions

NAMESPACE = "caad_kernels"
#: the KDOptions fields as schema arguments (``alpha`` is the scalar one; a per-row alpha is a tensor)
OPTION_TYPES = {
    "alpha": "float", "temperature": "float", "beta": "float", "plausibility": "float", "kd_weight": "float",
    "ce_weight": "float", "temperature_scaling": "bool", "ignore_index": "int", "reduction": "str",
    "backend": "str", "check_finite": "bool", "student_logit_scale": "float", "teacher_logit_scale": "float",
    "student_softcap": "float?", "teacher_softcap": "float?",
}
OPTION_NAMES = tuple(OPTION_TYPES)
if set(OPTION_NAMES) != {f.name for f in fields(KDOptions)}:  # pragma: no cover - guards KDOptions changes
    raise ImportError("caad_kernels.custom_ops.OPTION_TYPES does not list the fields of KDOptions")
OPTIONS_SCHEMA = ", ".join(f"{kind} {name}" for name, kind in OPTION_TYPES.items())

_force_eager = False


def active() -> bool:
    """Whether the losses go through the custom ops: under ``torch.compile``, or inside :func:`eager_custom_ops`."""
    return _force_eager or torch.compiler.is_compiling()


@contextlib.contextmanager
def eager_custom_ops(enabled: bool = True) -> Iterator[None]:
    """Run eager calls of both losses through the custom ops (as ``torch.compile`` does); for tests."""
    global _force_eager
    saved, _force_eager = _force_eager, enabled
    try:
        yield
    finally:
        _force_eager = saved


def _option_values(opts: KDOptions) -> list:
    values = []
    for name in OPTION_NAMES:
        value = getattr(opts, name)
        if name == "alpha":
            value = 0.0 if opts.per_row_alpha else float(value)
        values.append(value)
    return values


def _options(values, alpha_rows: torch.Tensor | None) -> KDOptions:
    kwargs = dict(zip(OPTION_NAMES, values))
    if alpha_rows is not None:
        kwargs["alpha"] = alpha_rows
    return KDOptions(**kwargs)


def _num_items_tensor(num_items: object) -> torch.Tensor | None:
    if num_items is None or isinstance(num_items, torch.Tensor):
        return num_items
    return torch.tensor(float(num_items), dtype=torch.float64)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _loss_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# ---- the logits op ----------------------------------------------------------------------------------------------

_LOGITS_INPUTS = ("Tensor student, Tensor? teacher, Tensor? negative, Tensor? labels, Tensor? alpha_rows, "
                  "Tensor? num_items, Tensor? topk_indices, Tensor? topk_logprobs, bool has_labels")
_N_LOGITS_INPUTS = 9


def _logits_forward_impl(student, teacher, negative, labels, alpha_rows, num_items, topk_indices, topk_logprobs,
                         has_labels, *option_values):
    from caad_kernels.contrastive_kd import logits_forward

    topk = None if topk_indices is None else (topk_indices, topk_logprobs)
    return logits_forward(student, teacher, negative, labels, alpha_rows, num_items, topk,
                          _options(option_values, alpha_rows), has_labels)


def _logits_forward_fake(student, teacher, negative, labels, alpha_rows, num_items, topk_indices, topk_logprobs,
                         has_labels, *option_values):
    from caad_kernels.contrastive_kd import stats_dtype

    reduction = option_values[OPTION_NAMES.index("reduction")]
    lead = student.shape[:-1]
    shape = lead if reduction == "none" else ()
    dtype = _loss_dtype(student)
    rows = math.prod(lead)
    stats = student.new_empty((rows, 5), dtype=stats_dtype(student, teacher, topk_logprobs))
    return (student.new_empty(shape, dtype=dtype), student.new_empty(shape, dtype=dtype),
            student.new_empty(shape, dtype=dtype), stats, student.new_empty((), dtype=torch.float32))


_logits_forward_op = torch.library.custom_op(
    f"{NAMESPACE}::contrastive_kd", _logits_forward_impl, mutates_args=(),
    schema=f"({_LOGITS_INPUTS}, {OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_logits_forward_op.register_fake(_logits_forward_fake)


def _logits_backward_impl(grad_loss, grad_kd, grad_ce, stats, denominator, student, teacher, negative, labels,
                          alpha_rows, num_items, topk_indices, topk_logprobs, has_labels, *option_values):
    from caad_kernels.contrastive_kd import logits_backward

    del num_items
    topk = None if topk_indices is None else (topk_indices, topk_logprobs)
    return logits_backward(grad_loss, grad_kd, grad_ce, student, teacher, negative, labels, alpha_rows, topk, stats,
                           denominator, _options(option_values, alpha_rows), has_labels)


def _logits_backward_fake(grad_loss, grad_kd, grad_ce, stats, denominator, student, *rest):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


_logits_backward_op = torch.library.custom_op(
    f"{NAMESPACE}::contrastive_kd_backward", _logits_backward_impl, mutates_args=(),
    schema=(f"(Tensor grad_loss, Tensor grad_kd, Tensor grad_ce, Tensor stats, Tensor denominator, {_LOGITS_INPUTS}, "
            f"{OPTIONS_SCHEMA}) -> Tensor"),
)
_logits_backward_op.register_fake(_logits_backward_fake)


def _logits_setup_context(ctx, inputs, output):
    ctx.inputs = inputs[_N_LOGITS_INPUTS - 1:]  # has_labels and the options
    ctx.save_for_backward(*inputs[:_N_LOGITS_INPUTS - 1], output[3], output[4])


def _logits_autograd_backward(ctx, grad_loss, grad_kd, grad_ce, grad_stats, grad_denominator):
    saved = ctx.saved_tensors
    n_inputs = len(ctx.inputs) + _N_LOGITS_INPUTS - 1
    if not ctx.needs_input_grad[0]:
        return (None,) * n_inputs
    stats, denominator = saved[-2], saved[-1]
    grad = _logits_backward_op(grad_loss, grad_kd, grad_ce, stats, denominator, *saved[:-2], *ctx.inputs)
    return (grad,) + (None,) * (n_inputs - 1)


_logits_forward_op.register_autograd(_logits_autograd_backward, setup_context=_logits_setup_context)


def contrastive_kd(student, teacher, negative, labels, alpha_rows, opts: KDOptions, num_items, has_labels,
                   topk_indices, topk_logprobs):
    """The logits op through the custom op; same arguments as ``_ContrastiveKDFunction.apply``."""
    out = _logits_forward_op(student, teacher, negative, labels, alpha_rows, _num_items_tensor(num_items),
                             topk_indices, topk_logprobs, has_labels, *_option_values(opts))
    return out[0], out[1], out[2]


# ---- the fused op -----------------------------------------------------------------------------------------------

_FUSED_TENSORS = ("Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? teacher_hidden, "
                  "Tensor? teacher_weight, Tensor? teacher_negative_hidden, Tensor? teacher_bias, Tensor? labels, "
                  "Tensor? mask, Tensor? alpha_rows, Tensor? num_items, Tensor? topk_indices, "
                  "Tensor? topk_logprobs")
_N_FUSED_TENSORS = 13
_FUSED_SETTINGS = ("int? chunk_size, ScalarType? accum_dtype, ScalarType? autocast_dtype, bool compact, "
                   "bool[] needs")
_N_FUSED_SETTINGS = 5


def _fused_call(tensors, settings, option_values):
    """Unpack the schema's arguments into :func:`fused_forward`'s."""
    (h_s, w_s, b_s, h_t, w_t, h_n, b_t, labels, mask, alpha_rows, num_items, topk_indices, topk_logprobs) = tensors
    chunk_size, accum_dtype, autocast_dtype, compact, needs = settings
    topk = None if topk_indices is None else (topk_indices, topk_logprobs)
    opts = _options(option_values, alpha_rows)
    return ((h_s, w_s, b_s, h_t, w_t, h_n, b_t, labels, mask, opts, num_items, chunk_size, accum_dtype, autocast_dtype,
             compact, tuple(needs), topk))


def _split(args):
    tensors = args[:_N_FUSED_TENSORS]
    settings = args[_N_FUSED_TENSORS:_N_FUSED_TENSORS + _N_FUSED_SETTINGS]
    return tensors, settings, args[_N_FUSED_TENSORS + _N_FUSED_SETTINGS:]


def _fused_forward_impl(*args):
    from caad_kernels.fused_linear import fused_forward

    out = fused_forward(*_fused_call(*_split(args)))
    grads = out.grads if out.grads is not None else (None, None, None)
    grads = tuple(_empty(out.loss) if g is None else g for g in grads)
    return (out.loss, out.kd_loss, out.ce_loss, *grads, out.denominator)


def _eager_mode(option_values, needs) -> bool:
    return any(needs) and option_values[OPTION_NAMES.index("reduction")] != "none"


def _fused_forward_fake(*args):
    from caad_kernels.fused_linear import gemm_dtype

    tensors, settings, option_values = _split(args)
    h_s, w_s, b_s = tensors[:3]
    chunk_size, accum_dtype, autocast_dtype, compact, needs = settings
    lead = h_s.shape[:-1]
    shape = lead if option_values[OPTION_NAMES.index("reduction")] == "none" else ()
    dtype = _loss_dtype(h_s)
    losses = tuple(h_s.new_empty(shape, dtype=dtype) for _ in range(3))
    empty = h_s.new_empty((0,), dtype=dtype)
    grads = [empty, empty, empty]
    if _eager_mode(option_values, needs):
        accum = accum_dtype or (torch.float64 if w_s.dtype == torch.float64 else torch.float32)
        if needs[0]:
            grads[0] = h_s.new_empty((math.prod(lead), h_s.shape[-1]), dtype=gemm_dtype(w_s.dtype, autocast_dtype))
        if needs[1]:
            grads[1] = w_s.new_empty(w_s.shape, dtype=accum)
        if needs[2] and b_s is not None:
            grads[2] = w_s.new_empty(b_s.shape, dtype=accum)
    return (*losses, *grads, h_s.new_empty((), dtype=torch.float32))


_fused_forward_op = torch.library.custom_op(
    f"{NAMESPACE}::fused_linear_contrastive_kd", _fused_forward_impl, mutates_args=(),
    schema=(f"({_FUSED_TENSORS}, {_FUSED_SETTINGS}, {OPTIONS_SCHEMA}) -> "
            "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
)
_fused_forward_op.register_fake(_fused_forward_fake)


def _scale_impl(grad_loss, grad_kd, grad_ce, grad_h, grad_w, grad_b, denominator, hidden_shape, h_dtype, w_dtype,
                b_dtype, has_labels, *option_values):
    from caad_kernels.fused_linear import fused_scale_grads

    grads = tuple(None if g.numel() == 0 and g.dim() == 1 else g for g in (grad_h, grad_w, grad_b))
    out = fused_scale_grads(grad_loss, grad_kd, grad_ce, grads, denominator, _options(option_values, None),
                            has_labels, (h_dtype, w_dtype, b_dtype), materialized=True)
    out_h, out_w, out_b = out
    out_h = torch.empty(0, dtype=h_dtype, device=grad_loss.device) if out_h is None else out_h.reshape(hidden_shape)
    out_w = torch.empty(0, dtype=w_dtype, device=grad_loss.device) if out_w is None else out_w
    out_b = torch.empty(0, dtype=b_dtype or w_dtype, device=grad_loss.device) if out_b is None else out_b
    return out_h, out_w, out_b


def _scale_fake(grad_loss, grad_kd, grad_ce, grad_h, grad_w, grad_b, denominator, hidden_shape, h_dtype, w_dtype,
                b_dtype, has_labels, *option_values):
    def like(grad, shape, dtype):
        return grad.new_empty((0,) if grad.numel() == 0 and grad.dim() == 1 else shape, dtype=dtype)

    return (like(grad_h, hidden_shape, h_dtype), like(grad_w, grad_w.shape, w_dtype),
            like(grad_b, grad_b.shape, b_dtype or w_dtype))


_scale_op = torch.library.custom_op(
    f"{NAMESPACE}::fused_linear_contrastive_kd_scale", _scale_impl, mutates_args=(),
    schema=("(Tensor grad_loss, Tensor grad_kd, Tensor grad_ce, Tensor grad_h, Tensor grad_w, Tensor grad_b, "
            "Tensor denominator, SymInt[] hidden_shape, ScalarType h_dtype, ScalarType w_dtype, "
            f"ScalarType? b_dtype, bool has_labels, {OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)"),
)
_scale_op.register_fake(_scale_fake)


def _recompute_impl(grad_loss, grad_kd, grad_ce, *args):
    from caad_kernels.fused_linear import fused_recompute_grads

    call = _fused_call(*_split(args))
    out_h, out_w, out_b = fused_recompute_grads(grad_loss, grad_kd, grad_ce, *call)
    h_s, w_s, b_s = args[:3]
    out_h = h_s.new_empty((0,)) if out_h is None else out_h
    out_w = w_s.new_empty((0,)) if out_w is None else out_w
    out_b = w_s.new_empty((0,)) if out_b is None else out_b
    return out_h, out_w, out_b


def _recompute_fake(grad_loss, grad_kd, grad_ce, *args):
    tensors, settings, _ = _split(args)
    h_s, w_s, b_s = tensors[:3]
    needs = settings[4]
    return (h_s.new_empty(h_s.shape) if needs[0] else h_s.new_empty((0,)),
            w_s.new_empty(w_s.shape) if needs[1] else w_s.new_empty((0,)),
            b_s.new_empty(b_s.shape) if needs[2] and b_s is not None else w_s.new_empty((0,)))


_recompute_op = torch.library.custom_op(
    f"{NAMESPACE}::fused_linear_contrastive_kd_recompute", _recompute_impl, mutates_args=(),
    schema=(f"(Tensor grad_loss, Tensor grad_kd, Tensor grad_ce, {_FUSED_TENSORS}, {_FUSED_SETTINGS}, "
            f"{OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)"),
)
_recompute_op.register_fake(_recompute_fake)


def _fused_setup_context(ctx, inputs, output):
    tensors, settings, option_values = _split(inputs)
    ctx.settings, ctx.option_values = settings, option_values
    h_s, w_s, b_s = tensors[:3]
    ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
    ctx.hidden_shape = tuple(h_s.shape)
    ctx.has_labels = tensors[7] is not None
    ctx.eager = _eager_mode(option_values, settings[4])
    if ctx.eager:  # the forward-pass gradients; nothing of the teacher is kept
        ctx.save_for_backward(*output[3:7])
    else:
        ctx.save_for_backward(*tensors)


def _fused_autograd_backward(ctx, grad_loss, grad_kd, grad_ce, *unused):
    n_inputs = _N_FUSED_TENSORS + _N_FUSED_SETTINGS + len(OPTION_NAMES)
    needs = ctx.settings[4]
    if not any(needs):
        return (None,) * n_inputs
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    if ctx.eager:
        grad_h, grad_w, grad_b, denominator = ctx.saved_tensors
        out = _scale_op(grad_loss, grad_kd, grad_ce, grad_h, grad_w, grad_b, denominator, ctx.hidden_shape, h_dtype,
                        w_dtype, b_dtype, ctx.has_labels, *ctx.option_values)
    else:
        out = _recompute_op(grad_loss, grad_kd, grad_ce, *ctx.saved_tensors, *ctx.settings, *ctx.option_values)
    grads = tuple(g if need else None for g, need in zip(out, needs))
    return grads + (None,) * (n_inputs - 3)


_fused_forward_op.register_autograd(_fused_autograd_backward, setup_context=_fused_setup_context)


def fused_linear_contrastive_kd(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_negative_hidden, teacher_bias, labels, mask, opts: KDOptions, num_items,
                                chunk_size, accum_dtype, want_grads, autocast_dtype, compact, topk_indices,
                                topk_logprobs):
    """The fused op through the custom op; same arguments as ``_FusedLinearFunction.apply`` (without anchors)."""
    student = (student_hidden, student_weight, student_bias)
    needs = [bool(want_grads and t is not None and t.requires_grad) for t in student]
    alpha_rows = None
    if opts.per_row_alpha:
        from caad_kernels.contrastive_kd import flat_alpha

        alpha_rows = flat_alpha(opts)
    out = _fused_forward_op(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                            teacher_negative_hidden, teacher_bias, labels, mask, alpha_rows,
                            _num_items_tensor(num_items), topk_indices, topk_logprobs, chunk_size, accum_dtype,
                            autocast_dtype, compact, needs, *_option_values(opts))
    return out[0], out[1], out[2]
