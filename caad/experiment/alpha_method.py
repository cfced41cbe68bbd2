"""CAAD with an alpha schedule or a per-token adaptive alpha, as a method on the shared trainer.

A stand-in until the ``stage2`` section and :mod:`caad.methods.caad.loss` carry the alpha options
themselves (see the experiment's wiring notes): :class:`AlphaStage2Config` is ``Stage2Config`` plus
the keys below, and :class:`AlphaCAADMethod` is :class:`~caad.methods.caad.CAADMethod` whose loss
step replaces the constant ``alpha`` by :func:`caad.methods.caad.alpha.scheduled_alpha` of the
optimizer step, or by :func:`caad.methods.caad.alpha.adaptive_alpha` of the teacher's two paths (a
per-row tensor the fused kernels take). With ``alpha_schedule: constant`` and ``alpha_adaptive:
false`` it is exactly ``CAADMethod``.

Extra keys (section ``stage2``):

- ``alpha_schedule``: ``constant`` | ``warmup`` | ``cosine`` (from ``alpha_start`` to ``alpha``);
- ``alpha_start``: the schedule's value at step 0 (default 0);
- ``alpha_warmup_steps``: ``warmup``'s ramp in optimizer steps (0: ``alpha_warmup_fraction`` of the run);
- ``alpha_warmup_fraction``: the ramp as a fraction of the run's steps (default 0.3);
- ``alpha_adaptive``: per-token alpha from ``JS(pos || neg)`` (the schedule then sets the mean alpha);
- ``alpha_max``: the adaptive alpha's upper clip;
- ``alpha_normalize``: ``mean`` (mean alpha = the scheduled alpha) or ``none`` (``alpha_scale * JS``);
- ``alpha_scale``: the factor under ``none`` (null: ``alpha_max / ln 2``).

The logged component ``alpha`` is the mean alpha over the step's target tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from caad.config import ConfigError, Stage2Config
from caad.data.manifest import ManifestRow
from caad.methods import register_method
from caad.methods.caad.alpha import ADAPTIVE_NORMALIZATIONS, ALPHA_SCHEDULES, adaptive_alpha, scheduled_alpha
from caad.methods.caad.batch import PseudoGTDataset, StepBatch
from caad.methods.caad.loss import distillation_loss, teacher_forward
from caad.methods.caad.method import CAADMethod, _lm_head_parameters
from caad.train.method import BatchInfo, LossOutput, SetupContext, StepContext
from caad.train.plan import StepPlan

__all__ = ["ALPHA_KEYS", "AlphaCAADMethod", "AlphaStage2Config", "alpha_config"]

#: The keys :class:`AlphaStage2Config` adds to ``Stage2Config``, with their defaults.
ALPHA_KEYS: dict[str, Any] = {
    "alpha_schedule": "constant",
    "alpha_start": 0.0,
    "alpha_warmup_steps": 0,
    "alpha_warmup_fraction": 0.3,
    "alpha_adaptive": False,
    "alpha_max": 4.0,
    "alpha_normalize": "mean",
    "alpha_scale": None,
}


@dataclass
class AlphaStage2Config(Stage2Config):
    """``Stage2Config`` with the alpha schedule and adaptive alpha keys (module docstring)."""

    alpha_schedule: str = "constant"
    alpha_start: float = 0.0
    alpha_warmup_steps: int = 0
    alpha_warmup_fraction: float = 0.3
    alpha_adaptive: bool = False
    alpha_max: float = 4.0
    alpha_normalize: str = "mean"
    alpha_scale: float | None = None

    def validate(self, prefix: str) -> None:
        super().validate(prefix)

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key}: {message}, got {getattr(self, key)!r}")

        check(self.alpha_schedule in ALPHA_SCHEDULES, "alpha_schedule", f"must be one of {ALPHA_SCHEDULES}")
        check(_finite(self.alpha_start) and self.alpha_start >= 0, "alpha_start", "must be >= 0")
        check(_int(self.alpha_warmup_steps) and self.alpha_warmup_steps >= 0, "alpha_warmup_steps", "must be >= 0")
        check(
            _finite(self.alpha_warmup_fraction) and 0 < self.alpha_warmup_fraction <= 1,
            "alpha_warmup_fraction",
            "must be in (0, 1]",
        )
        check(isinstance(self.alpha_adaptive, bool), "alpha_adaptive", "must be true or false")
        check(_finite(self.alpha_max) and self.alpha_max >= 0, "alpha_max", "must be >= 0")
        check(
            self.alpha_normalize in ADAPTIVE_NORMALIZATIONS,
            "alpha_normalize",
            f"must be one of {ADAPTIVE_NORMALIZATIONS}",
        )
        check(
            self.alpha_scale is None or (_finite(self.alpha_scale) and self.alpha_scale >= 0),
            "alpha_scale",
            "must be >= 0 or null",
        )
        check(
            not self.alpha_adaptive or self.alpha_max >= 0 and self.kd_weight > 0,
            "alpha_adaptive",
            "needs a teacher (kd_weight > 0)",
        )

    @property
    def uses_negative(self) -> bool:
        """Whether any step uses the teacher's negative path."""
        return self.needs_teacher and (
            self.alpha > 0 or (self.alpha_schedule != "constant" and self.alpha_start > 0)
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def alpha_config(stage2: Stage2Config, alpha_options: dict[str, Any] | None = None) -> AlphaStage2Config:
    """``stage2`` with the alpha keys of ``alpha_options`` (unknown keys: a ``ConfigError`` naming them)."""
    options = dict(alpha_options or {})
    unknown = sorted(set(options) - set(ALPHA_KEYS))
    if unknown:
        raise ConfigError(f"unknown alpha option(s) {', '.join(unknown)}; known: {', '.join(ALPHA_KEYS)}")
    fields = {f.name: getattr(stage2, f.name) for f in dataclasses.fields(Stage2Config)}
    return AlphaStage2Config(**fields, **options)


@register_method
class AlphaCAADMethod(CAADMethod):
    """CAAD with a scheduled or adaptive alpha (module docstring); registered as ``caad_alpha``."""

    name = "caad_alpha"
    config_class = AlphaStage2Config
    resume_keys = (*CAADMethod.resume_keys, *ALPHA_KEYS)
    config: AlphaStage2Config

    def describe(self) -> str:
        cfg = self.config
        if not cfg.needs_teacher:
            return "CE fine-tuning"
        if not cfg.uses_negative:
            return "KD"
        parts = [f"CAAD (alpha={cfg.alpha:g}"]
        if cfg.alpha_schedule != "constant":
            parts.append(f", {cfg.alpha_schedule} from {cfg.alpha_start:g}")
        if cfg.alpha_adaptive:
            parts.append(f", adaptive <= {cfg.alpha_max:g}")
        return "".join(parts) + ")"

    def load_examples(self, path: str, key: str) -> PseudoGTDataset:
        examples = super().load_examples(path, key)
        if key.endswith("train_manifest"):
            self._num_train = len(examples)
        return examples

    def build_teachers(self, ctx: SetupContext) -> None:
        super().build_teachers(ctx)
        cfg = self.config
        plan = StepPlan(
            num_examples=getattr(self, "_num_train", 0),
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            world_size=ctx.world_size,
            rank=ctx.rank,
            seed=cfg.seed,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
        )
        self.total_steps = max(1, plan.total_steps)  # the trainer refuses an empty plan itself
        self.warmup_steps = cfg.alpha_warmup_steps or max(1, round(cfg.alpha_warmup_fraction * self.total_steps))

    def step_alpha(self, step: int) -> float:
        """The scheduled alpha of optimizer step ``step`` (0-based)."""
        cfg = self.config
        return scheduled_alpha(
            cfg.alpha,
            min(step, self.total_steps - 1),
            self.total_steps,
            cfg.alpha_schedule,
            warmup_steps=self.warmup_steps,
            alpha_start=cfg.alpha_start,
        )

    def build_batch(self, examples: Sequence[ManifestRow], info: BatchInfo, device: torch.device) -> StepBatch:
        """As CAAD's, with the negative path whenever some step uses it; the step's alpha is attached."""
        from caad.methods.caad.batch import build_batch

        cfg = self.config
        batch = build_batch(
            examples,
            self.student,
            self.teacher,
            negative_mode=cfg.negative_mode if cfg.uses_negative else None,
            noise_seed=cfg.noise_seed + info.index,
            device=device,
            student_dtype=self.dtype,
        )
        # validation batches use the final alpha: the loss the run ends on
        step = info.step if info.split == "train" else self.total_steps - 1
        batch.scheduled_alpha = self.step_alpha(step)  # type: ignore[attr-defined]
        return batch

    def loss_step(self, batch: StepBatch, step: StepContext) -> LossOutput:
        """CAAD's loss step with this step's (scheduled, adaptive) alpha."""
        cfg = self.config
        alpha_value: float = getattr(batch, "scheduled_alpha", cfg.alpha)
        teacher_out = teacher_forward(self.teacher, batch)
        student_out = step.student(batch.student)
        student: Any = step.model
        with step.gathered(*_lm_head_parameters(student), *_lm_head_parameters(self.teacher)):
            alpha: float | torch.Tensor = alpha_value
            if cfg.alpha_adaptive and teacher_out is not None and teacher_out[1] is not None:
                positive, negative = teacher_out
                alpha = adaptive_alpha(
                    positive.hidden,
                    negative.hidden,
                    self.teacher.lm_head_weight,
                    self.teacher.lm_head_bias,
                    alpha_max=cfg.alpha_max,
                    normalize=cfg.alpha_normalize,  # type: ignore[arg-type]
                    alpha=alpha_value,
                    scale=cfg.alpha_scale,
                    vocab_size=student.vocab_size,
                    temperature=cfg.temperature,
                    chunk_rows=cfg.loss_chunk_size or 1024,
                ).to(student_out.hidden.device)
            # the loss reads config.alpha; a per-step copy carries this step's value (float or [N] tensor)
            step_config = dataclasses.replace(cfg, alpha=alpha) if alpha is not cfg.alpha else cfg
            out = distillation_loss(
                student_out, student, teacher_out, self.teacher, step_config, step.num_items, step.with_components
            )
            loss = out.loss if step.with_components else out
            step.backward(loss)
        if not step.with_components:
            return LossOutput(loss)
        rows = int(student_out.labels.numel())
        alpha_sum = float(alpha.sum()) if isinstance(alpha, torch.Tensor) else float(alpha) * rows
        if teacher_out is None or teacher_out[1] is None:
            alpha_sum = 0.0
        components = {"kd_loss": out.kd_loss, "ce_loss": out.ce_loss, "alpha": alpha_sum / max(1, step.num_items)}
        return LossOutput(loss, components)
