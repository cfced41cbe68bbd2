"""Layer-wise distillation (arXiv 2509.18579's layer-wise dimension; TinyWave's hidden-state terms).

Method ``layerwise`` (:mod:`~caad.methods.layerwise.method`), config section ``layerwise``
(:class:`~caad.methods.layerwise.config.LayerWiseConfig`); the layer map and projections are in
:mod:`caad.methods.layers`.
"""

from caad.methods.layerwise.config import LayerWiseConfig
from caad.methods.layerwise.method import LayerWiseBatch, LayerWiseMethod

__all__ = ["LayerWiseBatch", "LayerWiseConfig", "LayerWiseMethod"]
