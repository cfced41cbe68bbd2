"""Row kernels: the per-row contrastive KD math, one module per backend.

Every backend module exposes the same two functions, used by both the logits-level op and the
fused-linear op (which calls them on one chunk of freshly computed logits at a time):

``forward_rows(student, teacher, negative, labels, params) -> (kd, ce, stats)``
    ``student``/``teacher``/``negative`` are :class:`caad_kernels.rows.RowView` (``negative`` may be
    ``None``), folded together by :func:`caad_kernels.rows.as_row_views` so that they share ``B``
    and ``T``; the teacher's width may exceed the student's
    (only the first ``params.vocab_size`` columns are read). ``labels`` is a contiguous int64
    ``[rows]`` tensor, or ``None`` when ``params.has_labels`` is False. Returns float32 ``[rows]``
    tensors ``kd`` (the raw divergence: no ``tau**2``, no weight) and ``ce`` (at temperature 1),
    both 0 on rows whose label is ``ignore_index``, and ``stats``, float32 ``[rows, 5]`` (unspecified
    on ignored rows, which a backend may skip entirely):

    ====  =================================================================================
    col   meaning
    ====  =================================================================================
    0     ``lse_a``: logsumexp of ``a = z_hat / tau`` (cut-off tokens are ``-inf``)
    1     ``lse_b``: logsumexp of ``b = student / tau``
    2     ``lse_s``: logsumexp of the student logits at temperature 1
    3     ``kl_aux``: ``KL(q || p)`` for reverse KL, ``KL(q || m)`` for the mixture, else 0
    4     ``zmax``: ``max(z_pos)`` over the student's vocabulary when the cutoff is on, else 0
    ====  =================================================================================

``backward_rows(student, teacher, negative, labels, stats, coef_kd, coef_ce, params, grad)``
    Writes, for every row ``i`` and column ``v``,
    ``grad[i, v] = coef_kd[i] * d kd_i / d s_iv + coef_ce[i] * d ce_i / d s_iv``
    into ``grad``, a contiguous ``[rows, V]`` tensor of the student's dtype (it may alias the
    student when the caller no longer needs the logits). ``coef_kd``/``coef_ce`` are float32
    ``[rows]`` and already hold the weights, the reduction factor, ``tau**2`` and zero on ignored
    rows. Closed forms (DESIGN.md section 2), per row, with ``p``, ``q`` at temperature ``tau``:
    forward ``(q - p) / tau``; reverse ``q (log q - log p - KL(q||p)) / tau``; mixture
    ``(1 - beta) q (log(q/m) - KL(q||m)) / tau``; CE ``softmax(s) - onehot(y)``.

``loss_and_grad_rows(student, teacher, negative, labels, coef_kd, coef_ce, params, grad)`` (optional)
    Both in one pass for callers that know the coefficients in advance (the fused-linear op);
    returns what ``forward_rows`` returns.

Conventions every backend honours: a token with ``z_pos = -inf`` has ``z_hat = -inf``; the
cutoff keeps ``v`` iff ``z_pos_v >= zmax + log(plausibility)``; terms with ``p = 0`` (or ``q = 0``)
add nothing, never ``0 * inf``; all accumulation in float32 (float64 inputs: the torch backend
accumulates in float64).
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
