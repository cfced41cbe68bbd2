"""``caad experiment``: arms x seeds on one corpus, per seed one teacher shared by every arm.

Layout of the experiment folder (``output_dir``)::

    experiment.json, config.yaml       marker (one entry per invocation) and the resolved config
    shared/corpus/                     the built-in corpus (MCR-BENCH in miniature), once
    shared/stage1/                     the train split's pseudo-GT (Stage 1, template generator)
    shared/tokenizer/                  the tiny tokenizer, trained on the corpus texts
    seed-<s>/init/                     the seed's tiny teacher and student initialisations
    seed-<s>/teacher/                  the teacher's CE-only warm-up on the pseudo-GT (train/final)
    arms/<variant>/seed-<s>/train/     a student's training (students only; train/final the student)
    arms/<variant>/seed-<s>/test/      records.jsonl: the scored answers on the test split
    arms/<variant>/seed-<s>/validation/  the same on the validation split (sweep arms only)
    results.json, results.md, plots/   the report (:mod:`caad.experiment.report`)

Per seed ``s`` the teacher and student initialisations use seed ``s`` and every training uses seed
``s`` for its data order; the corpus, the pseudo-GT and the tokenizer are shared by all seeds.
Every folder above is a unit of :class:`~caad.experiment.store.UnitStore`: finished units are skipped
on ``--resume``, a unit whose settings changed is an error, and all of that is checked before
anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caad.experiment.config import ExperimentConfig, Variant, fingerprint
from caad.experiment.store import PlannedUnits, UnitStore, check_experiment_dir, prepare_experiment_dir

if TYPE_CHECKING:
    from caad.experiment.spoken_qa_config import SpokenQAExperimentConfig

__all__ = ["ExperimentResult", "plan_units", "run_experiment"]


@dataclass
class ExperimentResult:
    """What ``caad experiment`` produced."""

    output_dir: Path
    results_json: Path | None  # None after a set-up only run (no report)
    results_md: Path | None
    plots: list[Path]
    ran: list[str]
    skipped: list[str]
    seconds: float
    unit_seconds: dict[str, float] = field(default_factory=dict)


# ---- the plan: every unit, its settings (fingerprint inputs), in order ------------------------------------


def _shared_settings(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    corpus = {"data": dataclasses.asdict(config.data)}
    stage1 = {"corpus": fingerprint(corpus), "generator": "template"}
    tokenizer = {"stage1": fingerprint(stage1), "vocab": config.models.tokenizer_vocab_size}
    return {"shared/corpus": corpus, "shared/stage1": stage1, "shared/tokenizer": tokenizer}


def plan_units(config: ExperimentConfig) -> list[tuple[str, dict[str, Any]]]:
    """``[(unit name, settings)]`` of the whole experiment, in run order (module docstring)."""
    shared = _shared_settings(config)
    units = list(shared.items())
    warmup = dataclasses.asdict(config.warmup_config())
    for key in ("train_manifest", "validation_manifest", "student", "teacher", "output_dir"):
        warmup.pop(key, None)
    variants = config.variants()
    eval_common = {
        "batch_size": config.eval.batch_size,
        "max_new_tokens": config.eval.max_new_tokens,
        "negative_mode": config.eval.negative_mode,
    }
    sweep_arms = {v.arm for v in variants if v.values}
    for seed in config.seeds:
        init = {"tokenizer": fingerprint(shared["shared/tokenizer"]), "models": dataclasses.asdict(config.models),
                "seed": seed}
        teacher = {"init": fingerprint(init), "warmup": warmup, "seed": seed}
        units += [(f"seed-{seed}/init", init), (f"seed-{seed}/teacher", teacher)]
        for variant in variants:
            base = f"arms/{variant.key}/seed-{seed}"
            if variant.is_student:
                needs_teacher = float(variant.train.get("kd_weight", 0.7)) > 0
                train = {
                    "init": fingerprint(init),
                    "teacher": fingerprint(teacher) if needs_teacher else None,
                    "settings": variant.settings(),
                    "seed": seed,
                }
                units.append((f"{base}/train", train))
                model = fingerprint(train)
            else:
                model = fingerprint(teacher)
            splits = {"test": config.eval.test_items}
            if variant.arm in sweep_arms:
                splits["validation"] = config.eval.validation_items
            for split, items in splits.items():
                settings = {"model": model, "decoding": variant.decoding, "split": split, "items": items,
                            "corpus": fingerprint(shared["shared/corpus"]), **eval_common}
                units.append((f"{base}/{split}", settings))
    return units


# ---- the pieces, each through the project's public functions -----------------------------------------------


def _corpus(config: ExperimentConfig, folder: Path, progress: bool) -> dict[str, Any]:
    from caad.data import synthesize_corpus

    d = config.data
    synthesize_corpus(
        folder / "corpus",
        num_examples=d.num_examples,
        seed=d.seed,
        splits=tuple(d.splits),
        progress=progress,
        context_share=d.context_share,
        context_agreement=d.context_agreement,
        irrelevant_share=d.irrelevant_share,
        text_prior_examples=0,
    )
    return {}


def _stage1(corpus: Path, folder: Path) -> dict[str, Any]:
    from caad.stage1 import generate_pseudo_gt

    generate_pseudo_gt(corpus / "train.jsonl", folder / "train.jsonl", generator="template", resume=False,
                       progress=False)
    return {}


def _tokenizer(manifests: list[Path], config: ExperimentConfig, folder: Path) -> dict[str, Any]:
    from caad.data import read_manifest
    from caad.models import train_tokenizer

    texts: list[str] = []
    for manifest in manifests:
        for row in read_manifest(manifest):
            texts.append(row.instruction)
            texts += [value for value in (row.pseudo_gt, row.label, row.context) if value]
            transcript = row.metadata.get("transcript")
            if isinstance(transcript, str):
                texts.append(transcript)
    tokenizer = train_tokenizer(texts, vocab_size=config.models.tokenizer_vocab_size)
    tokenizer.save_pretrained(folder / "tokenizer")
    return {}


def _init_models(tokenizer_dir: Path, config: ExperimentConfig, seed: int, folder: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from caad.models import tiny_student, tiny_teacher

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_teacher(tokenizer, kind=config.models.teacher_kind, seed=2 * seed).save_pretrained(folder / "teacher")
    tiny_student(tokenizer, kind=config.models.student_kind, seed=2 * seed + 1).save_pretrained(folder / "student")
    return {}


def _train(stage2: Any, method: str, folder: Path, progress: bool, name: str) -> dict[str, Any]:
    from caad.train import train

    if method == "caad_alpha":
        from caad.experiment.alpha_method import AlphaCAADMethod

        result = train(AlphaCAADMethod(stage2, "stage2"), name=name)
    else:
        result = train(method, stage2, section="warmup", name=name)
    shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)  # the final student is all we keep
    keep = ("loss", "ce_loss", "kd_loss", "alpha", "step", "val_loss")
    return {"steps": result.steps, "last": {k: result.last.get(k) for k in keep if k in result.last}}


def _eval_rows(manifest: Path, items: int | None) -> list[Any]:
    """The labelled rows of the first ``items`` audio items (groups) of ``manifest``, every condition."""
    from caad.data import read_manifest

    rows = [row for row in read_manifest(manifest) if row.label is not None]
    if items is None:
        return rows
    groups: dict[str, None] = {}
    for row in rows:
        groups.setdefault(row.group or row.id, None)
        if len(groups) > items:
            break
    keep = set(list(groups)[:items])
    return [row for row in rows if (row.group or row.id) in keep]


class _ModelCache:
    """One loaded model at a time (the teacher is evaluated under several decodings in a row)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.model: Any = None

    def get(self, path: Path) -> Any:
        from caad.models import load_speech_lm

        if self.path != path:
            self.model = None
            self.model = load_speech_lm(path, device="cpu")
            self.path = path
        return self.model


def _evaluate(model: Any, rows: list[Any], variant: Variant, config: ExperimentConfig, folder: Path,
              progress: bool, desc: str) -> dict[str, Any]:
    from caad.eval import evaluate_rows

    decoding = variant.decoding
    alpha = decoding.get("alpha") if variant.kind == "teacher_contrastive" else None
    records = evaluate_rows(
        model,
        rows,
        contrastive_alpha=None if alpha is None else float(alpha),
        negative_mode=config.eval.negative_mode,
        plausibility=float(decoding.get("plausibility", 0.0)) if alpha is not None else 0.0,
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        audio_mode=decoding.get("audio_mode", "positive"),
        progress=progress,
        desc=desc,
    )
    with open(folder / "records.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    correct = sum(1 for r in records if r["correct"])
    return {"rows": len(records), "correct": correct}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """Where the experiment ran (for the report)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": _git_commit(),
    }


# ---- the run ------------------------------------------------------------------------------------------------


def run_experiment(
    config: ExperimentConfig | SpokenQAExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    setup_only: bool = False,
) -> ExperimentResult:
    """Run (or continue) the experiment of ``config``; write the report; returns where it is.

    Everything is checked before anything is written: the config (already, when loaded), the
    folder (:func:`~caad.experiment.store.check_experiment_dir`) and, on resume, every finished
    unit's settings against this config. A ``suite: spoken_qa`` config runs
    :func:`caad.experiment.spoken_qa.run_spoken_qa_experiment` (``setup_only``: its shared units only).
    """
    if getattr(config, "suite", "caad") == "spoken_qa":
        from caad.experiment.spoken_qa import run_spoken_qa_experiment

        return run_spoken_qa_experiment(
            config, resume=resume, overwrite=overwrite, setup_only=setup_only, progress=progress, command=command,
            log=log,
        )
    if setup_only:
        from caad.cli import UserError

        raise UserError("--setup-only is for suite spoken_qa configs (it builds their shared set and models)")
    import yaml

    from caad.experiment.alpha_method import alpha_config
    from caad.experiment.report import write_report
    from caad.models.feature_cache import feature_cache

    say = log or (lambda message: print(f"[caad experiment] {message}", file=sys.stderr, flush=True))
    started = time.perf_counter()
    out = Path(config.output_dir)
    action = check_experiment_dir(out, resume=resume, overwrite=overwrite)
    units = plan_units(config)
    store = UnitStore(out, log=say)
    if action == "resume":
        for name, settings in units:
            store.check(name, settings)  # raises before anything is written
    prepare_experiment_dir(out, action, {"command": command, "suite": "caad", "machine": machine_info()})
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    say(f"{action} {out}: {len(units)} units, {len(config.seeds)} seed(s), {len(config.variants())} variant(s)")

    try:
        import transformers

        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass

    corpus = out / "shared/corpus/corpus"
    pseudo_gt = out / "shared/stage1/train.jsonl"
    tokenizer_dir = out / "shared/tokenizer/tokenizer"
    plan = PlannedUnits(store, units, progress=progress)
    run = plan.run
    stack = contextlib.ExitStack()
    stack.enter_context(feature_cache())  # each clip featurised once in the run: both models, every epoch and arm

    try:
        run("shared/corpus", lambda folder: _corpus(config, folder, progress))
        run("shared/stage1", lambda folder: _stage1(corpus, folder))
        run("shared/tokenizer", lambda folder: _tokenizer([pseudo_gt, corpus / "test.jsonl"], config, folder))
        rows = {
            "test": _eval_rows(corpus / "test.jsonl", config.eval.test_items),
            "validation": _eval_rows(corpus / "validation.jsonl", config.eval.validation_items),
        }
        variants = config.variants()
        cache = _ModelCache()
        for seed in config.seeds:
            init = out / f"seed-{seed}/init"
            run(f"seed-{seed}/init", lambda folder, seed=seed: _init_models(tokenizer_dir, config, seed, folder))
            teacher_dir = out / f"seed-{seed}/teacher"

            def warm_up(folder: Path, seed: int = seed, init: Path = init) -> dict[str, Any]:
                warmup = dataclasses.replace(
                    config.warmup_config(),
                    train_manifest=str(pseudo_gt),
                    validation_manifest=None,
                    eval_every=0,
                    student=str(init / "teacher"),
                    output_dir=str(folder / "train"),
                    seed=seed,
                    overwrite=True,
                    tensorboard=False,
                    progress=progress,
                )
                return _train(warmup, "caad", folder, progress, f"seed {seed}: teacher warm-up")

            run(f"seed-{seed}/teacher", warm_up)
            teacher = teacher_dir / "train" / "final"
            for variant in variants:
                base = f"arms/{variant.key}/seed-{seed}"
                model_path = teacher
                if variant.is_student:

                    def train_student(
                        folder: Path, variant: Variant = variant, seed: int = seed, init: Path = init,
                        teacher: Path = teacher,
                    ) -> dict[str, Any]:
                        stage2 = config.student_config(dict(variant.train), f"arms.{variant.arm}")
                        stage2 = dataclasses.replace(
                            stage2,
                            train_manifest=str(pseudo_gt),
                            validation_manifest=None,
                            eval_every=0,
                            student=str(init / "student"),
                            teacher=str(teacher) if stage2.needs_teacher else None,
                            output_dir=str(folder / "train"),
                            seed=seed,
                            overwrite=True,
                            tensorboard=False,
                            progress=progress,
                        )
                        method_config = alpha_config(stage2, variant.alpha)
                        return _train(method_config, "caad_alpha", folder, progress, f"seed {seed}: {variant.label}")

                    run(f"{base}/train", train_student)
                    model_path = out / base / "train" / "train" / "final"
                for split in ("test", "validation"):
                    name = f"{base}/{split}"
                    if name not in plan:
                        continue
                    def evaluate(folder: Path, split: str = split, variant: Variant = variant,
                                 model_path: Path = model_path, seed: int = seed,
                                 cache: _ModelCache = cache) -> dict[str, Any]:
                        return _evaluate(cache.get(model_path), rows[split], variant, config, folder, progress,
                                         f"seed {seed}: {variant.key} ({split})")

                    run(name, evaluate)
            cache = _ModelCache()  # free the seed's models
    finally:
        plan.close()
        stack.close()

    done = {name: store.done(name) or {} for name, _ in units}
    unit_seconds = {name: float(info.get("seconds", 0.0)) for name, info in done.items()}
    unit_cpu = {name: float(info.get("cpu_seconds", 0.0)) for name, info in done.items()}
    seconds = time.perf_counter() - started
    report = write_report(config, out, unit_seconds=unit_seconds, invocation_seconds=seconds, command=command,
                          machine=machine_info(), unit_cpu_seconds=unit_cpu)
    say(f"done in {seconds:.0f} s ({len(store.ran)} unit(s) run, {len(store.skipped)} already finished): "
        f"{report['markdown']}")
    return ExperimentResult(out, report["json"], report["markdown"], report["plots"], store.ran, store.skipped,
                            seconds, unit_seconds)
