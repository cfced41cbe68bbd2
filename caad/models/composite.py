"""A composite speech LM: Whisper audio encoder + frame-stacking projector + any HF causal LM.

:class:`CompositeSpeechLMForCausalLM` is a regular :class:`~transformers.PreTrainedModel` with its
own :class:`CompositeSpeechLMConfig` (``model_type = "caad_composite_speech_lm"``), so
``save_pretrained``/``from_pretrained`` round-trip exactly. :class:`CompositeSpeechLM` puts it behind
the :class:`~caad.models.interface.SpeechLM` interface.

Audio path, per clip: log-mel ``[n_mels, 2 * S]`` (``S = audio_config.max_source_positions``) ->
``WhisperEncoder`` ``[S, D]`` (conv stride 2) -> stack ``k = stack_factor`` consecutive frames
``[ceil(S / k), k * D]`` -> ``Linear -> GELU -> Linear`` to the LM width. A clip with ``L`` real mel
frames keeps ``ceil(((L - 1) // 2 + 1) / k)`` audio tokens. Whisper's encoder attends over the whole
fixed window (it has no padding mask), so a clip's features do not depend on the rest of the batch.

The LM is any causal LM built into transformers (``AutoModelForCausalLM``); ``forward`` is the LM's
own forward on the merged embeddings, so its logit post-processing (Cohere's scale, Granite's
``logits_scaling``, Gemma-2's soft-cap) and loss apply as the checkpoint defines them.

Training plan stored in the config (set by ``caad models assemble``): ``freeze_audio_encoder``,
``freeze_language_model`` and ``freeze_projector`` turn ``requires_grad`` off on those parts when the
model is built; ``lora`` (``{"r", "alpha", "dropout", "target_modules"}``) is applied by
:meth:`CompositeSpeechLM.prepare_for_training` (needs ``peft``; :mod:`caad.models.lora`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    WhisperConfig,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from caad.models.compat import cache_kwargs, output_cache
from caad.models.interface import (
    WhisperAudioSpeechLM,
    register_speech_lm,
)

MODEL_TYPE = "caad_composite_speech_lm"


class CompositeSpeechLMConfig(PreTrainedConfig):
    """Config of :class:`CompositeSpeechLMForCausalLM`.

    Fields:
        audio_config: a :class:`~transformers.WhisperConfig` (only its encoder part is used).
        text_config: the config of any causal LM known to ``AutoModelForCausalLM`` (Llama, Qwen2, ...).
        stack_factor: audio encoder frames stacked into one audio token (>= 1).
        projector_hidden_size: width of the projector's hidden layer (default: the LM width).
        audio_token_id: token id that the audio placeholder expands to.
        freeze_audio_encoder, freeze_language_model, freeze_projector: parts built with
            ``requires_grad=False`` (the training plan; module docstring).
        lora: ``None`` or ``{"r": int, "alpha": float, "dropout": float, "target_modules": [str]}``,
            LoRA on the LM applied by :meth:`CompositeSpeechLM.prepare_for_training`.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    stack_factor: int = 2
    projector_hidden_size: int | None = None
    audio_token_id: int = 4
    initializer_range: float = 0.02
    freeze_audio_encoder: bool = False
    freeze_language_model: bool = False
    freeze_projector: bool = False
    lora: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if not isinstance(self.audio_config, WhisperConfig):
            raise ValueError(f"audio_config must be a WhisperConfig, got {type(self.audio_config).__name__}")
        if not isinstance(self.stack_factor, int) or self.stack_factor < 1:
            raise ValueError(f"stack_factor must be a positive int, got {self.stack_factor!r}")
        if self.projector_hidden_size is not None and self.projector_hidden_size < 1:
            raise ValueError(f"projector_hidden_size must be positive, got {self.projector_hidden_size!r}")
        for name in ("freeze_audio_encoder", "freeze_language_model", "freeze_projector"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.lora is not None:
            if not isinstance(self.lora, dict) or not {"r", "alpha"} <= set(self.lora):
                raise ValueError(f"lora must be None or a dict with at least 'r' and 'alpha', got {self.lora!r}")
            unknown = set(self.lora) - {"r", "alpha", "dropout", "target_modules"}
            if unknown:
                raise ValueError(f"lora has unknown keys {sorted(unknown)}")
        if not 0 <= self.audio_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"audio_token_id {self.audio_token_id} is outside the LM vocabulary "
                f"(text_config.vocab_size={self.text_config.vocab_size})"
            )


class StackingProjector(nn.Module):
    """``[C, S, D]`` encoder frames -> ``[C, ceil(S / k), H]``: stack ``k`` frames, then a 2-layer MLP."""

    def __init__(self, in_dim: int, stack_factor: int, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.stack_factor = stack_factor
        self.linear_1 = nn.Linear(in_dim * stack_factor, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, out_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        clips, length, dim = frames.shape
        remainder = (-length) % self.stack_factor
        if remainder:
            frames = torch.cat([frames, frames.new_zeros(clips, remainder, dim)], dim=1)
        stacked = frames.reshape(clips, -1, dim * self.stack_factor)
        return self.linear_2(self.act(self.linear_1(stacked)))


class CompositeSpeechLMForCausalLM(PreTrainedModel):
    """Whisper encoder + :class:`StackingProjector` + a causal LM (``language_model``), HF-style.

    ``forward`` takes the usual ``input_ids``/``attention_mask`` plus ``input_features``
    ``[C, n_mels, frames]`` and ``feature_attention_mask`` ``[C, frames]`` (one clip per row holding
    audio tokens, in row order), with the audio tokens already expanded in ``input_ids``.
    """

    config_class = CompositeSpeechLMConfig
    config: CompositeSpeechLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["WhisperEncoderLayer"]

    def __init__(self, config: CompositeSpeechLMConfig) -> None:
        super().__init__(config)
        self.audio_encoder = WhisperEncoder(config.audio_config)
        text_width = config.text_config.hidden_size
        self.projector = StackingProjector(
            config.audio_config.d_model,
            config.stack_factor,
            config.projector_hidden_size or text_width,
            text_width,
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Turn ``requires_grad`` off on the parts the config freezes (nothing by default)."""
        for flag, module in (
            ("freeze_audio_encoder", self.audio_encoder),
            ("freeze_language_model", self.language_model),
            ("freeze_projector", self.projector),
        ):
            if getattr(self.config, flag):
                module.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def num_audio_tokens(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens per clip from the number of real mel frames (int64, same shape)."""
        frames = (feature_lengths.long() - 1) // 2 + 1
        return (frames + self.config.stack_factor - 1) // self.config.stack_factor

    def get_audio_embeddings(
        self,
        input_features: torch.Tensor,
        feature_attention_mask: torch.Tensor,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[sum of audio tokens, H]``: the kept audio tokens of every clip, concatenated in order.

        ``shared``: ``(first, inverse)`` of :func:`caad.models.interface.unique_clips`: only the rows
        ``first`` are encoded and projected, row ``c`` takes the result of ``first[inverse[c]]`` (each
        clip is encoded on its own, so the result is that of encoding every row).
        """
        conv = self.audio_encoder.conv1.weight
        if shared is not None:
            input_features = input_features[shared[0].to(input_features.device)]
        # use_cache=False: the encoder keeps no cache, and the config's default (True) would make transformers
        # log that caching is incompatible with activation checkpointing
        encoded = self.audio_encoder(input_features.to(conv.device, conv.dtype), use_cache=False).last_hidden_state
        projected = self.projector(encoded)
        if shared is not None:
            projected = projected[shared[1].to(projected.device)]
        counts = self.num_audio_tokens(feature_attention_mask.sum(-1)).to(projected.device)
        keep = torch.arange(projected.shape[1], device=projected.device)[None, :] < counts[:, None]
        return projected[keep]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[B, T, H]`` input embeddings with the audio tokens replaced by projected audio (``shared``:
        see :meth:`get_audio_embeddings`)."""
        embeds = self.get_input_embeddings()(input_ids)
        audio_positions = input_ids == self.config.audio_token_id
        if input_features is None:
            if bool(audio_positions.any()):
                raise ValueError("input_ids hold audio tokens but input_features is None")
            return embeds
        if feature_attention_mask is None:
            raise ValueError("feature_attention_mask is required with input_features")
        audio = self.get_audio_embeddings(input_features, feature_attention_mask, shared)
        expected = int(audio_positions.sum())
        if audio.shape[0] != expected:
            raise ValueError(
                f"input_ids hold {expected} audio tokens but the {input_features.shape[0]} clips give "
                f"{audio.shape[0]}: expand the placeholder with num_audio_tokens (SpeechLM.build_inputs does)"
            )
        return embeds.masked_scatter(audio_positions[..., None], audio.to(embeds.dtype))

    def model_forward(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> BaseModelOutputWithPast:
        """The LM body on the merged embeddings: final hidden states (after the final norm), no logits
        (``shared``: see :meth:`get_audio_embeddings`)."""
        embeds = self.embed_inputs(input_ids, input_features, feature_attention_mask, shared)
        decoder = self.language_model.get_decoder()
        return decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(decoder, cache),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The LM's own forward on the merged embeddings: logits ``[B, T, V]`` (with the LM's logit
        post-processing) and, with unshifted ``labels``, its mean next-token cross-entropy.

        ``past_key_values`` is accepted as the old name of ``cache``.
        """
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        embeds = self.embed_inputs(input_ids, input_features, feature_attention_mask)
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            labels=labels,
            **cache_kwargs(self.language_model, cache),
            **kwargs,
        )


AutoConfig.register(MODEL_TYPE, CompositeSpeechLMConfig, exist_ok=True)
AutoModelForCausalLM.register(CompositeSpeechLMConfig, CompositeSpeechLMForCausalLM, exist_ok=True)


@register_speech_lm
class CompositeSpeechLM(WhisperAudioSpeechLM):
    """:class:`CompositeSpeechLMForCausalLM` behind the :class:`~caad.models.interface.SpeechLM` interface."""

    model_type = MODEL_TYPE
    model_class = CompositeSpeechLMForCausalLM
    model: CompositeSpeechLMForCausalLM

    def __init__(self, model: CompositeSpeechLMForCausalLM, tokenizer: Any, chat_template: bool | None = None) -> None:
        super().__init__(model, tokenizer, chat_template=chat_template)
        # again here: loading may replace the parameters created (and frozen) in the model's __init__
        model.apply_freezing()

    def num_audio_tokens(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        return self.model.num_audio_tokens(feature_lengths)

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
        out = self.model.model_forward(
            input_ids,
            input_features,
            feature_attention_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            shared=self.shared_clips(input_features, feature_attention_mask),
        )
        return out.last_hidden_state, output_cache(out)

    def prepare_for_training(self) -> int:
        """Apply the config's LoRA plan (once; no-op without one). Returns the number of adapted modules."""
        from caad.models.lora import apply_lora, has_lora

        plan = self.model.config.lora
        if plan is None or has_lora(self.model):
            return 0
        return apply_lora(
            self.model,
            r=int(plan["r"]),
            alpha=float(plan["alpha"]),
            dropout=float(plan.get("dropout", 0.0)),
            target_modules=tuple(plan.get("target_modules") or ("q_proj", "k_proj", "v_proj", "o_proj")),
        )
