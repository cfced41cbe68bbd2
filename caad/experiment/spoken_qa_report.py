"""The spoken-QA suite's report: ``results.json``, ``results.md`` and ``plots/modality_gap.png``.

Per arm, the test records of all its seeds (:mod:`caad.eval.modality_gap`'s records, read from each
evaluation unit's ``records.jsonl``) give the paper's measures with 95% bootstrap intervals over items and
seeds (:func:`caad.eval.modality_gap.modality_measures`): text and speech accuracy, modality gap
(text - speech), forgetting against the ``pre_distillation`` arm's text accuracy, teacher gap against the
``text_teacher`` arm's (both ``None`` when that reference arm is not in the config). A reference arm has one
set of records (key ``"shared"``): it is not trained per seed.

``results.json``::

    {"experiment": {output_dir, command, machine, seeds, invocation_seconds, unit_seconds, config, ...},
     "test": {utterances, items, chance_accuracy, chance_by_task, train_utterances},
     "rows": {arm: {kind, method, label, measures, per_seed: {seed: {text_accuracy, speech_accuracy}},
                    speech_by_task: {task: accuracy over all seeds' spoken records}, train_seconds: [per seed]}}}

The overall chance mixes tasks whose chance differs tenfold (a comparison names two candidates, an addition
19), so the report also gives each task's spoken accuracy beside its own chance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caad.data.files import write_text_atomic
from caad.experiment.spoken_qa_config import STUDENT_DEFAULTS, SpokenQAExperimentConfig

__all__ = ["PLOT", "markdown", "plot", "summarize_arms", "write_spoken_qa_report"]

PLOT = "modality_gap.png"
#: The student settings the table's caption names (all of them are in results.json).
SHOWN_STUDENT_KEYS = ("max_steps", "batch_size", "lr", "scheduler", "kd_weight", "ce_weight", "temperature")
REFERENCE_SEED = "shared"


def _records(folder: Path) -> list[dict[str, Any]]:
    if not (folder / "done.json").is_file():
        raise RuntimeError(f"{folder} is not finished: the experiment is not complete")
    with open(folder / "records.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summarize_arms(config: SpokenQAExperimentConfig, out: Path,
                   unit_seconds: Mapping[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per arm (config order): its measures over seeds, its per-seed accuracies and training times."""
    from caad.eval.modality_gap import modality_measures

    records: dict[str, dict[Any, list[dict[str, Any]]]] = {}
    for arm in config.arms:
        if arm.is_student:
            records[arm.name] = {s: _records(out / "arms" / arm.name / f"seed-{s}" / "test") for s in config.seeds}
        else:
            records[arm.name] = {REFERENCE_SEED: _records(out / "arms" / arm.name / "test")}
    references = {kind: next((records[a.name] for a in config.arms if a.kind == kind), None)
                  for kind in ("pre_distillation", "text_teacher")}
    rows: dict[str, dict[str, Any]] = {}
    for index, arm in enumerate(config.arms):
        per_seed = records[arm.name]
        others = {"pre": references["pre_distillation"], "teacher": references["text_teacher"]} if arm.is_student \
            else {}
        measures = modality_measures(per_seed, **others, num_bootstrap=config.eval.num_bootstrap, seed=index)
        by_seed = {s: modality_measures(values, num_bootstrap=0) for s, values in per_seed.items()}
        rows[arm.name] = {
            "kind": arm.kind,
            "method": arm.method,
            "label": arm.label,
            "measures": measures,
            "per_seed": {s: {k: m[k]["value"] for k in ("text_accuracy", "speech_accuracy")}
                         for s, m in by_seed.items()},
            "speech_by_task": _accuracy_by_task(per_seed, "speech"),
            "train_seconds": [round((unit_seconds or {}).get(f"arms/{arm.name}/seed-{s}/train", 0.0), 1)
                              for s in config.seeds] if arm.is_student else None,
        }
    return rows


def _accuracy_by_task(per_seed: Mapping[Any, list[dict[str, Any]]], modality: str) -> dict[str, float]:
    """Share of correct ``modality`` records per task, pooled over seeds (tasks sorted)."""
    counts: dict[str, list[int]] = {}
    for records in per_seed.values():
        for record in records:
            if record["modality"] == modality:
                entry = counts.setdefault(record["task"], [0, 0])
                entry[0] += bool(record["correct"])
                entry[1] += 1
    return {task: right / total for task, (right, total) in sorted(counts.items())}


def _test_info(out: Path) -> dict[str, Any]:
    from caad.data.manifest import read_manifest

    rows = read_manifest(out / "shared/set/test.jsonl")
    return {
        "utterances": len(rows),
        "items": len({row.group or row.id for row in rows}),
        "chance_accuracy": sum(1.0 / len(row.choices) for row in rows) / len(rows),
        "chance_by_task": {task: sum(1.0 / len(row.choices) for row in rows if row.task == task)
                           / sum(row.task == task for row in rows) for task in sorted({row.task for row in rows})},
        "train_utterances": len(read_manifest(out / "shared/set/train.jsonl")),
    }


def _what_test_holds(meta: Mapping[str, Any]) -> str:
    knowledge = meta.get("config", {}).get("models", {}).get("text_knowledge", "train")
    if knowledge == "all":
        return "never heard in training; both LMs learned every question's text, models.text_knowledge: all"
    return "held-out combinations"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the table with its command, commit, machine and settings."""
    from caad.eval.modality_gap import format_estimate

    meta, test = results["experiment"], results["test"]
    machine = meta["machine"]
    student = {k: v for k, v in meta["student"].items() if k in SHOWN_STUDENT_KEYS}
    lines = [
        "# Forgetting and modality gap of the text-teacher methods (built-in spoken QA, test split)",
        "",
        f"Command: `{meta.get('command') or 'caad experiment'}`  ",
        f"Commit: `{machine.get('commit')}`; {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, "
        f"{machine['torch_threads']} thread(s); run time of all units {meta['unit_seconds_total'] / 60:.1f} min "
        f"({meta['unit_cpu_seconds_total'] / 60:.1f} CPU-min).",
        "",
        f"Test split: {test['utterances']} utterances of {test['items']} questions ({_what_test_holds(meta)}); chance "
        f"(uniform guess among each question's choices): {100 * test['chance_accuracy']:.1f}%. Seeds "
        f"{meta['seeds']}; every student arm: {', '.join(f'{k} {v}' for k, v in student.items())}, then the "
        "arm's own settings (config.yaml); 95% bootstrap intervals over items and seeds. All numbers in percent "
        "(points for differences; a positive difference means the student is worse).",
        "",
        "| arm | what | text acc | speech acc | modality gap (text - speech) | forgetting (pre - text) "
        "| teacher gap (teacher - text) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        m = row["measures"]
        cells = [
            format_estimate(m["text_accuracy"]),
            format_estimate(m["speech_accuracy"]),
            format_estimate(m["modality_gap"], signed=True),
            format_estimate(m["forgetting"], signed=True),
            format_estimate(m["teacher_gap"], signed=True),
        ]
        lines.append(f"| `{name}` | {row['label']} | " + " | ".join(cells) + " |")
    students = {name: row for name, row in results["rows"].items() if row["kind"] == "student"}
    chance = test.get("chance_by_task") or {}
    spoken = {name: row for name, row in results["rows"].items() if row.get("speech_by_task")}
    if chance and spoken:
        lines += [
            "",
            "Speech accuracy by task (%, all seeds' spoken test records; chance per task in the header):",
            "",
            "| arm | " + " | ".join(f"{task} (chance {100 * c:.0f})" for task, c in chance.items()) + " |",
            "|---|" + "---|" * len(chance),
        ]
        lines += [f"| `{name}` | " + " | ".join(_pct(row["speech_by_task"].get(task)) for task in chance) + " |"
                  for name, row in spoken.items()]
    lines += [
        "",
        "Per seed (text / speech accuracy, %): "
        + "; ".join(
            f"`{name}` " + ", ".join(
                f"s{s}: {_pct(v['text_accuracy'])}/{_pct(v['speech_accuracy'])}" for s, v in row["per_seed"].items()
            )
            for name, row in students.items()
        ),
        "",
        "Training time per seed (s): "
        + "; ".join(f"`{name}` {row['train_seconds']}" for name, row in students.items()),
        "",
        f"Plot: `plots/{PLOT}`. Every unit's records: `arms/<arm>/[seed-<s>/]test/records.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Text and speech accuracy per arm with their intervals, chance as a dashed line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results["rows"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4.2))
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "text_accuracy", "text query"), (0.2, "speech_accuracy", "spoken query")):
        values, low, high = [], [], []
        for name in names:
            e = results["rows"][name]["measures"][key]
            v = e["value"]
            values.append(math.nan if v is None else 100 * v)
            low.append(0.0 if v is None or e["low"] is None else 100 * (v - e["low"]))
            high.append(0.0 if v is None or e["high"] is None else 100 * (e["high"] - v))
        ax.bar(x + offset, values, width=0.4, yerr=[low, high], capsize=3, label=label)
    ax.axhline(100 * results["test"]["chance_accuracy"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylabel("accuracy on the test split (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Spoken vs text queries of the same items ({len(results['experiment']['seeds'])} seed(s), "
                 "95% bootstrap intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_spoken_qa_report(
    config: SpokenQAExperimentConfig,
    out: Path,
    *,
    unit_seconds: Mapping[str, float],
    unit_cpu_seconds: Mapping[str, float],
    invocation_seconds: float,
    command: str | None,
    machine: Mapping[str, Any],
) -> dict[str, Any]:
    """Summaries, ``results.json``, ``results.md`` and the plot; returns their paths and the results."""
    results: dict[str, Any] = {
        "experiment": {
            "suite": "spoken_qa",
            "output_dir": str(out),
            "command": command,
            "machine": dict(machine),
            "seeds": list(config.seeds),
            "student": {**STUDENT_DEFAULTS, **config.student},
            "invocation_seconds": round(invocation_seconds, 1),
            "unit_seconds_total": round(sum(unit_seconds.values()), 1),
            "unit_seconds": {k: round(v, 2) for k, v in unit_seconds.items()},
            "unit_cpu_seconds_total": round(sum(unit_cpu_seconds.values()), 1),
            "config": config.to_dict(),
        },
        "test": _test_info(out),
        "rows": summarize_arms(config, out, unit_seconds),
    }
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    plots = [out / "plots" / PLOT]
    plot(results, plots[0])
    write_text_atomic(paths["markdown"], markdown(results))
    write_text_atomic(paths["json"], json.dumps(results, indent=1, default=str) + "\n")
    return {**paths, "plots": plots, "result": results}
