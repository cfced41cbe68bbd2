"""The method-agnostic trainer: DeepSpeed ZeRO, precision, accumulation, checkpoints and exact resume,
interruption, validation, metrics and plots. It knows no method.

A distillation method (:mod:`caad.methods`) implements :class:`Method` (its config section, teachers,
extra trainable modules, batch builder, item count and loss step; see :mod:`caad.train.method`), and
:func:`train` runs it::

    from caad.train import train
    result = train("caad", config.stage2)          # or train(MyMethod(config.my_section))

Modules: :mod:`~caad.train.trainer` (the loop, read top to bottom), :mod:`~caad.train.method` (the
interface), :mod:`~caad.train.engine` (DeepSpeed engines, partitioned loading, saving the student),
:mod:`~caad.train.plan` (the data order), :mod:`~caad.train.checkpoint` (resume state and checks),
:mod:`~caad.train.interrupt` (SIGINT/SIGTERM), :mod:`~caad.train.metrics`, :mod:`~caad.train.outputs`,
:mod:`~caad.train.distributed`.
"""

from caad.train.interrupt import TrainingInterrupted
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext
from caad.train.trainer import Trainer, TrainResult, train

__all__ = [
    "BatchInfo",
    "LossOutput",
    "Method",
    "SetupContext",
    "StepContext",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "train",
]
