"""The measures of a student, per round and arm: speech accuracy, text accuracy and the text-speech gap.

On the same utterances of the evaluation split, greedy answers scored with :func:`caad.eval.scoring.is_correct`
against each row's label and choices:

- ``speech_correct``: the student hears the spoken query (the row's instruction names no content);
- ``text_correct``: the student reads the text query with the audio removed (its ``t2t`` prompt): falls
  when the student forgets its text ability;
- the **gap** = text accuracy - speech accuracy (the same items), also per voice.

Over seeds, :func:`summarize_measures` gives each with a two-level percentile bootstrap interval (seeds and
items drawn with replacement, items crossed with seeds: every seed answers the same utterances), as
:func:`caad.eval.metrics.summarize` does for accuracies; the gap is paired per item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from caad.data.audio import load_audio
from caad.data.manifest import ManifestRow
from caad.eval.scoring import is_correct
from caad.methods.crossmodal.batch import text_query
from caad.models import SAMPLING_RATE, SpeechLM

__all__ = ["MEASURES", "evaluate_student", "summarize_measures"]

MEASURES = ("speech_accuracy", "text_accuracy", "gap")


@torch.no_grad()
def evaluate_student(
    student: SpeechLM, rows: Sequence[ManifestRow], *, batch_size: int = 16, max_new_tokens: int = 6
) -> list[dict[str, Any]]:
    """One record per row: ``{"id", "group", "voice", "task", "speech", "text", "speech_correct", "text_correct"}``."""
    student.eval()
    records = []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start : start + batch_size])
        audio = [load_audio(row.audio_path, SAMPLING_RATE) for row in chunk]
        spoken = student.generate(audio, [row.instruction for row in chunk], max_new_tokens=max_new_tokens)
        written = student.generate(
            audio, [text_query(row) for row in chunk], max_new_tokens=max_new_tokens, audio_mode="remove"
        )
        for row, speech, text in zip(chunk, spoken, written):
            label, choices = str(row.label), list(row.choices or [])
            records.append(
                {
                    "id": row.id,
                    "group": row.group or row.id,
                    "voice": row.metadata.get("voice"),
                    "task": row.task,
                    "speech": speech,
                    "text": text,
                    "speech_correct": bool(is_correct(speech, label, choices)),
                    "text_correct": bool(is_correct(text, label, choices)),
                }
            )
    return records


def _matrix(per_seed: Mapping[Any, Sequence[Mapping[str, Any]]], key: str, ids: list[str]) -> np.ndarray:
    out = np.full((len(per_seed), len(ids)), np.nan)
    for s, records in enumerate(per_seed.values()):
        by_id = {r["id"]: float(r[key]) for r in records}
        out[s] = [by_id.get(i, np.nan) for i in ids]
    return out


def summarize_measures(
    per_seed: Mapping[Any, Sequence[Mapping[str, Any]]],
    *,
    num_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    by: str | None = "voice",
) -> dict[str, Any]:
    """``{measure: {"value", "low", "high"}, "n_items", "n_seeds", "per_<by>": {value: {measure: ...}}}``.

    ``per_seed``: ``{seed: records of :func:`evaluate_student`}``. ``value``: the mean over seeds of each
    seed's measure; ``low``/``high``: the percentile interval of the two-level bootstrap (``None`` without
    replicates).
    """
    if not per_seed:
        raise ValueError("per_seed is empty")
    ids = sorted({r["id"] for records in per_seed.values() for r in records})
    speech = _matrix(per_seed, "speech_correct", ids)
    text = _matrix(per_seed, "text_correct", ids)

    def estimate(columns: np.ndarray) -> dict[str, dict[str, float | None]]:
        values = {"speech_accuracy": speech[:, columns], "text_accuracy": text[:, columns]}
        values["gap"] = values["text_accuracy"] - values["speech_accuracy"]
        out: dict[str, dict[str, float | None]] = {}
        rng = np.random.default_rng(seed)
        n_seeds, n_items = speech.shape[0], int(columns.size)
        seed_draws = rng.integers(0, n_seeds, size=(num_bootstrap, n_seeds))
        item_draws = rng.integers(0, n_items, size=(num_bootstrap, n_items)) if n_items else None
        for name, matrix in values.items():
            point = float(np.nanmean(np.nanmean(matrix, axis=1))) if n_items else None
            low = high = None
            if num_bootstrap and n_items and item_draws is not None:
                reps = np.nanmean(matrix[:, item_draws], axis=2)  # [S, B]
                reps = reps[seed_draws, np.arange(num_bootstrap)[:, None]].mean(axis=1)
                tail = (1 - level) / 2 * 100
                low, high = (float(v) for v in np.percentile(reps, [tail, 100 - tail]))
            out[name] = {"value": point, "low": low, "high": high}
        return out

    summary: dict[str, Any] = {"n_items": len(ids), "n_seeds": len(per_seed), **estimate(np.arange(len(ids)))}
    if by is not None:
        groups: dict[str, list[int]] = {}
        key_of = {r["id"]: str(r.get(by)) for records in per_seed.values() for r in records}
        for column, item in enumerate(ids):
            groups.setdefault(key_of[item], []).append(column)
        summary[f"per_{by}"] = {g: {"n_items": len(c), **estimate(np.array(c))} for g, c in sorted(groups.items())}
    return summary
