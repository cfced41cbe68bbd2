"""The offline, deterministic pseudo-GT generator: the answer to the question asked.

A labelled row gets its label first, once, and nothing that names another candidate answer, so the
target is right under the scorer of :mod:`caad.eval.scoring` and teaches no list of attributes:
the built-in tasks get a short fixed sentence (:func:`caad.data.tasks.answer_sentence`, e.g.
``Female. It is a woman's voice.``), any other task the label itself (``happy.``). A row without a
label gets a description of whatever it finds among the usual metadata keys (gender, rate, pitch,
transcript, emotion, environment).
"""

from __future__ import annotations

import re
import string
from typing import Any

from caad.data.manifest import ManifestRow
from caad.data.tasks import answer_sentence

__all__ = ["contains_label", "normalize_text", "template_answer"]

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}“”‘’]")


def normalize_text(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def contains_label(text: str, label: str) -> bool:
    """Whether the label's normalised word sequence occurs contiguously in the normalised text."""
    words, label_words = normalize_text(text).split(), normalize_text(label).split()
    if not label_words:
        return False
    n = len(label_words)
    return any(words[i : i + n] == label_words for i in range(len(words) - n + 1))


def _first(metadata: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = metadata.get(key)
        if value is not None and not isinstance(value, (dict, list)) and str(value).strip():
            return str(value).strip()
    return None


def _describe(metadata: dict[str, Any], skip: set[str]) -> list[str]:
    """Phrases for a voice description: ``["a female voice", "at a slow pace", "with a high pitch"]``."""
    gender = _first(metadata, "gender", "sex")
    rate = _first(metadata, "rate", "speaking_rate", "speed")
    pitch = _first(metadata, "pitch", "pitch_level")
    phrases = []
    if gender and "gender" not in skip:
        phrases.append(f"a {gender.lower()} voice")
    if rate and "rate" not in skip:
        phrases.append(f"at a {rate} pace")
    if pitch and "pitch" not in skip:
        phrases.append(f"with a {pitch} pitch")
    return phrases


def _voice_sentence(opening: str, phrases: list[str]) -> str:
    """``"It is a male voice talking at a fast pace."`` from ``["a male voice", "at a fast pace"]``."""
    if phrases[0].endswith("voice"):
        rest = f" talking {' '.join(phrases[1:])}" if phrases[1:] else ""
        return f"{opening} {phrases[0]}{rest}."
    return f"The speaker talks {' '.join(phrases)}."


def template_answer(row: ManifestRow) -> str:
    """The template pseudo-GT of one row (a pure function of its task, label and metadata).

    With a label: :func:`caad.data.tasks.answer_sentence` (the label first, once). Without one: a
    description of the recording from its metadata. Raises ``ValueError`` naming the row when there
    is neither a label nor usable metadata.
    """
    label = row.label.strip() if row.label else None
    if label:
        return answer_sentence(row.task, label)
    metadata = row.metadata or {}
    gender = _first(metadata, "gender", "sex")
    pronoun = {"female": "She", "male": "He"}.get((gender or "").lower(), "The speaker")
    transcript = _first(metadata, "transcript", "text")
    emotion = _first(metadata, "emotion")
    environment = _first(metadata, "environment", "background", "noise")
    sentences: list[str] = []
    description = _describe(metadata, set())
    if description:
        sentences.append(_voice_sentence("The recording has", description))
    if transcript:
        sentences.append(f'{pronoun} says: "{transcript}"')
    if emotion:
        sentences.append(f"The speaker sounds {emotion}.")
    if environment:
        sentences.append(f"The background is {environment}.")
    if not sentences:
        raise ValueError(
            f"row {row.id!r}: cannot build a pseudo-GT, it has no label and no usable metadata "
            "(gender, rate, pitch, transcript, emotion, environment)"
        )
    return " ".join(sentences)
