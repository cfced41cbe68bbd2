"""Qwen2-Audio behind the :class:`~caad.models.interface.SpeechLM` interface.

Wraps :class:`transformers.Qwen2AudioForConditionalGeneration` loaded from a local checkpoint
directory (or built from a :class:`~transformers.Qwen2AudioConfig`, e.g. a tiny one). The audio
placeholder expands exactly as Qwen2-Audio's processor does: a clip with ``L`` real mel frames gets
``((L - 1) // 2 + 1 - 2) // 2 + 1`` audio tokens (conv stride 2, then average pooling by 2). The
model's own merge (``Qwen2AudioModel.forward``) puts the audio into the sequence, so hidden states
here are exactly those of the checkpoint's forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
        shared = self.shared_clips(input_features, feature_attention_mask)
        with _encode_distinct_clips(self.model.model.audio_tower, shared):
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


@contextlib.contextmanager
def _encode_distinct_clips(
    audio_tower: torch.nn.Module, shared: tuple[torch.Tensor, torch.Tensor] | None
) -> Iterator[None]:
    """While active, ``audio_tower`` (called by Qwen2-Audio's own forward with ``[C, ...]`` features and a
    per-clip attention mask) encodes only the rows ``shared[0]`` and hands back row ``shared[1][c]`` of
    that for clip ``c`` (:func:`caad.models.interface.unique_clips`): the model's merge code runs
    unchanged on the same ``[C, S, D]`` output. Each clip attends only to itself, so the output is that
    of encoding every row. Nothing is changed when ``shared`` is ``None``."""
    if shared is None:
        yield
        return
    first, inverse = shared

    def keep_distinct(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        features = args[0] if args else kwargs.pop("input_features")
        count = features.shape[0]
        features = features[first.to(features.device)]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape[0] == count:
            kwargs["attention_mask"] = mask[first.to(mask.device)]
        elif mask is not None and not (isinstance(mask, torch.Tensor) and mask.shape[0] == 1):  # 1: broadcast
            raise TypeError(f"unexpected audio attention mask {type(mask).__name__} in Qwen2-Audio's encoder call")
        return (features, *args[1:]), kwargs

    def expand(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        output.last_hidden_state = output.last_hidden_state[inverse.to(output.last_hidden_state.device)]
        return output

    handles = [
        audio_tower.register_forward_pre_hook(keep_distinct, with_kwargs=True),
        audio_tower.register_forward_hook(expand, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
