"""caad_kernels: fused contrastive knowledge-distillation losses for large vocabularies.

Public API: :func:`contrastive_kd_loss` / :class:`ContrastiveKDLoss` (logits in) and
:func:`fused_linear_contrastive_kd_loss` / :class:`FusedLinearContrastiveKDLoss` (hidden states
and ``lm_head`` weights in, no logits materialised). The teacher is dense logits (or hidden
states and weights) or a sparse top-k (:mod:`caad_kernels.topk`; written offline by
:mod:`caad_kernels.topk_offline`). Both ops are ``torch.library``
custom ops under ``torch.compile`` (:mod:`caad_kernels.custom_ops`). Conventions: ``docs/math.md``.
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

from caad_kernels.attention_kd import AttentionKDLoss, attention_kd_loss  # noqa: E402  (attention maps, issue 16)

__all__ += ["AttentionKDLoss", "attention_kd_loss"]
