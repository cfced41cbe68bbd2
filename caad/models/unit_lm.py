"""Unit language models: causal LMs over text tokens, speech-unit tokens and modality markers.

A unit LM is any Hugging Face causal LM whose tokenizer went through
:func:`caad.data.interleaved.add_unit_tokens` (``<text>``, ``<speech>``, ``<u0>`` ...), trained on
the interleaved sequences of :mod:`caad.data.interleaved`. :func:`build_unit_lm_tokenizer` trains the
text part locally (:func:`caad.models.tokenizer.train_tokenizer`) and adds the unit tokens;
:func:`build_unit_lm` makes a randomly initialised Llama (SpiritLM's family) or Qwen2 model of a
named size over it. Teacher and student share the tokenizer, so their vocabularies are identical
(what logit distillation needs).

Sizes (:data:`UNIT_LM_SIZES`; ``vocab`` is ``len(tokenizer)``, untied embeddings):

- ``"teacher"``: hidden 128, 6 layers, 4 heads (2 KV heads, head size 32), MLP 384;
- ``"student"``: hidden 96, 3 layers, 4 heads (2 KV heads, head size 24), MLP 256: about 3x fewer
  parameters than the teacher with a vocabulary of ~600 (TinyWave's ratio), and a layer count that
  divides the teacher's (a uniform layer map: student layer ``i`` <- teacher layer ``2i + 1``).

A :class:`UnitLM` bundles the model, its tokenizer and the speech-unit tokenizer
(:class:`caad.data.units.UnitTokenizer`) and saves them into one folder: the model
(``save_pretrained``, safetensors), the tokenizer files, and ``speech_units.json`` /
``speech_units.npz`` beside them. :func:`load_unit_lm` reads such a folder (local files only).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from caad.data.interleaved import UnitVocab, add_unit_tokens
from caad.data.units import UNITS_JSON, UnitTokenizer
from caad.models.tokenizer import train_tokenizer

__all__ = [
    "UNIT_LM_SIZES",
    "UnitLM",
    "build_unit_lm",
    "build_unit_lm_tokenizer",
    "count_parameters",
    "load_unit_lm",
    "unit_lm_config",
]

#: Named sizes: LM width, layers, attention heads, KV heads, MLP width.
UNIT_LM_SIZES: dict[str, dict[str, int]] = {
    "teacher": dict(hidden=128, layers=6, heads=4, kv_heads=2, mlp=384),
    "student": dict(hidden=96, layers=3, heads=4, kv_heads=2, mlp=256),
}
Arch = Literal["llama", "qwen2"]


def build_unit_lm_tokenizer(texts: Iterable[str], n_units: int, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on ``texts`` (:func:`~caad.models.tokenizer.train_tokenizer`,
    ``vocab_size`` text entries at most) plus the markers and ``n_units`` unit tokens after them."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    add_unit_tokens(tokenizer, n_units)
    return tokenizer


def _sizes(size: str | dict[str, int], overrides: dict[str, int]) -> dict[str, int]:
    if isinstance(size, str):
        if size not in UNIT_LM_SIZES:
            raise ValueError(f"size must be one of {sorted(UNIT_LM_SIZES)} or a dict of sizes, got {size!r}")
        sizes = dict(UNIT_LM_SIZES[size])
    elif isinstance(size, dict):
        sizes = dict(UNIT_LM_SIZES["teacher"])
        overrides = {**size, **overrides}
    else:
        raise TypeError(f"size must be a str or dict, got {type(size).__name__}")
    unknown = set(overrides) - set(sizes)
    if unknown:
        raise ValueError(f"unknown size keys {sorted(unknown)}; known: {sorted(sizes)}")
    sizes.update(overrides)
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"size {key!r} must be a positive int, got {value!r}")
    if sizes["hidden"] % sizes["heads"] or (sizes["hidden"] // sizes["heads"]) % 2:
        raise ValueError(
            f"hidden ({sizes['hidden']}) must be a multiple of heads ({sizes['heads']}) with an even head size"
        )
    if sizes["heads"] % sizes["kv_heads"]:
        raise ValueError(f"heads ({sizes['heads']}) must be a multiple of kv_heads ({sizes['kv_heads']})")
    return sizes


def unit_lm_config(
    tokenizer: PreTrainedTokenizerBase,
    size: str | dict[str, int] = "teacher",
    arch: Arch = "llama",
    max_positions: int = 4096,
    **overrides: int,
) -> LlamaConfig | Qwen2Config:
    """The config of :func:`build_unit_lm` (vocabulary ``len(tokenizer)``, the tokenizer's special ids)."""
    UnitVocab.from_tokenizer(tokenizer)  # a clear error when the unit tokens are missing
    s = _sizes(size, overrides)
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_unit_lm(
    tokenizer: PreTrainedTokenizerBase,
    size: str | dict[str, int] = "teacher",
    arch: Arch = "llama",
    seed: int = 0,
    max_positions: int = 4096,
    **overrides: int,
) -> PreTrainedModel:
    """A randomly initialised causal LM over ``tokenizer``'s vocabulary (module docstring for sizes).

    ``size``: ``"teacher"``, ``"student"`` or a dict of sizes (``hidden``, ``layers``, ``heads``,
    ``kv_heads``, ``mlp``; missing keys from the teacher); ``overrides`` change single sizes. The
    global RNG is left untouched; the model is in eval mode.
    """
    config = unit_lm_config(tokenizer, size, arch, max_positions, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config) if arch == "llama" else Qwen2ForCausalLM(config)
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (embeddings and ``lm_head`` included)."""
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass
class UnitLM:
    """A unit LM: ``model`` (causal LM), ``tokenizer`` (with unit tokens), ``units`` (the speech-unit
    tokenizer whose units the vocabulary holds; ``None`` for a text-and-units model without one)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    units: UnitTokenizer | None = None

    def __post_init__(self) -> None:
        vocab = UnitVocab.from_tokenizer(self.tokenizer)
        if self.units is not None and self.units.n_units != vocab.n_units:
            raise ValueError(
                f"the speech-unit tokenizer has {self.units.n_units} units but the LM tokenizer {vocab.n_units}"
            )
        embeddings = self.model.get_input_embeddings().weight.shape[0]
        if embeddings < len(self.tokenizer):
            raise ValueError(
                f"the model's embedding has {embeddings} rows, fewer than the tokenizer's {len(self.tokenizer)}"
            )

    @property
    def vocab(self) -> UnitVocab:
        """The ids of markers and units in :attr:`tokenizer`."""
        return UnitVocab.from_tokenizer(self.tokenizer)

    def save(self, directory: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Save model, tokenizer and speech units into ``directory``.

        A non-empty ``directory`` is refused unless ``overwrite`` (then files of the same names are
        replaced, other files stay). Returns the folder.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory")
        if directory.is_dir() and any(directory.iterdir()) and not overwrite:
            raise FileExistsError(f"{directory} is not empty; pass overwrite=True to save into it")
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        if self.units is not None:
            self.units.save(directory, overwrite=True)
        return directory


def load_unit_lm(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> UnitLM:
    """Load a :class:`UnitLM` saved by :meth:`UnitLM.save` (local files only; eval mode). The speech
    units are loaded when ``speech_units.json`` is in the folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"unit LM folder not found: {directory}")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if device is not None:
        model = model.to(device)
    units = UnitTokenizer.load(directory) if (directory / UNITS_JSON).is_file() else None
    return UnitLM(model=model.eval(), tokenizer=tokenizer, units=units)
