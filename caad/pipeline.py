"""``caad run``: every stage of CAAD in order, into one run folder.

Layout of ``<output_dir>`` (``{timestamp}`` in the configured path expands to the start time)::

    caad_output.json, config.yaml   marker and the resolved config
    corpus/                         the synthesised built-in corpus (unless data.corpus_dir is given)
    stage1/train.jsonl              the train manifest with one pseudo-GT per row
    stage1/validation.jsonl         the same for the validation split (its loss is logged in training)
    models/tokenizer, models/teacher_init, models/student_init     (models.tiny: true)
    warmup/                         the tiny teacher's CE-only warm-up; warmup/final is the teacher used
    stage2/                         CAAD: metrics.jsonl, loss_curve.png, checkpoints/, final/ (the student)
    eval/                           per-model result files and results.md (the table)

Steps: (1) corpus, (2) Stage 1 pseudo-GT, (3) tokenizer + tiny teacher and student (or local
checkpoints), (4) teacher warm-up on the pseudo-GT (CE only, so the tiny random teacher becomes
audio-aware; by default only for the built-in tiny teacher: a real checkpoint is never changed
unless ``warmup.enabled: true``), (5) Stage 2 with CAAD (the method ``caad`` on the shared trainer),
(6) evaluation of the teacher (greedy and contrastive decoding) and the student (greedy). Under a
launcher the data and model preparation and the evaluation run on rank 0 while the other ranks
wait; training runs on every rank.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caad.config import CaadConfig, Stage2Config, TrainerConfig, dump_config, expand_output_dir
from caad.train.distributed import barrier, broadcast_object, init_distributed
from caad.train.outputs import check_output_dir, prepare_output_dir

__all__ = ["RunResult", "run_pipeline"]


@dataclass
class RunResult:
    """What ``caad run`` produced."""

    output_dir: Path
    teacher: str
    student: Path
    metrics: Path
    plot: Path | None
    stage2_last: dict[str, Any]
    warmup_last: dict[str, Any] = field(default_factory=dict)
    eval_results: dict[str, dict[str, Any]] | None = None
    eval_table: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _say(message: str, is_main: bool) -> None:
    if is_main:
        print(f"[caad run] {message}", flush=True)


def _train_texts(manifests: list[Path], text_prior: Path | None = None) -> list[str]:
    """Texts the tiny tokenizer is trained on: instructions, answers, transcripts and hints, and the
    instructions and answers of the corpus's text prior (``text_prior.jsonl``) when there is one."""
    from caad.data import read_manifest

    texts = []
    if text_prior is not None and text_prior.is_file():
        from caad.data.synth import read_text_prior

        for record in read_text_prior(text_prior):
            texts += [str(record["instruction"]), str(record["answer"])]
    for manifest in manifests:
        for row in read_manifest(manifest):
            texts.append(row.instruction)
            for value in (row.pseudo_gt, row.label, row.hint_neutral, row.hint_contradicting):
                if value:
                    texts.append(value)
            transcript = row.metadata.get("transcript")
            if isinstance(transcript, str):
                texts.append(transcript)
    return texts


def _build_tiny_models(
    config: CaadConfig, manifests: list[Path], models_dir: Path, text_prior: Path | None = None
) -> tuple[Path, Path]:
    """Train the tokenizer and save a tiny teacher and a smaller student; returns their folders."""
    from caad.models import tiny_student, tiny_teacher, train_tokenizer

    tokenizer = train_tokenizer(_train_texts(manifests, text_prior), vocab_size=config.models.tokenizer_vocab_size)
    tokenizer.save_pretrained(models_dir / "tokenizer")
    teacher_dir, student_dir = models_dir / "teacher_init", models_dir / "student_init"
    tiny_teacher(tokenizer, kind=config.models.teacher_kind, seed=config.models.teacher_seed).save_pretrained(
        teacher_dir
    )
    tiny_student(tokenizer, kind=config.models.student_kind, seed=config.models.student_seed).save_pretrained(
        student_dir
    )
    return teacher_dir, student_dir


def _with_paths(section: Stage2Config, **paths: Any) -> Stage2Config:
    """``section`` with the given paths filled where the config left them ``null``."""
    updates = {key: value for key, value in paths.items() if getattr(section, key) is None}
    if "output_dir" in paths:  # the run owns its sub-folders
        updates["output_dir"] = paths["output_dir"]
    return dataclasses.replace(
        section, **{k: str(v) if isinstance(v, Path) else v for k, v in updates.items()}
    )


#: Trainer keys that ``caad run`` takes from ``models.*`` / ``data.*`` where a section leaves them at default.
_FROM_MODELS = {key: key for key in ("chat_template", "allow_pickle", "trust_remote_code", "low_memory")}
_FROM_DATA = {
    "data_check": "check",
    "min_seconds": "min_seconds",
    "max_seconds": "max_seconds",
    "decode_check": "decode_check",
}


def _inherit(section: Stage2Config, config: CaadConfig) -> Stage2Config:
    """``section`` with its model-loading and data-check keys taken from ``models.*`` and ``data.*``
    where the section leaves them at their defaults (so one setting applies to every stage)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    updates = {}
    for source, keys in ((config.models, _FROM_MODELS), (config.data, _FROM_DATA)):
        for key, name in keys.items():
            if getattr(section, key) == defaults[key]:
                updates[key] = getattr(source, name)
    return dataclasses.replace(section, **updates)


def _train_config(section: Stage2Config) -> Stage2Config:
    """A plain :class:`Stage2Config` from a section (the warm-up's has an extra ``enabled`` field)."""
    names = {f.name for f in dataclasses.fields(Stage2Config)}
    return Stage2Config(**{k: v for k, v in dataclasses.asdict(section).items() if k in names})


def _validation_source(config: CaadConfig, corpus_root: Path) -> Path | None:
    """The validation manifest: ``data.validation_manifest``, else the corpus's validation split
    (unless the train manifest is your own); ``None`` when there is none or it is empty."""
    from caad.data import read_manifest

    if config.data.validation_manifest is not None:
        path = Path(config.data.validation_manifest)
    elif config.data.train_manifest is None:
        path = corpus_root / "validation.jsonl"
    else:
        return None
    if not path.is_file() or not read_manifest(path):
        return None
    return path


def run_pipeline(config: CaadConfig) -> RunResult:
    """Run every stage as configured (module docstring); returns where everything is."""
    from caad.methods.caad import train_stage2

    # 0. check every input and the output folder before anything is written
    config.check_run_paths()
    output_dir = Path(expand_output_dir(config.output_dir))
    check_output_dir(output_dir, overwrite=config.overwrite, resume=False, key="output_dir", resumable=False)
    dist = init_distributed()
    main = dist.is_main
    if main:
        prepare_output_dir(output_dir, overwrite=config.overwrite, resume=False, key="output_dir", kind="run")
        dump_config(config, output_dir / "config.yaml")
    barrier()
    _say(f"run folder: {output_dir}", main)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    # 1. the corpus
    if config.data.corpus_dir is not None:
        corpus_root = Path(config.data.corpus_dir)
        _say(f"1/6 corpus: using {corpus_root}", main)
    else:
        corpus_root = output_dir / "corpus"
        _say(f"1/6 corpus: synthesising {config.data.num_examples} examples into {corpus_root}", main)
        if main:
            from caad.data import synthesize_corpus

            synthesize_corpus(
                corpus_root,
                num_examples=config.data.num_examples,
                seed=config.data.seed,
                splits=tuple(config.data.splits),
                progress=False,
                context_share=config.data.context_share,
                context_agreement=config.data.context_agreement,
                irrelevant_share=config.data.irrelevant_share,
                text_prior_examples=config.data.text_prior_examples,
            )
        barrier()
    train_manifest = Path(config.data.train_manifest or corpus_root / "train.jsonl")
    eval_manifest = Path(config.eval.manifest or config.data.eval_manifest or corpus_root / "test.jsonl")
    if config.data.check:
        _check_source(config, train_manifest, main)
    lap("corpus")

    # 2. Stage 1: pseudo-GT for the train manifest (and the validation split)
    pseudo_gt = output_dir / "stage1" / "train.jsonl"
    validation_source = _validation_source(config, corpus_root) if main else None
    validation_pgt = output_dir / "stage1" / "validation.jsonl" if validation_source is not None else None
    validation_pgt = broadcast_object(validation_pgt)
    _say(f"2/6 stage 1 ({config.stage1.generator}): {train_manifest} -> {pseudo_gt}", main)
    if main:
        from caad.stage1 import generate_pseudo_gt

        for source, target in ((train_manifest, pseudo_gt), (validation_source, validation_pgt)):
            if source is None:
                continue
            generate_pseudo_gt(
                source,
                target,
                generator=config.stage1.generator,
                model_path=config.stage1.model_path,
                batch_size=config.stage1.batch_size,
                max_new_tokens=config.stage1.max_new_tokens,
                resume=False,
                device=str(dist.device),
                progress=False,
            )
    barrier()
    lap("stage1")

    # 3. models
    if config.models.tiny:
        teacher_init, student_init = (
            output_dir / "models" / "teacher_init",
            output_dir / "models" / "student_init",
        )
        _say(
            f"3/6 models: tokenizer + tiny teacher ({config.models.teacher_kind}) and student "
            f"({config.models.student_kind}) in {output_dir / 'models'}",
            main,
        )
        if main:
            manifests = [pseudo_gt] + ([eval_manifest] if eval_manifest.is_file() else [])
            _build_tiny_models(config, manifests, output_dir / "models", corpus_root / "text_prior.jsonl")
        barrier()
    else:
        teacher_init, student_init = Path(config.models.teacher), Path(config.models.student)
        _say(f"3/6 models: teacher {teacher_init}, student {student_init}", main)
    lap("models")

    # 4. warm the teacher up on the pseudo-GT (CE only)
    teacher: Path = teacher_init
    warmup_last: dict[str, Any] = {}
    if config.warmup.resolved_enabled(config.models.tiny):
        warmup = _with_paths(
            _inherit(_train_config(config.warmup), config),
            train_manifest=pseudo_gt,
            validation_manifest=validation_pgt,
            student=teacher_init,
            output_dir=output_dir / "warmup",
        )
        _say(f"4/6 teacher warm-up (CE only) -> {warmup.output_dir}", main)
        result = train_stage2(warmup, name="teacher warm-up", section="warmup")
        teacher, warmup_last = result.final_model, result.last
    elif config.warmup.enabled is None:
        _say("4/6 teacher warm-up: skipped (a real teacher is used as it is; warmup.enabled=true to warm it up)", main)
    else:
        _say("4/6 teacher warm-up: disabled (warmup.enabled: false)", main)
    lap("warmup")

    # 5. Stage 2: CAAD
    stage2 = _with_paths(
        _inherit(config.stage2, config),
        train_manifest=pseudo_gt,
        validation_manifest=validation_pgt,
        teacher=teacher,
        student=student_init,
        output_dir=output_dir / "stage2",
    )
    _say(
        f"5/6 stage 2 (alpha={stage2.alpha}, kd_weight={stage2.kd_weight}, ce_weight={stage2.ce_weight}, "
        f"ZeRO-{stage2.zero_stage}, {stage2.precision}) -> {stage2.output_dir}",
        main,
    )
    result = train_stage2(stage2, name="stage 2 (CAAD)")
    lap("stage2")
    kd_student: Path | None = None
    if config.eval.enabled and config.eval.side_by_side:
        # the baseline CAAD is compared with: the same student, data and settings, alpha = 0
        kd = dataclasses.replace(stage2, alpha=0.0, output_dir=str(output_dir / "stage2_kd"))
        _say(f"5/6 stage 2 baseline: standard KD (alpha=0) for the side-by-side -> {kd.output_dir}", main)
        kd_student = train_stage2(kd, name="stage 2 (KD, alpha=0)").final_model
        lap("stage2_kd")

    # 6. evaluation
    eval_results = eval_table = None
    if not config.eval.enabled:
        _say("6/6 evaluation: disabled (eval.enabled: false)", main)
    elif importlib.util.find_spec("caad.eval") is None:
        _say("6/6 evaluation: skipped (caad.eval is not available)", main)
    else:
        _say(f"6/6 evaluation on {eval_manifest}", main)
        if main:
            eval_results, eval_table = _evaluate(
                config,
                str(teacher),
                str(result.final_model),
                eval_manifest,
                output_dir / "eval",
                stage2,
                kd_student=None if kd_student is None else str(kd_student),
            )
        barrier()
    lap("eval")

    return RunResult(
        output_dir=output_dir,
        teacher=str(teacher),
        student=result.final_model,
        metrics=result.metrics,
        plot=result.plot,
        stage2_last=result.last,
        warmup_last=warmup_last,
        eval_results=eval_results,
        eval_table=eval_table,
        timings=timings,
    )


def _check_source(config: CaadConfig, manifest: Path, main: bool) -> None:
    """Every row and audio file of the train manifest (``data.check``), before Stage 1 reads it: an
    empty or broken manifest stops the run here with every problem listed (rank 0 reads the files)."""
    from caad.cli import UserError
    from caad.data.checks import DataCheckError, check_training_data

    error = None
    if main:
        try:
            check_training_data(
                manifest,
                window_seconds=None,
                require=(),
                min_seconds=config.data.min_seconds,
                max_seconds=config.data.max_seconds,
                decode=config.data.decode_check,
            )
        except (DataCheckError, FileNotFoundError) as caught:
            error = f"data: {caught}"
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)


def _evaluate(
    config: CaadConfig,
    teacher: str,
    student: str,
    manifest: Path,
    out_dir: Path,
    stage2: Stage2Config,
    kd_student: str | None = None,
) -> tuple[dict[str, dict[str, Any]], str]:
    """Teacher greedy, teacher contrastive decoding and student greedy on ``manifest``; the table.

    With ``kd_student`` (``eval.side_by_side``) the standard-KD student is evaluated too, and the
    table ends with the side-by-side (neutral vs adversarial context, text influence, shift).

    The models are loaded as in training (``chat_template`` ...); greedy decoding runs on
    ``eval.audio_mode``; contrastive decoding uses Stage 2's negative path.
    """
    from caad.eval import markdown_table, run_eval

    alpha = config.eval.contrastive_alpha if config.eval.contrastive_alpha is not None else stage2.alpha
    common: dict[str, Any] = dict(batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens)
    parameters = inspect.signature(run_eval).parameters
    if "num_bootstrap" in parameters:
        common["num_bootstrap"] = config.eval.num_bootstrap
    if "load_options" in parameters:
        common["load_options"] = {
            "chat_template": stage2.chat_template,
            "allow_pickle": stage2.allow_pickle,
            "trust_remote_code": stage2.trust_remote_code,
            "low_memory": stage2.low_memory,
        }
    greedy = dict(common, audio_mode=config.eval.audio_mode) if "audio_mode" in parameters else common
    contrastive: dict[str, Any] = dict(common, contrastive_alpha=alpha)
    if "negative_mode" in parameters:
        contrastive["negative_mode"] = stage2.negative_mode  # the same negative path as in training
    results = {
        "teacher": run_eval(teacher, str(manifest), str(out_dir), name="teacher", **greedy),
        "teacher (contrastive)": run_eval(
            teacher, str(manifest), str(out_dir), name="teacher_contrastive", **contrastive
        ),
        "student": run_eval(student, str(manifest), str(out_dir), name="student", **greedy),
    }
    if kd_student is not None:
        results["student (KD, alpha=0)"] = run_eval(
            kd_student, str(manifest), str(out_dir), name="student_kd", **greedy
        )
    table = markdown_table(results)
    if kd_student is not None:
        from caad.experiment.side_by_side import side_by_side_table

        rows = {
            "teacher, greedy": results["teacher"],
            f"teacher, contrastive (alpha={alpha:g})": results["teacher (contrastive)"],
            "student, standard KD (alpha=0)": results["student (KD, alpha=0)"],
            f"student, CAAD (alpha={stage2.alpha:g})": results["student"],
        }
        table += "\n\nSide by side:\n\n" + side_by_side_table(rows)
    (out_dir / "results.md").write_text(table, encoding="utf-8")
    return results, table
