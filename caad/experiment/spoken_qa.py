"""``caad experiment`` with ``suite: spoken_qa``: the text-teacher methods' ablations, arms x seeds.

Layout of the experiment folder (``output_dir``)::

    experiment.json, config.yaml       marker (one entry per invocation) and the resolved config
    shared/set/                        the built-in spoken-QA set (train/validation/test.jsonl, audio/)
    shared/tokenizer/                  one tokenizer for every model (the QA vocabulary)
    shared/text_teacher/               the text teacher (tiny Llama) trained on the questions' text: the
                                       train split's, or every split's (models.text_knowledge: all)
    shared/student/                    the student before distillation: tiny composite speech LM whose LM
                                       was trained on the same text (part of it in the spoken prompt
                                       format: models.student_spoken_format), + speech alignment when
                                       configured (models.speech_align_steps)
    arms/<ref>/test/                   records.jsonl of a reference arm (text_teacher, pre_distillation)
    arms/<arm>/seed-<s>/train/         a student arm's training (run/final: the trained student)
    arms/<arm>/seed-<s>/test/          records.jsonl: its answers to the test split, spoken and as text
    results.json, results.md, plots/   the report (:mod:`caad.experiment.spoken_qa_report`)

The ``shared/`` folders are what ``configs/crossmodal*.yaml`` point at (``--setup-only`` builds only them).
Every folder above is a unit of :class:`~caad.experiment.store.UnitStore`: finished units are skipped on
``--resume``, a unit whose settings changed is an error, and all of that is checked before anything is
written. A unit's fingerprint holds its settings and its inputs' fingerprints (a sourcewise arm's holds its
acoustic-teacher arm's), so a change upstream is caught downstream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caad.experiment.config import fingerprint
from caad.experiment.harness import ExperimentResult, machine_info
from caad.experiment.spoken_qa_config import QAArm, SpokenQAExperimentConfig
from caad.experiment.store import PlannedUnits, UnitStore, check_experiment_dir, prepare_experiment_dir

__all__ = ["SHARED_UNITS", "plan_spoken_qa_units", "run_spoken_qa_experiment"]

SHARED_UNITS = ("shared/set", "shared/tokenizer", "shared/text_teacher", "shared/student")


def train_unit(arm: str, seed: int) -> str:
    return f"arms/{arm}/seed-{seed}/train"


def eval_unit(arm: QAArm, seed: int | None) -> str:
    return f"arms/{arm.name}/test" if seed is None else f"arms/{arm.name}/seed-{seed}/test"


def final_student(out: Path, arm: str, seed: int) -> Path:
    """Where a student arm's trained student lies."""
    return out / train_unit(arm, seed) / "run" / "final"


# ---- the plan ----------------------------------------------------------------------------------------------


def _shared_settings(config: SpokenQAExperimentConfig) -> dict[str, dict[str, Any]]:
    d, m = config.data, config.models
    data = {k: v for k, v in dataclasses.asdict(d).items() if k != "workers"}
    tokenizer = {"vocab": m.tokenizer_vocab_size, "texts": "qa_tokenizer_texts(all_items())"}
    inputs = {"set": fingerprint(data), "tokenizer": fingerprint(tokenizer)}
    teacher = {**inputs, "steps": m.teacher_steps, "seed": d.seed, "model": "build_tiny_text_lm",
               "text_knowledge": m.text_knowledge}
    align = None
    if m.speech_align_steps > 0:
        align = {"steps": m.speech_align_steps, **m.speech_align}
    student = {**inputs, "text_steps": m.student_text_steps, "audio_window": m.audio_window, "seed": d.seed + 1,
               "model": "tiny_composite_config(role=student)", "speech_align": align,
               "text_knowledge": m.text_knowledge, "spoken_format": m.student_spoken_format,
               "sizes": dict(sorted(m.student_sizes.items()))}
    return {"shared/set": data, "shared/tokenizer": tokenizer, "shared/text_teacher": teacher,
            "shared/student": student}


def plan_spoken_qa_units(
    config: SpokenQAExperimentConfig, *, setup_only: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """``[(unit name, settings)]`` in run order (module docstring); ``setup_only``: the shared units."""
    shared = _shared_settings(config)
    units = list(shared.items())
    if setup_only:
        return units
    fp = {name: fingerprint(settings) for name, settings in shared.items()}
    evaluation = {**dataclasses.asdict(config.eval), "set": fp["shared/set"], "split": "test"}
    evaluation.pop("num_bootstrap")  # the report's, not the answers'
    arms = config.ordered_arms()
    for arm in arms:
        if arm.kind == "text_teacher":
            units.append((eval_unit(arm, None), {**evaluation, "model": fp["shared/text_teacher"]}))
        elif arm.kind == "pre_distillation":
            units.append((eval_unit(arm, None), {**evaluation, "model": fp["shared/student"]}))
    trained: dict[str, str] = {}
    for seed in config.seeds:
        for arm in arms:
            if not arm.is_student:
                continue
            train = {
                **config.train_settings(arm),
                "set": fp["shared/set"],
                "student": fp["shared/student"],
                "text_teacher": fp["shared/text_teacher"],
                "acoustic_teacher": trained[f"{arm.acoustic_teacher}/{seed}"] if arm.acoustic_teacher else None,
                "seed": seed,
            }
            trained[f"{arm.name}/{seed}"] = fingerprint(train)
            units.append((train_unit(arm.name, seed), train))
            units.append((eval_unit(arm, seed), {**evaluation, "model": trained[f"{arm.name}/{seed}"]}))
    return units


# ---- the pieces ------------------------------------------------------------------------------------------


def _set(config: SpokenQAExperimentConfig, folder: Path, progress: bool) -> dict[str, Any]:
    from caad.data.manifest import read_manifest
    from caad.data.spoken_qa import synthesize_spoken_qa

    d = config.data
    paths = synthesize_spoken_qa(folder, num_examples=d.num_examples, seed=d.seed, splits=tuple(d.splits),
                                 workers=d.workers, progress=progress)
    return {"utterances": {split: len(read_manifest(paths[split])) for split in ("train", "validation", "test")}}


def _tokenizer(config: SpokenQAExperimentConfig, folder: Path) -> dict[str, Any]:
    from caad.data.spoken_qa import qa_tokenizer_texts
    from caad.data.spoken_qa_items import all_items
    from caad.models import train_tokenizer

    tokenizer = train_tokenizer(qa_tokenizer_texts(all_items()), vocab_size=config.models.tokenizer_vocab_size)
    tokenizer.save_pretrained(folder)
    return {"vocab": len(tokenizer)}


def _train_text(model: Any, tokenizer: Any, set_dir: Path, knowledge: str, steps: int, seed: int, progress: bool,
                **spoken: Any) -> dict[str, Any]:
    """Train ``model`` on the text of the questions ``knowledge`` names (``models.text_knowledge``)."""
    from caad.data.spoken_qa import load_spoken_qa
    from caad.data.spoken_qa_items import QA_SPLITS
    from caad.models.text_lm import train_text_lm

    paths = load_spoken_qa(set_dir)
    items = [item for split in (QA_SPLITS if knowledge == "all" else ("train",)) for item in paths.items(split)]
    result = train_text_lm(model, tokenizer, [item.text_query for item in items], [item.answer for item in items],
                           steps=steps, seed=seed, progress=progress, **spoken)
    return {"text_items": len(items), "final_loss": result.losses[-1] if result.losses else None}


def _text_teacher(config: SpokenQAExperimentConfig, out: Path, folder: Path, progress: bool) -> dict[str, Any]:
    from caad.models.interface import load_tokenizer
    from caad.models.text_lm import build_tiny_text_lm, save_text_lm

    tokenizer = load_tokenizer(str(out / "shared/tokenizer"))
    teacher = build_tiny_text_lm(tokenizer, seed=config.data.seed)
    info = _train_text(teacher, tokenizer, out / "shared/set", config.models.text_knowledge,
                       config.models.teacher_steps, config.data.seed, progress)
    save_text_lm(teacher, tokenizer, folder)
    return info


def _student(config: SpokenQAExperimentConfig, out: Path, folder: Path, progress: bool) -> dict[str, Any]:
    from caad.models import build_speech_lm
    from caad.models.interface import load_tokenizer
    from caad.models.tiny import tiny_composite_config

    m, seed = config.models, config.data.seed + 1
    tokenizer = load_tokenizer(str(out / "shared/tokenizer"))
    model_config = tiny_composite_config(tokenizer, role="student", **m.student_sizes)
    model_config.audio_config.max_source_positions = m.audio_window * 50  # 50 encoder frames per second
    student = build_speech_lm(model_config, tokenizer, seed=seed)
    info: dict[str, Any] = {}
    if m.student_text_steps:
        spoken: dict[str, Any] = {}
        if m.student_spoken_format > 0:
            from caad.data.manifest import read_manifest
            from caad.models.spoken_format import SpokenPromptFormat

            instruction = read_manifest(out / "shared/set/train.jsonl")[0].instruction  # what the spoken rows ask
            spoken = {"spoken_format": SpokenPromptFormat.of(student, instruction),
                      "spoken_fraction": m.student_spoken_format}
        info = _train_text(student.model.language_model, tokenizer, out / "shared/set", m.text_knowledge,
                           m.student_text_steps, seed, progress, **spoken)
    if m.speech_align_steps > 0:
        from caad.models.speech_align import align_speech_student

        info["speech_align"] = align_speech_student(
            student, str(out / "shared/set/train.jsonl"), steps=m.speech_align_steps, seed=seed, progress=progress,
            **m.speech_align,
        )
    student.save_pretrained(folder)
    return info


def _train_arm(config: SpokenQAExperimentConfig, arm: QAArm, seed: int, out: Path, folder: Path, progress: bool,
               data_check: bool) -> dict[str, Any]:
    from caad.methods import get_method
    from caad.train import train

    filled: dict[str, Any] = {
        "train_manifest": str(out / "shared/set/train.jsonl"),
        "student": str(out / "shared/student"),
        "output_dir": str(folder / "run"),
        "seed": seed,
        "overwrite": True,
        "progress": progress,
        "data_check": data_check,
    }
    text_teacher = str(out / "shared/text_teacher")
    if arm.method == "sourcewise":
        filled["text_teacher"] = text_teacher
        if arm.acoustic_teacher is not None:
            filled["acoustic_teacher"] = str(final_student(out, arm.acoustic_teacher, seed))
    else:
        filled["teacher"] = text_teacher
    section = config.method_config(arm, **filled)
    assert arm.method is not None
    result = train(get_method(arm.method)(section, arm.method), name=f"seed {seed}: {arm.name}")
    shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)  # the final student is all we keep
    keep = ("loss", "ce_loss", "kd_loss", "hidden_loss", "step")
    return {"steps": result.steps, "last": {k: result.last.get(k) for k in keep if k in result.last}}


def _write_records(folder: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    with open(folder / "records.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    counts: dict[str, list[int]] = {}
    for record in records:
        entry = counts.setdefault(record["modality"], [0, 0])
        entry[0] += bool(record["correct"])
        entry[1] += 1
    return {"correct": {modality: f"{right}/{total}" for modality, (right, total) in counts.items()}}


def _evaluate_student(config: SpokenQAExperimentConfig, model_dir: Path, rows: list[Any], folder: Path,
                      progress: bool, desc: str) -> dict[str, Any]:
    from caad.eval.modality_gap import student_records
    from caad.models import load_speech_lm

    model = load_speech_lm(model_dir, device="cpu")
    records = student_records(model, rows, batch_size=config.eval.batch_size,
                              max_new_tokens=config.eval.max_new_tokens, progress=progress, desc=desc)
    return _write_records(folder, records)


def _evaluate_text_teacher(config: SpokenQAExperimentConfig, model_dir: Path, rows: list[Any],
                           folder: Path) -> dict[str, Any]:
    from caad.eval.modality_gap import text_teacher_records
    from caad.models.text_lm import load_text_lm

    model, tokenizer = load_text_lm(model_dir)
    records = text_teacher_records(model, tokenizer, rows, batch_size=config.eval.batch_size,
                                   max_new_tokens=config.eval.max_new_tokens)
    return _write_records(folder, records)


# ---- the run ------------------------------------------------------------------------------------------------


def run_spoken_qa_experiment(
    config: SpokenQAExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    setup_only: bool = False,
    progress: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Run (or continue) the spoken-QA experiment of ``config`` and write its report; ``setup_only`` builds
    the ``shared/`` units and stops (no report). Everything is checked before anything is written: the config
    (when loaded), the folder and, on resume, every finished unit's settings."""
    import yaml

    from caad.experiment.spoken_qa_report import write_spoken_qa_report
    from caad.models.feature_cache import feature_cache

    say = log or (lambda message: print(f"[caad experiment] {message}", file=sys.stderr, flush=True))
    started = time.perf_counter()
    out = Path(config.output_dir)
    action = check_experiment_dir(out, resume=resume, overwrite=overwrite, suite="spoken_qa")
    units = plan_spoken_qa_units(config, setup_only=setup_only)
    store = UnitStore(out, log=say)
    if action == "resume":
        for name, settings in units:
            store.check(name, settings)  # raises before anything is written
    prepare_experiment_dir(out, action, {"command": command, "suite": "spoken_qa", "setup_only": setup_only,
                                         "machine": machine_info()})
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    arms = config.ordered_arms()
    say(f"{action} {out}: {len(units)} units" + ("" if setup_only else
        f", {len(config.seeds)} seed(s), {len(arms)} arm(s)"))
    with contextlib.suppress(Exception):  # cosmetic only
        import transformers

        transformers.logging.disable_progress_bar()

    plan = PlannedUnits(store, units, progress=progress)
    run = plan.run
    checked = []  # the manifest is checked by the first training of this invocation only

    try:
        with feature_cache():  # each clip featurised once in the run: every arm, epoch and evaluation
            run("shared/set", lambda folder: _set(config, folder, progress))
            run("shared/tokenizer", lambda folder: _tokenizer(config, folder))
            run("shared/text_teacher", lambda folder: _text_teacher(config, out, folder, progress))
            run("shared/student", lambda folder: _student(config, out, folder, progress))
            if not setup_only:
                from caad.data.manifest import read_manifest

                rows = read_manifest(out / "shared/set/test.jsonl")
                for arm in arms:
                    if arm.kind == "text_teacher":
                        run(eval_unit(arm, None), lambda folder: _evaluate_text_teacher(
                            config, out / "shared/text_teacher", rows, folder))
                    elif arm.kind == "pre_distillation":
                        run(eval_unit(arm, None), lambda folder, arm=arm: _evaluate_student(
                            config, out / "shared/student", rows, folder, progress, f"{arm.name} (test)"))
                for seed in config.seeds:
                    for arm in arms:
                        if not arm.is_student:
                            continue

                        def train_arm(folder: Path, arm: QAArm = arm, seed: int = seed) -> dict[str, Any]:
                            info = _train_arm(config, arm, seed, out, folder, progress, data_check=not checked)
                            checked.append(arm.name)
                            return info

                        run(train_unit(arm.name, seed), train_arm)
                        run(eval_unit(arm, seed), lambda folder, arm=arm, seed=seed: _evaluate_student(
                            config, final_student(out, arm.name, seed), rows, folder, progress,
                            f"seed {seed}: {arm.name} (test)"))
    finally:
        plan.close()

    done = {name: store.done(name) or {} for name, _ in units}
    unit_seconds = {name: float(info.get("seconds", 0.0)) for name, info in done.items()}
    unit_cpu = {name: float(info.get("cpu_seconds", 0.0)) for name, info in done.items()}
    seconds = time.perf_counter() - started
    if setup_only:
        say(f"set-up done in {seconds:.0f} s: {', '.join(str(out / name) for name in SHARED_UNITS)}")
        return ExperimentResult(out, None, None, [], store.ran, store.skipped, seconds, unit_seconds)
    report = write_spoken_qa_report(config, out, unit_seconds=unit_seconds, unit_cpu_seconds=unit_cpu,
                                    invocation_seconds=seconds, command=command, machine=machine_info())
    say(f"done in {seconds:.0f} s ({len(store.ran)} unit(s) run, {len(store.skipped)} already finished): "
        f"{report['markdown']}")
    return ExperimentResult(out, report["json"], report["markdown"], report["plots"], store.ran, store.skipped,
                            seconds, unit_seconds)
