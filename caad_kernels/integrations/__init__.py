"""Thin adapters of the caad_kernels losses to other training stacks (``docs/integrations.md``).

- :mod:`caad_kernels.integrations.hf`: ``ContrastiveKDTrainer`` / ``ContrastiveKDMixin`` for the
  Hugging Face ``Trainer`` (needs ``transformers`` and ``accelerate``).
- :mod:`caad_kernels.integrations.trl`: ``use_caad_loss(trainer)`` for TRL's ``GKDTrainer`` and
  ``DistillationTrainer``, and TRL-signature loss functions (needs ``trl`` only for the trainers).
- :mod:`caad_kernels.integrations.torchtune`: ``ForwardKLLoss`` /
  ``ForwardKLWithChunkedOutputLoss`` with torchtune's call convention (needs nothing but torch).
- Building blocks, torch only: :func:`logit_transform` (a model config's logit scale and
  softcap), :func:`output_projection` (an ``lm_head``'s effective weight, PEFT LoRA folded in),
  :func:`forward_through` (run a loss as a DDP/FSDP-wrapped model's forward).

No framework is imported by ``import caad_kernels`` or by this package: each adapter module
imports its framework when it is imported itself, and says how to install it when it is missing
(``pip install 'caad[integrations]'``).
"""

from caad_kernels.integrations.lm_head import output_projection
from caad_kernels.integrations.model_config import LogitTransform, logit_transform
from caad_kernels.integrations.redirect import forward_through

__all__ = ["LogitTransform", "forward_through", "logit_transform", "output_projection"]
