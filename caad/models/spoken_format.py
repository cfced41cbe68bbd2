"""The spoken prompt format rendered from text: a question's tokens inside a speech LM's audio slot.

A speech LM reads a spoken question as ``prompt-before-audio + audio tokens + prompt-after-audio`` (for the
built-in tokenizer ``<bos><|audio_bos|> [audio] <|audio_eos|>instruction\\n``), where the audio tokens are the
projector's outputs. A large text LM answers such a prompt once the projector writes something close to the
question's embeddings; a tiny LM trained only on text prompts does not (it answers the same question at chance
when its tokens sit in the audio slot). :class:`SpokenPromptFormat` renders a text question in that format,
its tokens in the audio slot with audio-token fillers between them, so that a language model can also be
pre-trained on the format it will read speech in. The fillers stand in for the frames a recogniser leaves
blank (the CTC alignment of :mod:`caad.models.speech_align` with ``blank="audio_token"`` writes the audio
token's embedding there).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SpokenPromptFormat"]


@dataclass(frozen=True)
class SpokenPromptFormat:
    """``prefix + [filler]*k0 + q1 + [filler]*k1 + ... + qn + [filler]*kn + suffix`` for question ids ``q``.

    ``prefix``/``suffix``: the spoken prompt's ids before and after its one audio token; ``filler_id``: the
    audio token; each ``k`` is drawn uniformly from ``0..max_filler`` by the caller's ``random.Random``.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    filler_id: int
    max_filler: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.max_filler, bool) or not isinstance(self.max_filler, int) or self.max_filler < 0:
            raise ValueError(f"max_filler must be an int >= 0, got {self.max_filler!r}")
        if self.filler_id in self.prefix or self.filler_id in self.suffix:
            raise ValueError("prefix and suffix must not contain the filler (audio) token: pass the prompt's ids "
                             "before and after its one audio token")

    @classmethod
    def of(cls, speech_lm: Any, instruction: str, max_filler: int = 3) -> SpokenPromptFormat:
        """The format of ``speech_lm`` (a :class:`caad.models.SpeechLM`) for spoken rows asking ``instruction``."""
        ids = speech_lm.tokenizer(speech_lm.format_prompt(instruction, with_audio=True),
                                  add_special_tokens=False)["input_ids"]
        audio = speech_lm.audio_token_id
        if ids.count(audio) != 1:
            raise ValueError(f"the speech LM's spoken prompt has {ids.count(audio)} audio tokens; expected exactly 1")
        at = ids.index(audio)
        return cls(tuple(ids[:at]), tuple(ids[at + 1:]), int(audio), max_filler)

    def render(self, question_ids: Sequence[int], rng: random.Random) -> list[int]:
        """The prompt ids of one question (``question_ids``: its text tokens, no special tokens)."""
        body = [self.filler_id] * rng.randint(0, self.max_filler)
        for token in question_ids:
            body += [int(token)] + [self.filler_id] * rng.randint(0, self.max_filler)
        return [*self.prefix, *body, *self.suffix]
