"""Answer generation for a :class:`~caad.models.SpeechLM`: batched greedy and contrastive decoding.

Greedy decoding is :meth:`SpeechLM.generate_ids` (positive path, KV cache, left padding).

Greedy decoding can also run on a negative path (``audio_mode``, e.g. ``"remove"``: the text-only
path), which is how one checks that the text-only path is at chance on audio tasks.

Contrastive decoding (:func:`contrastive_generate_ids`) runs two paths of the same model side by
side, each with its own KV cache: the positive path (the real audio) and a negative path
(``negative_mode``, default ``"remove"``: no audio block in the prompt, so neither the clip's content
nor its duration reaches it; the other modes and what they hide are in :mod:`caad.models.interface`).
At each step, with ``z_pos``, ``z_neg`` the next-token logits ``[B, V']`` of the two paths (the
model's logit scale and soft-cap applied, :meth:`SpeechLM.logits_from_hidden`; ``V'`` =
``len(tokenizer)``: rows of a padded ``lm_head`` past the tokenizer are never chosen), the token is

    argmax_v  z_hat_v,   z_hat = (1 + alpha) * z_pos - alpha * z_neg

(computed in float32), optionally restricted by the adaptive plausibility cutoff of
docs/math.md (keep ``v`` iff ``z_pos_v >= max(z_pos) + log(plausibility)``). The
chosen token is appended to BOTH paths. A row stops at a stop token (:attr:`SpeechLM.stop_token_ids`:
the chat template's end of turn, or ``eos``); finished rows keep being fed the end token (ignored)
until every row has finished or ``max_new_tokens`` tokens were produced. With ``alpha = 0`` the
result equals greedy decoding exactly. Every row's negative path depends on that row alone (noise is
seeded per clip), so results do not depend on batch composition.

Prompts with a text hint (linguistic-bias measure) are ``f"{hint} {instruction}"``
(:func:`hinted_instruction`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from caad.models.interface import (
    DEFAULT_NEGATIVE_MODE,
    DEFAULT_SILENCE_SECONDS,
    SAMPLING_RATE,
    AudioInput,
    SpeechBatch,
    SpeechLM,
    position_ids_from_mask,
    resolve_audio_mode,
)

__all__ = [
    "batched",
    "check_decoding_options",
    "contrastive_logits",
    "contrastive_generate_ids",
    "decode_ids",
    "generate_answers",
    "generate_ids",
    "hinted_instruction",
]


def hinted_instruction(instruction: str, hint: str | None) -> str:
    """The instruction with a text hint put before it (``hint`` ``None`` or blank: unchanged)."""
    if hint is None or not hint.strip():
        return instruction
    return f"{hint.strip()} {instruction}"


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_decoding_options(
    alpha: float | None, negative_mode: str = DEFAULT_NEGATIVE_MODE, plausibility: float = 0.0
) -> float | None:
    """Validate contrastive-decoding options; returns ``alpha`` as a float (``None`` stays ``None``).

    ``negative_mode`` is one of :data:`caad.models.interface.NEGATIVE_MODES` or an old alias.
    """
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"contrastive alpha must be a finite number, got {alpha!r}")
        if alpha < 0:
            raise ValueError(f"contrastive alpha must be >= 0, got {alpha!r}")
        alpha = float(alpha)
    resolve_audio_mode(negative_mode, name="negative_mode", negative=True)
    if (
        isinstance(plausibility, bool)
        or not isinstance(plausibility, (int, float))
        or not 0.0 <= plausibility < 1.0
    ):
        raise ValueError(f"plausibility must be a number in [0, 1), got {plausibility!r}")
    return alpha


class _DecodingPath:
    """One path (positive or negative) of a model, decoded step by step with its own KV cache.

    ``logits()``: ``[B, V']`` float32 next-token logits; ``advance(ids)`` feeds ``[B]`` token ids.
    """

    def __init__(self, model: SpeechLM, batch: SpeechBatch, usable: int) -> None:
        self.model = model
        self.usable = usable
        batch = batch.to(model.device)
        self.attention_mask = batch.attention_mask
        positions = position_ids_from_mask(self.attention_mask)
        hidden, self.cache = model.backbone(
            batch.input_ids,
            self.attention_mask,
            positions,
            batch.input_features,
            batch.feature_attention_mask,
            use_cache=True,
        )
        self.last_hidden = hidden[:, -1]
        self.next_position = positions[:, -1:] + 1

    def logits(self) -> torch.Tensor:
        return self.model.logits_from_hidden(self.last_hidden)[:, : self.usable].float()

    def advance(self, ids: torch.Tensor) -> None:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], 1)
        hidden, self.cache = self.model.backbone(
            ids[:, None], self.attention_mask, self.next_position, cache=self.cache, use_cache=True
        )
        self.last_hidden = hidden[:, -1]
        self.next_position = self.next_position + 1


def contrastive_logits(
    z_pos: torch.Tensor, z_neg: torch.Tensor, alpha: float, plausibility: float = 0.0
) -> torch.Tensor:
    """``(1 + alpha) * z_pos - alpha * z_neg`` in float32, ``[B, V]``; cut-off tokens get ``-inf``."""
    z_pos = z_pos.float()
    z_hat = (1.0 + alpha) * z_pos - alpha * z_neg.float()
    if plausibility > 0.0:
        keep = z_pos >= z_pos.max(dim=-1, keepdim=True).values + math.log(plausibility)
        z_hat = z_hat.masked_fill(~keep, float("-inf"))
    return z_hat


@torch.no_grad()
def contrastive_generate_ids(
    model: SpeechLM,
    audio: AudioInput,
    instructions: Sequence[str],
    *,
    alpha: float,
    negative_mode: str = DEFAULT_NEGATIVE_MODE,
    plausibility: float = 0.0,
    max_new_tokens: int = 24,
    sampling_rate: int = SAMPLING_RATE,
    noise_seed: int = 0,
    silence_seconds: float = DEFAULT_SILENCE_SECONDS,
) -> list[list[int]]:
    """Batched contrastive decoding (module docstring): the new token ids of each row, ``eos`` excluded.

    Args:
        model: the speech LM (both paths are this model).
        audio: ``B`` mono clips at 16 kHz; instructions: ``B`` instruction strings.
        alpha: contrastive weight ``>= 0`` (0: greedy).
        negative_mode: the negative path (:data:`caad.models.interface.NEGATIVE_MODES`; default ``"remove"``).
        plausibility: adaptive plausibility cutoff in ``[0, 1)``; 0 disables it.
        max_new_tokens: most tokens generated per row (the stop token included).
        noise_seed: seed of ``"noise_keep_length"`` (per clip); silence_seconds: ``"silence_fixed_length"``.
    """
    alpha = check_decoding_options(alpha, negative_mode, plausibility)
    if alpha is None:
        raise ValueError("alpha must be a number for contrastive decoding")
    _check_positive_int(max_new_tokens, "max_new_tokens")
    positive = model.build_inputs(audio, instructions, None, sampling_rate=sampling_rate, padding_side="left")
    negative = model.negative_inputs(
        positive,
        audio,
        instructions,
        None,  # no targets: generation prompts
        audio_mode=negative_mode,
        sampling_rate=sampling_rate,
        padding_side="left",
        noise_seed=noise_seed,
        silence_seconds=silence_seconds,
    )
    usable = len(model.tokenizer)
    end_id = model.end_of_turn_id
    stop = torch.tensor(model.stop_token_ids, device=model.device)
    pos_path = _DecodingPath(model, positive, usable)
    neg_path = _DecodingPath(model, negative, usable)
    finished = torch.zeros(positive.batch_size, dtype=torch.bool, device=model.device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        z_hat = contrastive_logits(pos_path.logits(), neg_path.logits(), alpha, plausibility)
        next_ids = z_hat.argmax(dim=-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, end_id), next_ids)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        pos_path.advance(next_ids)
        neg_path.advance(next_ids)
    return model.cut_at_stop(torch.stack(generated, dim=1).tolist())


def generate_ids(
    model: SpeechLM,
    audio: AudioInput,
    instructions: Sequence[str],
    *,
    contrastive_alpha: float | None = None,
    negative_mode: str = DEFAULT_NEGATIVE_MODE,
    plausibility: float = 0.0,
    max_new_tokens: int = 24,
    sampling_rate: int = SAMPLING_RATE,
    audio_mode: str = "positive",
) -> list[list[int]]:
    """Greedy (``contrastive_alpha`` ``None``: :meth:`SpeechLM.generate_ids`) or contrastive decoding.

    ``audio_mode`` is the path greedy decoding runs on (``"positive"``, or a negative mode such as
    ``"remove"`` to measure the text-only path); contrastive decoding needs ``"positive"``.
    """
    audio_mode = resolve_audio_mode(audio_mode)
    if contrastive_alpha is None:
        _check_positive_int(max_new_tokens, "max_new_tokens")
        return model.generate_ids(
            audio, instructions, max_new_tokens=max_new_tokens, sampling_rate=sampling_rate, audio_mode=audio_mode
        )
    if audio_mode != "positive":
        raise ValueError(f"contrastive decoding runs on the positive path; got audio_mode={audio_mode!r}")
    return contrastive_generate_ids(
        model,
        audio,
        instructions,
        alpha=contrastive_alpha,
        negative_mode=negative_mode,
        plausibility=plausibility,
        max_new_tokens=max_new_tokens,
        sampling_rate=sampling_rate,
    )


def decode_ids(model: SpeechLM, rows: Sequence[Sequence[int]]) -> list[str]:
    """Token ids to answer strings, as :meth:`SpeechLM.generate` does (special tokens skipped, stripped)."""
    return [model.tokenizer.decode(list(row), skip_special_tokens=True).strip() for row in rows]


def generate_answers(
    model: SpeechLM,
    audio: AudioInput,
    instructions: Sequence[str],
    *,
    audio_mode: str = "positive",
    batch_size: int = 8,
    **options: Any,
) -> list[str]:
    """Answer strings for every clip, ``batch_size`` at a time, on the chosen ``audio_mode`` path.

    The entry point for "what does the model answer without the audio": ``audio_mode="remove"`` (or
    another negative mode) runs greedy decoding on that path; ``options`` go to :func:`generate_ids`
    (``contrastive_alpha``, ``negative_mode``, ``plausibility``, ``max_new_tokens``). Score the answers
    with :func:`caad.eval.scoring.is_correct` against the labels.
    """
    if len(audio) != len(instructions):
        raise ValueError(f"audio has {len(audio)} clips but instructions {len(instructions)} entries")
    answers: list[str] = []
    for chunk in batched(len(instructions), batch_size):
        rows = generate_ids(
            model, [audio[i] for i in chunk], [instructions[i] for i in chunk], audio_mode=audio_mode, **options
        )
        answers.extend(decode_ids(model, rows))
    return answers


def batched(count: int, batch_size: int) -> list[range]:
    """``range(count)`` cut into consecutive ranges of at most ``batch_size``."""
    _check_positive_int(batch_size, "batch_size")
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]

