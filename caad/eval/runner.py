"""Evaluate a speech LM on a manifest: answers, Dynamic-SUPERB-style accuracy, the linguistic-bias shift.

:func:`run_eval` is what ``caad eval`` and ``caad run`` call. For every labelled row of the manifest it
asks the model the row's instruction (plain accuracy) and, when the row has both hint fields
(``hint_neutral``, ``hint_contradicting``), the instruction with each hint put before it (the bias
measure; see :mod:`caad.eval.scoring`). Rows without a ``label`` cannot be scored and are skipped
(counted in ``num_unlabelled``).

Files written to ``out_dir`` (``name`` is the run's name, e.g. ``teacher-greedy``):

- ``<name>.json``: the metrics dict returned by :func:`run_eval` (keys below);
- ``<name>.md``: the markdown table of :func:`markdown_table` for this run, plus per-category means;
- ``<name>.predictions.jsonl``: one record per scored row (id, task, category, label, each prompt
  variant's prediction and correctness).

Metrics keys: ``name``, ``model``, ``manifest``, ``decoding`` (``{"method": "greedy" | "contrastive",
"alpha", "negative_mode", "plausibility"}``), ``max_new_tokens``, ``num_rows``, ``num_unlabelled``,
the keys of :func:`caad.eval.scoring.accuracy_metrics` (``num_items``, ``num_correct``, ``accuracy``,
``num_items_per_task``, ``accuracy_per_task``, ``accuracy_per_category``), ``bias`` (the dict of
:func:`caad.eval.scoring.bias_metrics`, or ``None`` when no row has both hints), ``predictions`` (the
predictions file name) and ``seconds`` (wall time of the generation).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caad.data.audio import load_audio
from caad.data.manifest import ManifestRow, read_manifest
from caad.eval.generation import (
    batched,
    check_decoding_options,
    decode_ids,
    generate_ids,
    hinted_instruction,
)
from caad.eval.normalize import normalized_words
from caad.eval.scoring import (
    BiasItem,
    ScoredItem,
    accuracy_metrics,
    bias_metrics,
    follows_hint,
    is_correct,
)
from caad.models.interface import MIN_AUDIO_SAMPLES, SAMPLING_RATE, SpeechLM, load_speech_lm

__all__ = [
    "check_outputs_free",
    "decoding_label",
    "evaluate_rows",
    "markdown_table",
    "result_paths",
    "run_eval",
    "score_records",
]

#: Prompt variants: (record key suffix, manifest hint field or None).
VARIANTS: tuple[tuple[str, str | None], ...] = (
    ("", None),
    ("_neutral", "hint_neutral"),
    ("_contradicting", "hint_contradicting"),
)


def _has_hints(row: ManifestRow) -> bool:
    return bool(row.hint_neutral and row.hint_neutral.strip()) and bool(
        row.hint_contradicting and row.hint_contradicting.strip()
    )


def _load_clip(model: SpeechLM, row: ManifestRow) -> np.ndarray:
    clip = load_audio(row.audio_path, SAMPLING_RATE)
    if clip.shape[0] < MIN_AUDIO_SAMPLES:
        raise ValueError(
            f"row {row.id!r}: audio {row.audio_path} is {clip.shape[0] / SAMPLING_RATE:.3f} s long; "
            f"at least {MIN_AUDIO_SAMPLES / SAMPLING_RATE:.1f} s is needed"
        )
    if clip.shape[0] > model.max_audio_samples:
        raise ValueError(
            f"row {row.id!r}: audio {row.audio_path} is {clip.shape[0] / SAMPLING_RATE:.2f} s long; "
            f"the model's audio window is {model.max_audio_samples / SAMPLING_RATE:.2f} s"
        )
    return clip


def evaluate_rows(
    model: SpeechLM,
    rows: Sequence[ManifestRow],
    *,
    contrastive_alpha: float | None = None,
    negative_mode: str = "zero",
    plausibility: float = 0.0,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    with_hints: bool = True,
    progress: bool = True,
    desc: str = "evaluating",
) -> list[dict[str, Any]]:
    """Generate and score answers for labelled rows; one record per row, in row order.

    Rows are processed ``batch_size`` at a time; each batch's audio is loaded once and asked the plain
    instruction and, for rows with both hints (when ``with_hints``), the two hinted ones (each variant
    one generation batch). Record keys: ``id``, ``task``, ``category``, ``label``, ``prediction``,
    ``correct``; for hinted rows also ``prediction_neutral``, ``correct_neutral``,
    ``prediction_contradicting``, ``correct_contradicting``, ``hint_contradicting_label`` and
    ``follows_hint``.
    """
    from tqdm.auto import tqdm

    check_decoding_options(contrastive_alpha, negative_mode, plausibility)
    for row in rows:
        if row.label is None:
            raise ValueError(f"row {row.id!r} has no label; only labelled rows can be evaluated")
        if not normalized_words(row.label):
            raise ValueError(f"row {row.id!r}: label {row.label!r} has no words after normalisation")
    records: list[dict[str, Any]] = []
    with tqdm(total=len(rows), desc=desc, unit="item", disable=not progress) as bar:
        for chunk in batched(len(rows), batch_size):
            batch_rows = [rows[i] for i in chunk]
            clips = [_load_clip(model, row) for row in batch_rows]
            batch_records: list[dict[str, Any]] = [
                {"id": row.id, "task": row.task, "category": row.category, "label": row.label}
                for row in batch_rows
            ]
            for suffix, field in VARIANTS:
                if field is None:
                    members = list(range(len(batch_rows)))
                elif with_hints:
                    members = [i for i, row in enumerate(batch_rows) if _has_hints(row)]
                else:
                    members = []
                if not members:
                    continue
                instructions = [
                    hinted_instruction(
                        batch_rows[i].instruction, None if field is None else getattr(batch_rows[i], field)
                    )
                    for i in members
                ]
                answers = decode_ids(
                    model,
                    generate_ids(
                        model,
                        [clips[i] for i in members],
                        instructions,
                        contrastive_alpha=contrastive_alpha,
                        negative_mode=negative_mode,
                        plausibility=plausibility,
                        max_new_tokens=max_new_tokens,
                    ),
                )
                for i, answer in zip(members, answers):
                    record = batch_records[i]
                    record[f"prediction{suffix}"] = answer
                    record[f"correct{suffix}"] = is_correct(answer, batch_rows[i].label or "")
            for row, record in zip(batch_rows, batch_records):
                if "prediction_contradicting" in record:
                    record["hint_contradicting_label"] = row.hint_contradicting_label
                    record["follows_hint"] = follows_hint(
                        record["prediction_contradicting"], row.label or "", row.hint_contradicting_label
                    )
            records.extend(batch_records)
            bar.update(len(batch_rows))
    return records


def score_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy metrics and bias metrics (``"bias"``, ``None`` without hinted records) of records.

    Records are those of :func:`evaluate_rows` (only ``task``, ``category``, ``correct`` and, for the
    bias measure, ``correct_neutral``, ``correct_contradicting`` and ``follows_hint`` are read).
    """
    metrics = accuracy_metrics(
        ScoredItem(task=r["task"], correct=bool(r["correct"]), category=r.get("category")) for r in records
    )
    hinted = [r for r in records if "correct_neutral" in r and "correct_contradicting" in r]
    metrics["bias"] = (
        bias_metrics(
            BiasItem(
                task=r["task"],
                correct_neutral=bool(r["correct_neutral"]),
                correct_contradicting=bool(r["correct_contradicting"]),
                follows_hint=r.get("follows_hint"),
            )
            for r in hinted
        )
        if hinted
        else None
    )
    return metrics


def result_paths(out_dir: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """The files a run named ``name`` writes: keys ``json``, ``markdown``, ``predictions``."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\"):
        raise ValueError(f"name must be a non-empty file name without path separators, got {name!r}")
    out = Path(out_dir)
    return {
        "json": out / f"{name}.json",
        "markdown": out / f"{name}.md",
        "predictions": out / f"{name}.predictions.jsonl",
    }


def decoding_label(metrics: Mapping[str, Any]) -> str:
    """A short description of a run's decoding, e.g. ``greedy`` or ``contrastive a=2 (zero)``."""
    decoding = metrics.get("decoding") or {}
    if decoding.get("method") != "contrastive":
        return "greedy"
    label = f"contrastive a={decoding.get('alpha'):g} ({decoding.get('negative_mode', 'zero')})"
    if decoding.get("plausibility"):
        label += f" cutoff={decoding['plausibility']:g}"
    return label


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100.0 * float(value):.1f}"


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One markdown table, one row per evaluated model/decoding (key of ``results`` = row name).

    Columns: model, decoding, items, overall accuracy, one column per task (union over the results, in
    sorted order), accuracy with the neutral hint, with the contradicting hint, and the shift. All
    numbers are percentages with one decimal; ``-`` where a value is missing (e.g. no hints).
    """
    tasks = sorted({task for metrics in results.values() for task in metrics.get("accuracy_per_task", {})})
    header = ["model", "decoding", "items", "accuracy", *tasks, "neutral hint", "contradicting hint", "shift"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- ", " --- "] + [" ---: "] * (len(header) - 2)) + "|",
    ]
    for row_name, metrics in results.items():
        per_task = metrics.get("accuracy_per_task", {})
        bias = metrics.get("bias") or {}
        cells = [
            str(row_name),
            decoding_label(metrics),
            str(metrics.get("num_items", "-")),
            _percent(metrics.get("accuracy")),
            *(_percent(per_task.get(task)) for task in tasks),
            _percent(bias.get("accuracy_neutral")),
            _percent(bias.get("accuracy_contradicting")),
            _percent(bias.get("shift")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run_markdown(metrics: Mapping[str, Any]) -> str:
    parts = [
        f"# Evaluation: {metrics['name']}",
        "",
        f"- model: `{metrics['model']}`",
        f"- manifest: `{metrics['manifest']}` ({metrics['num_items']} scored items, "
        f"{metrics['num_unlabelled']} unlabelled skipped)",
        f"- decoding: {decoding_label(metrics)}, at most {metrics['max_new_tokens']} new tokens",
        "- accuracy: Dynamic-SUPERB-style (normalised label contained in the normalised answer), in %;"
        " shift: % of items correct with the neutral hint that are wrong with the contradicting one",
        "",
        markdown_table({metrics["name"]: metrics}),
    ]
    categories = metrics.get("accuracy_per_category") or {}
    if categories:
        parts += [
            "Per-category means of task accuracies (%):",
            "",
            "| category | accuracy |",
            "| --- | ---: |",
            *(f"| {name} | {_percent(value)} |" for name, value in categories.items()),
            "",
        ]
    bias = metrics.get("bias") or {}
    if bias.get("hint_following") is not None:
        parts += [f"Answers following the contradicting hint: {_percent(bias['hint_following'])}%", ""]
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def check_outputs_free(out_dir: str | os.PathLike[str], name: str) -> None:
    """``FileExistsError`` naming the first result file of ``name`` that already exists in ``out_dir``."""
    for path in result_paths(out_dir, name).values():
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                "another --name or --out"
            )


def run_eval(
    model_path: str,
    manifest: str,
    out_dir: str,
    *,
    name: str,
    contrastive_alpha: float | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    negative_mode: str = "zero",
    plausibility: float = 0.0,
    device: str | None = None,
    overwrite: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the checkpoint at ``model_path`` on ``manifest``; write and return the metrics.

    Args:
        model_path: a checkpoint directory loadable with :func:`caad.models.load_speech_lm`.
        manifest: a JSONL manifest (:mod:`caad.data.manifest`); its labelled rows are scored.
        out_dir: folder of the result files (created when missing; module docstring).
        name: the run's name: file stem of the result files and the row name in the table.
        contrastive_alpha: ``None`` for greedy decoding, else contrastive decoding with this alpha.
        batch_size: rows per generation batch.
        max_new_tokens: most tokens generated per answer.
        negative_mode: negative path of contrastive decoding (``"zero"``, ``"remove"``, ``"noise"``).
        plausibility: adaptive plausibility cutoff of contrastive decoding (0 disables it).
        device: where the model runs (default: ``"cuda"`` when available, else ``"cpu"``).
        overwrite: replace existing result files (``caad eval`` passes ``False`` unless
            ``--overwrite``; the ``caad run`` pipeline manages its own output folder).
        progress: show a progress bar (stderr).

    Returns:
        The metrics dict (module docstring), as written to ``<out_dir>/<name>.json``.
    """
    alpha = check_decoding_options(contrastive_alpha, negative_mode, plausibility)
    for value, label in ((batch_size, "batch_size"), (max_new_tokens, "max_new_tokens")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    paths = result_paths(out_dir, name)
    if not overwrite:
        check_outputs_free(out_dir, name)
    rows = read_manifest(manifest)
    labelled = [row for row in rows if row.label is not None]
    if not labelled:
        raise ValueError(f"manifest {manifest} has no row with a label: nothing to evaluate")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_speech_lm(model_path, device=device)

    start = time.perf_counter()
    records = evaluate_rows(
        model,
        labelled,
        contrastive_alpha=alpha,
        negative_mode=negative_mode,
        plausibility=plausibility,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        desc=f"eval {name}",
    )
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "name": name,
        "model": str(model_path),
        "manifest": str(manifest),
        "decoding": {
            "method": "greedy" if alpha is None else "contrastive",
            "alpha": alpha,
            "negative_mode": None if alpha is None else negative_mode,
            "plausibility": None if alpha is None else float(plausibility),
        },
        "max_new_tokens": max_new_tokens,
        "num_rows": len(rows),
        "num_unlabelled": len(rows) - len(labelled),
        **score_records(records),
        "predictions": paths["predictions"].name,
        "seconds": round(seconds, 3),
    }
    _write_atomic(
        paths["predictions"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    _write_atomic(paths["markdown"], _run_markdown(metrics))
    _write_atomic(paths["json"], json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics
