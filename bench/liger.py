"""Liger-Kernel adapters, in the one configuration where its math is ours: the ``"kd"`` config.

``liger-fused-jsd``, ``liger-jsd`` and ``liger-kldiv`` are Liger's Triton kernels (CUDA only);
``liger-chunked-jsd`` is its pure-PyTorch chunked fused-linear JSD, which runs on the CPU too.

How Liger's conventions map onto ours (liger-kernel >= 0.5; checked on every case by the
harness, which fails a case whose loss or gradients disagree with the reference):

* ``LigerJSD(beta)`` / ``LigerFusedLinearJSD(jsd_beta)`` compute
  ``beta * KL(P || M) + (1 - beta) * KL(Q || M)`` with ``M = beta * P + (1 - beta) * Q``, ``P`` the
  teacher and ``Q`` the student, and special-case ``beta == 0`` as forward ``KL(P || Q)`` and
  ``beta == 1`` as reverse ``KL(Q || P)``: TRL's convention, which is ours, so ``beta=0`` maps to
  ``beta=0``. (Releases before the endpoints were special-cased asserted ``0 < beta < 1``: the
  case is then skipped with Liger's message.) The arguments come student first, in log space:
  ``LigerJSD()(log_q, log_p)``.
* ``LigerFusedLinearJSD(temperature=tau)`` divides both logits by ``tau`` and does not multiply
  the loss by ``tau**2``: our ``temperature_scaling=False``. Its weights are ``[V, H]`` like ours;
  the teacher's must have the student's vocabulary, so the teacher weight is sliced to ``[:V]``
  (our op drops teacher columns past ``V`` the same way). No bias.
* ``shift_labels`` only masks rows (``ignore_index``), there is no CE term, and the sum is divided
  by the number of non-ignored rows, i.e. ``reduction="mean"``, ``ce_weight=0``, ``kd_weight=1``.
  The ``"kd"`` config passes no labels, so every implementation divides by ``N``.
* ``LigerKLDIVLoss(reduction="batchmean", log_target=True)(log_q, log_p)`` is
  ``sum exp(log_p) (log_p - log_q) / N`` = forward KL, mean over rows.
* There is no contrastive (negative) path: ``alpha=0``.

* ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (``liger-chunked-jsd``) is Liger's pure-PyTorch
  chunked fused-linear JSD: ``weight_soft_loss * JSD + weight_hard_loss * CE`` over chunks of 1024
  rows, each chunk's gradients taken with ``torch.func.grad_and_value`` in the forward pass, the
  same ``beta``/``temperature`` conventions as above (CE at temperature 1, no ``tau**2``), the sum
  divided by the non-ignored rows. It runs with ``weight_hard_loss=0, weight_soft_loss=1`` and
  ``compiled=False`` (its default ``torch.compile`` of each chunk is not timed: on the CPU it
  needs a working C++ compiler and compiles for tens of seconds), so it runs on the CPU too. It
  needs labels (to mask rows): the ``"kd"`` config passes none, so it gets all-zero labels, none
  ignored, and with ``weight_hard_loss=0`` they only set the denominator ``N``. Like the fused
  JSD it pads a smaller student vocabulary with zero logits rather than dropping teacher columns,
  so it too gets ``teacher_weight[:V]``.

The logits-level Liger losses take log-probabilities, so the adapter materialises
``log_softmax(logits.float() / tau)`` for both student and teacher (in float32, as a careful
user would with bf16 logits); that cost is part of what is measured. ``LigerFusedLinearKLDivLoss``
takes the teacher *distribution* as a ``[N, V]`` tensor rather than teacher hidden states, so it
is a different op and is not compared.
"""

from __future__ import annotations

import importlib.util

import torch

from bench.cases import IGNORE_INDEX, LossConfig, Shape
from bench.impls import Impl, LossFn


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _skip(op: str, shape: Shape, device: torch.device) -> str | None:
    if not liger_installed():
        return "Liger-Kernel not installed (pip install liger-kernel; on the GPU image see bench/README.md)"
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need CUDA"
    return None


def _skip_chunked(op: str, shape: Shape, device: torch.device) -> str | None:
    if not liger_installed():
        return "Liger-Kernel not installed (pip install liger-kernel; on the GPU image see bench/README.md)"
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception as error:
        return f"liger_kernel.chunked_loss does not import here: {type(error).__name__}: {error}"
    return None


def _check_config(config: LossConfig) -> None:
    if (
        config.alpha != 0
        or config.negative
        or config.ce_weight != 0
        or config.temperature_scaling
        or config.plausibility != 0
    ):
        raise ValueError(f"Liger-Kernel computes config 'kd' only, not {config.name!r}")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _build_fused_jsd(op: str, config: LossConfig) -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearJSD

    _check_config(config)
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE_INDEX, temperature=config.temperature)

    def run(x):
        vocab = x.weight_s.shape[0]
        return loss_fn(x.hidden_s, x.weight_s, x.hidden_t, x.weight_t[:vocab], x.labels)

    return run


def _build_chunked_jsd(op: str, config: LossConfig) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    _check_config(config)
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=0.0,
        ignore_index=IGNORE_INDEX,
        temperature=config.temperature,
        compiled=False,
    )

    def run(x):
        vocab = x.weight_s.shape[0]
        labels = x.labels
        if labels is None:  # it masks rows with labels; none ignored, so the mean is over all N rows
            labels = torch.zeros(x.hidden_s.shape[0], dtype=torch.int64, device=x.hidden_s.device)
        return loss_fn(x.hidden_s, x.weight_s, x.hidden_t, x.weight_t[:vocab], labels)

    return run


def _build_jsd(op: str, config: LossConfig) -> LossFn:
    from liger_kernel.transformers import LigerJSD

    _check_config(config)
    loss_fn = LigerJSD(beta=0.0, ignore_index=IGNORE_INDEX)
    tau = config.temperature

    def run(x):
        vocab = x.student.shape[-1]
        return loss_fn(_log_probs(x.student, tau), _log_probs(x.teacher[..., :vocab], tau), x.labels)

    return run


def _build_kldiv(op: str, config: LossConfig) -> LossFn:
    from liger_kernel.transformers import LigerKLDIVLoss

    _check_config(config)
    if config.labels:
        raise ValueError("LigerKLDIVLoss has no ignore_index: it runs without labels only")
    loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    tau = config.temperature

    def run(x):
        vocab = x.student.shape[-1]
        return loss_fn(_log_probs(x.student, tau), _log_probs(x.teacher[..., :vocab], tau))

    return run


# Memory factors: the fused JSD keeps an fp32 [N, V] loss buffer; the chunked JSD holds about eight
# [1024, V] tensors per chunk; the logits-level losses hold the two fp32 log-probability tensors, a
# gradient clone and the autograd buffers of log_softmax.
LIGER_IMPLS = [
    Impl(
        "liger-fused-jsd",
        "liger",
        ("fused",),
        ("kd",),
        _skip,
        _build_fused_jsd,
        naive_memory_factor=2.0,
        failure_skips=True,
    ),
    Impl(
        "liger-chunked-jsd",
        "liger",
        ("fused",),
        ("kd",),
        _skip_chunked,
        _build_chunked_jsd,
        naive_memory_factor=1.0,
        failure_skips=True,
    ),
    Impl(
        "liger-jsd",
        "liger",
        ("logits",),
        ("kd",),
        _skip,
        _build_jsd,
        naive_memory_factor=6.0,
        failure_skips=True,
    ),
    Impl(
        "liger-kldiv",
        "liger",
        ("logits",),
        ("kd",),
        _skip,
        _build_kldiv,
        naive_memory_factor=6.0,
        failure_skips=True,
    ),
]
