"""Row kernels: the per-row contrastive KD math, one module per backend.

Every backend module exposes the same functions, used by both the logits-level op and the
fused-linear op (which calls them on one chunk of freshly computed logits at a time):

``forward_rows(student, teacher, negative, labels, params, *, alpha_rows=None) -> (kd, ce, stats, flags)``
    ``student``/``teacher``/``negative`` are :class:`caad_kernels.rows.RowView` (``negative`` may be
    ``None``), folded together by :func:`caad_kernels.rows.as_row_views` so that they share ``B``
    and ``T``; the teacher's width may exceed the student's (only the first ``params.vocab_size``
    columns are read). ``labels`` is a contiguous int64 ``[rows]`` tensor or ``None``: rows equal to
    ``params.ignore_index`` are *ignored* (never read: kd = ce = 0, flags 0, zero gradient); when
    ``params.has_labels`` the other rows hold the CE class, else the tensor only marks ignored rows
    (so a ``mask`` without labels is passed as labels that are ``ignore_index`` on masked rows).
    ``alpha_rows`` is a float32 ``[rows]`` tensor when ``params.per_row_alpha`` (``None`` otherwise).
    Returns float32 ``[rows]`` tensors ``kd`` (the raw divergence: no ``tau**2``, no weight) and
    ``ce`` (at temperature 1), ``stats``, float32 ``[rows, 5]`` (unspecified on ignored rows), and
    ``flags``, int32 ``[rows]``, the bits of :mod:`caad_kernels.validation` (NaN/``+inf`` in a path,
    a label out of range); a flagged row has NaN ``kd``, ``ce`` and ``stats`` (hence a NaN gradient):

    ====  =================================================================================
    col   meaning
    ====  =================================================================================
    0     ``lse_a``: logsumexp of ``a = z_hat / tau`` (cut-off tokens are ``-inf``)
    1     ``lse_b``: logsumexp of ``b = s / tau``
    2     ``lse_s``: logsumexp of the (transformed) student logits ``s`` at temperature 1
    3     ``kl_aux``: ``KL(q || p)`` for reverse KL, ``KL(q || m)`` for the mixture, else 0
    4     ``zmax``: ``max(z_pos)`` over the student's vocabulary when the cutoff is on, else 0
    ====  =================================================================================

``backward_rows(student, teacher, negative, labels, stats, coef_kd, coef_ce, params, grad, *, alpha_rows=None)``
    Writes, for every row ``i`` and column ``v``,
    ``grad[i, v] = coef_kd[i] * d kd_i / d x_iv + coef_ce[i] * d ce_i / d x_iv`` (``x`` the raw
    student logits, so through the student's scale and softcap)
    into ``grad``, a ``[rows, V]`` tensor of the student's dtype with unit column stride (its row
    stride may exceed ``V``; it may alias the student when the caller no longer needs the
    logits). ``coef_kd``/``coef_ce`` are float32 ``[rows]`` and already hold the weights, the
    reduction factor, ``tau**2`` and zero on ignored rows. Closed forms (docs/math.md), per
    row, with ``p``, ``q`` at temperature ``tau``, with respect to the transformed ``s``:
    forward ``(q - p) / tau``; reverse ``q (log q - log p - KL(q||p)) / tau``; mixture
    ``(1 - beta) q (log(q/m) - KL(q||m)) / tau``; CE ``softmax(s) - onehot(y)``; then times
    ``scale * (1 - (s / cap)**2)`` (``scale`` without a cap) for the chain rule.

``loss_and_grad_rows(student, teacher, negative, labels, coef_kd, coef_ce, params, grad, *, alpha_rows=None)``
    (optional) Both in one pass for callers that know the coefficients in advance (the
    fused-linear op); returns what ``forward_rows`` returns.

All three take the keyword ``col_limit=None``: an integer (int32 or int64) ``[rows]`` tensor of
per-row column limits. Row ``r`` then reads only the columns ``[0, min(col_limit[r], V))`` of
every path: the columns at or past its limit are never read (they may hold anything), count as
``-inf`` logits in every path (probability 0 for teacher and student) and get a zero gradient; a
label must lie below the limit (else the label flag); a row whose limit is ``<= 0`` has no column
and is ignored like an ``ignore_index`` row (kd = ce = 0, flags 0, zero gradient). So a row with
limit ``L`` gives exactly what the same row cut to its first ``L`` columns gives. Causal attention
is ``col_limit[i] = i + 1`` (:mod:`caad_kernels.attention_kd`). Absent (``None``), every row spans
the vocabulary and the kernels run as before (a compile-time branch in Triton, one comparison per
row in C++).

Conventions every backend honours: the transforms ``s = softcap(student_scale * x)`` and
``z = softcap(teacher_scale * z)`` per teacher path with ``softcap(-inf) = -inf``;
``z_hat = z_pos + alpha * (z_pos - z_neg)`` (better conditioned than ``(1 + alpha) z_pos - alpha z_neg``
at large offsets), and a token with ``z_pos = -inf`` has ``z_hat = -inf``; the cutoff keeps ``v``
iff ``z_pos_v >= zmax + log(plausibility)`` (on the transformed ``z_pos``); terms with ``p = 0``
(or ``q = 0``) add nothing, never ``0 * inf``; all accumulation in float32 (float64 inputs: the
torch backend accumulates in float64); ignored rows are skipped without reading their logits.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

_warned_cpp_fallback = False


def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA device, or ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def load_backend(name: str) -> ModuleType:
    """Import the row-kernel module of backend ``name`` ("torch", "triton" or "cpp")."""
    if name == "torch":
        from caad_kernels.backends import torch_rows

        return torch_rows
    if name == "triton":
        from caad_kernels.backends import triton_rows

        return triton_rows
    if name == "cpp":
        from caad_kernels.backends import cpp_rows

        cpp_rows.load_extension()  # raises a clear error when it cannot be built
        return cpp_rows
    raise ValueError(f"backend must be one of 'auto', 'torch', 'triton', 'cpp', got {name!r}")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Pick the row-kernel module: ``"auto"`` means triton on CUDA, cpp on CPU, torch otherwise.

    float64 inputs always use the torch backend under ``"auto"`` (the compiled kernels accumulate
    in float32). When the C++ extension cannot be built, ``"auto"`` falls back to torch with one
    warning.
    """
    global _warned_cpp_fallback
    if name != "auto":
        module = load_backend(name)
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got tensors on {device}"
            )
        if name == "cpp" and device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        return module
    if dtype == torch.float64:
        return load_backend("torch")
    if device.type == "cuda" and triton_available():
        return load_backend("triton")
    if device.type == "cpu":
        try:
            return load_backend("cpp")
        except Exception as error:  # no compiler, no ninja, a failed build
            if not _warned_cpp_fallback:
                warnings.warn(
                    f"caad_kernels: the C++ CPU kernels are unavailable ({error}); falling back to the "
                    "chunked PyTorch backend",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _warned_cpp_fallback = True
    return load_backend("torch")
