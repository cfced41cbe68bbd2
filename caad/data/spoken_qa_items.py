"""The spoken question-answering set's questions: a finite, closed-vocabulary universe and its splits.

Plain data and pure functions, no audio (:mod:`caad.data.spoken_qa` renders the questions as speech).
Every item is one question whose one-word answer needs the question's *content* (which numbers,
which object were said), in five tasks and four categories:

==============  ============  ==================================================  ============================
task            category      questions (two phrasings each)                      answers (the ``choices``)
==============  ============  ==================================================  ============================
``addition``    arithmetic    "What is three plus four?" (operands 0-9)           ``zero`` ... ``eighteen``
``subtraction`` arithmetic    "What is seven minus three?" (0-9, no negatives)    ``zero`` ... ``nine``
``comparison``  comparison    "Which is larger, six or two?" / "... smaller ..."  the two numbers said
``counting``    counting      "What number comes after four?" / "... before ..."  ``zero`` ... ``twenty``
``facts``       knowledge     "What colour is the sky?", "What sound does a cow   the answers of its relation
                              make?", legs, opposites, days and months            (colours, sounds, ...)
==============  ============  ==================================================  ============================

Numbers are words in the text too (``"three"``, never ``"3"``), so the text query and what the
synthesiser says are the same string. Answers are one lower-case word (``"seven"``, ``"blue"``), scored
with :func:`caad.eval.scoring.is_correct` against the item's ``choices`` (an answer that names two
candidates is wrong, so echoing "six or two" scores nothing).

Held-out combinations (the generalisation the test split measures). Each task's items are grouped by
a **key**, the unit that is held out: all items with a held-out key are validation or test items and
none is a training item:

- ``addition``, ``comparison``: the *unordered* operand pair ({3, 4}: both orders, both phrasings and,
  for comparisons, both "larger" and "smaller"), so commutativity cannot turn a test question into a
  training one;
- ``subtraction``: the ordered pair (a, b);
- ``counting``: (direction, number), e.g. "after thirteen";
- ``facts``: (fact, phrasing): a fact is never held out entirely (it cannot be inferred), one of its
  phrasings is; every fact keeps at least one phrasing in training. The test measures whether the
  knowledge transfers to a new wording (and, spoken, to a new voice).

:func:`split_items` holds out ``round(holdout_fraction * keys)`` keys per task (seeded), half to
validation and half (the larger half) to test. Item ids do not depend on the seed (``qa-addition-3-4-t0``),
so the same question has the same id in every split assignment.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FACTS",
    "NUMBER_WORDS",
    "QA_CATEGORIES",
    "QA_SPLITS",
    "QA_TASKS",
    "QAItem",
    "all_items",
    "chance_accuracy",
    "split_items",
]

#: Number words 0-20 (index = value).
NUMBER_WORDS: tuple[str, ...] = tuple(
    (
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty"
    ).split()
)

QA_TASKS: tuple[str, ...] = ("addition", "subtraction", "comparison", "counting", "facts")
QA_CATEGORIES: dict[str, str] = {
    "addition": "arithmetic",
    "subtraction": "arithmetic",
    "comparison": "comparison",
    "counting": "counting",
    "facts": "knowledge",
}
QA_SPLITS: tuple[str, str, str] = ("train", "validation", "test")

_ARITHMETIC_TEMPLATES = {
    "addition": ("What is {a} plus {b}?", "How much is {a} plus {b}?"),
    "subtraction": ("What is {a} minus {b}?", "How much is {a} minus {b}?"),
}
_COMPARISON_TEMPLATES = {
    "larger": ("Which is larger, {a} or {b}?", "Which number is bigger, {a} or {b}?"),
    "smaller": ("Which is smaller, {a} or {b}?", "Which number is less, {a} or {b}?"),
}
_COUNTING_TEMPLATES = {
    "after": ("What number comes after {n}?", "Which number follows {n}?"),
    "before": ("What number comes before {n}?", "Which number is just before {n}?"),
}
_COUNTING_RANGE = {"after": range(0, 20), "before": range(1, 21)}

_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december",
)  # fmt: skip

#: Relation -> (phrasings with ``{s}`` for the subject, ((subject, answer), ...)). Subjects are
#: written as said ("the sky", "a cow"); answers are single lower-case words.
FACTS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "colour": (
        ("What colour is {s}?", "What is the colour of {s}?"),
        (
            ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
            ("coal", "black"), ("a tomato", "red"), ("milk", "white"), ("a lemon", "yellow"),
            ("a frog", "green"), ("a strawberry", "red"), ("chocolate", "brown"), ("a carrot", "orange"),
            ("a flamingo", "pink"), ("an elephant", "grey"), ("the night sky", "black"), ("the sea", "blue"),
        ),
    ),
    "sound": (
        ("What sound does {s} make?", "What does {s} say?"),
        (
            ("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
            ("an owl", "hoot"), ("a pig", "oink"), ("a lion", "roar"), ("a snake", "hiss"), ("a bee", "buzz"),
            ("a horse", "neigh"),
        ),
    ),
    "legs": (
        ("How many legs does {s} have?", "How many legs has {s} got?"),
        (
            ("a spider", "eight"), ("a dog", "four"), ("a bird", "two"), ("an ant", "six"), ("a fish", "zero"),
            ("a horse", "four"), ("a person", "two"), ("a beetle", "six"), ("a snake", "zero"), ("a cat", "four"),
            ("a chicken", "two"),
        ),
    ),
    "opposite": (
        ("What is the opposite of {s}?", "What word means the opposite of {s}?"),
        (
            ("hot", "cold"), ("cold", "hot"), ("up", "down"), ("down", "up"), ("big", "small"), ("fast", "slow"),
            ("slow", "fast"), ("day", "night"), ("left", "right"), ("wet", "dry"), ("happy", "sad"),
            ("light", "dark"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"),
        ),
    ),
    "next_day": (
        ("What day comes after {s}?", "Which day follows {s}?"),
        tuple((_DAYS[i].capitalize(), _DAYS[(i + 1) % 7]) for i in range(7)),
    ),
    "next_month": (
        ("What month comes after {s}?", "Which month follows {s}?"),
        tuple((_MONTHS[i].capitalize(), _MONTHS[(i + 1) % 12]) for i in range(12)),
    ),
}


@dataclass(frozen=True)
class QAItem:
    """One question of the set (module docstring), the same for its text and its spoken versions.

    Attributes:
        id: stable id, a function of the question only (``"qa-addition-3-4-t0"``).
        task, category: see :data:`QA_TASKS` / :data:`QA_CATEGORIES`.
        text_query: the question as text; also exactly what the synthesiser says.
        answer: the reference answer, one lower-case word (the scoring label).
        choices: the candidate answers of the question (the answer among them).
        key: the held-out unit (module docstring); items sharing it are in the same split.
        template: index of the phrasing used.
        metadata: what the question is about: operands, direction, relation, subject.
    """

    id: str
    task: str
    category: str
    text_query: str
    answer: str
    choices: tuple[str, ...]
    key: str
    template: int
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)

    @property
    def label(self) -> str:
        """The scoring label (the answer)."""
        return self.answer

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the item (a line of a ``text_<split>.jsonl`` file)."""
        return {
            "id": self.id,
            "task": self.task,
            "category": self.category,
            "text_query": self.text_query,
            "answer": self.answer,
            "choices": list(self.choices),
            "key": self.key,
            "template": self.template,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, obj: Any) -> QAItem:
        """Validate one parsed JSON object; ``ValueError`` naming the bad field."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        for name in ("id", "task", "category", "text_query", "answer", "key"):
            if not isinstance(obj.get(name), str) or not obj[name].strip():
                raise ValueError(f"field {name!r}: expected a non-empty string, got {obj.get(name)!r}")
        choices = obj.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f"field 'choices': expected a list of non-empty strings, got {choices!r}")
        if obj["answer"] not in choices:
            raise ValueError(f"field 'answer': {obj['answer']!r} is not among the choices {choices!r}")
        template = obj.get("template", 0)
        if isinstance(template, bool) or not isinstance(template, int) or template < 0:
            raise ValueError(f"field 'template': expected a non-negative int, got {template!r}")
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"field 'metadata': expected a JSON object, got {type(metadata).__name__}")
        return cls(
            id=obj["id"],
            task=obj["task"],
            category=obj["category"],
            text_query=obj["text_query"],
            answer=obj["answer"],
            choices=tuple(choices),
            key=obj["key"],
            template=template,
            metadata=dict(metadata),
        )


def _slug(text: str) -> str:
    return "-".join(text.lower().split())


def _item(
    item_id: str, task: str, key: str, template: int, text: str, answer: str, choices: Sequence[str], **meta: Any
) -> QAItem:
    return QAItem(
        id=item_id,
        task=task,
        category=QA_CATEGORIES[task],
        text_query=text,
        answer=answer,
        choices=tuple(choices),
        key=key,
        template=template,
        metadata=meta,
    )


def _addition_items() -> list[QAItem]:
    items = []
    for a in range(10):
        for b in range(10):
            key = f"addition:{min(a, b)}-{max(a, b)}"
            for t, template in enumerate(_ARITHMETIC_TEMPLATES["addition"]):
                text = template.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])
                item_id, answer = f"qa-addition-{a}-{b}-t{t}", NUMBER_WORDS[a + b]
                items.append(_item(item_id, "addition", key, t, text, answer, NUMBER_WORDS[:19], a=a, b=b))
    return items


def _subtraction_items() -> list[QAItem]:
    items = []
    for a in range(10):
        for b in range(a + 1):
            key = f"subtraction:{a}-{b}"
            for t, template in enumerate(_ARITHMETIC_TEMPLATES["subtraction"]):
                text = template.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])
                item_id, answer = f"qa-subtraction-{a}-{b}-t{t}", NUMBER_WORDS[a - b]
                items.append(_item(item_id, "subtraction", key, t, text, answer, NUMBER_WORDS[:10], a=a, b=b))
    return items


def _comparison_items() -> list[QAItem]:
    items = []
    for direction, templates in _COMPARISON_TEMPLATES.items():
        for a in range(10):
            for b in range(10):
                if a == b:
                    continue
                answer = NUMBER_WORDS[max(a, b) if direction == "larger" else min(a, b)]
                key = f"comparison:{min(a, b)}-{max(a, b)}"
                choices = (NUMBER_WORDS[a], NUMBER_WORDS[b])
                for t, template in enumerate(templates):
                    text = template.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])
                    item_id = f"qa-comparison-{direction}-{a}-{b}-t{t}"
                    meta = {"direction": direction, "a": a, "b": b}
                    items.append(_item(item_id, "comparison", key, t, text, answer, choices, **meta))
    return items


def _counting_items() -> list[QAItem]:
    items = []
    for direction, templates in _COUNTING_TEMPLATES.items():
        for n in _COUNTING_RANGE[direction]:
            answer = NUMBER_WORDS[n + 1 if direction == "after" else n - 1]
            key = f"counting:{direction}-{n}"
            for t, template in enumerate(templates):
                text = template.format(n=NUMBER_WORDS[n])
                item_id = f"qa-counting-{direction}-{n}-t{t}"
                items.append(_item(item_id, "counting", key, t, text, answer, NUMBER_WORDS, direction=direction, n=n))
    return items


def _fact_items() -> list[QAItem]:
    items = []
    for relation, (templates, facts) in FACTS.items():
        answers = tuple(dict.fromkeys(answer for _, answer in facts))
        for subject, answer in facts:
            for t, template in enumerate(templates):
                name = f"{relation}-{_slug(subject)}-t{t}"
                text = template.format(s=subject)
                items.append(
                    _item(f"qa-facts-{name}", "facts", f"facts:{name}", t, text, answer, answers, relation=relation,
                          subject=subject)
                )  # fmt: skip
    return items


def all_items(tasks: Iterable[str] = QA_TASKS) -> list[QAItem]:
    """Every question of the chosen tasks, in a fixed order (a pure function; no seed).

    Sizes: addition 200 (100 ordered pairs x 2 phrasings), subtraction 110, comparison 360 (90 ordered
    pairs x larger/smaller x 2), counting 80, facts 146 (73 facts x 2): 896 in all.
    """
    tasks = _check_tasks(tasks)
    builders = {
        "addition": _addition_items,
        "subtraction": _subtraction_items,
        "comparison": _comparison_items,
        "counting": _counting_items,
        "facts": _fact_items,
    }
    return [item for task in tasks for item in builders[task]()]


def _check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of task names, got the string {tasks!r}")
    tasks = tuple(tasks)
    unknown = [task for task in tasks if task not in QA_TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names from {QA_TASKS}, got {tasks!r}")
    return tasks


def _fact_name(item: QAItem) -> str:
    return f"{item.metadata['relation']}:{item.metadata['subject']}"


def split_items(
    items: Sequence[QAItem], seed: int = 0, holdout_fraction: float = 0.2
) -> dict[str, list[QAItem]]:
    """Assign items to ``train`` / ``validation`` / ``test`` by held-out key (module docstring).

    Per task, ``round(holdout_fraction * number of keys)`` keys are held out (seeded by ``seed`` and
    the task); the first half of them (rounded down) goes to validation, the rest to test. For
    ``facts`` a key is skipped when holding it out would leave its fact without a training phrasing.
    Items keep their order within a split. A pure function of its arguments.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)):
        raise ValueError(f"holdout_fraction must be a number in [0, 1), got {holdout_fraction!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("items must have distinct ids")
    split_of_key: dict[str, str] = {}
    for task in dict.fromkeys(item.task for item in items):
        task_items = [item for item in items if item.task == task]
        keys = list(dict.fromkeys(item.key for item in task_items))
        random.Random(f"caad-spoken-qa-holdout-{seed}-{task}").shuffle(keys)
        target = round(holdout_fraction * len(keys))
        held: list[str] = []
        if task == "facts":
            phrasings: dict[str, set[str]] = {}
            fact_of: dict[str, str] = {}
            for item in task_items:
                phrasings.setdefault(_fact_name(item), set()).add(item.key)
                fact_of[item.key] = _fact_name(item)
            for key in keys:
                if len(held) == target:
                    break
                remaining = phrasings[fact_of[key]] - set(held) - {key}
                if remaining:
                    held.append(key)
        else:
            held = keys[:target]
        validation = len(held) // 2
        for index, key in enumerate(held):
            split_of_key[key] = "validation" if index < validation else "test"
    out: dict[str, list[QAItem]] = {name: [] for name in QA_SPLITS}
    for item in items:
        out[split_of_key.get(item.key, "train")].append(item)
    return out


def chance_accuracy(items: Sequence[QAItem]) -> float:
    """Expected accuracy of guessing uniformly among each item's choices: ``mean(1 / len(choices))``."""
    if not items:
        raise ValueError("chance_accuracy needs at least one item")
    return sum(1.0 / len(item.choices) for item in items) / len(items)
