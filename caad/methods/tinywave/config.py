"""The ``tinywave`` section: :class:`TinyWaveConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from caad.config import TrainerConfig, _check, _check_checkpoint
from caad.config import config_field as _field

__all__ = ["TinyWaveConfig"]


@dataclass
class TinyWaveConfig(TrainerConfig):
    """Layer-aligned distillation of a unit LM (method ``tinywave``, arXiv 2506.23670).

    ``train_manifest`` / ``validation_manifest`` are interleaved-example files
    (:func:`caad.data.interleaved.write_examples`, JSONL), not audio manifests; ``student`` and
    ``teacher`` are unit-LM folders (:meth:`caad.models.unit_lm.UnitLM.save`) over one tokenizer.
    ``loss = hidden_weight * H + attention_weight * A + logit_weight * KD + ce_weight * CE``, each a
    sum over the predicting positions divided by their number in the global batch
    (:mod:`caad.methods.tinywave.method`). With every distillation weight at 0 no teacher is read:
    plain next-token training (the teacher's own training, the no-distillation baseline).
    """

    # the trainer checks audio manifests; these files hold interleaved examples (checked on loading)
    data_check: bool = _field(False, "must stay false: the example files are not audio manifests")
    teacher: str | None = _field(None, "teacher unit-LM folder (null: no distillation, next-token CE only)")
    max_length: int = _field(512, "tokens per sequence at most (longer examples are cut)")
    layer_map: list[list[int]] = _field(
        help="[[student layer, teacher layer], ...], 1-based block outputs; [] = uniform", factory=list
    )
    projection: Literal["auto", "linear", "none"] = _field(
        "auto", "hidden-state projection: auto where widths differ, linear for every pair, none"
    )
    hidden_loss: Literal["mse", "cosine"] = _field("mse", "hidden-state distance per position")
    hidden_weight: float = _field(1.0, "weight of the hidden-state term (mean over mapped pairs)")
    attention_weight: float = _field(1.0, "weight of the attention-map term (mean over mapped pairs)")
    logit_weight: float = _field(1.0, "weight of the softened-logit KD term")
    ce_weight: float = _field(1.0, "weight of the next-token cross-entropy")
    temperature: float = _field(2.0, "softmax temperature of the logit KD")
    attention_temperature: float = _field(1.0, "softmax temperature of the attention maps")
    beta: float = _field(0.0, "divergence of logit and attention KD: 0 forward KL, 1 reverse KL, between: JSD")
    temperature_scaling: bool = _field(True, "multiply each divergence by its temperature^2")
    attention_head_map: list[int] = _field(
        help="teacher head of each student head ([]: identity, or averaging when counts differ)", factory=list
    )
    attention_head_groups: list[list[int]] = _field(
        help="teacher heads averaged into each student head ([]: see attention_head_map)", factory=list
    )
    loss_backend: Literal["auto", "cpp", "torch", "triton"] = _field("auto", "kernel backend of the fused ops")
    loss_chunk_size: int | None = _field(None, "rows per chunk of the fused ops (null: automatic)")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        checks: list[tuple[bool, str, str]] = [
            (not self.data_check, "data_check", "must be false (the example files are not audio manifests)"),
            (self.max_length >= 2, "max_length", "must be >= 2"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.attention_temperature > 0, "attention_temperature", "must be > 0"),
            (0 <= self.beta <= 1, "beta", "must be in [0, 1]"),
            (self.loss_chunk_size is None or self.loss_chunk_size >= 1, "loss_chunk_size", "must be >= 1"),
            (
                not (self.attention_head_map and self.attention_head_groups),
                "attention_head_groups",
                "cannot be set together with attention_head_map (a map or groups, not both)",
            ),
            (all(h >= 0 for h in self.attention_head_map), "attention_head_map", "must hold head indices >= 0"),
            (
                all(g and all(h >= 0 for h in g) for g in self.attention_head_groups),
                "attention_head_groups",
                "must hold non-empty groups of head indices >= 0",
            ),
        ]
        for name in ("hidden_weight", "attention_weight", "logit_weight", "ce_weight"):
            checks.append((getattr(self, name) >= 0, name, "must be >= 0"))
        checks.append(
            (self.distills or self.ce_weight > 0, "ce_weight", "must be > 0 when every distillation weight is 0")
        )
        for index, pair in enumerate(self.layer_map):
            checks.append(
                (
                    len(pair) == 2 and all(v >= 1 for v in pair),
                    f"layer_map[{index}]",
                    "must be [student layer, teacher layer] with layers >= 1",
                )
            )
        for ok, key, message in checks:
            value = getattr(self, key) if "[" not in key else self.layer_map[int(key.split("[")[1][:-1])]
            _check(ok, prefix, key, f"{message}, got {value!r}")

    @property
    def distills(self) -> bool:
        """Whether any distillation term is on (then a teacher is required)."""
        return self.hidden_weight > 0 or self.attention_weight > 0 or self.logit_weight > 0

    @property
    def teacher_heads(self) -> list[int] | list[list[int]] | None:
        """The ``teacher_heads`` argument of :func:`caad_kernels.attention_kd_loss` (``None``: its default)."""
        return self.attention_head_map or self.attention_head_groups or None

    def check_paths(self, prefix: str) -> None:
        super().check_paths(prefix)
        _check(
            self.teacher is not None or not self.distills,
            prefix,
            "teacher",
            "is required when hidden_weight, attention_weight or logit_weight is > 0 (a unit-LM folder)",
        )
        _check_checkpoint(prefix, "teacher", self.teacher)
