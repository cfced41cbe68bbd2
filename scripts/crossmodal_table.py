"""The forgetting and modality-gap table of the text-teacher methods (issue 14's measures) on the built-in data.

What it runs, in a work folder (a temporary one unless ``--work``):

1. the built-in spoken-QA set (:func:`caad.data.spoken_qa.synthesize_spoken_qa`; 78% train, 2% validation,
   20% test) and one tokenizer for every model;
2. the **text teacher**: a tiny Llama (hidden 128) trained on the text of the train split
   (:func:`caad.models.text_lm.train_text_lm`);
3. the **student before distillation**: the tiny composite speech LM (hidden 64) whose language model was
   first trained the same way on the text (a speech LM built on a text LM that knows the task), its audio
   encoder and projector untrained;
4. per seed, each arm trains that student on the spoken train split through the shared trainer
   (:func:`caad.train.train`), the same steps, batch and learning rate for all:

   ================  =================================================================================
   arm               what
   ================  =================================================================================
   ``ce_only``       CE on the spoken query only, distillation off (``crossmodal``, kd_weight 0, s2t)
   ``crossmodal``    cross-modal KD, both channels (t2t + s2t), KD + CE
   ``crossmodal_s2t``  cross-modal KD, speech-to-text channel only
   ``crossmodal_t2t``  cross-modal KD, text-to-text channel only (never hears speech)
   ``sourcewise``    source-wise KD, fixed weights 0.5 / 0.5: the text teacher and an acoustic teacher,
                     the ``ce_only`` student of the same seed (a speech LM trained on the spoken set)
   ``layerwise``     layer-wise KD from the text teacher: uniform layer map, MSE through learned
                     projections (64 -> 128), plus output KD and CE
   ================  =================================================================================

5. every model answers the spoken test split greedily, each utterance heard and each question read as
   text (:mod:`caad.eval.modality_gap`); the measures (text and speech accuracy, modality gap,
   forgetting against the student before distillation, gap to the teacher) with 95% bootstrap intervals
   over items and seeds.

Written to ``--out`` (default ``results/crossmodal``), which must not exist or be empty, unless
``--overwrite`` (then only a folder this script wrote is replaced, once the new results are complete):
``results.json`` (settings, command, commit, machine, timings, every measure), ``results.md`` (the table),
``crossmodal_table.png`` (text vs speech accuracy per arm), ``records.jsonl`` (every scored answer).

Run (defaults: 3 seeds x 6 arms x 300 steps; about 13 minutes of CPU time at one thread, measured as 12.8 min
user + system time, so about 13-15 minutes on 2 quiet cores; 32 minutes of wall time on a 2-core machine shared
with other busy processes)::

    OMP_NUM_THREADS=2 .venv/bin/python scripts/crossmodal_table.py --out results/crossmodal
    .venv/bin/python scripts/crossmodal_table.py --out /tmp/t --seeds 0 --steps 5 --num-examples 60 \\
        --teacher-steps 20 --student-text-steps 20 --arms ce_only crossmodal   # a smoke run, ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: The files this script writes into ``--out``; an existing folder holding anything else is never replaced.
OUTPUT_FILES = ("results.json", "results.md", "crossmodal_table.png", "records.jsonl")
MARKER = "results.json"
#: train / validation / test fractions of the utterances: a small validation split (for configs/crossmodal*.yaml's
#: validation_manifest; the table does not read it) and a larger test split.
SPLITS = (0.78, 0.02, 0.2)

#: arm -> one line on what it does (module docstring), in run order (``sourcewise`` needs ``ce_only``).
ARMS: dict[str, str] = {
    "ce_only": "CE on spoken queries, no teacher (kd_weight 0, s2t)",
    "crossmodal": "cross-modal KD, t2t + s2t",
    "crossmodal_s2t": "cross-modal KD, s2t only",
    "crossmodal_t2t": "cross-modal KD, t2t only",
    "sourcewise": "source-wise KD, fixed 0.5/0.5 (text + acoustic teacher)",
    "layerwise": "layer-wise KD (uniform map, MSE, projections) + output KD",
}
REFERENCES: dict[str, str] = {
    "text_teacher": "text teacher (reference)",
    "pre_distillation": "student before distillation (reference)",
}


# ---- arguments and the output folder --------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="results/crossmodal", help="results folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier table in --out")
    parser.add_argument("--work", default=None, help="keep the data and models here (default: a temporary folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms to run (default all)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per arm and seed")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine, 10%% warm-up)")
    parser.add_argument("--num-examples", type=int, default=600, help="spoken utterances (78/2/20%% train/val/test)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the spoken-QA set and the models")
    parser.add_argument("--teacher-steps", type=int, default=300, help="text teacher pre-training steps")
    parser.add_argument("--student-text-steps", type=int, default=500, help="student LM text pre-training steps")
    parser.add_argument("--audio-window", type=int, default=4, help="student audio window in seconds (tiny: 10)")
    parser.add_argument("--num-bootstrap", type=int, default=1000, help="bootstrap replicates of the intervals")
    parser.add_argument("--workers", type=int, default=1, help="synthesis processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="build the set, the text teacher and the student in --work, then stop (for configs/crossmodal*.yaml)",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "num_examples", "teacher_steps", "student_text_steps", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.audio_window <= 30:
        parser.error(f"--audio-window must be 1-30 seconds, got {args.audio_window}")
    if args.num_bootstrap < 0:
        parser.error(f"--num-bootstrap must be >= 0, got {args.num_bootstrap}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.setup_only and not args.work:
        parser.error("--setup-only needs --work (where to keep what it builds)")
    if "sourcewise" in args.arms and "ce_only" not in args.arms:
        parser.error("--arms: sourcewise needs ce_only (its acoustic teacher is the ce_only student)")
    args.arms = [arm for arm in ARMS if arm in args.arms]
    return args


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that would lose something: a ``FileExistsError`` naming what and why."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"--out {out} is not empty ({', '.join(entries[:4])}); pass --overwrite to replace it")
    if MARKER not in entries:
        raise FileExistsError(f"--out {out} holds no {MARKER}: not a table of this script; refusing to replace it")
    foreign = [name for name in entries if name not in OUTPUT_FILES]
    if foreign:
        raise FileExistsError(f"--out {out} holds files this script did not write ({', '.join(foreign[:4])})")


def _move_into_place(staging: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- provenance ---------------------------------------------------------------------------------


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(argv: Sequence[str]) -> dict[str, Any]:
    """The command, the commit (and whether the tree has uncommitted changes), the machine."""
    import torch

    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_run(["git", "status", "--porcelain"]))
    lscpu = _run(["lscpu"])
    return {
        "command": " ".join(
            [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
        )
        + " python scripts/crossmodal_table.py "
        + " ".join(shlex.quote(a) for a in argv),
        "commit": commit,
        "uncommitted_changes": dirty,
        "lscpu_head": "\n".join((lscpu or "").splitlines()[:10]),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ---- setup: data, teacher, student --------------------------------------------------------------


def build_setup(args: argparse.Namespace, work: Path, progress: bool) -> dict[str, Any]:
    """The spoken-QA set, the tokenizer, the text teacher and the student before distillation, in ``work``."""
    from caad.data.spoken_qa import qa_tokenizer_texts, synthesize_spoken_qa
    from caad.data.spoken_qa_items import all_items
    from caad.models import build_speech_lm, train_tokenizer
    from caad.models.text_lm import build_tiny_text_lm, save_text_lm, train_text_lm
    from caad.models.tiny import tiny_composite_config

    timings: dict[str, float] = {}
    started = time.perf_counter()
    paths = synthesize_spoken_qa(
        work / "set",
        num_examples=args.num_examples,
        seed=args.data_seed,
        splits=SPLITS,
        workers=args.workers,
        progress=progress,
    )
    timings["synthesis_s"] = time.perf_counter() - started
    tokenizer = train_tokenizer(qa_tokenizer_texts(all_items()), vocab_size=400)
    train_items = paths.items("train")
    queries, answers = [item.text_query for item in train_items], [item.answer for item in train_items]

    started = time.perf_counter()
    teacher = build_tiny_text_lm(tokenizer, seed=args.data_seed)
    train_text_lm(
        teacher, tokenizer, queries, answers, steps=args.teacher_steps, seed=args.data_seed, progress=progress
    )
    save_text_lm(teacher, tokenizer, work / "text_teacher")
    timings["text_teacher_s"] = time.perf_counter() - started

    started = time.perf_counter()
    config = tiny_composite_config(tokenizer, role="student")
    config.audio_config.max_source_positions = args.audio_window * 50
    student = build_speech_lm(config, tokenizer, seed=args.data_seed + 1)
    train_text_lm(
        student.model.language_model,
        tokenizer,
        queries,
        answers,
        steps=args.student_text_steps,
        seed=args.data_seed + 1,
        progress=progress,
    )
    student.save_pretrained(work / "student")
    timings["student_text_s"] = time.perf_counter() - started
    return {
        "paths": paths,
        "text_teacher": work / "text_teacher",
        "student": work / "student",
        "timings": timings,
        "train_text_items": len(train_items),
    }


# ---- the arms -----------------------------------------------------------------------------------


def arm_method(arm: str, setup: dict[str, Any], args: argparse.Namespace, seed: int, out: Path, first: bool) -> Any:
    """The method object (config included) of ``arm`` for ``seed``, writing into ``out``."""
    common = dict(
        train_manifest=str(setup["paths"].train),
        student=str(setup["student"]),
        output_dir=str(out),
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=args.lr,
        scheduler="cosine",
        warmup_ratio=0.1,
        seed=seed,
        save_every=0,
        keep_checkpoints=1,
        log_every=5,
        progress=False,
        tensorboard=False,
        data_check=first,  # the same manifest every run: check it once
        kd_weight=0.5,
        ce_weight=0.5,
        temperature=2.0,
    )
    teacher = str(setup["text_teacher"])
    if arm.startswith("crossmodal") or arm == "ce_only":
        from caad.methods.crossmodal import CrossModalConfig, CrossModalMethod

        channels = {
            "ce_only": dict(t2t=False, s2t=True, kd_weight=0.0, ce_weight=1.0),
            "crossmodal": dict(t2t=True, s2t=True),
            "crossmodal_s2t": dict(t2t=False, s2t=True),
            "crossmodal_t2t": dict(t2t=True, s2t=False),
        }[arm]
        return CrossModalMethod(CrossModalConfig(**{**common, **channels, "teacher": teacher}), "crossmodal")
    if arm == "sourcewise":
        from caad.methods.sourcewise import SourceWiseConfig, SourceWiseMethod

        acoustic = str(out.parent.parent / "ce_only" / f"seed{seed}" / "final")
        config = SourceWiseConfig(
            **common,
            text_teacher=teacher,
            acoustic_teacher=acoustic,
            weighting="fixed",
            text_weight=0.5,
            acoustic_weight=0.5,
        )
        return SourceWiseMethod(config, "sourcewise")
    if arm == "layerwise":
        from caad.methods.layerwise import LayerWiseConfig, LayerWiseMethod

        config = LayerWiseConfig(
            **common, teacher=teacher, teacher_kind="text", student_input="s2t", hidden_loss="mse", hidden_weight=1.0
        )
        return LayerWiseMethod(config, "layerwise")
    raise ValueError(f"unknown arm {arm!r}")


# ---- the report ---------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the table with its command, commit and machine."""
    from caad.eval.modality_gap import format_estimate

    prov, settings = results["provenance"], results["settings"]
    tree = "the uncommitted working tree on top of it" if prov["uncommitted_changes"] else "a clean tree"
    lines = [
        "# Forgetting and modality gap of the text-teacher methods (built-in spoken QA, test split)",
        "",
        f"Command: `{prov['command']}`  ",
        f"Commit: `{prov['commit']}` ({tree}); torch {prov['torch']}, {prov['torch_threads']} thread(s); "
        f"wall time {results['wall_s'] / 60:.1f} min.",
        "",
        f"Test split: {results['test']['utterances']} utterances of {results['test']['items']} questions "
        f"(held-out combinations); chance (uniform guess among each question's choices): "
        f"{100 * results['test']['chance_accuracy']:.1f}%. Seeds {settings['seeds']}; {settings['steps']} steps of "
        f"{settings['batch_size']} examples per arm and seed, lr {settings['lr']}; 95% bootstrap intervals over "
        f"items and seeds. All numbers in percent (points for differences; a positive difference means the "
        f"student is worse).",
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
        lines.append(f"| `{name}` | {row['description']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed (text / speech accuracy, %): "
        + "; ".join(
            f"`{name}` "
            + ", ".join(
                f"s{s}: {_pct(v['text_accuracy'])}/{_pct(v['speech_accuracy'])}" for s, v in row["per_seed"].items()
            )
            for name, row in results["rows"].items()
            if name in ARMS
        ),
        "",
        f"Timings (s): {json.dumps({k: round(v, 1) for k, v in results['timings'].items()})}",
        "",
        "Machine (`lscpu | head`):",
        "",
        "```",
        prov["lscpu_head"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Text and speech accuracy per row with their intervals, chance as a dashed line (PNG)."""
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
            values.append(np.nan if v is None else 100 * v)
            low.append(0.0 if v is None or e["low"] is None else 100 * (v - e["low"]))
            high.append(0.0 if v is None or e["high"] is None else 100 * (e["high"] - v))
        ax.bar(x + offset, values, width=0.4, yerr=[low, high], capsize=3, label=label)
    ax.axhline(100 * results["test"]["chance_accuracy"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylabel("accuracy on the test split (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Spoken vs text queries of the same items (95% bootstrap intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Everything of the module docstring; returns the results and every scored record."""
    started_on = provenance(argv)  # before anything runs: the commit and tree the run began on
    import torch
    from tqdm.auto import tqdm

    from caad.data.manifest import read_manifest
    from caad.eval.modality_gap import modality_measures, student_records, text_teacher_records
    from caad.models import load_speech_lm
    from caad.models.text_lm import load_text_lm
    from caad.train import train

    progress = not args.no_progress
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crossmodal-table-") as temporary:
        work = Path(args.work) if args.work else Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        setup = build_setup(args, work, progress)
        rows = read_manifest(setup["paths"].test)
        chance = sum(1.0 / len(row.choices) for row in rows) / len(rows)
        records: dict[str, dict[int, list[dict[str, Any]]]] = {}
        timings = dict(setup["timings"])

        eval_start = time.perf_counter()
        teacher, tokenizer = load_text_lm(setup["text_teacher"])
        records["text_teacher"] = {0: text_teacher_records(teacher, tokenizer, rows)}
        pre = load_speech_lm(setup["student"])
        records["pre_distillation"] = {0: student_records(pre, rows, progress=False)}
        timings["eval_references_s"] = time.perf_counter() - eval_start

        units = [(arm, seed) for arm in args.arms for seed in args.seeds]
        train_seconds: dict[str, list[float]] = {}
        with tqdm(total=len(units), desc="arms x seeds", unit="run", disable=not progress) as bar:
            for index, (arm, seed) in enumerate(units):
                bar.set_postfix(arm=arm, seed=seed)
                out = work / "runs" / arm / f"seed{seed}"
                t0 = time.perf_counter()
                result = train(arm_method(arm, setup, args, seed, out, first=index == 0))
                train_seconds.setdefault(arm, []).append(time.perf_counter() - t0)
                model = load_speech_lm(result.final_model)
                records.setdefault(arm, {})[seed] = student_records(model, rows, progress=False)
                del model
                shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only final/ is read later
                bar.update(1)
        timings["arms_s"] = sum(sum(v) for v in train_seconds.values())
        train_utterances = len(read_manifest(setup["paths"].train))

    rows_out: dict[str, Any] = {}
    for name in [*REFERENCES, *args.arms]:
        per_seed = records[name]
        references = (
            {} if name in REFERENCES else {"pre": records["pre_distillation"], "teacher": records["text_teacher"]}
        )
        measures = modality_measures(per_seed, **references, num_bootstrap=args.num_bootstrap, seed=0)
        by_seed = {seed: modality_measures(values, num_bootstrap=0) for seed, values in per_seed.items()}
        rows_out[name] = {
            "description": ARMS.get(name) or REFERENCES[name],
            "measures": measures,
            "per_seed": {
                seed: {k: m[k]["value"] for k in ("text_accuracy", "speech_accuracy")} for seed, m in by_seed.items()
            },
            "train_seconds": train_seconds.get(name),
        }
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "work")},
        "provenance": started_on,
        "test": {
            "utterances": len(rows),
            "items": len({row.group for row in rows}),
            "chance_accuracy": chance,
            "train_text_items": setup["train_text_items"],
            "train_utterances": train_utterances,
        },
        "rows": rows_out,
        "timings": timings,
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    flat = [
        {"row": name, "seed": seed, **record}
        for name, per_seed in records.items()
        for seed, values in per_seed.items()
        for record in values
    ]
    return results, flat


def write_outputs(out: Path, results: dict[str, Any], records: list[dict[str, Any]], overwrite: bool) -> None:
    """Write every output into a staging folder, then move it into ``out`` (checked again first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (staging / "results.md").write_text(markdown(results), encoding="utf-8")
        with open(staging / "records.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        plot(results, staging / "crossmodal_table.png")
        check_out_dir(out, overwrite)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.setup_only:
        setup = build_setup(args, Path(args.work), not args.no_progress)
        print(f"built in {args.work}: set/ text_teacher/ student/ ({json.dumps(setup['timings'])})")
        return 0
    out = Path(args.out)
    try:
        check_out_dir(out, args.overwrite)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results, records = run(args, argv)
    write_outputs(out, results, records, args.overwrite)
    print(markdown(results))
    print(f"written to {out}/ ({', '.join(OUTPUT_FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
