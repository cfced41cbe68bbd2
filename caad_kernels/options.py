"""Options shared by every contrastive KD op, and their validation.

The conventions are those of DESIGN.md section 2: ``z_hat = (1 + alpha) * z_pos - alpha * z_neg``,
``p = softmax(z_hat / temperature)``, ``q = softmax(student / temperature)``, the divergence chosen
by ``beta`` as in TRL's ``generalized_jsd_loss`` (0 forward KL, 1 reverse KL, else the mixture),
``temperature ** 2`` scaling when ``temperature_scaling``, and CE on ``labels`` at temperature 1.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "cpp")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class KDOptions:
    """Every option of ``contrastive_kd_loss`` (and of the fused-linear op), validated on creation."""

    alpha: float = 1.0
    temperature: float = 1.0
    beta: float = 0.0
    plausibility: float = 0.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature_scaling: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    backend: str = "auto"
    check_finite: bool = True

    def __post_init__(self) -> None:
        _check_real("alpha", self.alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 means plain KD against the positive path), got {self.alpha}")
        _check_real("temperature", self.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        _check_real("beta", self.beta)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {self.beta}")
        _check_real("plausibility", self.plausibility)
        if not 0.0 <= self.plausibility < 1.0:
            raise ValueError(f"plausibility must be in [0, 1) (0 disables the cutoff), got {self.plausibility}")
        if self.beta == 1.0 and self.plausibility > 0.0:
            raise ValueError(
                "reverse KL (beta=1) with a plausibility cutoff is infinite by definition: the student puts "
                "mass on tokens the cutoff gives zero teacher probability; use beta < 1 or plausibility=0"
            )
        _check_real("kd_weight", self.kd_weight)
        _check_real("ce_weight", self.ce_weight)
        if self.kd_weight < 0 or self.ce_weight < 0:
            raise ValueError(
                f"kd_weight and ce_weight must be >= 0, got kd_weight={self.kd_weight}, ce_weight={self.ce_weight}"
            )
        if not isinstance(self.temperature_scaling, bool):
            raise TypeError(f"temperature_scaling must be a bool, got {type(self.temperature_scaling).__name__}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {type(self.check_finite).__name__}")

    @property
    def kd_scale(self) -> float:
        """Factor applied to the raw divergence: ``temperature ** 2`` when scaling, else 1."""
        return self.temperature**2 if self.temperature_scaling else 1.0

    def row_params(self, vocab_size: int, has_negative: bool, has_labels: bool) -> RowParams:
        use_negative = has_negative and self.alpha != 0.0
        return RowParams(
            alpha=float(self.alpha) if use_negative else 0.0,
            inv_temperature=1.0 / float(self.temperature),
            beta=float(self.beta),
            log_plausibility=math.log(self.plausibility) if self.plausibility > 0 else None,
            has_negative=use_negative,
            has_labels=has_labels,
            ignore_index=int(self.ignore_index),
            vocab_size=int(vocab_size),
        )


@dataclass(frozen=True)
class RowParams:
    """What a row kernel needs to know; weights, reductions and ``tau**2`` stay in the op.

    ``log_plausibility`` is ``None`` when the cutoff is off. ``alpha`` is 0 and ``has_negative``
    False when there is no negative path. ``vocab_size`` is the student's: teacher columns at or
    past it are never read.
    """

    alpha: float
    inv_temperature: float
    beta: float
    log_plausibility: float | None
    has_negative: bool
    has_labels: bool
    ignore_index: int
    vocab_size: int

    @property
    def divergence(self) -> str:
        """``"forward"`` (beta 0), ``"reverse"`` (beta 1) or ``"mixture"``."""
        if self.beta == 0.0:
            return "forward"
        if self.beta == 1.0:
            return "reverse"
        return "mixture"


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")


def check_logits(name: str, tensor: object) -> torch.Tensor:
    """Type checks for a logits-like tensor; returns it unchanged."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {tensor.dtype}")
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
    return tensor


def check_labels(labels: object, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the leading shape of the student logits {tuple(leading_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")
    return labels


def check_no_nan(named_tensors: dict[str, torch.Tensor | None]) -> None:
    """Raise a ValueError naming the first tensor that holds a NaN; one host synchronisation.

    A single fp32 sum per tensor screens them (a NaN anywhere makes the sum NaN; ``-inf`` entries
    alone do not), so no ``[rows x V]`` boolean mask is built; only a tensor whose sum is NaN
    (a NaN, or ``+inf`` and ``-inf`` together) is inspected element by element.
    """
    present = {name: t for name, t in named_tensors.items() if t is not None and t.numel()}
    if not present:
        return
    sums = torch.stack([t.sum(dtype=torch.float32) if t.dtype != torch.float64 else t.sum().float()
                        for t in present.values()])
    suspicious = torch.isnan(sums).tolist()
    for (name, tensor), suspect in zip(present.items(), suspicious):
        if suspect and bool(torch.isnan(tensor).any()):
            raise ValueError(f"{name} contains NaN; pass check_finite=False to skip this check")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= vocab_size)).logical_and(valid).any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab_size))][:5].tolist()
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}, found {bad}"
        )


def check_num_items(num_items_in_batch: object, reduction: str) -> None:
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch is only used with reduction='mean', got reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        kind = type(num_items_in_batch).__name__
        raise TypeError(f"num_items_in_batch must be a number or a scalar tensor, got {kind}")
    if num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
