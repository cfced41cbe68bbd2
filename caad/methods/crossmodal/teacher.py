"""Teachers of the text-teacher methods: loading a text LM as a frozen teacher, ``lm_head`` access for
any model, and the teacher's answer rows.

A text teacher is any local Hugging Face causal LM (:mod:`caad.models.text_lm`); a speech teacher is a
:class:`caad.models.SpeechLM`. :class:`Head` reads either's output projection the same way, with the
logit scale and soft-cap its own forward applies, so the fused loss sees the logits the model gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from caad.models import SpeechLM, TargetHiddenStates
from caad.models.interface import load_tokenizer, logit_postprocessing
from caad.models.text_lm import TextBatch, check_shared_vocabulary, text_target_hidden_states

__all__ = [
    "Head",
    "head_of",
    "head_parameters",
    "load_text_teacher",
    "shared_vocabulary",
    "text_answer_states",
    "vocab_rows",
]


def load_text_teacher(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """A causal LM from a local folder (never downloads), in eval mode: the ``loader`` of
    ``SetupContext.load_frozen`` for text teachers (under ZeRO-3 it is partitioned while loading)."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def vocab_rows(model: nn.Module) -> int:
    """Rows of the model's ``lm_head`` (its full shape, also when ZeRO-3 partitioned it)."""
    if isinstance(model, SpeechLM):
        return model.vocab_size
    weight = model.get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def shared_vocabulary(teacher: nn.Module, teacher_path: str, student: SpeechLM, key: str) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer, checked to cover the student's vocabulary with the same ids and an
    ``lm_head`` at least as large (:func:`caad.models.text_lm.check_shared_vocabulary`); a
    ``ValueError`` naming ``key`` otherwise."""
    tokenizer = teacher.tokenizer if isinstance(teacher, SpeechLM) else load_tokenizer(os.fspath(teacher_path))
    rows = vocab_rows(teacher)
    try:
        check_shared_vocabulary(tokenizer, student.tokenizer, rows)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None
    if rows < student.vocab_size:
        raise ValueError(
            f"{key}: the teacher's lm_head has {rows} rows, fewer than the student's {student.vocab_size}; "
            "the teacher must cover every student token"
        )
    return tokenizer


@dataclass(frozen=True)
class Head:
    """A model's output projection: ``weight`` ``[V, H]``, ``bias`` ``[V]`` or ``None``, and the logit
    ``scale`` and ``softcap`` of its forward (``logits = cap * tanh(scale * (W h + b) / cap)``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits of ``hidden`` (materialised: for references and confidences, not the loss)."""
        out = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float() * self.scale
        return out if self.softcap is None else self.softcap * torch.tanh(out / self.softcap)


def head_of(model: nn.Module) -> Head:
    """The :class:`Head` of a :class:`SpeechLM` or a Hugging Face causal LM (read it inside
    ``step.gathered(*head_parameters(model))`` under ZeRO-3)."""
    if isinstance(model, SpeechLM):
        return Head(model.lm_head_weight, model.lm_head_bias, model.logit_scale, model.final_softcap)
    head = model.get_output_embeddings()
    scale, cap = logit_postprocessing(model.config.get_text_config())
    return Head(head.weight, getattr(head, "bias", None), scale, cap)


def head_parameters(model: nn.Module | None) -> list[torch.Tensor]:
    """Every parameter :func:`head_of` reads (to gather under ZeRO-3); none for ``None``."""
    if model is None:
        return []
    if isinstance(model, SpeechLM):
        return list(model.lm_head_parameters())
    return list(model.get_output_embeddings().parameters())


def text_answer_states(model: nn.Module, batch: TextBatch) -> TargetHiddenStates:
    """The text teacher's final hidden states on the answer rows, under ``no_grad``: ``([N, H_t]``,
    ``[N]`` labels), packed row-major (:func:`caad.models.text_lm.text_target_hidden_states`)."""
    with torch.no_grad():
        return text_target_hidden_states(model, batch)
