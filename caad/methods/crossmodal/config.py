"""Config sections of the text-teacher methods (cross-modal, source-wise, layer-wise).

:class:`AnswerKDConfig` holds what the three share: the answer-token distillation loss of
docs/math.md (temperature, divergence, KD and CE weights, the fused op's backend). Each method's
section subclasses it: :class:`CrossModalConfig` here, :class:`caad.methods.sourcewise.SourceWiseConfig`,
:class:`caad.methods.layerwise.LayerWiseConfig`. Every field has a one-line help (``caad.config``'s
convention); :meth:`validate` checks value ranges and :meth:`check_paths` the teacher folders, both with
errors naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from caad.config import TrainerConfig, _check, _check_checkpoint
from caad.config import config_field as _field

__all__ = ["AnswerKDConfig", "CrossModalConfig"]


@dataclass
class AnswerKDConfig(TrainerConfig):
    """The trainer's fields plus the answer-token KD loss: ``kd_weight * D(p_t || q_s) + ce_weight * CE``."""

    temperature: float = _field(2.0, "softmax temperature of teacher and student")
    kd_weight: float = _field(0.5, "weight of the divergence on the answer tokens (0: CE only, no teacher)")
    ce_weight: float = _field(0.5, "weight of the cross-entropy on the reference answer")
    beta: float = _field(0.0, "divergence: 0 forward KL, 1 reverse KL, between: generalised JSD")
    temperature_scaling: bool = _field(True, "multiply the divergence by temperature^2")
    loss_backend: Literal["auto", "cpp", "torch", "triton"] = _field("auto", "kernel backend of the fused loss")
    loss_chunk_size: int | None = _field(None, "rows per chunk of the fused loss (null: automatic)")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        checks: list[tuple[bool, str, str]] = [
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.kd_weight >= 0, "kd_weight", "must be >= 0"),
            (self.ce_weight >= 0, "ce_weight", "must be >= 0"),
            (
                self.kd_weight + self.ce_weight + self.other_terms_weight() > 0,
                "kd_weight",
                "kd_weight + ce_weight must be > 0 (nothing to learn from)",
            ),
            (0 <= self.beta <= 1, "beta", "must be in [0, 1]"),
            (self.loss_chunk_size is None or self.loss_chunk_size >= 1, "loss_chunk_size", "must be >= 1"),
        ]
        for ok, key, message in checks:
            _check(ok, prefix, key, f"{message}, got {getattr(self, key)!r}")

    def other_terms_weight(self) -> float:
        """The total weight of a method's further loss terms (hidden states...), 0 here."""
        return 0.0

    @property
    def needs_teacher(self) -> bool:
        """Whether the KD term is on (``kd_weight > 0``): CE-only runs load no teacher."""
        return self.kd_weight > 0


@dataclass
class CrossModalConfig(AnswerKDConfig):
    """Cross-modal KD from a text teacher (method ``crossmodal``, arXiv 2509.14930).

    ``t2t``: teacher and student both read the text query; ``s2t``: the teacher reads the text query,
    the student hears it spoken. Each channel on or off, with its weight.
    """

    teacher: str | None = _field(None, "text teacher: a local Hugging Face causal LM folder (unused at kd_weight 0)")
    t2t: bool = _field(True, "text-to-text channel: the student reads the text query")
    s2t: bool = _field(True, "speech-to-text channel: the student hears the spoken query")
    t2t_weight: float = _field(1.0, "weight of the t2t channel's loss")
    s2t_weight: float = _field(1.0, "weight of the s2t channel's loss")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check(self.t2t or self.s2t, prefix, "t2t", "and s2t are both false: turn at least one channel on")
        for name in ("t2t", "s2t"):
            weight = getattr(self, f"{name}_weight")
            _check(weight >= 0, prefix, f"{name}_weight", f"must be >= 0, got {weight!r}")
            _check(
                not getattr(self, name) or weight > 0,
                prefix,
                f"{name}_weight",
                f"is 0 with the channel on; set {name}: false to turn it off",
            )

    def check_paths(self, prefix: str) -> None:
        super().check_paths(prefix)
        if self.needs_teacher:
            _check(self.teacher is not None, prefix, "teacher", "is required with kd_weight > 0 (a text LM folder)")
        _check_checkpoint(prefix, "teacher", self.teacher)

    @property
    def channels(self) -> dict[str, float]:
        """The channels that are on, with their weights, in the order ``t2t``, ``s2t``."""
        return {name: getattr(self, f"{name}_weight") for name in ("t2t", "s2t") if getattr(self, name)}
