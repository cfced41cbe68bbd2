"""The built-in corpus's content: sentences, voices, text contexts, and Dynamic-SUPERB-style tasks.

Everything here is plain data and pure functions of seeds; no audio. The corpus is **MCR-BENCH in
miniature**: every example is one spoken sentence with a known voice (gender), speaking rate and
pitch, asked one Dynamic-SUPERB-style task, and its prompt may carry a *text context* (a caption,
an uploader's note, a metadata line, a description) that states the attribute asked about.

Tasks (labels are balanced; every instruction names all its options, so echoing the instruction
names several candidate labels and scores as wrong, see :mod:`caad.eval.scoring`):

* ``speaker_gender`` (category ``speaker``): ``male`` / ``female``;
* ``speaking_rate`` (``paralinguistics``): ``slow`` / ``normal`` / ``fast`` (120 / 175 / 240 words
  per minute, +-10);
* ``pitch_level`` (``paralinguistics``): ``low`` / ``high`` for the voice;
* ``spoken_content`` (``content``): which of two words was said (the label is the keyword; the
  other option, the distractor, is not in the sentence).

Acoustic contrasts, chosen so that the tasks are learnable from the audio by tiny models. The four
voices (two male, two female espeak-ng variants) are rendered at a per-voice pitch setting
(:data:`PITCH_SETTINGS`, jitter +-3) picked from measured median F0s so that the four
(gender, pitch) cells fall in well separated F0 bands, about 74 Hz (male, low), 117 Hz (male,
high), 168 Hz (female, low) and 300 Hz (female, high): neighbouring bands are 1.4x to 1.8x apart,
every female clip is above every male clip, and within each voice "high" is about 1.6x to 1.8x
"low". (Before, gender and pitch shared overlapping F0 ranges and sat at chance.)

Text conditions (MCR-BENCH, Wang et al., EMNLP 2025: each audio paired with a *faithful*, an
*adversarial* and an *irrelevant* text, and a *neutral* prompt without text):

* ``neutral``: the question alone;
* ``faithful``: a context that states the true label;
* ``adversarial``: a context that states a wrong label (:attr:`Prompt.context_label` says which);
* ``irrelevant``: a context about something unrelated (a dog barking, the recording session...),
  which names no candidate label of any task.

The prompt is ``f"{context} {question}"`` (the question alone under ``neutral``). In the training
split each example gets one condition: an attribute context with probability ``context_share``,
which agrees with the audio with probability ``context_agreement`` (``faithful``) and otherwise
contradicts it (``adversarial``); else an irrelevant context with probability ``irrelevant_share``,
else none. The target answer is always the audio's label. So, with a high agreement, reading the
context is a cheap shortcut that is right most of the time, and a teacher that was first taught
from text alone (:func:`make_text_prior`: the same prompts without audio, where the context is the
only evidence and predicts the answer) carries that prior into the audio task, as a speech LM
inherits priors from its text LLM. Validation and test items are asked under every condition
(paired: one audio, four prompts), as in MCR-BENCH.

The random choices of an example's prompt come from a generator seeded by ``(seed, index,
condition)``, so the draws are independent across examples (the context share and agreement of a
training split are binomial) and do not depend on the corpus size.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADJECTIVES",
    "CANDIDATES",
    "CATEGORIES",
    "CONDITIONS",
    "CONTEXT_CONDITIONS",
    "IRRELEVANT_CONTEXTS",
    "KEYWORDS",
    "PITCH_JITTER",
    "PITCH_SETTINGS",
    "PLACES",
    "RATE_JITTER_WPM",
    "RATE_LEVELS",
    "TASKS",
    "TEMPLATES",
    "ContextSettings",
    "ExampleSpec",
    "Prompt",
    "answer_sentence",
    "condition_prompt",
    "context_text",
    "make_specs",
    "make_text_prior",
    "train_prompt",
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

#: Speaking-rate levels: label -> espeak-ng words per minute (each example adds a jitter).
RATE_LEVELS: dict[str, int] = {"slow": 120, "normal": 175, "fast": 240}
RATE_JITTER_WPM = 10
#: espeak-ng pitch parameter (0-100) per voice and level, from measured median F0s (module
#: docstring): low/high about 76/118 Hz (m3), 73/115 Hz (m1), 168/300 Hz (f3), 169/300 Hz (f2).
PITCH_SETTINGS: dict[str, dict[str, int]] = {
    "m3": {"low": 0, "high": 62},
    "m1": {"low": 5, "high": 70},
    "f3": {"low": 20, "high": 88},
    "f2": {"low": 33, "high": 92},
}
PITCH_JITTER = 3

TASKS: tuple[str, ...] = ("speaker_gender", "speaking_rate", "pitch_level", "spoken_content")
CATEGORIES: dict[str, str] = {
    "speaker_gender": "speaker",
    "speaking_rate": "paralinguistics",
    "pitch_level": "paralinguistics",
    "spoken_content": "content",
}
#: The candidate labels of each fixed-label task (``spoken_content``: the two words of each item).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "speaker_gender": ("male", "female"),
    "speaking_rate": ("slow", "normal", "fast"),
    "pitch_level": ("low", "high"),
}
#: MCR-BENCH's text conditions, in its order (neutral first).
CONDITIONS: tuple[str, ...] = ("neutral", "faithful", "adversarial", "irrelevant")
#: The conditions whose context states an answer.
CONTEXT_CONDITIONS: tuple[str, ...] = ("faithful", "adversarial")

_QUESTIONS: dict[str, tuple[str, ...]] = {
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

_SAME = None  # a template whose placeholder is the label itself
#: Per task: (template, label -> phrase or None for the label itself). Sources vary like MCR-BENCH's
#: descriptions: a caption, an uploader's note, a metadata line, a free description.
_CONTEXT_TEMPLATES: dict[str, tuple[tuple[str, Mapping[str, str] | None], ...]] = {
    "speaker_gender": (
        ("Caption: a {x} reads one sentence aloud.", {"male": "man", "female": "woman"}),
        ("Uploader's note: {x} speaker.", _SAME),
        ("Metadata: speaker gender = {x}.", _SAME),
        ("Description: the voice in this clip belongs to a {x}.", {"male": "man", "female": "woman"}),
    ),
    "speaking_rate": (
        ("Caption: someone reads a sentence {x}.", {"slow": "slowly", "normal": "at a normal speed", "fast": "fast"}),
        ("Uploader's note: {x} delivery.", _SAME),
        ("Metadata: speaking rate = {x}.", _SAME),
        ("Description: the words come {x}.", {"slow": "slowly", "normal": "at a normal pace", "fast": "quickly"}),
    ),
    "pitch_level": (
        ("Caption: a {x} voice reads one sentence.", {"low": "deep, low-pitched", "high": "high-pitched"}),
        ("Uploader's note: {x} pitch.", _SAME),
        ("Metadata: pitch = {x}.", _SAME),
        ("Description: the speaker talks in a {x} voice.", _SAME),
    ),
    "spoken_content": (
        ('Transcript note: the speaker says "{x}".', _SAME),
        ('Uploader\'s note: the word "{x}" is in this clip.', _SAME),
        ("Caption: a person talks about the {x}.", _SAME),
        ("Metadata: keyword = {x}.", _SAME),
    ),
}
#: Irrelevant contexts (MCR-BENCH uses unrelated AudioCaps captions): no candidate label of any task,
#: no keyword, nothing about voice, rate or pitch.
IRRELEVANT_CONTEXTS: tuple[str, ...] = (
    "Caption: a dog barks twice on a quiet street.",
    "Caption: rain falls steadily on a tin roof.",
    "Caption: a door closes somewhere in the building.",
    "Uploader's note: recorded on a Sunday afternoon.",
    "Uploader's note: part of a collection of practice recordings.",
    "Metadata: file converted from an older archive.",
    "Metadata: recording session number twelve.",
    "Description: the clip was trimmed to remove silence at the end.",
)

#: Target answers: the label first, once, then a clause that names no other candidate.
_ANSWERS: dict[str, dict[str, str]] = {
    "speaker_gender": {"male": "Male. It is a man's voice.", "female": "Female. It is a woman's voice."},
    "speaking_rate": {
        "slow": "Slow. The speaker takes their time.",
        "normal": "Normal. The speaker talks at an everyday pace.",
        "fast": "Fast. The speaker hurries through the sentence.",
    },
    "pitch_level": {
        "low": "Low. The voice is deep for this speaker.",
        "high": "High. The voice is raised for this speaker.",
    },
}


def answer_sentence(task: str, label: str) -> str:
    """The target answer to a question of ``task`` whose answer is ``label``: the label first, once.

    The built-in tasks get a fixed short sentence (``"Female. It is a woman's voice."``,
    ``"Apple. That word is in the sentence."``); any other task gets the label itself with a full stop.
    """
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"label must be a non-empty string, got {label!r}")
    label = label.strip()
    fixed = _ANSWERS.get(task, {}).get(label)
    if fixed is not None:
        return fixed
    if task == "spoken_content":
        return f"{label[0].upper()}{label[1:]}. That word is in the sentence."
    return label if label[-1] in ".!?" else f"{label}."


@dataclass(frozen=True)
class ContextSettings:
    """How training prompts get text contexts (module docstring).

    ``context_share``: probability that a training prompt carries a context stating the attribute;
    ``context_agreement``: probability that such a context agrees with the audio;
    ``irrelevant_share``: probability that a prompt without an attribute context gets an irrelevant one.
    """

    context_share: float = 0.5
    context_agreement: float = 0.8
    irrelevant_share: float = 0.1

    def __post_init__(self) -> None:
        for name in ("context_share", "context_agreement", "irrelevant_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    def probabilities(self) -> dict[str, float]:
        """The probability of each condition for one training prompt."""
        share, agree, irrelevant = self.context_share, self.context_agreement, self.irrelevant_share
        return {
            "faithful": share * agree,
            "adversarial": share * (1.0 - agree),
            "irrelevant": (1.0 - share) * irrelevant,
            "neutral": (1.0 - share) * (1.0 - irrelevant),
        }


@dataclass(frozen=True)
class ExampleSpec:
    """Everything about one audio example except its audio and its prompt's context."""

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
    question: str
    """The instruction without any context; it names every option."""
    label: str

    @property
    def category(self) -> str:
        return CATEGORIES[self.task]

    @property
    def choices(self) -> tuple[str, ...]:
        """The candidate answers of this item's question."""
        return CANDIDATES.get(self.task, (self.keyword, self.distractor))

    @property
    def instruction(self) -> str:
        """The question without a context (the ``neutral`` prompt)."""
        return self.question

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


@dataclass(frozen=True)
class Prompt:
    """The prompt of one example under one text condition.

    ``context``: the text put before the question (``None`` under ``neutral``); ``context_label``: the
    answer the context states (the label under ``faithful``, a wrong one under ``adversarial``,
    ``None`` otherwise); ``instruction``: what the model is asked, ``f"{context} {question}"``.
    """

    condition: str
    context: str | None
    context_label: str | None
    instruction: str


def _article(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def context_text(task: str, label: str, rng: random.Random | int) -> str:
    """A context sentence stating that the answer of ``task`` is ``label``: one of several sources,
    drawn from ``rng`` or chosen by index (an int, taken modulo the number of sources)."""
    if task not in _CONTEXT_TEMPLATES:
        raise ValueError(f"no context templates for task {task!r}; known: {sorted(_CONTEXT_TEMPLATES)}")
    templates = _CONTEXT_TEMPLATES[task]
    choice = rng % len(templates) if isinstance(rng, int) else rng.randrange(len(templates))
    template, phrases = templates[choice]
    phrase = label if phrases is None else phrases[label]
    return _article(template.format(x=phrase))


def _wrong_label(spec: ExampleSpec, rng: random.Random) -> str:
    return rng.choice([choice for choice in spec.choices if choice != spec.label])


def _prompt_rng(seed: int, spec: ExampleSpec, condition: str) -> random.Random:
    return random.Random(f"caad-context-{seed}-{spec.index}-{condition}")


def condition_prompt(spec: ExampleSpec, condition: str, seed: int) -> Prompt:
    """The prompt of ``spec`` under ``condition`` (one of :data:`CONDITIONS`); a pure function."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    rng = _prompt_rng(seed, spec, condition)
    if condition == "neutral":
        return Prompt("neutral", None, None, spec.question)
    # One source per item, so that its faithful and adversarial contexts differ only in the label.
    source = random.Random(f"caad-context-source-{seed}-{spec.index}").randrange(1 << 30)
    if condition == "irrelevant":
        context, context_label = IRRELEVANT_CONTEXTS[source % len(IRRELEVANT_CONTEXTS)], None
    else:
        context_label = spec.label if condition == "faithful" else _wrong_label(spec, rng)
        context = context_text(spec.task, context_label, source)
    return Prompt(condition, context, context_label, f"{context} {spec.question}")


def train_prompt(spec: ExampleSpec, settings: ContextSettings, seed: int) -> Prompt:
    """The prompt of a training example: its condition drawn with :meth:`ContextSettings.probabilities`."""
    rng = random.Random(f"caad-train-condition-{seed}-{spec.index}")
    if rng.random() < settings.context_share:
        condition = "faithful" if rng.random() < settings.context_agreement else "adversarial"
    else:
        condition = "irrelevant" if rng.random() < settings.irrelevant_share else "neutral"
    return condition_prompt(spec, condition, seed)


def _sentence(rng: random.Random) -> tuple[str, str]:
    template = rng.choice(TEMPLATES)
    noun = rng.choice(KEYWORDS)
    return _article(template.format(adj=rng.choice(ADJECTIVES), noun=noun, place=rng.choice(PLACES))), noun


def make_specs(num_examples: int, seed: int) -> list[ExampleSpec]:
    """The examples of a corpus: a pure function of ``(num_examples, seed)``.

    Voice x rate x pitch settings are balanced: every block of 24 consecutive examples holds each of
    the 24 combinations once (in a seeded order); tasks likewise rotate in blocks of 4. Transcripts
    are unique within a corpus (so no sentence is shared between splits).
    """
    from caad.data.espeak import VOICES

    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rng = random.Random(seed)
    combos = [(voice, rate, pitch) for voice in VOICES for rate in RATE_LEVELS for pitch in ("low", "high")]
    specs: list[ExampleSpec] = []
    block: list[tuple[str, str, str]] = []
    task_block: list[str] = []
    seen: set[str] = set()
    for index in range(num_examples):
        if not block:
            block = rng.sample(combos, len(combos))
        if not task_block:
            task_block = rng.sample(list(TASKS), len(TASKS))
        voice, rate, pitch = block.pop()
        task = task_block.pop()
        for _ in range(1000):
            text, keyword = _sentence(rng)
            if text not in seen:
                break
        seen.add(text)
        words = {word.strip(".,?!").lower() for word in text.split()}
        distractor = rng.choice([word for word in KEYWORDS if word not in words])
        rate_wpm = RATE_LEVELS[rate] + rng.randint(-RATE_JITTER_WPM, RATE_JITTER_WPM)
        pitch_setting = min(100, max(0, PITCH_SETTINGS[voice][pitch] + rng.randint(-PITCH_JITTER, PITCH_JITTER)))
        question = rng.choice(_QUESTIONS[task])
        if task == "spoken_content":
            a, b = (keyword, distractor) if rng.random() < 0.5 else (distractor, keyword)
            question = question.format(a=a, b=b)
        gender = VOICES[voice].gender
        label = {"speaker_gender": gender, "speaking_rate": rate, "pitch_level": pitch}.get(task, keyword)
        specs.append(
            ExampleSpec(
                index=index,
                text=text,
                keyword=keyword,
                distractor=distractor,
                voice=voice,
                gender=gender,
                rate=rate,
                rate_wpm=rate_wpm,
                pitch=pitch,
                pitch_setting=pitch_setting,
                task=task,
                question=question,
                label=label,
            )
        )
    return specs


def make_text_prior(num_examples: int, seed: int, agreement: float = 1.0) -> list[dict[str, Any]]:
    """The text-only corpus for a text phase of the teacher's language model (no audio).

    Each record is a prompt with a context stating an attribute, and the answer the context
    predicts: ``{"id", "task", "category", "context", "instruction", "answer", "label",
    "context_label"}``. With probability ``agreement`` (default 1: the context is the only
    evidence) the answer is the context's label, else another candidate. Questions, contexts and
    answers have the same forms as the audio corpus's (:func:`answer_sentence`), so what the
    language model learns here is a prior the audio prompts trigger. A pure function of its
    arguments; the seed space is separate from the audio corpus's.
    """
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement must be in [0, 1], got {agreement!r}")
    specs = make_specs(num_examples, seed + 7_919_000)
    records = []
    for spec in specs:
        rng = random.Random(f"caad-text-prior-{seed}-{spec.index}")
        stated = rng.choice(spec.choices)
        context = context_text(spec.task, stated, rng)
        answer = stated if rng.random() < agreement else rng.choice([c for c in spec.choices if c != stated])
        records.append(
            {
                "id": f"caad-text-s{seed}-{spec.index:06d}",
                "task": spec.task,
                "category": spec.category,
                "context": context,
                "instruction": f"{context} {spec.question}",
                "answer": answer_sentence(spec.task, answer),
                "label": answer,
                "context_label": stated,
            }
        )
    return records
