"""Dynamic-SUPERB-style answer scoring, accuracies, and the MCR-BENCH-style linguistic-bias shift.

Correctness: prediction and label are normalised with :func:`caad.eval.normalize.normalized_words`;
the answer is correct when the label's word sequence occurs contiguously, on word boundaries, in the
prediction's (``"cat"`` is in ``"the cat sat"`` but not in ``"concatenate"`` nor ``"cats"``). A
label that normalises to no words is an error (it could never be matched fairly).

Aggregates (all fractions in ``[0, 1]``):

- ``accuracy``: correct items / items, over the whole set (micro average);
- ``accuracy_per_task``: the same per task;
- ``accuracy_per_category``: per category, the mean of the accuracies of its tasks (macro over
  tasks, as Dynamic-SUPERB reports category means); only items that carry a category count.

Linguistic-bias shift (MCR-BENCH manner), over the items that have both a neutral and a
contradicting hint: ``accuracy_neutral`` and ``accuracy_contradicting`` are the accuracies with each
hint in the prompt, and ``shift = flipped / correct_neutral`` where ``correct_neutral`` counts the
items answered correctly with the neutral hint and ``flipped`` those of them answered wrongly with the
contradicting hint (``None`` when no item is correct under the neutral hint). Where the manifest gives
the answer that the contradicting hint suggests, ``hint_following`` is the fraction of those items
whose contradicting-hint answer contains it (and not the label).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from caad.eval.normalize import normalized_words

__all__ = [
    "BiasItem",
    "ScoredItem",
    "accuracy_metrics",
    "bias_metrics",
    "contains_words",
    "follows_hint",
    "is_correct",
]


def contains_words(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether ``needle`` occurs as a contiguous run of whole words in ``haystack`` (lists of words)."""
    size = len(needle)
    if size == 0:
        return False
    first = needle[0]
    for start in range(len(haystack) - size + 1):
        if haystack[start] == first and list(haystack[start : start + size]) == list(needle):
            return True
    return False


def is_correct(prediction: str, label: str) -> bool:
    """Dynamic-SUPERB-style match: the normalised label's words appear contiguously in the prediction.

    Raises ``ValueError`` when the label normalises to nothing (e.g. ``"?!"``).
    """
    label_words = normalized_words(label)
    if not label_words:
        raise ValueError(f"label {label!r} has no words after normalisation; it cannot be scored")
    return contains_words(normalized_words(prediction), label_words)


@dataclass(frozen=True)
class ScoredItem:
    """One evaluated item: its task, optional category and whether the answer was correct."""

    task: str
    correct: bool
    category: str | None = None


@dataclass(frozen=True)
class BiasItem:
    """One item asked with a neutral and with a contradicting hint.

    ``follows_hint``: whether the contradicting-hint answer gave the answer the hint suggests (and
    not the label); ``None`` when the manifest does not say which answer the hint suggests.
    """

    task: str
    correct_neutral: bool
    correct_contradicting: bool
    follows_hint: bool | None = None


def _fraction(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def accuracy_metrics(items: Iterable[ScoredItem]) -> dict[str, Any]:
    """Overall, per-task and per-category accuracies of scored items (module docstring).

    Returns ``{"num_items", "num_correct", "accuracy", "num_items_per_task", "accuracy_per_task",
    "accuracy_per_category"}``; ``accuracy`` is ``None`` for no items. Tasks and categories are in
    sorted order.
    """
    items = list(items)
    per_task: dict[str, list[int]] = {}
    # category -> task -> [correct, total]
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
        "accuracy": _fraction(correct, len(items)),
        "num_items_per_task": {task: per_task[task][1] for task in sorted(per_task)},
        "accuracy_per_task": {task: per_task[task][0] / per_task[task][1] for task in sorted(per_task)},
        "accuracy_per_category": {
            category: sum(c / n for c, n in tasks.values()) / len(tasks)
            for category, tasks in sorted(per_category.items())
        },
    }


def _bias_counts(items: Sequence[BiasItem]) -> dict[str, Any]:
    correct_neutral = sum(int(item.correct_neutral) for item in items)
    correct_contradicting = sum(int(item.correct_contradicting) for item in items)
    flipped = sum(int(item.correct_neutral and not item.correct_contradicting) for item in items)
    judged = [item.follows_hint for item in items if item.follows_hint is not None]
    return {
        "num_items": len(items),
        "accuracy_neutral": _fraction(correct_neutral, len(items)),
        "accuracy_contradicting": _fraction(correct_contradicting, len(items)),
        "num_correct_neutral": correct_neutral,
        "num_flipped": flipped,
        "shift": _fraction(flipped, correct_neutral),
        "hint_following": _fraction(sum(int(v) for v in judged), len(judged)),
    }


def bias_metrics(items: Iterable[BiasItem]) -> dict[str, Any]:
    """Linguistic-bias metrics (module docstring), overall and under ``"per_task"``.

    Returns ``{"num_items", "accuracy_neutral", "accuracy_contradicting", "num_correct_neutral",
    "num_flipped", "shift", "hint_following", "per_task": {task: {same keys}}}``; fractions are
    ``None`` when their denominator is 0.
    """
    items = list(items)
    by_task: dict[str, list[BiasItem]] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    out = _bias_counts(items)
    out["per_task"] = {task: _bias_counts(by_task[task]) for task in sorted(by_task)}
    return out


def follows_hint(prediction: str, label: str, hint_label: str | None) -> bool | None:
    """Whether ``prediction`` gives the hint's suggested answer and not the label (``None``: unknown).

    Also ``None`` when the suggested answer normalises to nothing or the label's words contain it (or
    the other way round), since the prediction then cannot tell the two apart.
    """
    if hint_label is None:
        return None
    hint_words = normalized_words(hint_label)
    label_words = normalized_words(label)
    if not hint_words or contains_words(label_words, hint_words) or contains_words(hint_words, label_words):
        return None
    words = normalized_words(prediction)
    return contains_words(words, hint_words) and not contains_words(words, label_words)

