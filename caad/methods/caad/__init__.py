"""CAAD: Contrastive Audio-Aware Distillation.

- Stage 1 (pseudo-GT): one target answer per example from its metadata, :mod:`caad.stage1`.
- Stage 2 (this package): synchronised teacher forcing on ``prompt + pseudo-GT`` and the contrastive
  teacher ``(1 + alpha) z_pos - alpha z_neg`` distilled with the fused-linear loss, as the method
  ``caad`` on the shared trainer (:mod:`caad.methods.caad.method`); its batches
  (:mod:`~caad.methods.caad.batch`) and loss (:mod:`~caad.methods.caad.loss`).

:func:`train_stage2` runs Stage 2 (or plain KD with ``alpha: 0``, or CE-only fine-tuning with
``kd_weight: 0``) from a :class:`caad.config.Stage2Config`.
"""

from __future__ import annotations

from caad.config import Stage2Config
from caad.methods.caad.batch import PseudoGTDataset, StepBatch, build_batch, build_step_batch
from caad.methods.caad.loss import distillation_loss, teacher_forward
from caad.methods.caad.method import CAADMethod
from caad.train import TrainResult, train

__all__ = [
    "CAADMethod",
    "PseudoGTDataset",
    "StepBatch",
    "build_batch",
    "build_step_batch",
    "distillation_loss",
    "teacher_forward",
    "train_stage2",
]


def train_stage2(
    config: Stage2Config,
    *,
    resume: bool = False,
    force_resume: bool = False,
    name: str | None = None,
    section: str = "stage2",
) -> TrainResult:
    """Run CAAD Stage 2 as configured (``section``: where the settings came from, for error messages)."""
    return train(CAADMethod(config, section), resume=resume, force_resume=force_resume, name=name)
