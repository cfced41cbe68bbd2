"""Our kernels behind TRL's distillation trainers, with TRL's option names, defaults and reductions.

One line on a constructed trainer::

    from caad_kernels.integrations.trl import use_caad_loss

    trainer = GKDTrainer(...)            # or DistillationTrainer(...)
    use_caad_loss(trainer)

- ``GKDTrainer`` (``trl.experimental.gkd``): its ``generalized_jsd_loss(student_logits,
  teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
  num_items_in_batch=None)`` is replaced on the instance by :func:`generalized_jsd_loss`, same
  signature and value, computed by :func:`caad_kernels.contrastive_kd_loss` without materialising
  the ``[rows x V]`` log-probabilities and mixture TRL builds. Note TRL's ``compute_loss`` passes
  ``beta`` but not ``temperature``: the stock loss runs at temperature 1 whatever
  ``GKDConfig.temperature`` (a sampling temperature) says; ``use_caad_loss(trainer,
  temperature=...)`` sets a loss temperature explicitly.
- ``DistillationTrainer`` (``trl``): its chunked fused-linear ``_chunked_divergence_loss`` is
  replaced, for this trainer's loss calls only, by :func:`chunked_divergence_loss` (same
  signature and return value), i.e. :func:`caad_kernels.fused_linear_contrastive_kd_loss`.
  TRL's trainer keeps doing everything else: generation, the forward redirection through the
  DDP/FSDP wrapper, the logit scales and softcaps read from the configs, the token counting.

TRL's conventions, kept here: ``beta`` 0 forward KL, 1 reverse KL, else the generalised JSD
(ours too); both logits divided by ``temperature``, no ``temperature ** 2`` factor
(``temperature_scaling=False``); rows with label ``-100`` ignored; ``"batchmean"`` divides by the
number of valid rows (by ``student_logits.size(0)`` without labels), ``"sum"``, ``"mean"`` by
the number of elements (valid rows x vocabulary); ``num_items_in_batch`` overrides the reduction
with ``sum / num_items_in_batch``. Differences: ``reduction="none"`` (a ``[rows, V]`` tensor in
TRL) raises, as per-vocabulary terms are exactly what the kernels never form; an empty
denominator (and ``num_items_in_batch=0``) gives 0 where TRL gives NaN; the teacher's vocabulary may be larger
than the student's (extra columns dropped) where TRL refuses; ``DistillationTrainer``'s logged
``entropy`` is NaN unless ``use_caad_loss(trainer, log_entropy=True)`` (one more student GEMM,
without gradients).

Only ``trl`` >= 1.16 has been checked (``_chunked_divergence_loss``'s signature is checked when
patching, and a change raises).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch

from caad_kernels import contrastive_kd_loss, fused_linear_contrastive_kd_loss

TRL_IGNORE_INDEX = -100
GKD_REDUCTIONS = ("batchmean", "sum", "mean")
#: ``trl.trainer.distillation_trainer._chunked_divergence_loss``'s parameters (trl 1.16), in order.
CHUNKED_DIVERGENCE_PARAMETERS = (
    "student_hidden_states", "teacher_hidden_states", "student_lm_head_weight", "teacher_lm_head_weight",
    "completion_mask", "beta", "num_items_in_batch", "student_lm_head_bias", "teacher_lm_head_bias",
    "student_logit_scale", "teacher_logit_scale", "student_final_logit_softcapping",
    "teacher_final_logit_softcapping", "temperature",
)


def _divide(total: torch.Tensor, denominator: Any) -> torch.Tensor:
    if isinstance(denominator, torch.Tensor):
        return total / denominator.to(device=total.device, dtype=total.dtype).clamp(min=1)
    return total / max(denominator, 1)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    temperature_scaling: bool = False,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, same arguments and value, on our kernels (module docstring).

    Args:
        student_logits: ``[B, T, V]`` (any leading dims), fp32/bf16/fp16; gets the gradient.
        teacher_logits: ``[B, T, V_t]``, ``V_t >= V``.
        labels: ``[B, T]``; rows equal to ``-100`` are ignored (TRL's fixed ignore index).
        beta, temperature, reduction, num_items_in_batch: as in TRL (module docstring).
        temperature_scaling: ours, off by default as in TRL; True multiplies by ``temperature**2``.
        backend, check_finite: as in :func:`caad_kernels.contrastive_kd_loss`.

    Returns:
        A float32 scalar.
    """
    if reduction not in GKD_REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {GKD_REDUCTIONS}, got {reduction!r} (TRL's 'none' returns per-vocabulary terms, "
            "which the fused kernels never form; use caad_kernels.contrastive_kd_loss(reduction='none') for per-row "
            "values)"
        )
    mask = None if labels is None else labels != TRL_IGNORE_INDEX
    options = dict(alpha=0.0, temperature=temperature, beta=beta, temperature_scaling=temperature_scaling,
                   backend=backend, check_finite=check_finite, mask=mask)
    if num_items_in_batch is not None:  # sum / num_items_in_batch; 0 items give 0 (TRL: NaN)
        return contrastive_kd_loss(student_logits, teacher_logits, None, None, reduction="mean",
                                   num_items_in_batch=num_items_in_batch, **options)
    total = contrastive_kd_loss(student_logits, teacher_logits, None, None, reduction="sum", **options)
    if reduction == "sum":
        return total
    if mask is not None:
        rows = mask.sum()
    else:
        rows = student_logits.size(0) if reduction == "batchmean" else student_logits[..., 0].numel()
    if reduction == "mean":
        rows = rows * student_logits.size(-1)
    return _divide(total, rows)


def _full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is not None and hasattr(tensor, "full_tensor") and callable(tensor.full_tensor):
        return tensor.full_tensor()
    return tensor


def _student_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                         temperature: float, scale: float, softcap: float | None, backend: str) -> torch.Tensor:
    """``sum_rows H(q)``, ``q = softmax(softcap(scale * (h W^T + b)) / temperature)``, without gradients.

    Reverse KL against a uniform teacher is ``log V - H(q)``: one fused call with a zero teacher.
    """
    vocab = weight.shape[0]
    with torch.no_grad():
        zero_hidden = hidden.new_zeros(*hidden.shape[:-1], 1)
        zero_weight = weight.new_zeros(vocab, 1)
        kl_sum = fused_linear_contrastive_kd_loss(
            hidden.detach(), weight.detach(), zero_hidden, zero_weight, None, None,
            student_bias=None if bias is None else bias.detach(), alpha=0.0, temperature=temperature, beta=1.0,
            temperature_scaling=False, reduction="sum", mask=mask, backend=backend,
            student_logit_scale=scale, student_softcap=softcap,
        )
        return mask.sum().to(kl_sum.dtype) * math.log(vocab) - kl_sum


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    temperature_scaling: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    log_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``DistillationTrainer`` ``_chunked_divergence_loss``, same arguments and returns, on our fused op.

    Args:
        student_hidden_states, teacher_hidden_states: ``[B, K, H_s]`` / ``[B, K, H_t]``, aligned.
        student_lm_head_weight, teacher_lm_head_weight: ``[V, H_s]`` / ``[V_t, H_t]``, ``V_t >= V``;
            a DTensor (FSDP2) is gathered with ``full_tensor()``. A weight whose dtype differs from
            its hidden states is not copied: under autocast the GEMM runs in the autocast dtype
            (TRL's case under mixed precision: the same), otherwise in the weight's dtype (TRL casts
            the weight to the hidden states' dtype instead).
        completion_mask: ``[B, K]``, nonzero marks a row in the loss.
        beta, temperature, num_items_in_batch, the biases, scales and softcaps: as in TRL.
        temperature_scaling, chunk_size, backend: ours (TRL: no ``temperature**2``).
        log_entropy: compute the student entropy sum TRL logs (one more student GEMM, no
            gradient); False returns NaN for it.

    Returns:
        ``(loss, entropy_sum, n_valid)``: the loss (``sum / num_items_in_batch``, else the mean over
        the valid rows, 0 when there are none), the summed student entropy in nats (NaN unless
        ``log_entropy``) and the number of valid rows, all over the local batch.
    """
    mask = completion_mask != 0
    n_valid = mask.sum()
    student_weight, student_bias = _full_tensor(student_lm_head_weight), _full_tensor(student_lm_head_bias)
    teacher_weight, teacher_bias = _full_tensor(teacher_lm_head_weight), _full_tensor(teacher_lm_head_bias)
    # mean over the valid rows, or sum / num_items_in_batch (0 items: 0); mixed dtypes and autocast are the op's
    loss = fused_linear_contrastive_kd_loss(
        student_hidden_states, student_weight, teacher_hidden_states, teacher_weight, None, None,
        student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size, alpha=0.0,
        temperature=temperature, beta=beta, temperature_scaling=temperature_scaling, reduction="mean",
        num_items_in_batch=num_items_in_batch, mask=mask, backend=backend, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale, student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping,
    )
    if log_entropy:
        entropy_sum = _student_entropy_sum(student_hidden_states, student_weight, student_bias, mask, temperature,
                                           student_logit_scale, student_final_logit_softcapping, backend)
    else:
        entropy_sum = torch.full((), float("nan"), device=loss.device)
    return loss, entropy_sum, n_valid


@contextlib.contextmanager
def _module_attribute(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _is_instance(trainer: Any, module_name: str, class_name: str) -> bool:
    import importlib

    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False
    return isinstance(trainer, cls)


def use_caad_loss(trainer: Any, *, temperature: float | None = None, temperature_scaling: bool = False,
                  backend: str = "auto", check_finite: bool = True, chunk_size: int | None = None,
                  log_entropy: bool = False) -> Any:
    """Make a TRL ``GKDTrainer`` or ``DistillationTrainer`` compute its loss with our kernels; returns the trainer.

    Only this trainer instance changes. The options TRL passes (``beta``, and for
    ``DistillationTrainer`` the temperature, scales and softcaps) keep TRL's values.

    Args:
        trainer: a constructed ``trl.experimental.gkd.GKDTrainer`` or ``trl.DistillationTrainer``
            (or a subclass).
        temperature: ``GKDTrainer`` only: the loss temperature (TRL's GKD loss uses 1.0); for
            ``DistillationTrainer`` set ``DistillationConfig.temperature`` instead.
        temperature_scaling: multiply by ``temperature**2`` (not TRL's behaviour; default off).
        backend, check_finite, chunk_size: our kernels' options (``check_finite`` for GKD,
            ``chunk_size`` for ``DistillationTrainer``).
        log_entropy: ``DistillationTrainer`` only: compute the logged student entropy (NaN otherwise).

    Raises:
        TypeError: the trainer is neither; ValueError: an option that does not apply to it, or
            a TRL version whose loss function has another signature.
    """
    if _is_instance(trainer, "trl.experimental.gkd", "GKDTrainer"):
        if chunk_size is not None or log_entropy:
            raise ValueError("chunk_size and log_entropy apply to DistillationTrainer, not GKDTrainer")
        extra = {"temperature_scaling": temperature_scaling, "backend": backend, "check_finite": check_finite}

        def gkd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                     reduction="batchmean", num_items_in_batch=None):
            return generalized_jsd_loss(student_logits, teacher_logits, labels, beta,
                                        temperature if loss_temperature is None else loss_temperature,
                                        reduction, num_items_in_batch, **extra)

        loss_temperature = temperature
        trainer.generalized_jsd_loss = gkd_loss
        return trainer
    if _is_instance(trainer, "trl.trainer.distillation_trainer", "DistillationTrainer"):
        if temperature is not None:
            raise ValueError("DistillationTrainer passes DistillationConfig.temperature to its loss: set it there")
        import trl.trainer.distillation_trainer as distillation

        stock = getattr(distillation, "_chunked_divergence_loss", None)
        names = tuple(inspect.signature(stock).parameters) if stock is not None else ()
        if names != CHUNKED_DIVERGENCE_PARAMETERS:
            raise ValueError(
                "this TRL version's DistillationTrainer loss (_chunked_divergence_loss) has parameters "
                f"{names}, expected {CHUNKED_DIVERGENCE_PARAMETERS} (trl 1.16): the adapter needs updating"
            )
        extra = {"temperature_scaling": temperature_scaling, "backend": backend, "chunk_size": chunk_size,
                 "log_entropy": log_entropy}

        def ours(*args, **kwargs):
            return chunked_divergence_loss(*args, **kwargs, **extra)

        stock_compute_loss = trainer._compute_loss

        def compute_loss(*args, **kwargs):
            with _module_attribute(distillation, "_chunked_divergence_loss", ours):
                return stock_compute_loss(*args, **kwargs)

        trainer._compute_loss = compute_loss
        return trainer
    raise TypeError(
        f"use_caad_loss takes a trl GKDTrainer or DistillationTrainer, got {type(trainer).__name__} (for a "
        "transformers Trainer use caad_kernels.integrations.hf.ContrastiveKDTrainer)"
    )


__all__ = ["chunked_divergence_loss", "generalized_jsd_loss", "use_caad_loss"]
