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
from transformers import PreTrainedTokenizerBase, Qwen2AudioForConditionalGeneration

from caad.models.interface import SpeechLM, load_tokenizer, register_speech_lm, whisper_feature_extractor


@register_speech_lm
class Qwen2AudioSpeechLM(SpeechLM):
    """A Qwen2-Audio model (``model``) with its tokenizer and a Whisper feature extractor from its config."""

    model_type = "qwen2_audio"
    model: Qwen2AudioForConditionalGeneration

    def __init__(self, model: Qwen2AudioForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
        if not isinstance(model, Qwen2AudioForConditionalGeneration):
            raise TypeError(f"model must be a Qwen2AudioForConditionalGeneration, got {type(model).__name__}")
        audio_config = model.config.audio_config
        feature_extractor = whisper_feature_extractor(
            audio_config.num_mel_bins, 2 * audio_config.max_source_positions
        )
        super().__init__(model, tokenizer, feature_extractor)

    @property
    def audio_token_id(self) -> int:
        return int(self.model.config.audio_token_id)

    @property
    def window_frames(self) -> int:
        return 2 * int(self.model.config.audio_config.max_source_positions)

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
        past_key_values: Any = None,
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
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    @classmethod
    def _load(cls, path: str, dtype: torch.dtype | None = None, **kwargs: Any) -> Qwen2AudioSpeechLM:
        model = Qwen2AudioForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
        return cls(model, load_tokenizer(path))
