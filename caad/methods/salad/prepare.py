"""SALAD's inputs: the spoken-QA set, the text teacher and the initial student, built when not given.

With the config's ``set``/``teacher``/``student`` left ``null`` (the built-in data), :func:`prepare_base`
builds under ``folder``: ``set/`` (:func:`caad.data.spoken_qa.synthesize_spoken_qa` with the config's
voices, rates and pitches), a byte-level tokenizer trained on every question and answer
(:func:`caad.models.train_tokenizer`), ``text_teacher/`` (a tiny Llama pre-trained on the set's training
questions as text, :func:`caad.models.text_lm.train_text_lm`) and ``student/`` (a tiny composite speech LM on
the same tokenizer). Given paths are used as they are (a given teacher and student must share a vocabulary;
the trainer checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caad.methods.salad.config import SaladConfig

__all__ = ["prepare_base"]


def prepare_base(config: SaladConfig, folder: Path) -> dict[str, Any]:
    """Build what is missing under ``folder``; returns the paths and the teacher's text accuracy.

    Keys: ``set``, ``teacher``, ``student``, ``text_train`` (the pool's text items), ``train_manifest``
    (Stage I's speech), ``eval_manifest``, ``stage1_utterances``, ``stage1_seconds``, ``eval_items``,
    ``teacher_text_accuracy`` (greedy, on the evaluation utterances' text queries).
    """
    from caad.data.manifest import read_manifest
    from caad.data.spoken_qa import load_spoken_qa, qa_tokenizer_texts, synthesize_spoken_qa
    from caad.data.spoken_qa_items import all_items
    from caad.models import tiny_student, train_tokenizer
    from caad.models.interface import load_tokenizer
    from caad.models.text_lm import build_tiny_text_lm, evaluate_text_lm, load_text_lm, save_text_lm, train_text_lm

    folder.mkdir(parents=True, exist_ok=True)
    if config.set is None:
        set_dir = folder / "set"
        if not (set_dir / "spoken_qa.json").is_file():
            synthesize_spoken_qa(
                set_dir,
                num_examples=config.set_examples,
                seed=config.set_seed,
                voices=tuple(config.voices),
                rates=tuple(config.rates),
                pitches=tuple(config.pitches),
                progress=config.progress,
                overwrite=set_dir.exists(),  # an interrupted earlier attempt of this step
            )
    else:
        set_dir = Path(config.set)
    paths = load_spoken_qa(set_dir)

    if config.teacher is not None:
        tokenizer = load_tokenizer(config.teacher)
    elif config.student is not None:
        tokenizer = load_tokenizer(config.student)
    else:
        tokenizer = train_tokenizer(qa_tokenizer_texts(all_items()), vocab_size=400)

    teacher = config.teacher
    if teacher is None:
        teacher = str(folder / "text_teacher")
        if not (Path(teacher) / "config.json").is_file():
            model = build_tiny_text_lm(tokenizer, seed=config.set_seed)
            items = paths.items("train")
            train_text_lm(
                model,
                tokenizer,
                [item.text_query for item in items],
                [item.answer for item in items],
                steps=config.teacher_steps,
                seed=config.set_seed,
                progress=config.progress,
            )
            save_text_lm(model, tokenizer, teacher, overwrite=True)
    student = config.student
    if student is None:
        student = str(folder / "student")
        if not (Path(student) / "config.json").is_file():
            tiny_student(tokenizer, seed=config.set_seed + 1).save_pretrained(student)

    train_rows = read_manifest(paths.train)
    eval_rows = read_manifest(paths[config.eval_split])
    if config.eval_max_items is not None:
        eval_rows = eval_rows[: config.eval_max_items]
    if not eval_rows:
        raise ValueError(f"salad.eval_split: the set's {config.eval_split} split has no utterances")
    model, teacher_tokenizer = load_text_lm(teacher)
    teacher_eval = evaluate_text_lm(model, teacher_tokenizer, [_Item(row) for row in eval_rows])
    return {
        "set": str(set_dir),
        "teacher": teacher,
        "student": student,
        "text_train": str(paths.text["train"]),
        "train_manifest": str(paths.train),
        "eval_manifest": str(paths[config.eval_split]),
        "eval_split": config.eval_split,
        "stage1_utterances": len(train_rows),
        "stage1_seconds": round(sum(float(r.metadata.get("duration_s") or 0.0) for r in train_rows), 3),
        "eval_items": len(eval_rows),
        "teacher_text_accuracy": teacher_eval["accuracy"],
    }


class _Item:
    """A spoken row seen as a text QA item (what :func:`evaluate_text_lm` reads)."""

    def __init__(self, row: Any) -> None:
        from caad.methods.crossmodal.batch import text_query

        self.text_query = text_query(row)
        self.answer = str(row.label)
        self.choices = list(row.choices or [])
        self.task = row.task
        self.category = row.category or row.task
