"""Evaluate a speech LM on a manifest: answers, Dynamic-SUPERB-style accuracy, MCR-BENCH bias metrics.

:func:`run_eval` is what ``caad eval`` and ``caad run`` call. Every labelled row of the manifest is
asked its ``instruction`` once (the built-in corpus's validation and test rows already hold their
text context in the instruction, one row per item and condition: see :mod:`caad.data.synth`). Rows
in the legacy form with hint fields are expanded first (:func:`expand_conditions`): the plain
instruction (``neutral``), ``hint_neutral`` before it (``irrelevant``) and ``hint_contradicting``
before it (``adversarial``). Rows without a ``label`` cannot be scored and are skipped (counted in
``num_unlabelled``). Answers are scored with :func:`caad.eval.scoring.score_answer` against the
row's candidates (:func:`row_candidates`), and the metrics with their bootstrap intervals come from
:func:`caad.eval.metrics.summarize`.

Clips longer than the model's audio window are cut to it, as the Qwen2-Audio processor does
(counted in ``num_truncated_audio``).

Files written to ``out_dir`` (``name`` is the run's name):

- ``<name>.predictions.jsonl``: one record per scored row, appended batch by batch while the run
  goes (a stopped run leaves the answers it had);
- ``<name>.json``: the metrics dict returned by :func:`run_eval` (keys below), at the end;
- ``<name>.md``: the markdown table of :func:`markdown_table` for this run, with per-category means
  and the warnings, at the end.

Metrics keys: ``name``, ``model``, ``manifest``, ``decoding`` (``{"method": "greedy" | "contrastive",
"alpha", "negative_mode", "plausibility", "audio_mode"}``), ``max_new_tokens``, ``num_rows``, ``num_unlabelled``,
``num_truncated_audio``, the keys of :func:`caad.eval.metrics.summarize` (``accuracy``,
``accuracy_per_condition``, ``text_influence_rate``, ``shift``, ``modal_robustness``, ...,
``warnings``), ``predictions`` (the predictions file name) and ``seconds`` (wall time of the
generation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caad.data.checks import load_clip
from caad.data.files import write_text_atomic
from caad.data.manifest import ManifestRow, read_manifest
from caad.eval.generation import (
    batched,
    check_decoding_options,
    decode_ids,
    generate_ids,
    hinted_instruction,
)
from caad.eval.metrics import TEXT_CONDITIONS, summarize
from caad.eval.normalize import normalized_words
from caad.eval.scoring import MAX_CANDIDATES, candidate_set, contains_words, follows_context, score_answer
from caad.models.feature_cache import feature_cache
from caad.models.interface import (
    DEFAULT_NEGATIVE_MODE,
    MIN_AUDIO_SAMPLES,
    SAMPLING_RATE,
    SpeechLM,
    load_speech_lm,
    resolve_audio_mode,
)

__all__ = [
    "check_outputs_free",
    "decoding_label",
    "default_run_name",
    "evaluate_rows",
    "expand_conditions",
    "markdown_table",
    "result_paths",
    "row_candidates",
    "run_eval",
    "score_records",
    "task_labels",
]


def _has_hints(row: ManifestRow) -> bool:
    return bool(row.hint_neutral and row.hint_neutral.strip()) and bool(
        row.hint_contradicting and row.hint_contradicting.strip()
    )


def expand_conditions(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """Rows in the legacy hint form (``hint_neutral`` and ``hint_contradicting``, no ``condition``)
    become three rows: ``<id>`` (neutral, the plain instruction), ``<id>-irrelevant`` (``hint_neutral``
    first) and ``<id>-adversarial`` (``hint_contradicting`` first, ``context_label`` from
    ``hint_contradicting_label``), sharing the group ``<id>``. Other rows are returned as they are."""
    out: list[ManifestRow] = []
    for row in rows:
        if row.condition is not None or not _has_hints(row):
            out.append(row)
            continue
        group = row.group or row.id
        out.append(dataclasses.replace(row, condition="neutral", group=group))
        for condition, hint, label in (
            ("irrelevant", row.hint_neutral, None),
            ("adversarial", row.hint_contradicting, row.hint_contradicting_label),
        ):
            out.append(
                dataclasses.replace(
                    row,
                    id=f"{row.id}-{condition}",
                    group=group,
                    condition=condition,
                    context=hint,
                    context_label=label,
                    instruction=hinted_instruction(row.instruction, hint),
                )
            )
    return out


def task_labels(rows: Sequence[ManifestRow]) -> dict[str, list[str]]:
    """Per task, its distinct labels and choices (in order of appearance); a task with more than
    :data:`caad.eval.scoring.MAX_CANDIDATES` of them is not a classification task and gets ``[]``."""
    out: dict[str, list[str]] = {}
    for row in rows:
        labels = out.setdefault(row.task, [])
        for value in [row.label, *(row.choices or [])]:
            if value is not None and value not in labels:
                labels.append(value)
    for task, labels in out.items():
        if labels and len(candidate_set(labels[0], labels[1:])) > MAX_CANDIDATES:
            out[task] = []
    return out


def row_candidates(row: ManifestRow, labels_of_task: Sequence[str]) -> list[str]:
    """The candidate answers of a row: its ``choices`` when it has them, else its task's labels; plus
    every label of its task that its instruction names (the options it lists)."""
    candidates = list(row.choices) if row.choices else list(labels_of_task)
    instruction = normalized_words(row.instruction)
    for label in labels_of_task:
        words = normalized_words(label)
        if label not in candidates and contains_words(instruction, words):
            candidates.append(label)
    return candidates


def _load_clip(model: SpeechLM, row: ManifestRow) -> tuple[np.ndarray, bool]:
    try:
        return load_clip(row.audio_path, SAMPLING_RATE, model.max_audio_samples, MIN_AUDIO_SAMPLES)
    except ValueError as error:
        raise ValueError(f"row {row.id!r}: {error}") from error


def evaluate_rows(
    model: SpeechLM,
    rows: Sequence[ManifestRow],
    *,
    contrastive_alpha: float | None = None,
    negative_mode: str = DEFAULT_NEGATIVE_MODE,
    plausibility: float = 0.0,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    audio_mode: str = "positive",
    with_hints: bool = True,
    progress: bool = True,
    desc: str = "evaluating",
    labels_per_task: Mapping[str, Sequence[str]] | None = None,
    on_records: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate and score answers for labelled rows; one record per row, in row order.

    Rows are processed ``batch_size`` at a time (a clip shared by several rows is read once per
    batch, featurised once per run and, in a batch, encoded once:
    :attr:`caad.models.SpeechLM.share_clip_encoding`). ``audio_mode``: the path greedy decoding runs
    on (``"positive"``, or a negative mode such as ``"remove"`` to score the text-only path).
    ``with_hints``: expand legacy hint rows (:func:`expand_conditions`) first.
    ``labels_per_task``: the candidate labels of each task (default: :func:`task_labels` of
    ``rows``). ``on_records`` is called with each batch's records as soon as they are scored.

    Record keys: ``id``, ``group``, ``condition``, ``task``, ``category``, ``label``,
    ``context_label``, ``prediction``, ``correct``, ``reason`` (why it is wrong, ``""`` when right),
    ``follows_context`` (see :func:`caad.eval.scoring.follows_context`) and ``audio_truncated``.
    """
    from tqdm.auto import tqdm

    check_decoding_options(contrastive_alpha, negative_mode, plausibility)
    for row in rows:
        if row.label is None:
            raise ValueError(f"row {row.id!r} has no label; only labelled rows can be evaluated")
        if not normalized_words(row.label):
            raise ValueError(f"row {row.id!r}: label {row.label!r} has no words after normalisation")
    rows = expand_conditions(rows) if with_hints else list(rows)
    labels = dict(labels_per_task) if labels_per_task is not None else task_labels(rows)
    records: list[dict[str, Any]] = []
    # a clip asked under several conditions is featurised once in the run (also across batches)
    with feature_cache(), tqdm(total=len(rows), desc=desc, unit="item", disable=not progress) as bar:
        for chunk in batched(len(rows), batch_size):
            batch_rows = [rows[i] for i in chunk]
            cache: dict[Path, tuple[np.ndarray, bool]] = {}
            clips = []
            for row in batch_rows:
                if row.audio_path not in cache:
                    cache[row.audio_path] = _load_clip(model, row)
                clips.append(cache[row.audio_path])
            answers = decode_ids(
                model,
                generate_ids(
                    model,
                    [clip for clip, _ in clips],
                    [row.instruction for row in batch_rows],
                    contrastive_alpha=contrastive_alpha,
                    negative_mode=negative_mode,
                    plausibility=plausibility,
                    max_new_tokens=max_new_tokens,
                    audio_mode=audio_mode,
                ),
            )
            batch_records = []
            for row, answer, (_, truncated) in zip(batch_rows, answers, clips):
                label = row.label or ""
                candidates = row_candidates(row, labels.get(row.task, ()))
                verdict = score_answer(answer, label, candidates)
                batch_records.append(
                    {
                        "id": row.id,
                        "group": row.group or row.id,
                        "condition": row.condition or "neutral",
                        "task": row.task,
                        "category": row.category,
                        "label": row.label,
                        "context_label": row.context_label,
                        "prediction": answer,
                        "correct": verdict.correct,
                        "reason": verdict.reason,
                        "follows_context": follows_context(answer, row.context_label, label, candidates),
                        "audio_truncated": truncated,
                    }
                )
            records.extend(batch_records)
            if on_records is not None:
                on_records(batch_records)
            bar.update(len(batch_rows))
    return records


def score_records(
    records: Sequence[Mapping[str, Any]] | Mapping[Any, Sequence[Mapping[str, Any]]],
    *,
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The metrics of records (those of :func:`evaluate_rows`; a list, or ``{seed: records}``), with
    bootstrap intervals: :func:`caad.eval.metrics.summarize`."""
    return summarize(records, num_bootstrap=num_bootstrap, seed=seed)


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


_GENERIC_MODEL_NAMES = {"final", "last", "best", "latest", "model", "checkpoint", "checkpoints"}


def default_run_name(
    model_path: str | os.PathLike[str],
    contrastive_alpha: float | None = None,
    negative_mode: str = DEFAULT_NEGATIVE_MODE,
    plausibility: float = 0.0,
    audio_mode: str = "positive",
) -> str:
    """A run name from the model and the decoding, e.g. ``stage2-final-greedy``,
    ``teacher-cd-a2-remove-p0.1`` or ``teacher-greedy-remove`` (greedy on the text-only path): the
    checkpoint folder's name, with its parent's when the name alone says little (``final``,
    ``checkpoint-300``, ...)."""
    path = Path(os.path.abspath(model_path))
    model = path.name or "model"
    generic = model.lower() in _GENERIC_MODEL_NAMES or model.lower().startswith(("checkpoint", "step", "epoch"))
    if generic and path.parent.name:
        model = f"{path.parent.name}-{model}"
    if contrastive_alpha is None:
        return f"{model}-greedy" + ("" if audio_mode == "positive" else f"-{audio_mode}")
    name = f"{model}-cd-a{contrastive_alpha:g}-{negative_mode}"
    return name + (f"-p{plausibility:g}" if plausibility else "")


def decoding_label(metrics: Mapping[str, Any]) -> str:
    """A short description of a run's decoding, e.g. ``greedy`` or ``contrastive a=2 (zero)``."""
    decoding = metrics.get("decoding") or {}
    if decoding.get("method") != "contrastive":
        path = decoding.get("audio_mode") or "positive"
        return "greedy" if path == "positive" else f"greedy, {path} path"
    label = f"contrastive a={decoding.get('alpha'):g} ({decoding.get('negative_mode', DEFAULT_NEGATIVE_MODE)})"
    if decoding.get("plausibility"):
        label += f" cutoff={decoding['plausibility']:g}"
    return label


def _percent(estimate: Any) -> str:
    """``52.5 +-4.9`` from an estimate dict (``+-`` half the interval), ``no items`` when it has none."""
    if not isinstance(estimate, Mapping):
        return "-" if estimate is None else f"{100.0 * float(estimate):.1f}"
    if estimate.get("value") is None:
        return "no items" if not estimate.get("n") else "-"
    text = f"{100.0 * estimate['value']:.1f}"
    if estimate.get("low") is not None and estimate.get("high") is not None:
        text += f" +-{50.0 * (estimate['high'] - estimate['low']):.1f}"
    return text


def _ratio_text(estimate: Any) -> str:
    if not isinstance(estimate, Mapping) or estimate.get("value") is None:
        return "-"
    text = f"{estimate['value']:.2f}"
    if estimate.get("low") is not None and estimate.get("high") is not None:
        text += f" +-{(estimate['high'] - estimate['low']) / 2:.2f}"
    return text


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One markdown table, one row per evaluated model/decoding (key of ``results`` = row name).

    Columns: model, decoding, items (scored neutral items), accuracy (neutral condition), one column
    per task (union over the results, sorted), accuracy under the faithful, adversarial and irrelevant
    contexts, text influence rate, shift and modal robustness. Percentages with one decimal and
    ``+-`` half the 95% interval; ``no items`` where a task or condition has no item in that run;
    ``-`` where a value is undefined.
    """
    tasks = sorted({task for metrics in results.values() for task in metrics.get("accuracy_per_task", {})})
    conditions = [
        c for c in TEXT_CONDITIONS
        if any((m.get("accuracy_per_condition") or {}).get(c, {}).get("n") for m in results.values())
    ]  # fmt: skip
    header = ["model", "decoding", "items", "accuracy", *tasks, *conditions]
    if "adversarial" in conditions:
        header += ["text influence", "shift"]
    if "adversarial" in conditions and "irrelevant" in conditions:
        header += ["modal robustness"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- ", " --- "] + [" ---: "] * (len(header) - 2)) + "|",
    ]
    for row_name, metrics in results.items():
        per_task = metrics.get("accuracy_per_task", {})
        per_condition = metrics.get("accuracy_per_condition") or {}
        accuracy = metrics.get("accuracy")
        items = accuracy.get("n") if isinstance(accuracy, Mapping) else metrics.get("num_items", "-")
        cells = [
            str(row_name),
            decoding_label(metrics),
            str(items),
            _percent(accuracy),
            *(_percent(per_task.get(task, {"value": None, "n": 0})) for task in tasks),
            *(_percent(per_condition.get(c, {"value": None, "n": 0})) for c in conditions),
        ]
        if "adversarial" in conditions:
            cells += [_percent(metrics.get("text_influence_rate")), _percent(metrics.get("shift"))]
        if "adversarial" in conditions and "irrelevant" in conditions:
            cells.append(_ratio_text(metrics.get("modal_robustness")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run_markdown(metrics: Mapping[str, Any]) -> str:
    parts = [
        f"# Evaluation: {metrics['name']}",
        "",
        f"- model: `{metrics['model']}`",
        f"- manifest: `{metrics['manifest']}` ({metrics['num_records']} scored rows, {metrics['num_items']} items, "
        f"{metrics['num_unlabelled']} unlabelled rows skipped)",
        f"- decoding: {decoding_label(metrics)}, at most {metrics['max_new_tokens']} new tokens",
        "- accuracy: Dynamic-SUPERB style (the label named, no other candidate, not negated) on the question "
        "alone (neutral), in %, +- half the 95% bootstrap interval; faithful / adversarial / irrelevant: accuracy "
        "with that text context (MCR-BENCH); text influence: % of adversarial items answered as the text says; "
        "shift: % of items right under neutral and wrong under adversarial; modal robustness: "
        "0.8 x adversarial/neutral + 0.2 x irrelevant/neutral accuracy (1: the text changes nothing)",
        "",
        markdown_table({metrics["name"]: metrics}),
    ]
    if metrics.get("num_truncated_audio"):
        parts += [f"{metrics['num_truncated_audio']} clips were longer than the model's audio window and cut.", ""]
    categories = metrics.get("accuracy_per_category") or {}
    if categories:
        parts += [
            "Per-category means of task accuracies (neutral, %):",
            "",
            "| category | accuracy |",
            "| --- | ---: |",
            *(f"| {name} | {_percent(value)} |" for name, value in categories.items()),
            "",
        ]
    for warning in metrics.get("warnings") or []:
        parts += [f"**Warning:** {warning}", ""]
    return "\n".join(parts)


def check_outputs_free(out_dir: str | os.PathLike[str], name: str) -> None:
    """``FileExistsError`` naming the first result file of ``name`` that already exists in ``out_dir``."""
    for path in result_paths(out_dir, name).values():
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; pass --overwrite to replace it, or choose another --name or --out"
            )


def run_eval(
    model_path: str,
    manifest: str,
    out_dir: str,
    *,
    name: str | None = None,
    contrastive_alpha: float | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    negative_mode: str = DEFAULT_NEGATIVE_MODE,
    plausibility: float = 0.0,
    device: str | None = None,
    overwrite: bool = True,
    progress: bool = True,
    num_bootstrap: int = 1000,
    audio_mode: str = "positive",
    load_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint at ``model_path`` on ``manifest``; write and return the metrics.

    Args:
        model_path: a checkpoint directory loadable with :func:`caad.models.load_speech_lm`.
        manifest: a JSONL manifest (:mod:`caad.data.manifest`); its labelled rows are scored.
        out_dir: folder of the result files (created when missing; module docstring).
        name: the run's name: file stem of the result files and the row name in the table
            (default: :func:`default_run_name`).
        contrastive_alpha: ``None`` for greedy decoding, else contrastive decoding with this alpha.
        batch_size: rows per generation batch.
        max_new_tokens: most tokens generated per answer.
        negative_mode: negative path of contrastive decoding (see ``caad.models.NEGATIVE_MODES``).
        plausibility: adaptive plausibility cutoff of contrastive decoding (0 disables it).
        device: where the model runs (default: ``"cuda"`` when available, else ``"cpu"``).
        overwrite: replace existing result files (``caad eval`` passes ``False`` unless
            ``--overwrite``; the ``caad run`` pipeline manages its own output folder).
        progress: show a progress bar (stderr).
        num_bootstrap: bootstrap replicates of the confidence intervals.
        audio_mode: the path greedy decoding runs on: ``"positive"`` (the audio), or a negative mode
            (``"remove"`` ...) to measure what the model answers without the audio.
        load_options: keyword arguments of :func:`caad.models.load_speech_lm` (``chat_template``,
            ``allow_pickle``, ``trust_remote_code``, ``low_memory``), as the model was trained with.

    Returns:
        The metrics dict (module docstring), as written to ``<out_dir>/<name>.json``. Too small a
        test set (:data:`caad.eval.metrics.MIN_MEANINGFUL_ITEMS`) is reported in ``warnings`` and
        with a ``UserWarning``.
    """
    alpha = check_decoding_options(contrastive_alpha, negative_mode, plausibility)
    audio_mode = resolve_audio_mode(audio_mode)
    if alpha is not None and audio_mode != "positive":
        raise ValueError(f"contrastive decoding runs on the positive path; got audio_mode={audio_mode!r}")
    for value, label in ((batch_size, "batch_size"), (max_new_tokens, "max_new_tokens")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if name is None:
        name = default_run_name(model_path, alpha, negative_mode, plausibility, audio_mode)
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
    model = load_speech_lm(model_path, device=device, **(load_options or {}))

    paths["predictions"].parent.mkdir(parents=True, exist_ok=True)
    for stale in (paths["json"], paths["markdown"]):  # never leave an earlier run's metrics beside new answers
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(paths["predictions"], "w", encoding="utf-8") as handle:

        def write_batch(batch: list[dict[str, Any]]) -> None:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch))
            handle.flush()

        records = evaluate_rows(
            model,
            labelled,
            contrastive_alpha=alpha,
            negative_mode=negative_mode,
            plausibility=plausibility,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            audio_mode=audio_mode,
            progress=progress,
            desc=f"eval {name}",
            on_records=write_batch,
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
            "audio_mode": audio_mode,
        },
        "max_new_tokens": max_new_tokens,
        "num_rows": len(rows),
        "num_unlabelled": len(rows) - len(labelled),
        "num_truncated_audio": sum(1 for r in records if r.get("audio_truncated")),
        **score_records(records, num_bootstrap=num_bootstrap),
        "predictions": paths["predictions"].name,
        "seconds": round(seconds, 3),
    }
    for warning in metrics["warnings"]:
        warnings.warn(f"{name}: {warning}", UserWarning, stacklevel=2)
    write_text_atomic(paths["markdown"], _run_markdown(metrics))
    write_text_atomic(paths["json"], json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics

