"""The experiment's report: ``results.json``, ``results.md`` and PNG plots.

For every variant and split the scored records of all seeds are summarised together
(:func:`caad.eval.summarize`: each metric with a 95% bootstrap interval over items and seeds). A sweep
arm's reported variant is the one with the best *validation* value of ``eval.select_by``; the test
split only reports.

``results.json``::

    {"experiment": {output_dir, command, machine, seeds, items, seconds, unit_seconds, ...},
     "arms": {arm: {"kind", "label", "variants": [keys], "selected", "select_by", "validation_scores"}},
     "variants": {key: {"arm", "label", "kind", "values", "settings", "seeds", "test", "validation"}},
     "paper": the paper's figures (direction only), "comparison": ours beside them}

Plots (``plots/``): ``alpha_sweep.png`` (test accuracy and text influence rate against alpha, one
line per arm family, intervals as bars), ``per_task.png`` (neutral accuracy per task and arm),
``per_condition.png`` (accuracy under each text condition per arm).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caad.data.files import write_text_atomic
from caad.experiment.config import ExperimentConfig, Variant

__all__ = ["PAPER", "load_records", "summarize_variants", "write_report"]

#: The CAAD paper's headline figures, for direction (its models and benchmarks are not ours).
PAPER: dict[str, Any] = {
    "dynamic_superb_accuracy": {"kd": 50.40, "caad": 54.44},
    "mcr_shift_ratio_caad_over_kd": 0.79,
    "teacher": "contrastive decoding beats greedy decoding on paralinguistic tasks",
}
#: Arm names the direction check looks for (missing arms are skipped).
ROLES = {"kd": "student_kd", "caad": "student_caad", "teacher": "teacher_greedy", "teacher_cd": "teacher_contrastive"}
CONDITION_NAMES = ("neutral", "faithful", "adversarial", "irrelevant")


def load_records(folder: Path) -> list[dict[str, Any]]:
    """The records of one evaluation unit (``records.jsonl``)."""
    with open(folder / "records.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summarize_variants(config: ExperimentConfig, out: Path) -> dict[str, dict[str, Any]]:
    """Per variant: ``{"test": summary, "validation": summary or None, "seeds": [...]}``."""
    from caad.eval import summarize

    out_variants: dict[str, dict[str, Any]] = {}
    for index, variant in enumerate(config.variants()):
        entry: dict[str, Any] = {"seeds": list(config.seeds)}
        for split in ("test", "validation"):
            per_seed = {}
            for seed in config.seeds:
                folder = out / "arms" / variant.key / f"seed-{seed}" / split
                if (folder / "done.json").is_file():
                    per_seed[seed] = load_records(folder)
            entry[split] = (
                summarize(per_seed, num_bootstrap=config.eval.num_bootstrap, seed=index) if per_seed else None
            )
        out_variants[variant.key] = entry
    return out_variants


def _value(summary: Mapping[str, Any] | None, *path: str) -> float | None:
    node: Any = summary
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node.get("value") if isinstance(node, Mapping) else None


def _estimate(summary: Mapping[str, Any] | None, *path: str) -> Mapping[str, Any] | None:
    node: Any = summary
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) and "value" in node else None


def _cell(estimate: Mapping[str, Any] | None, percent: bool = True) -> str:
    if estimate is None or estimate.get("value") is None:
        return "-"
    scale = 100.0 if percent else 1.0
    digits = 1 if percent else 2
    text = f"{estimate['value'] * scale:.{digits}f}"
    if estimate.get("low") is not None and estimate.get("high") is not None:
        text += f" [{estimate['low'] * scale:.{digits}f}, {estimate['high'] * scale:.{digits}f}]"
    return text


def _select(config: ExperimentConfig, variants: list[Variant], summaries: Mapping[str, Any]) -> dict[str, Any]:
    """Per arm: its variants and the one chosen on validation (single-variant arms: that one)."""
    arms: dict[str, Any] = {}
    for arm in config.arms:
        keys = [v.key for v in variants if v.arm == arm.name]
        entry: dict[str, Any] = {"kind": arm.kind, "label": arm.label, "variants": keys, "selected": keys[0],
                                 "select_by": None, "validation_scores": {}}
        if len(keys) > 1:
            scores = {k: _value(summaries[k]["validation"], config.eval.select_by) for k in keys}
            entry["validation_scores"] = scores
            entry["select_by"] = f"validation {config.eval.select_by}"
            ranked = [k for k in keys if scores[k] is not None]
            if ranked:
                entry["selected"] = max(ranked, key=lambda k: scores[k])  # first of equals wins
        arms[arm.name] = entry
    return arms


def _comparison(arms: Mapping[str, Any], summaries: Mapping[str, Any]) -> dict[str, Any]:
    def test(role: str) -> Mapping[str, Any] | None:
        arm = arms.get(ROLES[role])
        return None if arm is None else summaries[arm["selected"]]["test"]

    out: dict[str, Any] = {}
    kd, caad = test("kd"), test("caad")
    if kd is not None and caad is not None:
        out["accuracy_kd"], out["accuracy_caad"] = _value(kd, "accuracy"), _value(caad, "accuracy")
        shift_kd, shift_caad = _value(kd, "shift"), _value(caad, "shift")
        out["shift_kd"], out["shift_caad"] = shift_kd, shift_caad
        out["shift_ratio_caad_over_kd"] = shift_caad / shift_kd if shift_kd else None
    teacher, teacher_cd = test("teacher"), test("teacher_cd")
    if teacher is not None and teacher_cd is not None:
        for name, summary in (("teacher_greedy", teacher), ("teacher_contrastive", teacher_cd)):
            out[f"{name}_paralinguistics"] = _value(summary, "accuracy_per_category", "paralinguistics")
    return out


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def _markdown(config: ExperimentConfig, result: Mapping[str, Any], variants: list[Variant]) -> str:
    summaries, arms, meta = result["variants"], result["arms"], result["experiment"]
    by_key = {v.key: v for v in variants}
    lines = [
        "# CAAD experiment",
        "",
        f"Command: `{meta.get('command') or 'caad experiment'}`; commit {meta['machine'].get('commit')}; "
        f"{meta['machine']['cpu']} ({meta['machine']['cores']} cores, torch {meta['machine']['torch']}).",
        f"Seeds {config.seeds} (initialisation and data order); {meta['items']['test']} test items per text "
        f"condition; run time (all units) {meta['unit_seconds_total'] / 60:.1f} min.",
        "Values: mean over seeds, in %, with the 95% bootstrap interval over items and seeds. A sweep arm "
        f"shows its variant chosen on the validation split by {config.eval.select_by}; the test split chose nothing.",
        "",
        "| arm | setting | accuracy (neutral) | faithful | adversarial | irrelevant | text influence | shift | "
        "modal robustness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms.values():
        key = arm["selected"]
        test = summaries[key]["test"]
        setting = ", ".join(f"{k}={v}" for k, v in by_key[key].values.items()) or "-"
        if arm["select_by"]:
            setting += " (chosen on validation)"
        lines.append(
            f"| {arm['label']} | {setting} | {_cell(_estimate(test, 'accuracy'))} | "
            + " | ".join(_cell(_estimate(test, "accuracy_per_condition", c)) for c in CONDITION_NAMES[1:])
            + f" | {_cell(_estimate(test, 'text_influence_rate'))} | {_cell(_estimate(test, 'shift'))} | "
            f"{_cell(_estimate(test, 'modal_robustness'), percent=False)} |"
        )
    tasks = sorted({t for arm in arms.values() for t in (summaries[arm["selected"]]["test"] or {}).get(
        "accuracy_per_task", {})})
    if tasks:
        lines += ["", "## Accuracy per task (neutral condition, %)", "",
                  "| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for arm in arms.values():
            test = summaries[arm["selected"]]["test"]
            lines.append(f"| {arm['label']} | " + " | ".join(
                _cell(_estimate(test, "accuracy_per_task", t)) for t in tasks) + " |")
    for arm in arms.values():
        if len(arm["variants"]) < 2:
            continue
        lines += ["", f"## Sweep: {arm['label']}", "",
                  f"| variant | validation {config.eval.select_by} | test accuracy | test adversarial | "
                  "test text influence |", "|---|---|---|---|---|"]
        for key in arm["variants"]:
            test = summaries[key]["test"]
            mark = " (chosen)" if key == arm["selected"] else ""
            lines.append(
                f"| {by_key[key].label}{mark} | {_fmt(arm['validation_scores'].get(key))} | "
                f"{_cell(_estimate(test, 'accuracy'))} | "
                f"{_cell(_estimate(test, 'accuracy_per_condition', 'adversarial'))} | "
                f"{_cell(_estimate(test, 'text_influence_rate'))} |"
            )
    comparison = result["comparison"]
    lines += ["", "## Beside the paper (direction only: other models, other benchmarks)", "",
              "| claim | paper | ours (test) |", "|---|---|---|"]
    if "accuracy_kd" in comparison:
        paper = PAPER["dynamic_superb_accuracy"]
        lines.append(f"| accuracy, KD -> CAAD | {paper['kd']:.2f} -> {paper['caad']:.2f} | "
                     f"{_fmt(comparison['accuracy_kd'])} -> {_fmt(comparison['accuracy_caad'])} |")
        lines.append(f"| bias shift, CAAD / KD | {PAPER['mcr_shift_ratio_caad_over_kd']:.2f} | "
                     f"{_fmt(comparison['shift_ratio_caad_over_kd'], percent=False)} |")
    if not comparison:
        lines.append(f"| (needs the arms {', '.join(ROLES.values())}) | | |")
    if "teacher_greedy_paralinguistics" in comparison:
        lines.append(f"| teacher on paralinguistics, greedy -> contrastive | CD better | "
                     f"{_fmt(comparison['teacher_greedy_paralinguistics'])} -> "
                     f"{_fmt(comparison['teacher_contrastive_paralinguistics'])} |")
    warnings = sorted({w for v in summaries.values() for s in (v["test"],) if s for w in s.get("warnings", [])})
    if warnings:
        lines += ["", "Warnings:", *(f"- {w}" for w in warnings)]
    lines += ["", "Plots: `plots/alpha_sweep.png`, `plots/per_task.png`, `plots/per_condition.png`.", ""]
    return "\n".join(lines)


def _alpha_of(variant: Variant) -> float | None:
    if variant.kind == "teacher_contrastive":
        return float(variant.decoding.get("alpha", 0.0))
    if variant.kind == "student" and float(variant.train.get("kd_weight", 0.0)) > 0:
        return float(variant.train.get("alpha", 0.0))
    return None


def _family(variant: Variant) -> str:
    """The line a variant belongs to in the alpha plot."""
    if variant.kind == "teacher_contrastive":
        return f"teacher contrastive (plausibility {float(variant.decoding.get('plausibility', 0.0)):g})"
    options = variant.alpha
    if options.get("alpha_adaptive"):
        return "student CAAD, adaptive alpha"
    if options.get("alpha_schedule", "constant") != "constant":
        return f"student CAAD, {options['alpha_schedule']} schedule"
    return "student KD / CAAD (constant alpha)"


def _plots(config: ExperimentConfig, result: Mapping[str, Any], variants: list[Variant], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    summaries, arms = result["variants"], result["arms"]
    paths = []

    def bars(estimate: Mapping[str, Any] | None) -> tuple[float, float, float]:
        if estimate is None or estimate.get("value") is None:
            return math.nan, 0.0, 0.0
        value = estimate["value"]
        low = estimate["low"] if estimate.get("low") is not None else value
        high = estimate["high"] if estimate.get("high") is not None else value
        return 100 * value, 100 * (value - low), 100 * (high - value)

    # 1. accuracy and text influence against alpha
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families: dict[str, list[Variant]] = {}
    for variant in variants:
        if _alpha_of(variant) is not None:
            families.setdefault(_family(variant), []).append(variant)
    flat = [v for v in variants if _alpha_of(v) is None]
    for ax, metric, title in ((axes[0], ("accuracy",), "test accuracy (neutral), %"),
                              (axes[1], ("text_influence_rate",), "text influence rate (adversarial), %")):
        for family, members in families.items():
            members = sorted(members, key=_alpha_of)
            xs = [_alpha_of(v) for v in members]
            stats = [bars(_estimate(summaries[v.key]["test"], *metric)) for v in members]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[[s[1] for s in stats], [s[2] for s in stats]],
                        marker="o", capsize=3, label=family)
        for variant in flat:
            value = bars(_estimate(summaries[variant.key]["test"], *metric))[0]
            if not math.isnan(value):
                ax.axhline(value, linestyle="--", linewidth=1, color="grey" if variant.kind == "teacher" else "black")
                ax.annotate(variant.label, (0, value), fontsize=7, va="bottom")
        ax.set_xlabel("alpha")
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CAAD experiment: {len(config.seeds)} seed(s), 95% intervals")
    fig.tight_layout()
    paths.append(folder / "alpha_sweep.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. per task and 3. per condition: grouped bars of the arms' reported variants
    for name, getter, keys_of in (
        ("per_task", lambda s, k: _estimate(s, "accuracy_per_task", k),
         lambda s: sorted((s or {}).get("accuracy_per_task", {}))),
        ("per_condition", lambda s, k: _estimate(s, "accuracy_per_condition", k), lambda s: list(CONDITION_NAMES)),
    ):
        selected = [(arm["label"], summaries[arm["selected"]]["test"]) for arm in arms.values()]
        groups = sorted({k for _, s in selected for k in keys_of(s)}, key=lambda k: (
            CONDITION_NAMES.index(k) if k in CONDITION_NAMES else 0, k))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4.2))
        width = 0.8 / max(1, len(selected))
        for i, (label, summary) in enumerate(selected):
            stats = [bars(getter(summary, g)) for g in groups]
            xs = [j + (i - (len(selected) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[[s[1] for s in stats], [s[2] for s in stats]],
                   capsize=2, label=label)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylabel("accuracy, % (test)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("accuracy per task (neutral)" if name == "per_task" else "accuracy per text condition")
        fig.tight_layout()
        paths.append(folder / f"{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(
    config: ExperimentConfig,
    out: Path,
    *,
    unit_seconds: Mapping[str, float],
    invocation_seconds: float,
    command: str | None,
    machine: Mapping[str, Any],
    unit_cpu_seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Summaries, selection, ``results.json``, ``results.md`` and the plots; returns their paths."""
    variants = config.variants()
    summaries = summarize_variants(config, out)
    missing = [key for key, entry in summaries.items() if entry["test"] is None]
    if missing:
        raise RuntimeError(f"no test records for {', '.join(missing)}: the experiment is not finished")
    arms = _select(config, variants, summaries)
    first = next(iter(summaries.values()))["test"]
    by_key = {v.key: v for v in variants}
    result: dict[str, Any] = {
        "experiment": {
            "output_dir": str(out),
            "command": command,
            "machine": dict(machine),
            "seeds": list(config.seeds),
            "items": {"test": first["num_items"], "test_records_per_seed": first["num_records"] // max(1, len(
                config.seeds))},
            "invocation_seconds": round(invocation_seconds, 1),
            "unit_seconds_total": round(sum(unit_seconds.values()), 1),
            "unit_seconds": {k: round(v, 2) for k, v in unit_seconds.items()},
            "unit_cpu_seconds_total": round(sum((unit_cpu_seconds or {}).values()), 1),
            "unit_cpu_seconds": {k: round(v, 2) for k, v in (unit_cpu_seconds or {}).items()},
            "config": config.to_dict(),
        },
        "arms": arms,
        "variants": {
            key: {"arm": by_key[key].arm, "label": by_key[key].label, "kind": by_key[key].kind,
                  "values": by_key[key].values, "settings": by_key[key].settings(), **entry}
            for key, entry in summaries.items()
        },
        "paper": PAPER,
    }
    result["comparison"] = _comparison(arms, summaries)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    plots = _plots(config, result, variants, out / "plots")
    write_text_atomic(paths["markdown"], _markdown(config, result, variants))
    write_text_atomic(paths["json"], json.dumps(result, indent=1, default=str) + "\n")
    return {**paths, "plots": plots, "result": result}
