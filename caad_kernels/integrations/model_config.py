"""The final-logit transforms a causal LM applies after its ``lm_head``, read from its config.

A model that scales or soft-caps its logits inside ``forward`` does so *after* the ``lm_head``
GEMM, so a loss that runs the GEMM itself (the fused-linear form) must apply the same transform,
or it distils the wrong distribution. The logits form needs nothing: the model's ``logits``
already carry the transform.

Attributes read (on ``config.get_text_config()`` when it exists, as for multimodal models), the
first that is set wins for the scale:

================================  ==================================  =================================
config attribute                  models (transformers 5.x)           transform
================================  ==================================  =================================
``logit_scale``                   Cohere, Cohere2                     ``z * logit_scale``
``output_multiplier``             Muse Glimmer                        ``z * output_multiplier``
``lm_head_multiplier``            Falcon-H1                           ``z * lm_head_multiplier``
``logits_scaling``                Granite, GraniteMoe, MiniCPM3       ``z / logits_scaling``
``logits_scaling`` (hyperclovax)  HyperCLOVA X                        ``z * logits_scaling``
``final_logit_softcapping``       Gemma-2, Gemma-3 (None by default)  ``cap * tanh(z / cap)`` (after
                                                                      the scale)
================================  ==================================  =================================

The list and the order are those of TRL's ``DistillationTrainer`` (trl 1.16), so both read a
config the same way. ``None`` means "not set" (scale 1, no cap).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


@dataclass(frozen=True)
class LogitTransform:
    """``softcap(scale * z)`` with ``softcap(x) = cap * tanh(x / cap)``, identity when ``softcap`` is None."""

    scale: float = 1.0
    softcap: float | None = None

    def as_student(self) -> dict[str, float | None]:
        """The loss options for the student path (``student_logit_scale``, ``student_softcap``)."""
        return {"student_logit_scale": self.scale, "student_softcap": self.softcap}

    def as_teacher(self) -> dict[str, float | None]:
        """The loss options for both teacher paths (``teacher_logit_scale``, ``teacher_softcap``)."""
        return {"teacher_logit_scale": self.scale, "teacher_softcap": self.softcap}


def _number(config: Any, name: str) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"config.{name} must be a finite number or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"config.{name} must be > 0 (it scales or caps the logits), got {value!r}")
    return float(value)


def logit_transform(config: Any) -> LogitTransform:
    """The :class:`LogitTransform` a model with this config applies to its logits (see the module docstring).

    Args:
        config: a ``transformers`` config (or any object with those attributes); for a multimodal
            config its text config is read (``get_text_config()``).

    Raises:
        ValueError: an attribute is set to something other than a finite number ``> 0``.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in _MULTIPLIERS:
        scale = _number(text_config, name)
        if scale is not None:
            break
    if scale is None:
        scaling = _number(text_config, "logits_scaling")
        if scaling is not None:
            multiplies = getattr(text_config, "model_type", None) in _MULTIPLYING_LOGITS_SCALING
            scale = scaling if multiplies else 1.0 / scaling
    softcap = _number(text_config, "final_logit_softcapping")
    return LogitTransform(scale=1.0 if scale is None else scale, softcap=softcap)
