"""One interface for teacher and student speech LMs: :class:`SpeechLM`.

Conventions (shared by every model in :mod:`caad.models`):

- Audio is a list of mono waveforms at 16 kHz (1-D ``numpy`` arrays or tensors, float, in [-1, 1]),
  one clip per example. Each clip becomes log-mel features with transformers'
  :class:`~transformers.WhisperFeatureExtractor`, built from the model's config (never downloaded):
  ``input_features`` ``[C, n_mels, frames]`` float32 (the model's fixed audio window, zero-padded
  audio) and ``feature_attention_mask`` ``[C, frames]`` int64 (1 on frames of real audio).
- The sequence is ``prompt + target`` with the prompt of :meth:`SpeechLM.format_prompt`: the
  checkpoint's chat template when its tokenizer has one (a user turn with the audio placeholder and
  the instruction, then the assistant's generation prompt), else the chat-free convention; see
  :mod:`caad.models.tokenizer`. The single ``<|AUDIO|>`` placeholder is expanded to
  :meth:`SpeechLM.num_audio_tokens` copies of the audio token id, which the model replaces by the
  projected audio encoder outputs. The target ends with :attr:`SpeechLM.end_of_turn_id`: ``eos``, or
  the chat template's end-of-turn token (``<|im_end|>`` for Qwen).
- ``labels`` are unshifted (Hugging Face style): ``labels[b, t]`` is ``input_ids[b, t]`` on target
  tokens (the target text and its end token) and ``-100`` on prompt, audio and padding
  positions. The hidden state at position ``t`` predicts the token at ``t + 1``.
- "Target hidden states" are the final hidden states (after the LM's final norm, before
  ``lm_head``) at the positions that predict target tokens, packed row-major (example by example,
  left to right) into ``[N, H]``, with the ``[N]`` labels they predict. Because only target tokens
  are packed, rows line up across the positive and negative paths of one model, and across teacher
  and student even when they expand the audio to different numbers of tokens: row ``i`` of each
  predicts the same target token. This is what the fused-linear loss consumes.
- Logits are ``lm_head(hidden)`` (+ bias) multiplied by :attr:`SpeechLM.logit_scale`, then soft-capped
  by :attr:`SpeechLM.final_softcap` (``cap * tanh(z / cap)``), both read from the LM's config
  (Cohere ``logit_scale``, Granite ``1 / logits_scaling``, Gemma-2/3 ``final_logit_softcapping``), as
  the checkpoint's own forward does. The fused loss takes the same two numbers as options.
- Position ids always come from the attention mask (``cumsum - 1``), so left and right padding
  give the same hidden states on real tokens.

``audio_mode``: ``"positive"`` (the real audio) or a negative path. What each negative path hides
from the model (the clip's *content*: what was said and how; its *duration*: the number of audio
tokens and the feature mask, which alone predicts e.g. speaking rate):

==============================  =========================================================  =======  ========
mode                            what the model gets                                        content  duration
==============================  =========================================================  =======  ========
``"remove"`` (default)          no audio block at all (no ``<|audio_bos|>``, audio tokens,  hidden   hidden
                                ``<|audio_eos|>``, no features): the text-only prompt
``"silence_fixed_length"``      the audio block of a fixed ``silence_seconds`` (default     hidden   hidden
                                1 s) of digital silence, the same for every example
``"zero_features_keep_length"`` the clip's audio token count and feature mask, log-mel      hidden   **seen**
                                features set to 0 (the old ``"zero"``)
``"noise_keep_length"``         the clip's audio token count and feature mask, standard     hidden   **seen**
                                Gaussian features seeded per clip (the old ``"noise"``)
==============================  =========================================================  =======  ========

The default is ``"remove"``: it is the literal text-only path of audio contrastive decoding (the
language model's prior given the instruction alone, which is what a text-only phase of the teacher's
LM trains), costs no audio tokens, and needs no choice of a blank length. The two ``*_keep_length``
modes leak the duration and are kept for comparison only. ``"zero"`` and ``"noise"`` are accepted as
aliases of ``"zero_features_keep_length"`` and ``"noise_keep_length"`` (:data:`NEGATIVE_MODE_ALIASES`),
so older configs keep their exact behaviour; :func:`resolve_audio_mode` maps them.
Noise is seeded per clip (from ``noise_seed`` and the clip's samples), so an example's negative path
does not depend on the rest of its batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, WhisperFeatureExtractor

from caad.data import audio as data_audio
from caad.models.compat import enable_activation_checkpointing
from caad.models.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    build_prompt,
    chat_prompt,
    end_of_turn_token,
    has_chat_template,
)

IGNORE_INDEX = -100
SAMPLING_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
#: Shortest clip accepted: 0.1 s gives every model at least 2 audio tokens.
MIN_AUDIO_SAMPLES = SAMPLING_RATE // 10
#: Negative-path modes (module docstring: what each hides); the first is the default.
NEGATIVE_MODES = ("remove", "silence_fixed_length", "zero_features_keep_length", "noise_keep_length")
DEFAULT_NEGATIVE_MODE = "remove"
#: Old names, accepted with their old behaviour.
NEGATIVE_MODE_ALIASES = {"zero": "zero_features_keep_length", "noise": "noise_keep_length"}
AUDIO_MODES = ("positive", *NEGATIVE_MODES)
#: Length of the ``"silence_fixed_length"`` audio block, in seconds.
DEFAULT_SILENCE_SECONDS = 1.0

AudioInput = Sequence["np.ndarray | torch.Tensor"] | np.ndarray | torch.Tensor


def resolve_audio_mode(audio_mode: object, name: str = "audio_mode", negative: bool = False) -> str:
    """The canonical name of an audio mode (aliases mapped); ``ValueError`` naming ``name`` otherwise.

    ``negative=True`` accepts only the negative-path modes (:data:`NEGATIVE_MODES` and aliases).
    """
    if isinstance(audio_mode, str):
        audio_mode = NEGATIVE_MODE_ALIASES.get(audio_mode, audio_mode)
    allowed = NEGATIVE_MODES if negative else AUDIO_MODES
    if audio_mode not in allowed:
        aliases = ", ".join(f"{old!r} (= {new!r})" for old, new in NEGATIVE_MODE_ALIASES.items())
        raise ValueError(f"{name} must be one of {allowed} or an alias {aliases}, got {audio_mode!r}")
    return str(audio_mode)


def clip_noise_seed(clip: np.ndarray, noise_seed: int) -> int:
    """A 63-bit seed from ``noise_seed`` and the clip's float32 samples (the same clip, the same seed)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(int(noise_seed).to_bytes(8, "little", signed=True))
    digest.update(np.ascontiguousarray(clip, dtype=np.float32).tobytes())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def unique_clips(
    input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of ``input_features`` ``[C, ...]`` that repeat an earlier row exactly (with the same row of
    ``feature_attention_mask`` ``[C, frames]``), e.g. one clip asked several questions.

    Returns ``(first, inverse)``: int64 ``[U]`` the index of each distinct row's first occurrence and
    int64 ``[C]`` such that row ``c`` equals row ``first[inverse[c]]``; ``None`` when every row is
    distinct (then nothing needs sharing). Rows are compared exactly (``torch.equal``), after a cheap
    per-row key (mask length and feature sum) rules out most pairs.
    """
    count = int(input_features.shape[0])
    if count < 2:
        return None
    flat = input_features.detach().reshape(count, -1)
    sums = flat.double().sum(-1).tolist()
    lengths = [0] * count if feature_attention_mask is None else feature_attention_mask.sum(-1).tolist()
    first: list[int] = []
    inverse: list[int] = []
    seen: dict[tuple[Any, Any], list[int]] = {}
    for row in range(count):
        candidates = seen.setdefault((lengths[row], sums[row]), [])
        for slot in candidates:
            other = first[slot]
            same_mask = feature_attention_mask is None or torch.equal(
                feature_attention_mask[row], feature_attention_mask[other]
            )
            if same_mask and torch.equal(flat[row], flat[other]):
                inverse.append(slot)
                break
        else:
            candidates.append(len(first))
            inverse.append(len(first))
            first.append(row)
    if len(first) == count:
        return None
    device = input_features.device
    return torch.tensor(first, dtype=torch.long, device=device), torch.tensor(inverse, dtype=torch.long, device=device)


def noise_features(clips: Sequence[np.ndarray], shape: Sequence[int], noise_seed: int) -> torch.Tensor:
    """``[C, *shape]`` float32 standard Gaussian features, clip ``c`` drawn from :func:`clip_noise_seed`."""
    out = torch.empty((len(clips), *shape), dtype=torch.float32)
    for index, clip in enumerate(clips):
        generator = torch.Generator().manual_seed(clip_noise_seed(clip, noise_seed))
        out[index] = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return out


class TargetHiddenStates(NamedTuple):
    """Final hidden states at the target-prediction positions, packed row-major.

    ``hidden``: ``[N, H]`` in the model's dtype; ``labels``: ``[N]`` int64, the target token that
    each row predicts (never ``-100``).
    """

    hidden: torch.Tensor
    labels: torch.Tensor


@dataclass
class SpeechBatch:
    """Model inputs for ``prompt (+ target)`` sequences; build with :meth:`SpeechLM.build_inputs`.

    Attributes:
        input_ids: ``[B, T]`` int64, audio placeholder already expanded, padded with the pad id.
        attention_mask: ``[B, T]`` int64, 1 on real tokens, 0 on padding.
        labels: ``[B, T]`` int64 (unshifted, ``-100`` outside targets), or ``None`` without targets.
        input_features: ``[C, n_mels, frames]`` float32 or ``None``; one clip for every row that holds
            audio tokens, in row order (``None`` when no row has audio, e.g. ``audio_mode="remove"``).
        feature_attention_mask: ``[C, frames]`` int64 or ``None``, 1 on frames of real audio.
        audio_mode: the ``audio_mode`` the batch was built with (``"mixed"`` after concatenation).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    input_features: torch.Tensor | None
    feature_attention_mask: torch.Tensor | None
    audio_mode: str = "positive"

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_target_tokens(self) -> int:
        """Number of target tokens (rows of the packed target hidden states)."""
        if self.labels is None:
            return 0
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> SpeechBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (
                getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else None
            )
            for f in fields(self)
            if f.name != "audio_mode"
        }
        return SpeechBatch(**moved, audio_mode=self.audio_mode)


def _pad_right(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if tensor.shape[1] == length:
        return tensor
    pad = torch.full(
        (tensor.shape[0], length - tensor.shape[1]), value, dtype=tensor.dtype, device=tensor.device
    )
    return torch.cat([tensor, pad], dim=1)


def _padding_side(batch: SpeechBatch) -> str:
    # Left-padded batches have a 0 in the first column of some row.
    return "left" if bool((batch.attention_mask[:, 0] == 0).any()) else "right"


def concat_batches(first: SpeechBatch, second: SpeechBatch, pad_token_id: int) -> SpeechBatch:
    """Stack two right-padded batches along the batch dimension (rows of ``first``, then ``second``).

    The shorter one is right-padded to the longer length; features are concatenated in row order.
    Both must have labels, or neither. Used for the one-forward positive + negative teacher paths.
    """
    for name, batch in (("first", first), ("second", second)):
        if _padding_side(batch) != "right":
            raise ValueError(
                f"concat_batches: {name} must be right-padded (build it with padding_side='right')"
            )
    if (first.labels is None) != (second.labels is None):
        raise ValueError("concat_batches: both batches must have labels, or neither")
    length = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def cat(a: torch.Tensor | None, b: torch.Tensor | None, value: int) -> torch.Tensor | None:
        if a is None or b is None:
            return None
        return torch.cat([_pad_right(a, length, value), _pad_right(b, length, value)], dim=0)

    features = [f for f in (first.input_features, second.input_features) if f is not None]
    feature_masks = [
        m for m in (first.feature_attention_mask, second.feature_attention_mask) if m is not None
    ]
    return SpeechBatch(
        input_ids=cat(first.input_ids, second.input_ids, pad_token_id),
        attention_mask=cat(first.attention_mask, second.attention_mask, 0),
        labels=cat(first.labels, second.labels, IGNORE_INDEX),
        input_features=torch.cat(features, dim=0) if features else None,
        feature_attention_mask=torch.cat(feature_masks, dim=0) if feature_masks else None,
        audio_mode=first.audio_mode if first.audio_mode == second.audio_mode else "mixed",
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int64 positions counting real tokens only (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_audio(
    audio: AudioInput, sampling_rate: int, max_samples: int, name: str = "audio"
) -> list[np.ndarray]:
    """Validate a batch of clips and return them as 1-D float32 numpy arrays.

    Accepts a list/tuple of 1-D arrays or tensors, or a 2-D array/tensor ``[B, samples]``.
    Raises ``ValueError`` naming the argument on a wrong rank, sampling rate, length or non-finite values.
    """
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(
            f"sampling_rate must be {SAMPLING_RATE} (the feature extractor's), got {sampling_rate}; "
            "resample the audio first (caad.data.audio.load_audio does)"
        )
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        if audio.ndim != 2:
            raise ValueError(
                f"{name} must be a list of 1-D waveforms or a 2-D [batch, samples] array, "
                f"got an array of shape {tuple(audio.shape)}"
            )
        clips = list(audio)
    elif isinstance(audio, (list, tuple)):
        clips = list(audio)
    else:
        raise TypeError(f"{name} must be a list of 1-D waveforms, got {type(audio).__name__}")
    if not clips:
        raise ValueError(f"{name} is empty")
    out = []
    for index, clip in enumerate(clips):
        if isinstance(clip, torch.Tensor):
            clip = clip.detach().to("cpu", torch.float32).numpy()
        clip = np.asarray(clip)
        if clip.ndim != 1:
            raise ValueError(
                f"{name}[{index}] must be a 1-D mono waveform, got shape {tuple(clip.shape)} "
                "(mix stereo down to mono first)"
            )
        if not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(f"{name}[{index}] must hold float samples in [-1, 1], got dtype {clip.dtype}")
        if clip.shape[0] < MIN_AUDIO_SAMPLES:
            raise ValueError(
                f"{name}[{index}] has {clip.shape[0]} samples; at least {MIN_AUDIO_SAMPLES} "
                f"({MIN_AUDIO_SAMPLES / SAMPLING_RATE:.1f} s at {SAMPLING_RATE} Hz) are needed"
            )
        if clip.shape[0] > max_samples:
            raise ValueError(
                f"{name}[{index}] is {clip.shape[0] / SAMPLING_RATE:.2f} s long; "
                f"this model's audio window is {max_samples / SAMPLING_RATE:.2f} s"
            )
        if not np.isfinite(clip).all():
            raise ValueError(f"{name}[{index}] contains NaN or infinite samples")
        out.append(clip.astype(np.float32, copy=False))
    return out


def _check_texts(texts: object, name: str, count: int, forbidden: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a list of str (one per example), got {type(texts).__name__}")
    if len(texts) != count:
        raise ValueError(f"{name} has {len(texts)} entries but audio has {count} clips")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(text).__name__}")
        for token in forbidden:
            if token in text:
                raise ValueError(f"{name}[{index}] contains the special token {token!r}")
    return list(texts)


def whisper_feature_extractor(num_mel_bins: int, window_frames: int) -> WhisperFeatureExtractor:
    """A Whisper log-mel extractor built from parameters (16 kHz, hop 160, n_fft 400).

    ``window_frames`` is the fixed number of mel frames the encoder expects (3000 for 30 s); it must
    be a multiple of 100 (whole seconds), as the extractor pads to ``chunk_length`` seconds.
    """
    if window_frames <= 0 or window_frames % (SAMPLING_RATE // HOP_LENGTH) != 0:
        raise ValueError(
            f"the audio window must be a whole number of seconds, got {window_frames} mel frames"
        )
    return data_audio.whisper_feature_extractor(
        n_mels=num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=window_frames // (SAMPLING_RATE // HOP_LENGTH),
        n_fft=N_FFT,
    )


def _full_shape(parameter: torch.Tensor) -> torch.Size:
    # DeepSpeed ZeRO-3 partitions parameters to empty tensors and keeps the real shape in ds_shape.
    return getattr(parameter, "ds_shape", parameter.shape)


def _special_token(tokenizer: PreTrainedTokenizerBase, role: str) -> str:
    return getattr(tokenizer, role, None) or DEFAULT_SPECIAL_TOKENS[role]


def logit_postprocessing(config: Any) -> tuple[float, float | None]:
    """``(logit_scale, final_softcap)`` of a causal LM config, as its own forward applies them.

    Cohere's ``logit_scale`` multiplies the logits, Granite's ``logits_scaling`` divides them (scale
    ``1 / x``), Gemma-2/3's ``final_logit_softcapping`` caps them (``cap * tanh(z / cap)``, after the
    scale); ``(1.0, None)`` for LMs with none of these. Raises ``ValueError`` on a non-positive value.
    """
    scale = 1.0
    for name, invert in (("logit_scale", False), ("logits_scaling", True)):
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"the LM config's {name} must be a positive number, got {value!r}")
        scale = scale / float(value) if invert else scale * float(value)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None or cap == 0:
        return scale, None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 0:
        raise ValueError(f"the LM config's final_logit_softcapping must be a positive number, got {cap!r}")
    return scale, float(cap)


class SpeechLM(nn.Module):
    """Base class of teacher and student wrappers; subclasses give the model-specific parts.

    ``model`` is the underlying :class:`~transformers.PreTrainedModel` (its parameters are this
    module's parameters, so the wrapper can go straight to ``deepspeed.initialize`` or an optimizer).
    ``forward(batch)`` returns :class:`TargetHiddenStates`. ``chat_template`` (``None``: use the
    tokenizer's chat template when it has one) picks the prompt convention (:meth:`format_prompt`).
    """

    #: ``config.model_type`` of the checkpoints a subclass loads (set by subclasses).
    model_type: str = ""
    #: Compute the log-mel features and the audio encoder's outputs once per distinct clip of a batch
    #: (:func:`unique_clips`; one clip asked under several text conditions). The encoder part applies
    #: without autograd only (evaluation, a teacher's forward), so training gradients are untouched.
    #: Every clip is encoded on its own by each encoder, so the outputs are the same either way.
    share_clip_encoding: bool = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor,
        chat_template: bool | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token")
        token_id = tokenizer.convert_tokens_to_ids(_special_token(tokenizer, "audio_token"))
        if token_id != self.audio_token_id:
            raise ValueError(
                f"tokenizer's audio token id {token_id} differs from the model config's audio_token_id "
                f"{self.audio_token_id}"
            )
        if len(tokenizer) > self.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's lm_head only {self.vocab_size} rows"
            )
        self.set_chat_template(chat_template)
        logit_postprocessing(self.text_config)  # a bad value fails here, not mid-training

    # ---- model-specific parts -------------------------------------------------------------------

    @property
    def audio_token_id(self) -> int:
        """Id of the audio token that the placeholder expands to."""
        raise NotImplementedError

    def num_audio_tokens(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens per clip (int64 ``[C]``) from the number of real mel frames per clip (``[C]``)."""
        raise NotImplementedError

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
        """Run audio encoder + merge + LM body: ``([B, T, H]`` final hidden states, the KV cache)."""
        raise NotImplementedError

    @property
    def window_frames(self) -> int:
        """Mel frames in the model's fixed audio window (3000 = 30 s for Whisper and Qwen2-Audio)."""
        raise NotImplementedError

    def prepare_for_training(self) -> int:
        """Add what the checkpoint's training plan asks for (e.g. LoRA adapters); call once before the
        optimizer is built. Returns the number of modules changed (0 here: nothing to add)."""
        return 0

    # ---- common properties ----------------------------------------------------------------------

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        """The language model's config (``config.get_text_config()``)."""
        return self.model.config.get_text_config()

    @property
    def logit_scale(self) -> float:
        """Factor the logits are multiplied by (LM config; 1.0 for most LMs): the loss's ``*_logit_scale``."""
        return logit_postprocessing(self.text_config)[0]

    @property
    def final_softcap(self) -> float | None:
        """Final logit soft-cap ``c`` (``c * tanh(z / c)`` after the scale), or ``None``: the loss's ``*_softcap``."""
        return logit_postprocessing(self.text_config)[1]

    def postprocess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply :attr:`logit_scale` then :attr:`final_softcap` to raw ``lm_head`` outputs (any shape)."""
        scale, cap = logit_postprocessing(self.text_config)
        if scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    @property
    def lm_head(self) -> nn.Module:
        """The output projection module (gather :meth:`lm_head_parameters` under ZeRO-3 before reading it)."""
        return self.model.get_output_embeddings()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, H]`` effective output projection weight (``V`` may exceed ``len(tokenizer)``: padded vocab).

        With a PEFT LoRA adapter on ``lm_head`` this is ``W + sum_a scaling_a * B_a @ A_a`` computed
        differentiably (gradients reach the adapter; one ``[V, H]`` tensor is materialised), so the
        fused-linear loss sees what ``lm_head`` computes. Adapters it cannot express as a weight
        (DoRA, a LoRA bias, dropout > 0 while training) raise ``NotImplementedError``
        (:func:`caad.models.lora.effective_weight`).
        """
        from caad.models.lora import effective_weight, is_lora_layer

        head = self.lm_head
        return effective_weight(head) if is_lora_layer(head) else head.weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """``[V]`` output projection bias, or ``None`` (the usual case)."""
        head = self.lm_head
        return getattr(getattr(head, "base_layer", head), "bias", None)

    def lm_head_parameters(self) -> list[nn.Parameter]:
        """Every parameter :attr:`lm_head_weight` and :attr:`lm_head_bias` read (base and adapters)."""
        return list(self.lm_head.parameters())

    @property
    def vocab_size(self) -> int:
        """Rows of ``lm_head`` (the logit width)."""
        return int(_full_shape(self.lm_head.weight)[0])

    @property
    def hidden_size(self) -> int:
        """Width of the final hidden states (columns of ``lm_head``)."""
        return int(_full_shape(self.lm_head.weight)[1])

    def gradient_checkpointing_enable(self, use_reentrant: bool = False, **kwargs: Any) -> None:
        """Activation (gradient) checkpointing in every checkpointable layer of the model (audio encoder
        and LM), non-reentrant by default; active in training mode. ``kwargs`` (e.g. ``every_n_layers``)
        go to transformers."""
        enable_activation_checkpointing(self.model, use_reentrant=use_reentrant, **kwargs)

    #: the name transformers >= 5.23 uses for the same thing
    activation_checkpointing_enable = gradient_checkpointing_enable

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on in some layer."""
        return any(bool(getattr(m, "gradient_checkpointing", False)) for m in self.model.modules())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_audio_samples(self) -> int:
        return self.window_frames * HOP_LENGTH

    # ---- prompts --------------------------------------------------------------------------------

    def set_chat_template(self, enabled: bool | None) -> None:
        """Use the tokenizer's chat template (``True``), the chat-free prompt (``False``), or the template
        when the tokenizer has one (``None``). Sets :attr:`end_of_turn_id` accordingly."""
        available = has_chat_template(self.tokenizer)
        if enabled is None:
            enabled = available
        if not isinstance(enabled, bool):
            raise TypeError(f"chat_template must be True, False or None, got {enabled!r}")
        if enabled and not available:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        token = end_of_turn_token(self.tokenizer) if enabled else self.tokenizer.eos_token
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the end-of-turn token {token!r} is not in the tokenizer's vocabulary")
        self._chat_template = enabled
        self._end_of_turn_id = int(token_id)

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts use the tokenizer's chat template (see :meth:`set_chat_template`)."""
        return self._chat_template

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends every target: the chat template's end of turn (``<|im_end|>``), else ``eos``."""
        return self._end_of_turn_id

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end generation: :attr:`end_of_turn_id` and ``eos``."""
        return tuple(dict.fromkeys((self.end_of_turn_id, int(self.tokenizer.eos_token_id))))

    def format_prompt(self, instruction: str, with_audio: bool = True) -> str:
        """The prompt text for one example: :func:`~caad.models.tokenizer.chat_prompt` under the chat
        template, else :func:`~caad.models.tokenizer.build_prompt`."""
        if self._chat_template:
            return chat_prompt(self.tokenizer, instruction, with_audio=with_audio)
        return build_prompt(self.tokenizer, instruction, with_audio=with_audio)

    # ---- inputs ---------------------------------------------------------------------------------

    def extract_features(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of checked clips: ``([C, n_mels, frames]`` float32, ``[C, frames]`` int64).

        With :attr:`share_clip_encoding`, identical clips (same samples) are featurised once, and inside
        :func:`caad.models.feature_cache.feature_cache` clips featurised before (by any model with the
        same extractor settings) are taken from the cache. The extractor treats every clip on its own,
        so the result is the same.
        """
        clips = list(clips)
        if not self.share_clip_encoding or getattr(self.feature_extractor, "dither", 0.0):
            return self._run_feature_extractor(clips)
        from caad.models.feature_cache import active_feature_cache, clip_digest

        cache = active_feature_cache()
        keys = [clip_digest(clip) for clip in clips]
        if cache is None and len(set(keys)) == len(keys):
            return self._run_feature_extractor(clips)
        settings = self.feature_extractor.to_json_string() if cache is not None else ""
        found: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        missing: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            if key in found or key in missing:
                continue
            hit = cache.get((settings, key)) if cache is not None else None
            if hit is None:
                missing[key] = index
            else:
                found[key] = hit
        if missing:
            features, mask = self._run_feature_extractor([clips[i] for i in missing.values()])
            for row, key in enumerate(missing):
                found[key] = (features[row], mask[row])
                if cache is not None:
                    cache.put((settings, key), features[row], mask[row])
        return torch.stack([found[k][0] for k in keys]), torch.stack([found[k][1] for k in keys])

    def _run_feature_extractor(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.feature_extractor(
            clips,
            sampling_rate=SAMPLING_RATE,
            return_tensors="pt",
            return_attention_mask=True,
            padding="max_length",
        )
        return out["input_features"].to(torch.float32), out["attention_mask"].to(torch.long)

    def shared_clips(
        self, input_features: torch.Tensor | None, feature_attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`unique_clips` of a batch's audio when the encoder may run once per distinct clip
        (:attr:`share_clip_encoding` on, autograd off, some clip repeated); else ``None``."""
        if input_features is None or not self.share_clip_encoding or torch.is_grad_enabled():
            return None
        return unique_clips(input_features, feature_attention_mask)

    def _check_silence_seconds(self, seconds: object) -> int:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
            raise ValueError(f"silence_seconds must be a number of seconds, got {seconds!r}")
        samples = int(round(seconds * SAMPLING_RATE))
        if not MIN_AUDIO_SAMPLES <= samples <= self.max_audio_samples:
            raise ValueError(
                f"silence_seconds must be between {MIN_AUDIO_SAMPLES / SAMPLING_RATE:.1f} and "
                f"{self.max_audio_samples / SAMPLING_RATE:.1f} (the audio window), got {seconds!r}"
            )
        return samples

    def _audio_inputs(
        self, clips: list[np.ndarray], audio_mode: str, noise_seed: int, silence_seconds: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
        """``(input_features, feature_attention_mask, audio tokens per clip)`` for ``audio_mode``."""
        if audio_mode == "remove":
            return None, None, [0] * len(clips)
        if audio_mode == "silence_fixed_length":
            silence = np.zeros(self._check_silence_seconds(silence_seconds), dtype=np.float32)
            features, mask = self.extract_features([silence] * len(clips))
        else:
            features, mask = self.extract_features(clips)
            if audio_mode == "zero_features_keep_length":
                features = torch.zeros_like(features)
            elif audio_mode == "noise_keep_length":
                features = noise_features(clips, features.shape[1:], noise_seed)
        return features, mask, self.num_audio_tokens(mask.sum(-1)).tolist()

    def build_inputs(
        self,
        audio: AudioInput,
        instructions: Sequence[str],
        targets: Sequence[str] | None = None,
        *,
        audio_mode: str = "positive",
        sampling_rate: int = SAMPLING_RATE,
        noise_seed: int = 0,
        silence_seconds: float = DEFAULT_SILENCE_SECONDS,
        padding_side: str = "right",
        add_eos: bool = True,
    ) -> SpeechBatch:
        """Build ``prompt + target`` inputs (CPU tensors) for one batch.

        Args:
            audio: ``B`` mono clips at ``sampling_rate`` (see :func:`check_audio`).
            instructions: ``B`` instruction strings (the text part of the prompt).
            targets: ``B`` target strings (pseudo-GT), or ``None`` for generation prompts.
            audio_mode: ``"positive"`` or a negative mode (module docstring; aliases accepted).
            sampling_rate: must be 16000.
            noise_seed: seed of the ``"noise_keep_length"`` features (per clip: :func:`clip_noise_seed`).
            silence_seconds: length of the ``"silence_fixed_length"`` audio block.
            padding_side: ``"right"`` (training, concatenation) or ``"left"`` (generation).
            add_eos: end every target with :attr:`end_of_turn_id` (it is a target token too).
        """
        audio_mode = resolve_audio_mode(audio_mode)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        clips = check_audio(audio, sampling_rate, self.max_audio_samples)
        specials = [
            _special_token(self.tokenizer, role)
            for role in ("audio_bos_token", "audio_token", "audio_eos_token")
        ]
        end_token = self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        forbidden = [
            *specials,
            *dict.fromkeys(t for t in (self.tokenizer.pad_token, self.tokenizer.eos_token, end_token) if t),
        ]
        instructions = _check_texts(instructions, "instructions", len(clips), forbidden)
        if targets is not None:
            targets = _check_texts(targets, "targets", len(clips), forbidden)

        with_audio = audio_mode != "remove"
        input_features, feature_mask, counts = self._audio_inputs(clips, audio_mode, noise_seed, silence_seconds)

        audio_id = self.audio_token_id
        sequences: list[list[int]] = []
        label_rows: list[list[int]] = []
        for index, instruction in enumerate(instructions):
            prompt = self.tokenizer(self.format_prompt(instruction, with_audio), add_special_tokens=False)[
                "input_ids"
            ]
            if prompt.count(audio_id) != int(with_audio):
                raise ValueError(f"instructions[{index}]: the prompt must hold exactly one audio placeholder")
            if with_audio:
                at = prompt.index(audio_id)
                prompt = prompt[:at] + [audio_id] * int(counts[index]) + prompt[at + 1 :]
            target: list[int] = []
            if targets is not None:
                target = self.tokenizer(targets[index], add_special_tokens=False)["input_ids"]
                if add_eos:
                    target = target + [self.end_of_turn_id]
                if not target:
                    raise ValueError(f"targets[{index}] is empty (and add_eos is False)")
            sequences.append(prompt + target)
            label_rows.append([IGNORE_INDEX] * len(prompt) + target)

        length = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        for row, (sequence, label_row) in enumerate(zip(sequences, label_rows)):
            span = (
                slice(0, len(sequence)) if padding_side == "right" else slice(length - len(sequence), length)
            )
            input_ids[row, span] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, span] = 1
            labels[row, span] = torch.tensor(label_row, dtype=torch.long)
        return SpeechBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels if targets is not None else None,
            input_features=input_features,
            feature_attention_mask=feature_mask,
            audio_mode=audio_mode,
        )

    def negative_inputs(
        self,
        positive: SpeechBatch,
        audio: AudioInput,
        instructions: Sequence[str],
        targets: Sequence[str] | None,
        audio_mode: str = DEFAULT_NEGATIVE_MODE,
        **kwargs: Any,
    ) -> SpeechBatch:
        """The negative-path batch for the examples ``positive`` was built from (same targets).

        ``audio``, ``instructions`` and ``targets`` are those ``positive`` was built from;
        ``"zero_features_keep_length"`` reuses ``positive``'s token ids, the other modes rebuild the
        batch. ``kwargs`` go to :meth:`build_inputs` (``noise_seed``, ``silence_seconds``, ``padding_side``...).
        """
        audio_mode = resolve_audio_mode(audio_mode, negative=True)
        if audio_mode == "zero_features_keep_length" and positive.input_features is not None:
            return replace(positive, input_features=torch.zeros_like(positive.input_features), audio_mode=audio_mode)
        return self.build_inputs(audio, instructions, targets, audio_mode=audio_mode, **kwargs)

    # ---- forward passes -------------------------------------------------------------------------

    def hidden_states(self, batch: SpeechBatch) -> torch.Tensor:
        """``[B, T, H]`` final hidden states (after the final norm) for every position."""
        if not isinstance(batch, SpeechBatch):
            raise TypeError(f"batch must be a SpeechBatch (from build_inputs), got {type(batch).__name__}")
        batch = batch.to(self.device)
        hidden, _ = self.backbone(
            batch.input_ids,
            batch.attention_mask,
            position_ids_from_mask(batch.attention_mask),
            batch.input_features,
            batch.feature_attention_mask,
        )
        return hidden

    @staticmethod
    def gather_targets(hidden: torch.Tensor, labels: torch.Tensor) -> TargetHiddenStates:
        """Pack ``hidden[b, t]`` for every ``t`` with ``labels[b, t + 1] != -100``, with those labels."""
        shifted = labels[:, 1:].to(hidden.device)
        mask = shifted != IGNORE_INDEX
        return TargetHiddenStates(hidden[:, :-1][mask], shifted[mask])

    def target_hidden_states(self, batch: SpeechBatch) -> TargetHiddenStates:
        """Packed ``([N, H]`` hidden states, ``[N]`` labels) at the target-prediction positions."""
        if batch.labels is None:
            raise ValueError("batch has no labels: build it with targets to get target hidden states")
        return self.gather_targets(self.hidden_states(batch), batch.labels)

    def forward(self, batch: SpeechBatch) -> TargetHiddenStates:
        """Same as :meth:`target_hidden_states` (so a DeepSpeed engine can be called on a batch)."""
        return self.target_hidden_states(batch)

    def paired_target_hidden_states(
        self, positive: SpeechBatch, negative: SpeechBatch
    ) -> tuple[TargetHiddenStates, TargetHiddenStates]:
        """Positive and negative paths in ONE forward (rows concatenated along the batch).

        Both batches must be right-padded and hold the same targets; returns the packed target
        hidden states of each path (same ``N``, equal labels). Wrap in ``torch.no_grad()`` for a teacher.
        """
        if positive.batch_size != negative.batch_size:
            raise ValueError(
                f"positive has {positive.batch_size} rows but negative {negative.batch_size}: they must match"
            )
        both = concat_batches(positive, negative, self.tokenizer.pad_token_id)
        packed = self.target_hidden_states(both)
        split = positive.num_target_tokens
        pos = TargetHiddenStates(packed.hidden[:split], packed.labels[:split])
        neg = TargetHiddenStates(packed.hidden[split:], packed.labels[split:])
        if not torch.equal(pos.labels, neg.labels):
            raise ValueError("positive and negative batches hold different targets")
        return pos, neg

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits of final hidden states ``[..., H]``: ``lm_head``, then :meth:`postprocess_logits`."""
        return self.postprocess_logits(self.lm_head(hidden))

    def logits(self, batch: SpeechBatch) -> torch.Tensor:
        """``[B, T, V]`` logits as the checkpoint's own forward gives them (scale and soft-cap applied;
        materialised: for evaluation and tests, not for the training loss)."""
        return self.logits_from_hidden(self.hidden_states(batch))

    @torch.no_grad()
    def generate_ids(
        self,
        audio: AudioInput,
        instructions: Sequence[str],
        *,
        max_new_tokens: int = 32,
        sampling_rate: int = SAMPLING_RATE,
        audio_mode: str = "positive",
        **input_kwargs: Any,
    ) -> list[list[int]]:
        """Batched greedy decoding with the LM's KV cache: the new token ids of each row, stop token excluded.

        Decoding stops at a :attr:`stop_token_ids` token (per row) or after ``max_new_tokens``; only ids
        inside the tokenizer's vocabulary are considered (a padded ``lm_head`` never produces an unknown
        id). The prompt batch is left-padded; positions come from the attention mask, so rows do not
        depend on each other. ``audio_mode`` may be a negative mode (e.g. ``"remove"``: the text-only
        path); ``input_kwargs`` go to :meth:`build_inputs` (``noise_seed``, ``silence_seconds``).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        batch = self.build_inputs(
            audio,
            instructions,
            None,
            audio_mode=audio_mode,
            sampling_rate=sampling_rate,
            padding_side="left",
            **input_kwargs,
        ).to(self.device)
        stop = torch.tensor(self.stop_token_ids, device=self.device)
        usable = len(self.tokenizer)
        attention_mask = batch.attention_mask
        positions = position_ids_from_mask(attention_mask)
        hidden, cache = self.backbone(
            batch.input_ids,
            attention_mask,
            positions,
            batch.input_features,
            batch.feature_attention_mask,
            use_cache=True,
        )
        generated = []
        finished = torch.zeros(batch.batch_size, dtype=torch.bool, device=self.device)
        next_position = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            next_ids = self.logits_from_hidden(hidden[:, -1])[:, :usable].argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.end_of_turn_id), next_ids)
            generated.append(next_ids)
            finished |= torch.isin(next_ids, stop)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            hidden, cache = self.backbone(next_ids[:, None], attention_mask, next_position, cache=cache, use_cache=True)
            next_position = next_position + 1
        return self.cut_at_stop(torch.stack(generated, dim=1).tolist())

    def cut_at_stop(self, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each row up to (without) its first :attr:`stop_token_ids` token."""
        stop = set(self.stop_token_ids)
        out = []
        for row in rows:
            end = next((i for i, token in enumerate(row) if token in stop), len(row))
            out.append(list(row[:end]))
        return out

    def generate(
        self,
        audio: AudioInput,
        instructions: Sequence[str],
        *,
        max_new_tokens: int = 32,
        sampling_rate: int = SAMPLING_RATE,
        audio_mode: str = "positive",
        **input_kwargs: Any,
    ) -> list[str]:
        """:meth:`generate_ids`, decoded (special tokens skipped, stripped): one string per clip."""
        rows = self.generate_ids(
            audio,
            instructions,
            max_new_tokens=max_new_tokens,
            sampling_rate=sampling_rate,
            audio_mode=audio_mode,
            **input_kwargs,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]

    # ---- persistence ----------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write the model (``config.json`` + safetensors), the tokenizer and ``preprocessor_config.json``.

        ``kwargs`` go to the model's ``save_pretrained`` (e.g. ``state_dict`` gathered under ZeRO-3).
        LoRA adapters (:mod:`caad.models.lora`) are merged into the saved weights, so the checkpoint
        loads as a plain model.
        """
        from caad.models.lora import has_lora, merged_state_dict

        if has_lora(self.model):
            kwargs["state_dict"] = merged_state_dict(self.model, kwargs.get("state_dict"))
        self.model.save_pretrained(path, **kwargs)
        self.tokenizer.save_pretrained(path)
        self.feature_extractor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> SpeechLM:
        """Load a checkpoint directory written by :meth:`save_pretrained` (see :func:`load_speech_lm`)."""
        return load_speech_lm(path, **kwargs)

    @classmethod
    def _load(cls, path: str, **kwargs: Any) -> SpeechLM:
        raise NotImplementedError


_REGISTRY: dict[str, type[SpeechLM]] = {}


class WhisperAudioSpeechLM(SpeechLM):
    """A :class:`SpeechLM` whose audio side follows Whisper's config (``config.audio_config``,
    ``config.audio_token_id``): the feature extractor, the audio window and the audio token come
    from the wrapped model's config. Subclasses set ``model_class``."""

    #: the Hugging Face model class a subclass wraps
    model_class: type[PreTrainedModel] = PreTrainedModel

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat_template: bool | None = None
    ) -> None:
        if not isinstance(model, self.model_class):
            raise TypeError(f"model must be a {self.model_class.__name__}, got {type(model).__name__}")
        audio_config = model.config.audio_config
        feature_extractor = whisper_feature_extractor(
            audio_config.num_mel_bins, 2 * audio_config.max_source_positions
        )
        super().__init__(model, tokenizer, feature_extractor, chat_template=chat_template)

    @property
    def audio_token_id(self) -> int:
        return int(self.model.config.audio_token_id)

    @property
    def window_frames(self) -> int:
        return 2 * int(self.model.config.audio_config.max_source_positions)

    @classmethod
    def _load(
        cls, path: str, chat_template: bool | None = None, trust_remote_code: bool = False, **model_kwargs: Any
    ) -> WhisperAudioSpeechLM:
        model = cls.model_class.from_pretrained(path, local_files_only=True, **model_kwargs)
        return cls(model, load_tokenizer(path, trust_remote_code=trust_remote_code), chat_template=chat_template)


def register_speech_lm(cls: type[SpeechLM]) -> type[SpeechLM]:
    """Class decorator: :func:`load_speech_lm` loads ``config.model_type == cls.model_type`` with ``cls``."""
    _REGISTRY[cls.model_type] = cls
    return cls


def checkpoint_model_type(path: str | os.PathLike[str]) -> str:
    """``model_type`` in ``path/config.json``; ``FileNotFoundError`` naming what is missing."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"checkpoint directory {path!r} has no config.json")
    with open(config_path, encoding="utf-8") as handle:
        try:
            model_type = json.load(handle).get("model_type")
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not model_type:
        raise ValueError(f"{config_path} has no model_type")
    return str(model_type)


def _weight_files(path: str) -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(path))
    safe = [n for n in names if n.endswith(".safetensors")]
    pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth")) and n != "training_args.bin"]
    return safe, pickled


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - every supported version has it
        return False
    return bool(is_deepspeed_zero3_enabled())


def load_speech_lm(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    low_memory: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    chat_template: bool | None = None,
) -> SpeechLM:
    """Load a teacher or student from a local checkpoint directory (never downloads).

    Dispatches on ``config.json``'s ``model_type``: ``"qwen2_audio"`` ->
    :class:`~caad.models.qwen2_audio.Qwen2AudioSpeechLM`, ``"caad_composite_speech_lm"`` ->
    :class:`~caad.models.composite.CompositeSpeechLM`. The model is returned in eval mode.

    Args:
        dtype: parameter dtype; ``None`` keeps the checkpoint's (no float32 up-cast copy).
        device: where the model ends up.
        low_memory: with ``device``, weights are read from the safetensors files straight onto
            ``device`` (transformers builds the model on the meta device first and fills it from the
            memory-mapped files), so host memory never holds a second copy; ``False`` loads on the
            CPU and moves the model. Under DeepSpeed ZeRO-3 (``HfDeepSpeedConfig`` alive) the model is
            partitioned while loading instead and ``device`` is left to the engine.
        allow_pickle: also accept ``.bin``/``.pt`` weight files (read with ``weights_only=True``);
            by default only safetensors are read and a checkpoint without them is refused.
        trust_remote_code: allow a tokenizer whose checkpoint ships Python code. Off by default.
        chat_template: prompt convention (:meth:`SpeechLM.set_chat_template`; ``None``: the tokenizer's
            chat template when it has one).
    """
    # Importing the subclasses registers them.
    import caad.models.composite  # noqa: F401
    import caad.models.qwen2_audio  # noqa: F401

    model_type = checkpoint_model_type(path)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} has model_type {model_type!r}; supported: {sorted(_REGISTRY)}"
        )
    path = os.fspath(path)
    safe, pickled = _weight_files(path)
    if not safe and not (allow_pickle and pickled):
        hint = f" (it has {pickled}: pass allow_pickle=True to read them with weights_only=True)" if pickled else ""
        raise FileNotFoundError(f"checkpoint directory {path!r} has no .safetensors weights{hint}")
    model_kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True if safe else None, "weights_only": True}
    zero3 = _zero3_enabled()
    if low_memory and device is not None and not zero3:
        model_kwargs["device_map"] = {"": torch.device(device)}
    speech_lm = _REGISTRY[model_type]._load(
        path, chat_template=chat_template, trust_remote_code=trust_remote_code, **model_kwargs
    )
    if device is not None and not zero3:
        speech_lm.to(device)
    return speech_lm.eval()


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint directory (local files only; no remote code unless asked)."""
    from transformers import AutoTokenizer

    if not any(
        os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise FileNotFoundError(f"checkpoint directory {path!r} has no tokenizer (tokenizer.json)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


__all__ = [
    "AUDIO_MODES",
    "DEFAULT_NEGATIVE_MODE",
    "DEFAULT_SILENCE_SECONDS",
    "IGNORE_INDEX",
    "NEGATIVE_MODES",
    "NEGATIVE_MODE_ALIASES",
    "SAMPLING_RATE",
    "SpeechBatch",
    "SpeechLM",
    "TargetHiddenStates",
    "check_audio",
    "clip_noise_seed",
    "concat_batches",
    "load_speech_lm",
    "logit_postprocessing",
    "noise_features",
    "position_ids_from_mask",
    "resolve_audio_mode",
    "unique_clips",
    "whisper_feature_extractor",
    "WhisperAudioSpeechLM",
]
