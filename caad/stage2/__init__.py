"""Stage 2: synchronised teacher forcing and contrastive audio-aware distillation on DeepSpeed ZeRO.

:func:`train_stage2` runs one training (CAAD, plain KD with ``alpha: 0``, or CE-only fine-tuning
with ``kd_weight: 0``) from a :class:`caad.config.TrainConfig`; see :mod:`caad.stage2.trainer`.
"""

from caad.stage2.trainer import Stage2Result, Stage2Trainer, train_stage2

__all__ = ["Stage2Result", "Stage2Trainer", "train_stage2"]
