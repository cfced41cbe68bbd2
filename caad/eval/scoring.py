"""Dynamic-SUPERB-style answer scoring that cannot be gamed, and simple accuracies.

An answer is matched against its label the Dynamic-SUPERB way (the normalised label contained in the
normalised answer, :func:`caad.eval.normalize.normalized_words`: whole words, in order, so ``male``
is not found in ``female`` nor ``cat`` in ``cats``), with three rules that stop an answer from being
counted right without committing to the label:

1. **Negation.** A mention preceded, in the same clause and within :data:`NEGATION_WINDOW` words, by a
   negator (``not``, ``no``, ``never``, ``neither``, ``nor``, ``without``, ``non``, ``cannot``,
   ``hardly``; contractions are expanded first, so ``isn't`` is ``is not``) is negated: ``"It is not
   normal."`` does not name ``normal``. Clauses end at ``. , ; : ! ?`` followed by a space (so
   ``3.5`` stays one number); the look-back also stops at a contrast word (``but``, ``rather``,
   ``instead`` ...: ``"not slow but fast"`` names ``fast``) and at another candidate, whose negation
   carries over when the two are joined by ``or``/``nor``/``and`` (``"not slow or fast"`` names
   neither).
2. **One candidate only.** When the task has candidate labels (the row's ``choices``, the labels
   of its task, the options the instruction lists), an answer that names more than one of them
   (each not negated) is wrong: ``"male or female"`` is wrong for both labels. A candidate found
   only inside a longer candidate that is also found counts as the longer one (``"red apple"``
   names ``red apple``, not ``apple``). With more than :data:`MAX_CANDIDATES` distinct labels the
   task is not a classification task and the rule is not applied.
3. The label must be named, not negated.

So an answer that echoes an instruction listing the options names several candidates and is wrong;
a constant answer scores the frequency of that label (chance on balanced sets).

:func:`follows_context` asks whether an answer gave the answer a text context stated (the label
rule above applied to the context's label with the true label as a candidate): the numerator of
the Text Influence Rate (:mod:`caad.eval.metrics`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from caad.eval.normalize import normalized_words

__all__ = [
    "MAX_CANDIDATES",
    "NEGATION_WINDOW",
    "AnswerScore",
    "ScoredItem",
    "accuracy_metrics",
    "candidate_set",
    "contains_words",
    "follows_context",
    "follows_hint",
    "is_correct",
    "named_candidates",
    "score_answer",
]

NEGATORS = frozenset({"not", "no", "never", "neither", "nor", "without", "non", "cannot", "hardly"})
CONTRASTS = frozenset({"but", "rather", "instead", "however", "though", "although", "yet", "whereas"})
_JOINERS = frozenset({"or", "nor", "and"})
#: Words looked back from a mention for a negator.
NEGATION_WINDOW = 4
#: Above this many distinct candidate labels, the "one candidate only" rule is not applied.
MAX_CANDIDATES = 50
_CLAUSE_END = re.compile(r"[.,;:!?]+(?=\s|$)")


def contains_words(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether ``needle`` occurs as a contiguous run of whole words in ``haystack`` (lists of words)."""
    return bool(_starts(haystack, needle))


def _starts(haystack: Sequence[str], needle: Sequence[str]) -> list[int]:
    size = len(needle)
    if size == 0:
        return []
    first = needle[0]
    return [
        start
        for start in range(len(haystack) - size + 1)
        if haystack[start] == first and list(haystack[start : start + size]) == list(needle)
    ]


def _words_and_clauses(text: str) -> tuple[list[str], list[int]]:
    """The normalised words of ``text`` and, per word, the index of its clause (a mention may span
    clauses, as a label with a comma does; a negation does not reach across them)."""
    words: list[str] = []
    clause_of: list[int] = []
    for number, part in enumerate(_CLAUSE_END.split(text)):
        part_words = normalized_words(part)
        words += part_words
        clause_of += [number] * len(part_words)
    return words, clause_of


@dataclass(frozen=True)
class _Span:
    candidate: tuple[str, ...]
    start: int
    end: int
    negated: bool = False


def _spans(words: list[str], clause_of: list[int], candidates: Sequence[tuple[str, ...]]) -> list[_Span]:
    spans = [
        _Span(candidate, start, start + len(candidate))
        for candidate in candidates
        for start in _starts(words, candidate)
    ]
    # a mention inside a longer mention of another candidate is that longer candidate's
    spans = [
        span
        for span in spans
        if not any(
            other.candidate != span.candidate
            and other.start <= span.start
            and span.end <= other.end
            and other.end - other.start > span.end - span.start
            for other in spans
        )
    ]
    spans.sort(key=lambda span: (span.start, -span.end))
    resolved: list[_Span] = []
    for span in spans:
        negated = False
        position = span.start - 1
        while (
            position >= 0 and span.start - position <= NEGATION_WINDOW and clause_of[position] == clause_of[span.start]
        ):
            word = words[position]
            previous = next((s for s in reversed(resolved) if s.start <= position < s.end), None)
            if previous is not None:
                between = words[previous.end : span.start]
                negated = previous.negated and bool(between) and all(w in _JOINERS for w in between)
                break
            if word in NEGATORS:
                negated = True
                break
            if word in CONTRASTS:
                break
            position -= 1
        resolved.append(_Span(span.candidate, span.start, span.end, negated))
    return resolved


def candidate_set(label: str, candidates: Iterable[str] = ()) -> list[tuple[str, ...]]:
    """The distinct normalised word sequences of ``label`` and ``candidates`` (label first)."""
    out: list[tuple[str, ...]] = []
    for text in (label, *candidates):
        words = tuple(normalized_words(text))
        if words and words not in out:
            out.append(words)
    return out


def named_candidates(prediction: str, candidates: Sequence[str]) -> list[str]:
    """The candidates ``prediction`` names (module docstring: not negated, longest match), in the
    order of ``candidates`` (each as its normalised text)."""
    normalised = candidate_set(candidates[0], candidates[1:]) if candidates else []
    words, clause_of = _words_and_clauses(prediction)
    named = {span.candidate for span in _spans(words, clause_of, normalised) if not span.negated}
    return [" ".join(c) for c in normalised if c in named]


@dataclass(frozen=True)
class AnswerScore:
    """The verdict on one answer: ``correct`` and, when wrong, ``reason`` (for the predictions file)."""

    correct: bool
    reason: str = ""
    named: tuple[str, ...] = field(default=())


def score_answer(prediction: str, label: str, candidates: Iterable[str] = ()) -> AnswerScore:
    """Score ``prediction`` against ``label`` with the rules of the module docstring.

    ``candidates``: the task's candidate labels (the label need not be among them). Raises
    ``ValueError`` when the label normalises to no words (it could never be matched fairly).
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    label_words = tuple(normalized_words(label))
    if not label_words:
        raise ValueError(f"label {label!r} has no words after normalisation; it cannot be scored")
    others = [c for c in candidate_set(label, candidates) if c != label_words]
    if len(others) + 1 > MAX_CANDIDATES:
        others = []
    normalised = [label_words, *others]
    label_found = False
    named: list[tuple[str, ...]] = []
    words, clause_of = _words_and_clauses(prediction)
    for span in _spans(words, clause_of, normalised):
        label_found |= span.candidate == label_words
        if not span.negated and span.candidate not in named:
            named.append(span.candidate)
    shown = tuple(" ".join(c) for c in named)
    if label_words not in named:
        if label_found:
            return AnswerScore(False, "the label is negated", shown)
        return AnswerScore(False, "the label is not named" + (f" (names {', '.join(shown)})" if shown else ""), shown)
    if len(named) > 1:
        return AnswerScore(False, f"names {len(named)} candidates: {', '.join(shown)}", shown)
    return AnswerScore(True, "", shown)


def is_correct(prediction: str, label: str, candidates: Iterable[str] = ()) -> bool:
    """Whether ``prediction`` names ``label`` and no other candidate, not negated (module docstring).

    Raises ``ValueError`` when the label normalises to nothing (e.g. ``"?!"``).
    """
    return score_answer(prediction, label, candidates).correct


def follows_context(
    prediction: str, context_label: str | None, label: str, candidates: Iterable[str] = ()
) -> bool | None:
    """Whether ``prediction`` gives the answer a text context stated (``context_label``) instead of
    ``label``; ``None`` when unknown: no context label, or one that cannot be told apart from the
    label (equal, or one's words contain the other's)."""
    if context_label is None:
        return None
    context_words = normalized_words(context_label)
    label_words = normalized_words(label)
    if (
        not context_words
        or contains_words(label_words, context_words)
        or contains_words(context_words, label_words)
    ):
        return None
    return is_correct(prediction, context_label, [label, *candidates])


def follows_hint(prediction: str, label: str, hint_label: str | None) -> bool | None:
    """:func:`follows_context` with the legacy argument order (``hint_label`` is the context's label)."""
    return follows_context(prediction, hint_label, label)


@dataclass(frozen=True)
class ScoredItem:
    """One evaluated item: its task, optional category and whether the answer was correct."""

    task: str
    correct: bool
    category: str | None = None


def accuracy_metrics(items: Iterable[ScoredItem]) -> dict[str, Any]:
    """Overall, per-task and per-category accuracies of scored items (point values, no intervals).

    ``accuracy`` = correct / items (micro); ``accuracy_per_task`` likewise per task;
    ``accuracy_per_category`` = per category, the mean of its tasks' accuracies (macro over tasks,
    as Dynamic-SUPERB reports category means; only items with a category count). Returns
    ``{"num_items", "num_correct", "accuracy", "num_items_per_task", "accuracy_per_task",
    "accuracy_per_category"}``; ``accuracy`` is ``None`` for no items; keys sorted. For intervals
    and the text-condition metrics see :func:`caad.eval.metrics.summarize`.
    """
    items = list(items)
    per_task: dict[str, list[int]] = {}
    per_category: dict[str, dict[str, list[int]]] = {}
    for item in items:
        counts = per_task.setdefault(item.task, [0, 0])
        counts[0] += int(item.correct)
        counts[1] += 1
        if item.category is not None:
            cat = per_category.setdefault(item.category, {}).setdefault(item.task, [0, 0])
            cat[0] += int(item.correct)
            cat[1] += 1
    correct = sum(int(item.correct) for item in items)
    return {
        "num_items": len(items),
        "num_correct": correct,
        "accuracy": correct / len(items) if items else None,
        "num_items_per_task": {task: per_task[task][1] for task in sorted(per_task)},
        "accuracy_per_task": {task: per_task[task][0] / per_task[task][1] for task in sorted(per_task)},
        "accuracy_per_category": {
            category: sum(c / n for c, n in tasks.values()) / len(tasks)
            for category, tasks in sorted(per_category.items())
        },
    }
