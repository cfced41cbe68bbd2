"""Options shared by every contrastive KD op, and their validation.

The conventions are those of docs/math.md, with the per-path logit transforms in front:
``s = softcap_s(student_logit_scale * student)``, ``z = softcap_t(teacher_logit_scale * teacher)``
for each teacher path, where ``softcap_c(x) = c * tanh(x / c)`` (identity when the cap is
``None``; ``-inf`` stays ``-inf``, a masked token stays masked). Then
``z_hat = z_pos + alpha * (z_pos - z_neg)`` (``alpha`` a float or a per-row tensor),
``p = softmax(z_hat / temperature)``, ``q = softmax(s / temperature)``, the divergence chosen by
``beta`` as in TRL's ``generalized_jsd_loss`` (0 forward KL, 1 reverse KL, else the mixture),
``temperature ** 2`` scaling when ``temperature_scaling``, and CE on ``labels`` at temperature 1
(on the transformed student logits ``s``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "cpp")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class KDOptions:
    """Every option of ``contrastive_kd_loss`` (and of the fused-linear op), validated on creation.

    ``alpha`` is a float or a per-row floating tensor with the student's leading shape (adaptive
    alpha); a tensor's shape and values (finite, ``>= 0``) are checked by the ops, which know the
    student's shape and read the values in their one host synchronisation.
    """

    alpha: float | torch.Tensor = 1.0
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
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, torch.Tensor):
            if not self.alpha.dtype.is_floating_point:
                raise TypeError(f"alpha as a tensor must be floating (one value per row), got {self.alpha.dtype}")
        else:
            _check_real("alpha", self.alpha)
            if self.alpha < 0:
                raise ValueError(
                    f"alpha must be >= 0 (0 means plain KD against the positive path), got {self.alpha}"
                )
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
        for name in ("student_logit_scale", "teacher_logit_scale"):
            value = getattr(self, name)
            _check_real(name, value)
            if not value > 0:
                raise ValueError(f"{name} must be > 0 (logits are multiplied by it), got {value}")
        for name in ("student_softcap", "teacher_softcap"):
            value = getattr(self, name)
            if value is not None:
                _check_real(name, value)
                if not value > 0:
                    raise ValueError(f"{name} must be None (no cap) or > 0 (cap * tanh(z / cap)), got {value}")

    @property
    def per_row_alpha(self) -> bool:
        return isinstance(self.alpha, torch.Tensor)

    @property
    def kd_scale(self) -> float:
        """Factor applied to the raw divergence: ``temperature ** 2`` when scaling, else 1."""
        return self.temperature**2 if self.temperature_scaling else 1.0

    def row_params(self, vocab_size: int, has_negative: bool, has_labels: bool) -> RowParams:
        """The row kernels' view of these options.

        The negative path is used when it is given and ``alpha`` is a tensor or a nonzero float.
        """
        per_row = self.per_row_alpha
        use_negative = has_negative and (per_row or self.alpha != 0.0)
        return RowParams(
            alpha=0.0 if per_row or not use_negative else float(self.alpha),
            inv_temperature=1.0 / float(self.temperature),
            beta=float(self.beta),
            log_plausibility=math.log(self.plausibility) if self.plausibility > 0 else None,
            has_negative=use_negative,
            has_labels=has_labels,
            ignore_index=int(self.ignore_index),
            vocab_size=int(vocab_size),
            per_row_alpha=per_row and use_negative,
            student_scale=float(self.student_logit_scale),
            teacher_scale=float(self.teacher_logit_scale),
            student_softcap=None if self.student_softcap is None else float(self.student_softcap),
            teacher_softcap=None if self.teacher_softcap is None else float(self.teacher_softcap),
        )

    def replace(self, **changes: object) -> KDOptions:
        """A copy with some fields changed (validated again)."""
        fields = dict(self.__dict__)
        fields.update(changes)
        return KDOptions(**fields)


@dataclass(frozen=True)
class RowParams:
    """What a row kernel needs to know; weights, reductions and ``tau**2`` stay in the op.

    ``log_plausibility`` is ``None`` when the cutoff is off. ``alpha`` is the scalar alpha (0 and
    ``has_negative`` False when there is no negative path); with ``per_row_alpha`` the kernels
    take the float32 ``[rows]`` tensor ``alpha_rows`` instead. ``vocab_size`` is the student's:
    teacher columns at or past it are never read. ``has_labels``: CE is computed from the labels
    (when False, a ``labels`` tensor only marks ignored rows). Scales and softcaps are the
    per-path logit transforms (a cap of ``None`` is off).
    """

    alpha: float
    inv_temperature: float
    beta: float
    log_plausibility: float | None
    has_negative: bool
    has_labels: bool
    ignore_index: int
    vocab_size: int
    per_row_alpha: bool = False
    student_scale: float = 1.0
    teacher_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None

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


def check_mask(mask: object, leading_shape: torch.Size, device: torch.device, student_name: str) -> None:
    """``mask`` is ``None`` or a bool tensor with the student's leading shape, on its device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True rows count, False rows are ignored), got {mask.dtype}")
    if mask.shape != leading_shape:
        raise ValueError(
            f"mask must have the leading shape of {student_name} {tuple(leading_shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask must be on {device} like {student_name}, got {mask.device}")


def check_alpha_tensor(alpha: object, leading_shape: torch.Size, device: torch.device, student_name: str) -> None:
    """A per-row ``alpha`` has the student's leading shape and device (its values are checked later)."""
    if not isinstance(alpha, torch.Tensor):
        return
    if alpha.shape != leading_shape:
        raise ValueError(
            f"alpha as a tensor must have the leading shape of {student_name} {tuple(leading_shape)} (one value "
            f"per row), got {tuple(alpha.shape)}"
        )
    if alpha.device != device:
        raise ValueError(f"alpha must be on {device} like {student_name}, got {alpha.device}")


def check_num_items(num_items_in_batch: object, reduction: str) -> None:
    """Type and host-side value checks; a tensor's value is checked in the op's one host sync.

    ``0`` is allowed: no item in the whole accumulated batch, so the loss and its gradients are 0.
    """
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch is only used with reduction='mean', got reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a real scalar tensor, got {num_items_in_batch.dtype}")
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        kind = type(num_items_in_batch).__name__
        raise TypeError(f"num_items_in_batch must be a number or a scalar tensor, got {kind}")
    if not num_items_in_batch >= 0 or not math.isfinite(float(num_items_in_batch)):
        raise ValueError(f"num_items_in_batch must be >= 0 and finite (0: a zero loss), got {num_items_in_batch}")
