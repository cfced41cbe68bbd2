"""The ``sourcewise`` section: :class:`SourceWiseConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from caad.config import _check, _check_checkpoint
from caad.config import config_field as _field
from caad.methods.crossmodal.config import AnswerKDConfig

__all__ = ["WEIGHTINGS", "SourceWiseConfig"]

WEIGHTINGS = ("fixed", "category", "confidence")


@dataclass
class SourceWiseConfig(AnswerKDConfig):
    """Source-wise distillation (method ``sourcewise``, arXiv 2509.18579): a textual and an acoustic teacher,
    blended per answer token (``weighting``; :mod:`caad.methods.sourcewise.blend`)."""

    text_teacher: str | None = _field(None, "textual teacher: a local Hugging Face causal LM folder")
    acoustic_teacher: str | None = _field(None, "acoustic teacher: a speech LM checkpoint folder")
    weighting: Literal["fixed", "category", "confidence"] = _field(
        "fixed", "per-token teacher weights: fixed, by task category, or by each teacher's confidence"
    )
    text_weight: float = _field(0.5, "fixed (and unlisted categories): the textual teacher's weight")
    acoustic_weight: float = _field(0.5, "fixed (and unlisted categories): the acoustic teacher's weight")
    text_categories: list[str] = _field(help="category: categories the textual teacher leads", factory=list)
    acoustic_categories: list[str] = _field(help="category: categories the acoustic teacher leads", factory=list)
    lead_weight: float = _field(0.8, "category: the leading teacher's weight (the other gets 1 - lead_weight)")
    text_metadata: bool = _field(False, "the textual teacher also reads the row's acoustic labels as text")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        for key in ("text_weight", "acoustic_weight"):
            _check(getattr(self, key) >= 0, prefix, key, f"must be >= 0, got {getattr(self, key)!r}")
        _check(
            self.text_weight + self.acoustic_weight > 0,
            prefix,
            "text_weight",
            "text_weight + acoustic_weight must be > 0",
        )
        _check(0 <= self.lead_weight <= 1, prefix, "lead_weight", f"must be in [0, 1], got {self.lead_weight!r}")
        both = sorted(set(self.text_categories) & set(self.acoustic_categories))
        _check(not both, prefix, "acoustic_categories", f"and text_categories both list {both}")
        _check(
            self.weighting == "category" or not (self.text_categories or self.acoustic_categories),
            prefix,
            "text_categories",
            f"and acoustic_categories are used only with weighting: category (got weighting: {self.weighting})",
        )

    @property
    def needs_text_teacher(self) -> bool:
        """Whether the textual teacher can get a non-zero weight."""
        return self.needs_teacher and not (self.weighting == "fixed" and self.text_weight == 0)

    @property
    def needs_acoustic_teacher(self) -> bool:
        """Whether the acoustic teacher can get a non-zero weight."""
        return self.needs_teacher and not (self.weighting == "fixed" and self.acoustic_weight == 0)

    def check_paths(self, prefix: str) -> None:
        super().check_paths(prefix)
        for key, needed in (
            ("text_teacher", self.needs_text_teacher),
            ("acoustic_teacher", self.needs_acoustic_teacher),
        ):
            if needed:
                _check(getattr(self, key) is not None, prefix, key, "is required (a checkpoint folder)")
            _check_checkpoint(prefix, key, getattr(self, key))
