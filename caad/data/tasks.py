"""The built-in corpus's content: sentences, paralinguistic settings, and Dynamic-SUPERB-style tasks.

Everything here is plain data and pure functions of a ``random.Random``; no audio. Each example is
one spoken sentence with a known voice (gender), speaking rate and pitch setting, asked one task:

* ``speaker_gender`` (category ``speaker``): label ``male`` / ``female``;
* ``speaking_rate`` (``paralinguistics``): ``slow`` / ``normal`` / ``fast``;
* ``pitch_level`` (``paralinguistics``): ``low`` / ``high``, relative to the voice's own range;
* ``spoken_content`` (``content``): which of two words was said (the label is the keyword).

Each example also gets a neutral text hint and a hint that contradicts the audio (MCR-BENCH style
linguistic-bias measure), with the wrong answer the contradicting hint suggests.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADJECTIVES",
    "CATEGORIES",
    "KEYWORDS",
    "PITCH_LEVELS",
    "PLACES",
    "RATE_LEVELS",
    "TASKS",
    "TEMPLATES",
    "ExampleSpec",
    "make_specs",
]

#: Content words the ``spoken_content`` task asks about (two-syllable concrete nouns).
KEYWORDS: tuple[str, ...] = (
    "apple", "anchor", "basket", "blanket", "bottle", "bridge", "butter", "candle", "carpet", "castle",
    "cherry", "compass", "copper", "cotton", "dolphin", "dragon", "feather", "forest", "garden", "guitar",
    "hammer", "island", "jacket", "kettle", "ladder", "lemon", "letter", "lizard", "marble", "meadow",
    "mirror", "monkey", "needle", "orange", "parrot", "pencil", "pepper", "pillow", "planet", "pocket",
    "rabbit", "ribbon", "river", "rocket", "saddle", "spider", "tiger", "tomato", "tunnel", "turtle",
    "violin", "wagon", "window", "zebra",
)  # fmt: skip
ADJECTIVES: tuple[str, ...] = (
    "red", "small", "heavy", "quiet", "shiny", "broken", "golden", "tiny", "wooden", "bright", "gentle",
    "ancient", "purple", "dusty", "clever", "lucky",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "kitchen", "station", "library", "harbor", "market", "school", "bakery", "hospital", "museum",
    "theater", "stadium", "airport", "village", "cottage", "office", "garage",
)  # fmt: skip
#: Sentence templates; ``{noun}`` is the keyword.
TEMPLATES: tuple[str, ...] = (
    "I saw a {adj} {noun} near the {place} this morning.",
    "Please bring the {adj} {noun} to the {place}.",
    "There is a {adj} {noun} in the {place}.",
    "My sister found a {noun} behind the {place}.",
    "We talked about the {adj} {noun} for an hour.",
    "Do you remember the {noun} we left at the {place}?",
    "He painted a {adj} {noun} on the wall of the {place}.",
    "They will sell the old {noun} at the {place} tomorrow.",
    "Nobody expected a {noun} to appear in the {place}.",
    "She keeps a {adj} {noun} on the shelf in the {place}.",
    "The children drew a {noun} next to the {place}.",
    "Yesterday a {adj} {noun} arrived at the {place}.",
)

#: Speaking-rate levels: label -> espeak-ng words per minute (each example adds a jitter in [-10, 10]).
RATE_LEVELS: dict[str, int] = {"slow": 120, "normal": 175, "fast": 240}
#: Pitch levels: label -> espeak-ng pitch parameter (0-100; each example adds a jitter in [-5, 5]).
PITCH_LEVELS: dict[str, int] = {"low": 25, "high": 75}
RATE_JITTER_WPM = 10
PITCH_JITTER = 5

TASKS: tuple[str, ...] = ("speaker_gender", "speaking_rate", "pitch_level", "spoken_content")
CATEGORIES: dict[str, str] = {
    "speaker_gender": "speaker",
    "speaking_rate": "paralinguistics",
    "pitch_level": "paralinguistics",
    "spoken_content": "content",
}

_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "speaker_gender": (
        "Is the speaker male or female? Answer with one word.",
        "Listen to the recording and tell whether the speaker is male or female.",
        "What is the gender of the speaker: male or female?",
    ),
    "speaking_rate": (
        "Is the speaking rate slow, normal or fast? Answer with one word.",
        "How fast does the speaker talk: slow, normal or fast?",
        "Classify the speaking rate of this recording as slow, normal or fast.",
    ),
    "pitch_level": (
        "Is the speaker's pitch low or high for their voice? Answer with one word.",
        "Listen to the voice and say whether its pitch is low or high.",
        "Classify the pitch of the speaker's voice as low or high.",
    ),
    "spoken_content": (
        "Which of these two words did the speaker say: {a} or {b}?",
        'Did the speaker say "{a}" or "{b}"? Answer with the word.',
        "One of the words {a} and {b} is in the recording. Which one?",
    ),
}

_NEUTRAL_HINTS: tuple[str, ...] = (
    "Here is a short recording of one person speaking.",
    "Please listen to the recording before you answer.",
    "The recording is a single English sentence.",
)


@dataclass(frozen=True)
class ExampleSpec:
    """Everything about one example except its audio."""

    index: int
    text: str
    keyword: str
    distractor: str
    voice: str
    gender: str
    rate: str
    rate_wpm: int
    pitch: str
    pitch_setting: int
    task: str
    instruction: str
    label: str
    hint_neutral: str
    hint_contradicting: str
    hint_contradicting_label: str

    @property
    def category(self) -> str:
        return CATEGORIES[self.task]

    def metadata(self) -> dict[str, Any]:
        """The example's metadata, minus the attributes measured on the audio."""
        return {
            "transcript": self.text,
            "keyword": self.keyword,
            "distractor": self.distractor,
            "speaker": self.voice,
            "gender": self.gender,
            "rate": self.rate,
            "rate_wpm": self.rate_wpm,
            "pitch": self.pitch,
            "pitch_setting": self.pitch_setting,
        }


def _sentence(rng: random.Random) -> tuple[str, str]:
    template = rng.choice(TEMPLATES)
    noun = rng.choice(KEYWORDS)
    text = template.format(adj=rng.choice(ADJECTIVES), noun=noun, place=rng.choice(PLACES))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text), noun


def _contradicting(task: str, spec: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    if task == "speaker_gender":
        if spec["gender"] == "female":
            return rng.choice(("The speaker is a man.", "This sentence was recorded by a male speaker.")), "male"
        return rng.choice(("The speaker is a woman.", "This sentence was recorded by a female speaker.")), "female"
    if task == "speaking_rate":
        wrong = {"slow": "fast", "fast": "slow"}.get(spec["rate"]) or rng.choice(("slow", "fast"))
        text = "The speaker talks very slowly." if wrong == "slow" else "The speaker talks very fast."
        return text, wrong
    if task == "pitch_level":
        if spec["pitch"] == "low":
            return "The speaker has a very high-pitched voice.", "high"
        return "The speaker has a very deep, low-pitched voice.", "low"
    return f'The speaker clearly says the word "{spec["distractor"]}".', spec["distractor"]


def make_specs(num_examples: int, seed: int) -> list[ExampleSpec]:
    """The examples of a corpus: a pure function of ``(num_examples, seed)``.

    Voice x rate x pitch settings are balanced: every block of 24 consecutive examples holds each of
    the 24 combinations once (in a seeded order); tasks likewise rotate in blocks of 4.
    """
    from caad.data.espeak import VOICES

    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    rng = random.Random(seed)
    combos = [(voice, rate, pitch) for voice in VOICES for rate in RATE_LEVELS for pitch in PITCH_LEVELS]
    specs: list[ExampleSpec] = []
    block: list[tuple[str, str, str]] = []
    task_block: list[str] = []
    for index in range(num_examples):
        if not block:
            block = rng.sample(combos, len(combos))
        if not task_block:
            task_block = rng.sample(list(TASKS), len(TASKS))
        voice, rate, pitch = block.pop()
        task = task_block.pop()
        text, keyword = _sentence(rng)
        words = {word.strip(".,?!").lower() for word in text.split()}
        distractor = rng.choice([word for word in KEYWORDS if word not in words])
        fields: dict[str, Any] = {
            "gender": VOICES[voice].gender,
            "rate": rate,
            "rate_wpm": RATE_LEVELS[rate] + rng.randint(-RATE_JITTER_WPM, RATE_JITTER_WPM),
            "pitch": pitch,
            "pitch_setting": PITCH_LEVELS[pitch] + rng.randint(-PITCH_JITTER, PITCH_JITTER),
            "distractor": distractor,
        }
        instruction = rng.choice(_INSTRUCTIONS[task])
        if task == "spoken_content":
            a, b = (keyword, distractor) if rng.random() < 0.5 else (distractor, keyword)
            instruction = instruction.format(a=a, b=b)
        label = {"speaker_gender": fields["gender"], "speaking_rate": rate, "pitch_level": pitch}.get(task, keyword)
        hint, hint_label = _contradicting(task, fields, rng)
        specs.append(
            ExampleSpec(
                index=index,
                text=text,
                keyword=keyword,
                distractor=distractor,
                voice=voice,
                gender=fields["gender"],
                rate=rate,
                rate_wpm=fields["rate_wpm"],
                pitch=pitch,
                pitch_setting=fields["pitch_setting"],
                task=task,
                instruction=instruction,
                label=label,
                hint_neutral=rng.choice(_NEUTRAL_HINTS),
                hint_contradicting=hint,
                hint_contradicting_label=hint_label,
            )
        )
    return specs
