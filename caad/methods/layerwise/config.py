"""The ``layerwise`` section: :class:`LayerWiseConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from caad.config import _check, _check_checkpoint
from caad.config import config_field as _field
from caad.methods.crossmodal.config import AnswerKDConfig

__all__ = ["LayerWiseConfig"]


@dataclass
class LayerWiseConfig(AnswerKDConfig):
    """Layer-wise distillation (method ``layerwise``, arXiv 2509.18579; TinyWave's hidden-state terms).

    The student's mapped layers are pulled towards the teacher's on the answer rows through learned
    projections (:mod:`caad.methods.layers`), plus the output KD and CE of :class:`AnswerKDConfig`.
    """

    teacher: str | None = _field(None, "teacher folder: a Hugging Face causal LM (text) or a speech LM checkpoint")
    teacher_kind: Literal["text", "speech"] = _field("text", "text: reads the text query; speech: hears the audio")
    student_input: Literal["s2t", "t2t"] = _field("s2t", "what the student reads: the spoken query or the text")
    layer_map: list[list[int]] = _field(
        help="[[student layer, teacher layer], ...], 1-based block outputs; [] = uniform", factory=list
    )
    hidden_loss: Literal["mse", "cosine"] = _field("mse", "hidden-state loss per answer row")
    hidden_weight: float = _field(1.0, "weight of the hidden-state terms (0: output KD and CE only)")
    layer_weights: list[float] = _field(help="weight of each mapped pair ([]: 1 / number of pairs)", factory=list)
    projection: Literal["auto", "linear", "none"] = _field(
        "auto", "auto: a learned projection where widths differ; linear: for every pair; none: widths must match"
    )

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check(self.hidden_weight >= 0, prefix, "hidden_weight", f"must be >= 0, got {self.hidden_weight!r}")
        _check(
            all(w >= 0 for w in self.layer_weights) and (not self.layer_weights or sum(self.layer_weights) > 0),
            prefix,
            "layer_weights",
            f"must be non-negative with a positive sum, got {self.layer_weights!r}",
        )
        _check(
            not self.layer_weights or not self.layer_map or len(self.layer_weights) == len(self.layer_map),
            prefix,
            "layer_weights",
            f"has {len(self.layer_weights)} entries but layer_map {len(self.layer_map)} pairs",
        )
        for index, pair in enumerate(self.layer_map):
            _check(
                len(pair) == 2 and all(v >= 1 for v in pair),
                prefix,
                f"layer_map[{index}]",
                f"must be [student layer, teacher layer] with layers >= 1, got {pair!r}",
            )

    def other_terms_weight(self) -> float:
        return max(0.0, self.hidden_weight)

    @property
    def needs_teacher(self) -> bool:
        return True

    def check_paths(self, prefix: str) -> None:
        super().check_paths(prefix)
        _check(self.teacher is not None, prefix, "teacher", "is required (a teacher checkpoint folder)")
        _check_checkpoint(prefix, "teacher", self.teacher)
