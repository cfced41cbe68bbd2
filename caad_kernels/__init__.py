"""caad_kernels: fused contrastive knowledge-distillation losses for large vocabularies.

Public API: :func:`contrastive_kd_loss` / :class:`ContrastiveKDLoss` (logits in) and
:func:`fused_linear_contrastive_kd_loss` / :class:`FusedLinearContrastiveKDLoss` (hidden states
and ``lm_head`` weights in, no logits materialised). Conventions: DESIGN.md section 2.
"""

from caad_kernels.contrastive_kd import ContrastiveKDLoss, KDLossOutput, contrastive_kd_loss
from caad_kernels.fused_linear import FusedLinearContrastiveKDLoss, fused_linear_contrastive_kd_loss
from caad_kernels.options import KDOptions

__all__ = [
    "ContrastiveKDLoss",
    "FusedLinearContrastiveKDLoss",
    "KDLossOutput",
    "KDOptions",
    "contrastive_kd_loss",
    "fused_linear_contrastive_kd_loss",
]
__version__ = "0.1.0"
