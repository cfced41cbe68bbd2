"""TinyWave's table on the built-in corpus: the teacher, the distilled student with and without each term.

What it does (everything local, CPU by default):

1. data: the built-in speech corpus (:func:`caad.data.synthesize_corpus`); a speech-unit tokenizer
   trained on the train clips (:func:`caad.data.units.train_unit_tokenizer`); interleaved examples of
   the train clips (speech, text, speech->text, text->speech: :func:`caad.data.interleaved.build_examples`);
   on the held-out clips (validation + test) the speech continuations and the StoryCloze-style pairs
   (:mod:`caad.eval.speech_lm`). Prepared once into ``--work`` and reused;
2. the teacher unit LM (``UNIT_LM_SIZES["teacher"]``) trained first: method ``tinywave`` with no teacher
   (next-token CE);
3. per seed, one student initialisation (``"student"`` size, ~3x fewer parameters) trained per arm:
   ``full`` (hidden + attention + logits + CE), ``no_hidden``, ``no_attention``, ``no_logits`` (one term
   off), ``no_kd`` (CE only: the student trained without distillation); same data order and steps;
4. every model scored: normalised perplexity of the speech continuations (per 20 ms of audio) and
   StoryCloze-style accuracy (summed log-likelihood, and PMI scoring), the student's accuracy as a
   fraction of the teacher's. 95% intervals: percentile bootstrap over the held-out items (the same
   resample for teacher and students, each seed's student scored on it, then the mean over seeds).

Writes ``results.json``, ``results.md`` (command, commit, machine, wall time) and ``tinywave.png`` into
``--out`` (refused when it holds results unless ``--overwrite``). Run from the repository root::

    OMP_NUM_THREADS=1 python scripts/tinywave_table.py --out results/tinywave
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ARMS: dict[str, dict[str, float]] = {
    "full": dict(hidden_weight=1.0, attention_weight=1.0, logit_weight=1.0),
    "no_hidden": dict(hidden_weight=0.0, attention_weight=1.0, logit_weight=1.0),
    "no_attention": dict(hidden_weight=1.0, attention_weight=0.0, logit_weight=1.0),
    "no_logits": dict(hidden_weight=1.0, attention_weight=1.0, logit_weight=0.0),
    "no_kd": dict(hidden_weight=0.0, attention_weight=0.0, logit_weight=0.0),
}
KINDS = ("speech", "text", "speech_text", "text_speech")
RESULT_FILES = ("results.json", "results.md", "tinywave.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="results/tinywave", help="results folder")
    parser.add_argument("--work", default="runs/tinywave_table", help="prepared data, models and training runs")
    parser.add_argument("--overwrite", action="store_true", help="replace results (and runs) already there")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="student arms")
    parser.add_argument("--corpus-size", type=int, default=200, help="audio items of the built-in corpus")
    parser.add_argument("--n-units", type=int, default=64, help="speech units (k-means clusters)")
    parser.add_argument("--teacher-steps", type=int, default=400, help="optimizer steps of the teacher")
    parser.add_argument("--student-steps", type=int, default=150, help="optimizer steps of each student")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training sequence at most")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the intervals")
    args = parser.parse_args(argv)
    for name in ("corpus_size", "n_units", "teacher_steps", "student_steps", "batch_size", "max_length", "bootstrap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


# ---- data -----------------------------------------------------------------------------------------------


def prepare_data(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Corpus, unit tokenizer, LM tokenizer, training examples, continuations and cloze pairs (cached)."""
    from caad.data import load_audio, synthesize_corpus
    from caad.data.interleaved import build_examples, corpus_clips, write_examples
    from caad.data.units import UnitTokenizer, train_unit_tokenizer
    from caad.eval.speech_lm import ClozePair, SpeechContinuation, build_cloze_pairs, speech_continuations
    from caad.models.unit_lm import build_unit_lm_tokenizer

    data = work / "data"
    done = data / "prepared.json"
    settings = {"corpus_size": args.corpus_size, "n_units": args.n_units, "kinds": list(KINDS)}
    if done.is_file() and json.loads(done.read_text())["settings"] == settings:
        info = json.loads(done.read_text())
        from transformers import AutoTokenizer

        return {
            "units": UnitTokenizer.load(data / "lm_tokenizer"),
            "tokenizer": AutoTokenizer.from_pretrained(data / "lm_tokenizer", local_files_only=True),
            "train": data / "train.jsonl",
            "validation": data / "validation.jsonl",
            "continuations": [SpeechContinuation(**c) for c in info["continuations"]],
            "pairs": [ClozePair(**p) for p in info["pairs"]],
            "stats": info["stats"],
        }
    data.mkdir(parents=True, exist_ok=True)
    corpus = synthesize_corpus(data / "corpus", num_examples=args.corpus_size, seed=0, overwrite=True)
    train_clips = corpus_clips(corpus.train)
    held_out = corpus_clips([corpus.validation, corpus.test])
    units = train_unit_tokenizer(
        [load_audio(c.audio_path) for c in train_clips], n_units=args.n_units, seed=0, progress=True
    )
    tokenizer = build_unit_lm_tokenizer([c.transcript for c in train_clips], args.n_units, vocab_size=512)
    tokenizer.save_pretrained(data / "lm_tokenizer")
    units.save(data / "lm_tokenizer", overwrite=True)
    examples = build_examples(train_clips, units, kinds=KINDS, seed=0, progress=True)
    write_examples(data / "train.jsonl", examples, overwrite=True)
    validation = build_examples(held_out[:8], units, kinds=("speech",), seed=0)
    write_examples(data / "validation.jsonl", validation, overwrite=True)
    continuations = speech_continuations(held_out, units)
    pairs = build_cloze_pairs(held_out, units, seed=0)
    stats = {
        "train_clips": len(train_clips),
        "held_out_clips": len(held_out),
        "train_examples": len(examples),
        "continuations": len(continuations),
        "cloze_pairs": len(pairs),
        "unit_rate_hz": units.stats.get("unit_rate_hz"),
        "units_used": units.stats.get("units_used"),
    }
    info = {
        "settings": settings,
        "stats": stats,
        "continuations": [c.__dict__ for c in continuations],
        "pairs": [p.__dict__ for p in pairs],
    }
    done.write_text(json.dumps(info) + "\n")
    return prepare_data(work, args)


# ---- training ---------------------------------------------------------------------------------------------


def train_unit_lm(
    run_dir: Path,
    student: Path,
    teacher: Path | None,
    weights: dict[str, float],
    data: dict,
    args: argparse.Namespace,
    steps: int,
    lr: float,
    seed: int,
) -> Path:
    """One trainer run of method ``tinywave``; returns the trained model's folder."""
    from caad.methods.tinywave import TinyWaveConfig, TinyWaveMethod
    from caad.train import train

    config = TinyWaveConfig(
        train_manifest=str(data["train"]),
        validation_manifest=str(data["validation"]),
        student=str(student),
        teacher=None if teacher is None else str(teacher),
        output_dir=str(run_dir),
        overwrite=True,
        max_steps=steps,
        batch_size=args.batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 20),
        scheduler="cosine",
        min_lr_ratio=0.1,
        max_length=args.max_length,
        save_every=0,
        keep_checkpoints=1,
        eval_every=steps,
        log_every=max(1, steps // 10),
        seed=seed,
        tensorboard=False,
        **weights,
    )
    return train(TinyWaveMethod(config)).final_model


# ---- measures -------------------------------------------------------------------------------------------


def per_item_scores(model_dir: Path, data: dict) -> dict[str, np.ndarray]:
    """Per continuation: nll (nats) and seconds; per cloze pair: the margins (sum and PMI scoring)."""
    import torch

    from caad.data.interleaved import UnitVocab
    from caad.eval.speech_lm import cloze_accuracy, continuation_log_probs
    from caad.models.unit_lm import load_unit_lm

    lm = load_unit_lm(model_dir)
    vocab = UnitVocab.from_tokenizer(lm.tokenizer)
    head = [] if vocab.bos_id is None else [vocab.bos_id]
    items = data["continuations"]
    prompts = [head + [vocab.speech_id] + [vocab.first_unit_id + u for u in c.prompt_units] for c in items]
    conts = [[vocab.first_unit_id + u for u in c.continuation_units] for c in items]
    with torch.no_grad():
        log_probs = continuation_log_probs(lm.model, prompts, conts, vocab.pad_id, batch_size=16)
        margins = {
            scoring: np.asarray(cloze_accuracy(lm.model, vocab, data["pairs"], scoring=scoring)["margins"])
            for scoring in ("sum", "pmi")
        }
    return {
        "nll": np.array([-lp.sum() for lp in log_probs]),
        "seconds": np.array([c.continuation_seconds for c in items]),
        "margin_sum": margins["sum"],
        "margin_pmi": margins["pmi"],
    }


def _accuracy(margins: np.ndarray) -> np.ndarray:
    """Accuracy along the last axis (ties count one half)."""
    return np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0)).mean(-1)


def _nppl(nll: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    return np.exp(nll.sum(-1) / (seconds.sum(-1) * 50.0))


def summarise(scores: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Point values and bootstrap intervals (module docstring) of every arm and the teacher."""
    rng = np.random.default_rng(0)
    teacher = scores["teacher"]
    n_cont, n_pairs = teacher["nll"].size, teacher["margin_sum"].size
    cont_idx = rng.integers(0, n_cont, size=(args.bootstrap, n_cont))
    pair_idx = rng.integers(0, n_pairs, size=(args.bootstrap, n_pairs))

    def measures(s: dict[str, np.ndarray], cont: Any, pair: Any) -> dict[str, np.ndarray]:
        return {
            "normalised_perplexity": _nppl(s["nll"][cont], s["seconds"][cont]),
            "cloze_accuracy": _accuracy(s["margin_sum"][pair]),
            "cloze_accuracy_pmi": _accuracy(s["margin_pmi"][pair]),
        }

    full = slice(None)
    t_point, t_boot = measures(teacher, full, full), measures(teacher, cont_idx, pair_idx)
    out: dict[str, Any] = {"teacher": {k: {"value": float(v), "ci95": _ci(t_boot[k])} for k, v in t_point.items()}}
    for arm in args.arms:
        per_seed = [scores[f"{arm}/seed{seed}"] for seed in args.seeds]
        points = [measures(s, full, full) for s in per_seed]
        boots = [measures(s, cont_idx, pair_idx) for s in per_seed]
        row: dict[str, Any] = {}
        for key in t_point:
            value = float(np.mean([p[key] for p in points]))
            boot = np.mean([b[key] for b in boots], axis=0)
            row[key] = {"value": value, "ci95": _ci(boot), "per_seed": [float(p[key]) for p in points]}
        for key, base in (("cloze_accuracy", "cloze_accuracy"), ("cloze_accuracy_pmi", "cloze_accuracy_pmi")):
            ratio = [p[base] / t_point[base] for p in points]
            boot = np.mean([b[base] for b in boots], axis=0) / np.maximum(t_boot[base], 1e-9)
            row[f"{key}_fraction_of_teacher"] = {
                "value": float(np.mean(ratio)),
                "ci95": _ci(boot),
                "per_seed": [float(r) for r in ratio],
            }
        gap = [p["normalised_perplexity"] - t_point["normalised_perplexity"] for p in points]
        boot = np.mean([b["normalised_perplexity"] for b in boots], axis=0) - t_boot["normalised_perplexity"]
        row["normalised_perplexity_gap"] = {
            "value": float(np.mean(gap)),
            "ci95": _ci(boot),
            "per_seed": [float(g) for g in gap],
        }
        out[arm] = row
    return out


def _ci(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


# ---- reporting --------------------------------------------------------------------------------------------


def _fmt(entry: dict[str, Any], digits: int = 2, percent: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    value, (low, high) = entry["value"] * scale, [x * scale for x in entry["ci95"]]
    unit = "%" if percent else ""
    return f"{value:.{digits}f}{unit} [{low:.{digits}f}, {high:.{digits}f}]"


def write_markdown(path: Path, summary: dict, meta: dict, args: argparse.Namespace) -> None:
    labels = {
        "full": "distilled (hidden + attention + logits)",
        "no_hidden": "distilled, without hidden states",
        "no_attention": "distilled, without attention maps",
        "no_logits": "distilled, without logits",
        "no_kd": "trained without distillation",
    }
    t = summary["teacher"]
    lines = [
        "# TinyWave on the built-in corpus",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: {meta['commit']}  ",
        f"Machine: {meta['machine']}  ",
        f"Wall time: {meta['wall_time_s'] / 60:.1f} min  ",
        f"Data: {meta['data']}  ",
        f"Models: teacher {meta['parameters']['teacher']:,} parameters, student {meta['parameters']['student']:,} "
        f"({meta['parameters']['teacher'] / meta['parameters']['student']:.1f}x fewer); teacher "
        f"{args.teacher_steps} steps, each student {args.student_steps} steps, batch {args.batch_size}, "
        f"seeds {args.seeds}",
        "",
        "Normalised perplexity: per 20 ms of held-out speech continuation (lower is better). StoryCloze-style: "
        "which of two synthesised endings the model prefers (chance 50%), summed log-likelihood (sSC-style) and "
        "PMI scoring. Student values: mean over seeds; [95% interval]: bootstrap over held-out items, the same "
        "resample for teacher and students.",
        "",
        "| model | normalised perplexity | gap to teacher | StoryCloze (sum) | fraction of teacher | "
        "StoryCloze (PMI) | fraction of teacher |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {_fmt(t['normalised_perplexity'])} | - | {_fmt(t['cloze_accuracy'], 1, True)} | 100% | "
        f"{_fmt(t['cloze_accuracy_pmi'], 1, True)} | 100% |",
    ]
    for arm in args.arms:
        r = summary[arm]
        lines.append(
            f"| {labels[arm]} | {_fmt(r['normalised_perplexity'])} | {_fmt(r['normalised_perplexity_gap'])} | "
            f"{_fmt(r['cloze_accuracy'], 1, True)} | {_fmt(r['cloze_accuracy_fraction_of_teacher'], 1, True)} | "
            f"{_fmt(r['cloze_accuracy_pmi'], 1, True)} | {_fmt(r['cloze_accuracy_pmi_fraction_of_teacher'], 1, True)} |"
        )
    lines += ["", "Per seed (normalised perplexity; StoryCloze sum):", ""]
    for arm in args.arms:
        r = summary[arm]
        per = ", ".join(
            f"seed {s}: {p:.2f}; {a * 100:.1f}%"
            for s, p, a in zip(args.seeds, r["normalised_perplexity"]["per_seed"], r["cloze_accuracy"]["per_seed"])
        )
        lines.append(f"- {arm}: {per}")
    lines += ["", "![TinyWave table](tinywave.png)", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, summary: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["teacher", *args.arms]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "normalised_perplexity", "normalised perplexity (lower is better)"),
        (axes[1], "cloze_accuracy", "StoryCloze-style accuracy (sum), chance 0.5"),
    ):
        values = [summary[n][key]["value"] for n in names]
        lows = [summary[n][key]["value"] - summary[n][key]["ci95"][0] for n in names]
        highs = [summary[n][key]["ci95"][1] - summary[n][key]["value"] for n in names]
        ax.bar(names, values, yerr=[lows, highs], capsize=4, color=["#555"] + ["#4a7"] * len(args.arms))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        if key == "cloze_accuracy":
            ax.axhline(0.5, color="k", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + uncommitted tree" if dirty.strip() else commit


def _machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, CPU only (no GPU figure)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        print(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them", file=sys.stderr)
        return 2
    started = time.perf_counter()
    from tqdm.auto import tqdm

    from caad.models.unit_lm import UnitLM, build_unit_lm, count_parameters

    work = Path(args.work)
    data = prepare_data(work, args)
    models = work / "models"
    teacher_init = models / "teacher_init"
    UnitLM(build_unit_lm(data["tokenizer"], "teacher", seed=0), data["tokenizer"], data["units"]).save(
        teacher_init, overwrite=True
    )
    no_kd = ARMS["no_kd"]
    teacher = train_unit_lm(
        work / "runs" / "teacher", teacher_init, None, no_kd, data, args, args.teacher_steps, args.teacher_lr, seed=0
    )
    jobs = [(seed, arm) for seed in args.seeds for arm in args.arms]
    scores = {"teacher": per_item_scores(teacher, data)}
    parameters = {"teacher": count_parameters(build_unit_lm(data["tokenizer"], "teacher"))}
    for seed, arm in tqdm(jobs, desc="students", unit="run"):
        init = models / f"student_init_seed{seed}"
        if not (init / "config.json").is_file():
            student_model = build_unit_lm(data["tokenizer"], "student", seed=seed)
            parameters["student"] = count_parameters(student_model)
            UnitLM(student_model, data["tokenizer"], data["units"]).save(init, overwrite=True)
        final = train_unit_lm(
            work / "runs" / f"{arm}_seed{seed}",
            init,
            teacher,
            ARMS[arm],
            data,
            args,
            args.student_steps,
            args.student_lr,
            seed=seed,
        )
        scores[f"{arm}/seed{seed}"] = per_item_scores(final, data)
    parameters.setdefault("student", count_parameters(build_unit_lm(data["tokenizer"], "student")))
    summary = summarise(scores, args)
    stats = data["stats"]
    meta = {
        "command": "OMP_NUM_THREADS="
        + os.environ.get("OMP_NUM_THREADS", "")
        + " python "
        + " ".join(shlex.quote(a) for a in sys.argv),
        "commit": _commit(),
        "machine": _machine(),
        "wall_time_s": time.perf_counter() - started,
        "data": f"{stats['train_clips']} train clips ({stats['train_examples']} interleaved examples), "
        f"{stats['held_out_clips']} held-out clips ({stats['continuations']} continuations, "
        f"{stats['cloze_pairs']} StoryCloze pairs), {args.n_units} units "
        f"({stats['unit_rate_hz']:.1f} units/s after merging)",
        "parameters": parameters,
    }
    out.mkdir(parents=True, exist_ok=True)
    raw = {k: {m: v.tolist() for m, v in s.items()} for k, s in scores.items()}
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "args": vars(args), "summary": summary, "per_item": raw}, indent=1) + "\n"
    )
    write_markdown(out / "results.md", summary, meta, args)
    plot(out / "tinywave.png", summary, args)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
