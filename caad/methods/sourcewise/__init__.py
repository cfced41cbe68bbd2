"""Source-wise distillation (arXiv 2509.18579's source-wise dimension): a textual and an acoustic teacher,
blended per answer token by fixed weights, by task category or by teacher confidence.

Method ``sourcewise`` (:mod:`~caad.methods.sourcewise.method`), config section ``sourcewise``
(:class:`~caad.methods.sourcewise.config.SourceWiseConfig`), the blending rules in
:mod:`~caad.methods.sourcewise.blend`.
"""

from caad.methods.sourcewise.blend import category_weights, confidence_weights, label_probability
from caad.methods.sourcewise.config import WEIGHTINGS, SourceWiseConfig
from caad.methods.sourcewise.method import SourceWiseBatch, SourceWiseMethod

__all__ = [
    "WEIGHTINGS",
    "SourceWiseBatch",
    "SourceWiseConfig",
    "SourceWiseMethod",
    "category_weights",
    "confidence_weights",
    "label_probability",
]
