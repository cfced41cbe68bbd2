"""Forgetting and the modality gap of a speech student distilled from a text teacher (arXiv 2509.14930's measures).

Records. One scored answer is a mapping with ``group`` (the question: every rendering of one item shares
it), ``modality`` (``"text"``: the question read as text; ``"speech"``: heard), ``correct`` (bool) and,
optionally, ``task``, ``id``, ``prediction``, ``label``. On the built-in spoken-QA set
(:mod:`caad.data.spoken_qa`) :func:`student_records` asks a speech LM each spoken row of a split (one
``speech`` record per utterance) and each distinct question once as text (one ``text`` record per group,
the text-only prompt of the ``t2t`` channel); :func:`text_teacher_records` asks a text LM the same
questions. Answers are greedy and scored as the set scores them (:func:`caad.eval.scoring.is_correct`
against the row's ``choices``).

Measures (:func:`modality_measures`; accuracies are fractions in ``[0, 1]``, a difference is positive
when the student is worse):

- ``text_accuracy`` / ``speech_accuracy``: the mean over items of the fraction of the item's records of
  that modality answered right (an item spoken three times weighs as much as one spoken once, so both
  accuracies weigh the same items alike);
- ``modality_gap = text_accuracy - speech_accuracy`` on the items that have both (the paper's modality
  inequivalence: how much worse the same questions go when heard);
- ``forgetting = pre_text_accuracy - text_accuracy``: the text accuracy the student lost against itself
  before distillation (``pre``);
- ``teacher_gap = teacher_text_accuracy - text_accuracy``: how far the student's text accuracy is below
  the text teacher's;
- ``pre_text_accuracy``, ``teacher_text_accuracy``: the references, on the student's items.

Confidence intervals: the two-level percentile bootstrap of :func:`caad.eval.metrics.summarize`. Each
replicate draws the items (groups) with replacement, once for every model (the comparisons stay paired
by item), and, per model, its seeds with replacement; a model's two modalities share its seed draw (the
gap stays paired by seed). A replicate's accuracy is the mean over its drawn seeds of the item accuracies
of its drawn items; the point value is the mean over seeds on all items. References are drawn the same
way (one seed each: item resampling only).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MODALITIES",
    "MEASURES",
    "format_estimate",
    "modality_measures",
    "student_records",
    "text_teacher_records",
]

MODALITIES: tuple[str, ...] = ("text", "speech")
#: The keys of :func:`modality_measures`, in table order.
MEASURES: tuple[str, ...] = (
    "text_accuracy",
    "speech_accuracy",
    "modality_gap",
    "forgetting",
    "teacher_gap",
    "pre_text_accuracy",
    "teacher_text_accuracy",
)

PerSeed = Mapping[Hashable, Sequence[Mapping[str, Any]]]


# ---- answering ----------------------------------------------------------------------------------


def _record(row: Any, modality: str, prediction: str) -> dict[str, Any]:
    from caad.eval.scoring import is_correct

    return {
        "id": row.id,
        "group": row.group or row.id,
        "modality": modality,
        "task": row.task,
        "label": row.label,
        "prediction": prediction,
        "correct": bool(is_correct(prediction, row.label, row.choices)),
    }


def _first_of_each_group(rows: Sequence[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for row in rows:
        seen.setdefault(row.group or row.id, row)
    return list(seen.values())


def _check_rows(rows: Sequence[Any]) -> None:
    if not rows:
        raise ValueError("rows is empty: nothing to evaluate")
    for row in rows:
        if not row.label:
            raise ValueError(f"row {row.id!r} has no label: only labelled rows can be scored")
        if not row.extra.get("text_query"):
            raise ValueError(f"row {row.id!r} has no text_query: the text side needs the question as text")


def student_records(
    model: Any,
    rows: Sequence[Any],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 6,
    progress: bool = True,
    desc: str = "evaluating",
) -> list[dict[str, Any]]:
    """Greedy answers of a :class:`caad.models.SpeechLM` to every spoken row (``speech`` records, row order)
    and to each distinct question as text (``text`` records, first-seen order); module docstring.

    The spoken query is the row's audio with its ``instruction``; the text query is the row's
    ``text_query`` on the text-only path (``audio_mode="remove"``, the prompt the ``t2t`` channel trains).
    """
    from tqdm.auto import tqdm

    from caad.data.audio import load_audio
    from caad.eval.generation import batched
    from caad.models import SAMPLING_RATE

    rows = list(rows)
    _check_rows(rows)
    text_rows = _first_of_each_group(rows)
    records: list[dict[str, Any]] = []
    with tqdm(total=len(rows) + len(text_rows), desc=desc, unit="answer", disable=not progress) as bar:
        for chunk in batched(len(rows), batch_size):
            part = [rows[i] for i in chunk]
            clips = [load_audio(row.audio_path, SAMPLING_RATE) for row in part]
            answers = model.generate(clips, [row.instruction for row in part], max_new_tokens=max_new_tokens)
            records += [_record(row, "speech", answer) for row, answer in zip(part, answers)]
            bar.update(len(part))
        silent = np.zeros(SAMPLING_RATE // 10, dtype=np.float32)  # not read on the text-only path
        for chunk in batched(len(text_rows), batch_size):
            part = [text_rows[i] for i in chunk]
            answers = model.generate(
                [silent] * len(part),
                [row.extra["text_query"] for row in part],
                max_new_tokens=max_new_tokens,
                audio_mode="remove",
            )
            records += [_record(row, "text", answer) for row, answer in zip(part, answers)]
            bar.update(len(part))
    return records


def text_teacher_records(
    model: Any, tokenizer: Any, rows: Sequence[Any], *, batch_size: int = 64, max_new_tokens: int = 6
) -> list[dict[str, Any]]:
    """Greedy answers of a text LM (:func:`caad.models.text_lm.generate_text_answers`) to each distinct
    question of ``rows`` as text: ``text`` records in first-seen order."""
    from caad.models.text_lm import generate_text_answers

    rows = list(rows)
    _check_rows(rows)
    text_rows = _first_of_each_group(rows)
    answers = generate_text_answers(
        model,
        tokenizer,
        [row.extra["text_query"] for row in text_rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return [_record(row, "text", answer) for row, answer in zip(text_rows, answers)]


# ---- measures -----------------------------------------------------------------------------------


def _as_per_seed(records: PerSeed | Sequence[Mapping[str, Any]] | None, name: str) -> dict[Hashable, list] | None:
    if records is None:
        return None
    if isinstance(records, Mapping):
        per_seed = {seed: list(values) for seed, values in records.items()}
    elif isinstance(records, Sequence) and not isinstance(records, (str, bytes)):
        per_seed = {0: list(records)}
    else:
        raise TypeError(f"{name} must be a list of records or {{seed: records}}, got {type(records).__name__}")
    if not per_seed:
        raise ValueError(f"{name} has no seeds")
    for seed, values in per_seed.items():
        if not values:
            raise ValueError(f"{name}[{seed!r}] has no records")
        for index, record in enumerate(values):
            where = f"{name}[{seed!r}][{index}]"
            if not isinstance(record, Mapping) or "group" not in record or "correct" not in record:
                raise ValueError(f"{where} must be a mapping with 'group', 'modality' and 'correct'")
            if record.get("modality") not in MODALITIES:
                raise ValueError(f"{where}: modality must be one of {MODALITIES}, got {record.get('modality')!r}")
            if not isinstance(record["correct"], (bool, np.bool_)):
                raise ValueError(f"{where}: correct must be a bool, got {record['correct']!r}")
    return per_seed


def _counts(per_seed: dict[Hashable, list], index: dict[Hashable, int]) -> np.ndarray:
    """``[S, G, 2 modalities, 2]`` float64: (the item's fraction right, 1) per seed, item and modality, or
    ``(0, 0)`` where the item has no record of the modality (so sums over items give item-weighted means)."""
    out = np.zeros((len(per_seed), len(index), len(MODALITIES), 2))
    for s, values in enumerate(per_seed.values()):
        for record in values:
            cell = out[s, index[record["group"]], MODALITIES.index(record["modality"])]
            cell[0] += bool(record["correct"])
            cell[1] += 1
    seen = out[..., 1] > 0
    out[..., 0] = np.where(seen, out[..., 0] / np.where(seen, out[..., 1], 1.0), 0.0)
    out[..., 1] = seen
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def modality_measures(
    student: PerSeed | Sequence[Mapping[str, Any]],
    *,
    pre: PerSeed | Sequence[Mapping[str, Any]] | None = None,
    teacher: PerSeed | Sequence[Mapping[str, Any]] | None = None,
    num_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The measures of the module docstring with bootstrap intervals.

    Args:
        student: the student's records, ``{seed: [record, ...]}`` (a plain list: one seed).
        pre: the same student before distillation (for ``forgetting``); ``None``: not measured.
        teacher: the text teacher's records (for ``teacher_gap``); ``None``: not measured.
        num_bootstrap: replicates (0: point values, intervals ``None``).
        level: two-sided coverage of the percentile intervals.
        seed: the bootstrap generator's seed (results are reproducible).

    Items are the student's groups; a reference's records on other groups are ignored, and a reference
    missing one of the student's text items is a ``ValueError`` (the comparison would not be paired).

    Returns:
        ``{"num_items", "num_seeds", "level", "num_bootstrap"}`` plus each key of :data:`MEASURES` as
        ``{"value", "low", "high", "n"}`` (``n``: items it rests on; ``value`` ``None`` where undefined,
        e.g. no speech records, or no reference given).
    """
    if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be a non-negative int, got {num_bootstrap!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    models = {"student": _as_per_seed(student, "student")}
    for name, value in (("pre", pre), ("teacher", teacher)):
        per_seed = _as_per_seed(value, name)
        if per_seed is not None:
            models[name] = per_seed
    groups = list(dict.fromkeys(r["group"] for values in models["student"].values() for r in values))
    index = {group: i for i, group in enumerate(groups)}
    student_text = {r["group"] for values in models["student"].values() for r in values if r["modality"] == "text"}
    for name in ("pre", "teacher"):
        if name not in models:
            continue
        for s, values in models[name].items():
            covered = {r["group"] for r in values if r["modality"] == "text"}
            missing = sorted(map(str, student_text - covered))
            if missing:
                raise ValueError(
                    f"{name}[{s!r}] has no text record of {len(missing)} student item(s), e.g. {missing[0]}"
                )
            models[name][s] = [r for r in values if r["group"] in index]
    counts = {name: _counts(per_seed, index) for name, per_seed in models.items()}
    num_groups = len(groups)

    # per model: [S, G, M, 2] -> (sums over items) [S, (R,) M, 2]; replicate sums use the same item draws
    rng = np.random.default_rng(seed)
    weights = None
    seed_draws: dict[str, np.ndarray] = {}
    if num_bootstrap:
        weights = rng.multinomial(num_groups, np.full(num_groups, 1.0 / num_groups), size=num_bootstrap).astype(float)
        for name, c in counts.items():
            seed_draws[name] = rng.integers(0, c.shape[0], size=(num_bootstrap, c.shape[0]))

    def accuracy(c: np.ndarray, modality: str, both: bool, w: np.ndarray | None) -> np.ndarray:
        """Per seed (``[S]``, or ``[S, R]`` with item weights ``[R, G]``): the mean item accuracy of ``modality``."""
        m = MODALITIES.index(modality)
        mask = (c[:, :, 0, 1] > 0) & (c[:, :, 1, 1] > 0) if both else np.ones(c.shape[:2], dtype=bool)
        correct, total = c[:, :, m, 0] * mask, c[:, :, m, 1] * mask
        if w is None:
            return _ratio(correct.sum(1), total.sum(1))
        return _ratio(correct @ w.T, total @ w.T)

    def over_seeds(name: str, values: np.ndarray) -> np.ndarray:
        """Mean over seeds: a scalar for ``[S]``, ``[R]`` for ``[S, R]`` (each replicate's drawn seeds)."""
        if values.ndim == 1:
            return np.nanmean(values) if np.isfinite(values).any() else np.array(np.nan)
        draws = seed_draws[name]  # [R, S]
        picked = values[draws, np.arange(values.shape[1])[:, None]]  # [R, S]
        return np.nanmean(picked, axis=1)

    def measures(w: np.ndarray | None) -> dict[str, np.ndarray]:
        c = counts["student"]
        out = {
            "text_accuracy": over_seeds("student", accuracy(c, "text", False, w)),
            "speech_accuracy": over_seeds("student", accuracy(c, "speech", False, w)),
            "modality_gap": over_seeds("student", accuracy(c, "text", True, w) - accuracy(c, "speech", True, w)),
        }
        for name, key, diff in (
            ("pre", "pre_text_accuracy", "forgetting"),
            ("teacher", "teacher_text_accuracy", "teacher_gap"),
        ):
            if name in counts:
                reference = over_seeds(name, accuracy(counts[name], "text", False, w))
                out[key] = reference
                out[diff] = reference - out["text_accuracy"]
        return out

    sizes = _item_counts(counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point = measures(None)
        replicates = measures(weights) if weights is not None else {}
    summary: dict[str, Any] = {
        "num_items": num_groups,
        "num_seeds": counts["student"].shape[0],
        "level": level,
        "num_bootstrap": num_bootstrap,
    }
    tail = (1.0 - level) / 2 * 100
    for key in MEASURES:
        value = point.get(key)
        estimate: dict[str, Any] = {"value": None, "low": None, "high": None, "n": sizes[key]}
        if value is not None and np.isfinite(value):
            estimate["value"] = float(value)
            draws = replicates.get(key)
            if draws is not None:
                draws = draws[np.isfinite(draws)]
                if draws.size:
                    estimate["low"], estimate["high"] = (float(v) for v in np.percentile(draws, [tail, 100 - tail]))
        summary[key] = estimate
    return summary


def _item_counts(counts: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Items each measure rests on (items with records of the modalities it reads, in any seed)."""

    def having(c: np.ndarray, *modalities: str) -> np.ndarray:
        present = c[:, :, :, 1].sum(0) > 0  # [G, M]
        return np.all([present[:, MODALITIES.index(m)] for m in modalities], axis=0)

    c = counts["student"]
    text = having(c, "text")
    out = {
        "text_accuracy": int(text.sum()),
        "speech_accuracy": int(having(c, "speech").sum()),
        "modality_gap": int(having(c, "text", "speech").sum()),
    }
    for name, key, diff in (
        ("pre", "pre_text_accuracy", "forgetting"),
        ("teacher", "teacher_text_accuracy", "teacher_gap"),
    ):
        n = int(having(counts[name], "text").sum()) if name in counts else 0
        out[key] = n
        out[diff] = int((having(counts[name], "text") & text).sum()) if name in counts else 0
    return out


def format_estimate(estimate: Mapping[str, Any] | None, percent: bool = True, signed: bool = False) -> str:
    """``"61.2 [55.0, 67.1]"`` (percent points) for an estimate; ``"-"`` when undefined."""
    if estimate is None or estimate.get("value") is None:
        return "-"
    scale = 100.0 if percent else 1.0
    sign = "+" if signed else ""
    text = f"{estimate['value'] * scale:{sign}.1f}"
    if estimate.get("low") is not None and estimate.get("high") is not None:
        text += f" [{estimate['low'] * scale:{sign}.1f}, {estimate['high'] * scale:{sign}.1f}]"
    return text
