"""SALAD's report: the measures per arm and round over seeds with confidence intervals, the clusters' gaps per
round, and two plots.

``report.json``::

    {"teacher_text_accuracy", "budget_unit", "seeds", "stage1": {...},
     "arms": {arm: [{"round", "spent": {"utterances", "seconds", "budget_units"}, "seeds",
                     "measures": summarize_measures(...),
                     "probe": {"kl", "js", "acc_gap"}}, ...]},    # round 0: Stage I, shared by every arm
     "clusters": {arm: {"metric", "scores": [[round 0..R] x clusters] (mean over seeds),
                        "acc_gap": [...], "chosen": {seed: [[clusters] per round]}}}}

``gap_per_cluster.png``: per arm, each cluster's misalignment (the arm's metric; KL for the random arm) on
its probe after each round, clusters chosen that round marked. ``measures_vs_budget.png``: the text-speech
gap, speech accuracy and text accuracy against the synthesis budget spent after Stage I, per arm, with the
intervals as bands (the teacher's text accuracy as a dashed line), and the mean probe KL over all clusters
(mean over seeds). Only completed rounds are counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caad.data.files import write_text_atomic
from caad.methods.salad.config import ARM_RANDOM, SaladConfig
from caad.methods.salad.measures import summarize_measures

__all__ = ["collect_report", "format_markdown", "plot_budget", "plot_clusters", "write_report"]


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _round_dir(root: Path, seed: int, arm: str, index: int) -> Path:
    return root / f"seed_{seed}" / "stage1" if index == 0 else root / f"seed_{seed}" / arm / f"round_{index}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def collect_report(root: Path, config: SaladConfig) -> dict[str, Any]:
    """The report's data from the completed rounds in ``root`` (module docstring)."""
    base = _read(root / "base" / "base.json") if (root / "base" / "base.json").is_file() else {}
    report: dict[str, Any] = {
        "teacher_text_accuracy": base.get("teacher_text_accuracy"),
        "budget_unit": config.budget_unit,
        "budget_per_round": config.budget_per_round,
        "eval_items": base.get("eval_items"),
        "stage1_utterances": base.get("stage1_utterances"),
        "stage1_seconds": base.get("stage1_seconds"),
        "seeds": list(config.seeds),
        "arms": {},
        "clusters": {},
    }
    for arm in config.arms:
        rows, scores, acc_gaps, chosen = [], [], [], {}
        metric = "kl" if arm == ARM_RANDOM else arm
        for index in range(config.rounds + 1):
            done = {s: _round_dir(root, s, arm, index) for s in config.seeds}
            done = {s: d for s, d in done.items() if (d / "round.json").is_file()}
            if not done:
                break
            per_seed = {s: _read(d / "eval.json")["records"] for s, d in done.items()}
            infos = [_read(d / "round.json") for d in done.values()]
            spent_utt = _mean([float(i["spent_utterances"]) for i in infos])
            spent_sec = _mean([float(i["spent_seconds"]) for i in infos])
            rows.append({
                "round": index,
                "seeds": sorted(done),
                "spent": {"utterances": spent_utt, "seconds": spent_sec,
                          "budget_units": spent_utt if config.budget_unit == "utterances" else spent_sec},
                "measures": summarize_measures(per_seed, num_bootstrap=config.bootstrap),
                "probe": _probe_means([_read(d / "probe_after.json")["records"] for d in done.values()]),
            })  # fmt: skip
            probes = [_read(d / "probe_after.json")["cluster_scores"] for d in done.values()]
            scores.append(_cluster_means([p[metric] for p in probes]))
            acc_gaps.append(_cluster_means([p["acc_gap"] for p in probes]))
            if index > 0:
                for s, d in done.items():
                    chosen.setdefault(str(s), []).append(_read(d / "selection.json")["chosen_clusters"])
        report["arms"][arm] = rows
        report["clusters"][arm] = {"metric": metric, "scores": scores, "acc_gap": acc_gaps, "chosen": chosen}
    return report


def _probe_means(per_seed: list[list[dict[str, Any]]]) -> dict[str, float | None]:
    """Over every probe item (all clusters), the mean over seeds of the item means of KL and JS, and of the
    accuracy gap (teacher text accuracy - student speech accuracy)."""
    out: dict[str, float | None] = {}
    for key in ("kl", "js"):
        out[key] = _mean([_mean([float(r[key]) for r in records]) or 0.0 for records in per_seed if records])
    gaps = [
        _mean([float(r["teacher_correct"]) - float(r["student_correct"]) for r in records]) or 0.0
        for records in per_seed
        if records
    ]
    out["acc_gap"] = _mean(gaps)
    return out


def _cluster_means(per_seed: list[list[float | None]]) -> list[float | None]:
    out = []
    for values in zip(*per_seed):
        present = [float(v) for v in values if v is not None]
        out.append(_mean(present))
    return out


def plot_clusters(report: dict[str, Any], path: Path) -> Path | None:
    """``gap_per_cluster.png`` (module docstring); ``None`` when no arm has a round yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a, c in report["clusters"].items() if c["scores"]]
    if not arms:
        return None
    fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 3.8), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        data = report["clusters"][arm]
        rounds = list(range(len(data["scores"])))
        clusters = len(data["scores"][0])
        colours = plt.get_cmap("tab10" if clusters <= 10 else "tab20")
        for c in range(clusters):
            ys = [r[c] if r[c] is not None else float("nan") for r in data["scores"]]
            ax.plot(rounds, ys, marker="o", color=colours(c % 20), label=f"cluster {c}")
            # chosen: a round's selection was made on the previous round's measures
            for seed_rounds in data["chosen"].values():
                for r, chosen in enumerate(seed_rounds, start=1):
                    if c in chosen and r - 1 < len(ys):
                        ax.scatter([r - 1], [ys[r - 1]], s=140, facecolors="none", edgecolors="black", zorder=3)
        ax.set_title(f"{arm}: cluster {data['metric']} per round")
        ax.set_xlabel("round (0 = after Stage I; circled: chosen for the next round)")
        ax.set_ylabel(f"probe {data['metric']} (mean over seeds)")
        ax.set_xticks(rounds)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_budget(report: dict[str, Any], path: Path) -> Path | None:
    """``measures_vs_budget.png`` (module docstring); ``None`` when no arm has a round yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a, rows in report["arms"].items() if rows]
    if not arms:
        return None
    titles = {"gap": "text-speech gap (text - speech)", "speech_accuracy": "speech accuracy",
              "text_accuracy": "text accuracy (forgetting)"}  # fmt: skip
    titles["probe_kl"] = "probe KL(teacher on text || student on speech)"
    fig, axes = plt.subplots(1, 4, figsize=(20, 3.8))
    for ax, measure in zip(axes, ("gap", "speech_accuracy", "text_accuracy", "probe_kl")):
        for arm in arms:
            rows = report["arms"][arm]
            xs = [r["spent"]["budget_units"] for r in rows]
            if measure == "probe_kl":
                ax.plot(xs, [r["probe"]["kl"] for r in rows], marker="o", label=arm)
                continue
            values = [r["measures"][measure] for r in rows]
            ys = [v["value"] for v in values]
            line = ax.plot(xs, ys, marker="o", label=arm)[0]
            if all(v["low"] is not None for v in values):
                ax.fill_between(xs, [v["low"] for v in values], [v["high"] for v in values],
                                color=line.get_color(), alpha=0.15)  # fmt: skip
        if measure == "text_accuracy" and report.get("teacher_text_accuracy") is not None:
            ax.axhline(report["teacher_text_accuracy"], color="grey", linestyle="--", label="text teacher")
        ax.set_title(titles[measure])
        ax.set_xlabel(f"synthesis budget spent after Stage I ({report['budget_unit']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ci(estimate: dict[str, Any]) -> str:
    if estimate.get("value") is None:
        return "n/a"
    if estimate.get("low") is None:
        return f"{estimate['value']:.3f}"
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report's tables as Markdown: measures per arm and round, then the gap per voice at the last round."""
    unit = report["budget_unit"]
    lines = [
        f"| arm | round | new speech ({unit}) | speech accuracy | text accuracy | gap (text - speech) | probe KL |",
        "|---|---|---|---|---|---|---|",
    ]
    stage1_shown = False
    for arm, rows in report["arms"].items():
        for row in rows:
            if row["round"] == 0 and stage1_shown:
                continue  # Stage I is shared by every arm: one row
            stage1_shown = stage1_shown or row["round"] == 0
            m = row["measures"]
            name = "Stage I" if row["round"] == 0 else arm
            spent = row["spent"]["budget_units"]
            lines.append(
                f"| {name} | {row['round']} | {spent:g} | {_ci(m['speech_accuracy'])} | {_ci(m['text_accuracy'])} "
                f"| {_ci(m['gap'])} | {_fmt(row.get('probe', {}).get('kl'))} |"
            )
    voices = sorted(
        {v for rows in report["arms"].values() for r in rows[-1:] for v in r["measures"].get("per_voice", {})}
    )
    if voices:
        lines += ["", f"Gap per voice at the last round ({', '.join(voices)}):", ""]
        lines += ["| arm | " + " | ".join(voices) + " |", "|---|" + "---|" * len(voices)]
        for arm, rows in report["arms"].items():
            if rows:
                per_voice = rows[-1]["measures"].get("per_voice", {})
                cells = [_ci(per_voice[v]["gap"]) if v in per_voice else "n/a" for v in voices]
                lines.append(f"| {arm} (round {rows[-1]['round']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(root: Path, config: SaladConfig) -> dict[str, Any]:
    """``report.json``, ``report.md`` and both plots in ``root``; returns the report (with the plots' paths)."""
    report = collect_report(root, config)
    plots = {"clusters": plot_clusters(report, root / "gap_per_cluster.png"),
             "budget": plot_budget(report, root / "measures_vs_budget.png")}  # fmt: skip
    report["plots"] = {k: None if v is None else str(v) for k, v in plots.items()}
    write_text_atomic(root / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(root / "report.md", format_markdown(report))
    return report
