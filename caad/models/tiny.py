"""Tiny random teachers and students of both kinds, for tests and the demo (fast on CPU).

All share one tokenizer (:func:`caad.models.tokenizer.train_tokenizer`). Sizes:

- teacher: LM hidden 128, 2 layers, 4 heads (2 KV heads), vocabulary ``len(tokenizer) + 64``
  (a padded ``lm_head``, as Qwen's 152064 vs 151936), audio encoder width 64, 2 layers;
- student: LM hidden 64, 2 layers, 2 heads, vocabulary ``len(tokenizer)``, audio encoder width 32,
  2 layers, 4 frames stacked per audio token (composite).

The audio window is 10 s (1000 mel frames, 80 mel bins) instead of Whisper's 30 s, to keep the
encoders cheap; longer clips are rejected by :meth:`SpeechLM.build_inputs`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import (
    LlamaConfig,
    PreTrainedConfig,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2Config,
    WhisperConfig,
)

from caad.models.composite import CompositeSpeechLM, CompositeSpeechLMConfig, CompositeSpeechLMForCausalLM
from caad.models.interface import SpeechLM
from caad.models.qwen2_audio import Qwen2AudioSpeechLM
from caad.models.tokenizer import audio_token_ids

Kind = Literal["qwen2_audio", "composite"]
Role = Literal["teacher", "student"]

#: Per role: LM width, layers, heads, KV heads, MLP width, audio width, audio layers, audio heads,
#: extra lm_head rows, frames stacked per audio token (composite only).
TINY_SIZES: dict[str, dict[str, int]] = {
    "teacher": dict(
        hidden=128,
        layers=2,
        heads=4,
        kv_heads=2,
        mlp=256,
        audio=64,
        audio_layers=2,
        audio_heads=4,
        vocab_padding=64,
        stack=2,
    ),
    "student": dict(
        hidden=64,
        layers=2,
        heads=2,
        kv_heads=1,
        mlp=128,
        audio=32,
        audio_layers=2,
        audio_heads=2,
        vocab_padding=0,
        stack=4,
    ),
}
TINY_AUDIO_SECONDS = 10
TINY_MEL_BINS = 80


def _sizes(role: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if role not in TINY_SIZES:
        raise ValueError(f"role must be one of {sorted(TINY_SIZES)}, got {role!r}")
    sizes = dict(TINY_SIZES[role])
    unknown = set(overrides) - set(sizes)
    if unknown:
        raise ValueError(f"unknown size overrides {sorted(unknown)}; known: {sorted(sizes)}")
    sizes.update(overrides)
    return sizes


def _text_config(cls: type, tokenizer: Any, s: dict[str, Any]) -> Any:
    return cls(
        vocab_size=len(tokenizer) + s["vocab_padding"],
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_qwen2_audio_config(tokenizer: Any, role: Role = "teacher", **sizes: int) -> Qwen2AudioConfig:
    """A tiny :class:`~transformers.Qwen2AudioConfig` (Qwen2 text model) using ``tokenizer``'s audio token."""
    s = _sizes(role, sizes)
    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=TINY_MEL_BINS,
        encoder_layers=s["audio_layers"],
        encoder_attention_heads=s["audio_heads"],
        encoder_ffn_dim=2 * s["audio"],
        d_model=s["audio"],
        max_source_positions=TINY_AUDIO_SECONDS * 50,
    )
    return Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=_text_config(Qwen2Config, tokenizer, s),
        audio_token_index=audio_token_ids(tokenizer)["audio"],
    )


def tiny_composite_config(
    tokenizer: Any, role: Role = "student", text_model: str | PreTrainedConfig = "llama", **sizes: int
) -> CompositeSpeechLMConfig:
    """A tiny :class:`CompositeSpeechLMConfig`: Whisper encoder + a causal LM.

    ``text_model``: ``"llama"`` or ``"qwen2"`` (sized by ``role``), or any causal-LM config (used as
    given, e.g. a tiny Cohere, Granite or Gemma-2 config).
    """
    s = _sizes(role, sizes)
    if isinstance(text_model, PreTrainedConfig):
        text_config = text_model
    elif text_model in ("llama", "qwen2"):
        text_config = _text_config(LlamaConfig if text_model == "llama" else Qwen2Config, tokenizer, s)
    else:
        raise ValueError(f"text_model must be 'llama', 'qwen2' or a causal-LM config, got {text_model!r}")
    audio_config = WhisperConfig(
        num_mel_bins=TINY_MEL_BINS,
        encoder_layers=s["audio_layers"],
        encoder_attention_heads=s["audio_heads"],
        encoder_ffn_dim=2 * s["audio"],
        decoder_layers=1,
        decoder_attention_heads=s["audio_heads"],
        decoder_ffn_dim=2 * s["audio"],
        d_model=s["audio"],
        max_source_positions=TINY_AUDIO_SECONDS * 50,
        # the decoder is never built; keep its token ids inside its (tiny) vocabulary
        max_target_positions=64,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return CompositeSpeechLMConfig(
        audio_config=audio_config,
        text_config=text_config,
        stack_factor=s["stack"],
        audio_token_id=audio_token_ids(tokenizer)["audio"],
    )


def build_speech_lm(
    config: Qwen2AudioConfig | CompositeSpeechLMConfig,
    tokenizer: Any,
    seed: int = 0,
    chat_template: bool | None = None,
) -> SpeechLM:
    """A randomly initialised :class:`SpeechLM` from a config, in eval mode; the global RNG is untouched.

    ``chat_template``: see :meth:`SpeechLM.set_chat_template` (``None``: the tokenizer's, if any).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(config, Qwen2AudioConfig):
            model = Qwen2AudioForConditionalGeneration(config)
            return Qwen2AudioSpeechLM(model, tokenizer, chat_template=chat_template).eval()
        if isinstance(config, CompositeSpeechLMConfig):
            model = CompositeSpeechLMForCausalLM(config)
            return CompositeSpeechLM(model, tokenizer, chat_template=chat_template).eval()
    raise TypeError(
        f"config must be a Qwen2AudioConfig or CompositeSpeechLMConfig, got {type(config).__name__}"
    )


def build_tiny_speech_lm(
    tokenizer: Any, kind: Kind = "composite", role: Role = "student", seed: int = 0, **sizes: int
) -> SpeechLM:
    """A tiny random model: ``kind`` ``"qwen2_audio"`` or ``"composite"``, ``role`` sets the size."""
    if kind == "qwen2_audio":
        config: Any = tiny_qwen2_audio_config(tokenizer, role, **sizes)
    elif kind == "composite":
        config = tiny_composite_config(tokenizer, role, **sizes)
    else:
        raise ValueError(f"kind must be 'qwen2_audio' or 'composite', got {kind!r}")
    return build_speech_lm(config, tokenizer, seed=seed)


def tiny_teacher(tokenizer: Any, kind: Kind = "qwen2_audio", seed: int = 0, **sizes: int) -> SpeechLM:
    """The tiny teacher (default: Qwen2-Audio kind, padded vocabulary)."""
    return build_tiny_speech_lm(tokenizer, kind, "teacher", seed, **sizes)


def tiny_student(tokenizer: Any, kind: Kind = "composite", seed: int = 1, **sizes: int) -> SpeechLM:
    """The tiny student (default: composite kind, vocabulary = ``len(tokenizer)``)."""
    return build_tiny_speech_lm(tokenizer, kind, "student", seed, **sizes)
