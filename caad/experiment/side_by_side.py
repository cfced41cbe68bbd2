"""The small side-by-side that closes the demo: teacher greedy vs contrastive, student KD vs CAAD,
neutral vs adversarial text context, on one seed.

:func:`side_by_side` evaluates each model once on the rows of a manifest (the built-in corpus's test
split: every item under the four text conditions) and :func:`side_by_side_table` renders the
accuracy without a context (neutral), with a contradicting one (adversarial), the text influence
rate and the shift, each with its 95% bootstrap interval. One seed and a few dozen items: the
intervals are wide, and the table says so; ``caad experiment`` is the measurement.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SideBySideEntry", "side_by_side", "side_by_side_table"]


@dataclass(frozen=True)
class SideBySideEntry:
    """One row of the table: a model folder and how it decodes (``contrastive_alpha`` ``None``: greedy)."""

    name: str
    model: str | os.PathLike[str]
    contrastive_alpha: float | None = None
    plausibility: float = 0.0


def side_by_side(
    entries: Sequence[SideBySideEntry],
    manifest: str | os.PathLike[str],
    *,
    negative_mode: str = "remove",
    batch_size: int = 16,
    max_new_tokens: int = 8,
    num_bootstrap: int = 500,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate every entry on the labelled rows of ``manifest``; ``{name: summary}``
    (:func:`caad.eval.summarize`). A model folder used by several entries is loaded once."""
    from caad.data import read_manifest
    from caad.eval import evaluate_rows, summarize
    from caad.models import load_speech_lm

    rows = [row for row in read_manifest(manifest) if row.label is not None]
    if not rows:
        raise ValueError(f"manifest {manifest} has no labelled row")
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"entries must have distinct names, got {names}")
    loaded: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        key = os.fspath(entry.model)
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[key] = load_speech_lm(key, device="cpu")
        records = evaluate_rows(
            loaded[key],
            rows,
            contrastive_alpha=entry.contrastive_alpha,
            negative_mode=negative_mode,
            plausibility=entry.plausibility if entry.contrastive_alpha is not None else 0.0,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
            desc=f"side by side: {entry.name}",
        )
        out[entry.name] = summarize(records, num_bootstrap=num_bootstrap)
    return out


def _cell(estimate: Mapping[str, Any] | None) -> str:
    if not estimate or estimate.get("value") is None:
        return "-"
    text = f"{100 * estimate['value']:.0f}%"
    if estimate.get("low") is not None:
        text += f" [{100 * estimate['low']:.0f}, {100 * estimate['high']:.0f}]"
    return text


def side_by_side_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per model; neutral and adversarial accuracy, text influence rate, shift."""
    lines = [
        "| model | no context (neutral) | contradicting context (adversarial) | text influence | shift |",
        "|---|---|---|---|---|",
    ]
    items = 0
    for name, summary in summaries.items():
        conditions = summary.get("accuracy_per_condition", {})
        items = max(items, int(summary.get("num_items") or 0))
        lines.append(
            f"| {name} | {_cell(conditions.get('neutral'))} | {_cell(conditions.get('adversarial'))} | "
            f"{_cell(summary.get('text_influence_rate'))} | {_cell(summary.get('shift'))} |"
        )
    lines += [
        "",
        f"One seed, {items} items per condition, 95% bootstrap intervals: too few to rank the models "
        "(`make experiment` runs 3 seeds on 400 items per condition).",
    ]
    return "\n".join(lines)
