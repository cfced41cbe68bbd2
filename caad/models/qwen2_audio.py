"""Qwen2-Audio behind the :class:`~caad.models.interface.SpeechLM` interface.

Wraps :class:`transformers.Qwen2AudioForConditionalGeneration` loaded from a local checkpoint
directory (or built from a :class:`~transformers.Qwen2AudioConfig`, e.g. a tiny one). The audio
placeholder expands exactly as Qwen2-Audio's processor does: a clip with ``L`` real mel frames gets
``((L - 1) // 2 + 1 - 2) // 2 + 1`` audio tokens (conv stride 2, then average pooling by 2). The
model's own merge (``Qwen2AudioModel.forward``) puts the audio into the sequence, so hidden states
here are exactly those of the checkpoint's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2AudioForConditionalGeneration

from caad.models.compat import cache_kwargs, output_cache
from caad.models.interface import WhisperAudioSpeechLM, register_speech_lm


@register_speech_lm
class Qwen2AudioSpeechLM(WhisperAudioSpeechLM):
    """A Qwen2-Audio model (``model``) with its tokenizer and a Whisper feature extractor from its config."""

    model_type = "qwen2_audio"
    model_class = Qwen2AudioForConditionalGeneration
    model: Qwen2AudioForConditionalGeneration

    def num_audio_tokens(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        frames = (feature_lengths.long() - 1) // 2 + 1
        return (frames - 2) // 2 + 1

    def backbone(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        if input_features is None and bool((input_ids == self.audio_token_id).any()):
            raise ValueError("input_ids hold audio tokens but input_features is None")
        out = self.model.model(
            input_ids=input_ids,
            input_features=input_features,
            attention_mask=attention_mask,
            feature_attention_mask=feature_attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(self.model.model, cache),
        )
        return out.last_hidden_state, output_cache(out)
