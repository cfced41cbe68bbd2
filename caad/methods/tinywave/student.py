"""A unit LM as the trainer's student or teacher: :class:`UnitLMModule` and its loader.

The shared trainer trains an ``nn.Module`` and writes it with ``save_pretrained``. A unit LM
(:class:`caad.models.unit_lm.UnitLM`) is a Hugging Face causal LM plus its tokenizer and speech-unit
tokenizer; :class:`UnitLMModule` holds the three, exposes the causal LM as ``model`` (so that the
trainer's ZeRO-3 save, which strips the ``student.model.`` prefix, gives the causal LM's own keys) and
saves all three, so the trained student is again a unit-LM folder (:func:`caad.models.load_unit_lm`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from caad.data.interleaved import UnitVocab
from caad.data.units import UnitTokenizer
from caad.models.unit_lm import UnitLM, load_unit_lm

__all__ = ["UnitLMModule", "load_unit_lm_module"]


class UnitLMModule(nn.Module):
    """``model`` (causal LM), ``tokenizer`` (with unit tokens), ``units`` (or ``None``).

    ``forward(**inputs)`` is the causal LM's. It deliberately has no ``config`` attribute (the trainer's
    ``align_requires_grad`` would take it for a Hugging Face model); read ``model.config``.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, units: UnitTokenizer | None = None
    ) -> None:
        super().__init__()
        UnitLM(model, tokenizer, units)  # the checks: unit tokens, sizes
        self.model = model
        self.tokenizer = tokenizer
        self.units = units

    @property
    def vocab(self) -> UnitVocab:
        return UnitVocab.from_tokenizer(self.tokenizer)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, H]`` output projection weight."""
        return self.model.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant recomputation (reentrant checkpointing would hide the captured attention inputs)."""
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        """The causal LM (``kwargs`` to its ``save_pretrained``, e.g. a gathered ``state_dict``), the
        tokenizer and the speech units: a unit-LM folder."""
        self.model.save_pretrained(path, **kwargs)
        self.tokenizer.save_pretrained(path)
        if self.units is not None:
            self.units.save(path, overwrite=True)


def load_unit_lm_module(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> UnitLMModule:
    """A unit-LM folder as a :class:`UnitLMModule` (eval mode): the trainer's ``loader(path, dtype=, device=)``."""
    unit_lm = load_unit_lm(path, dtype=dtype, device=device)
    return UnitLMModule(unit_lm.model, unit_lm.tokenizer, unit_lm.units).eval()
