"""TinyWave (arXiv 2506.23670): layer-aligned distillation of a unit LM (hidden states, attention maps,
softened logits).

Method ``tinywave`` (:mod:`~caad.methods.tinywave.method`), config section ``tinywave``
(:class:`~caad.methods.tinywave.config.TinyWaveConfig`); the terms in :mod:`~caad.methods.tinywave.loss`,
the unit LM as a trainable module in :mod:`~caad.methods.tinywave.student`; the layer map and
projections are :mod:`caad.methods.layers`'.
"""

from caad.methods.tinywave.config import TinyWaveConfig
from caad.methods.tinywave.method import TinyWaveMethod, UnitBatch
from caad.methods.tinywave.student import UnitLMModule, load_unit_lm_module

__all__ = ["TinyWaveConfig", "TinyWaveMethod", "UnitBatch", "UnitLMModule", "load_unit_lm_module"]
