"""Helpers shared by test_stage2.py and test_cli.py: a Stage 1 manifest and tiny saved models.

Not a conftest (tests/conftest.py belongs to the data fixtures); import it from a test module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Prepared:
    """A pseudo-GT manifest and tiny teacher/student checkpoints sharing one tokenizer."""

    train: Path
    teacher: Path
    student: Path
    root: Path


def prepare(corpus, root: Path) -> Prepared:
    """Stage 1 (template) on the corpus's train split, a tokenizer, a tiny teacher and student."""
    from caad.data import read_manifest
    from caad.models import tiny_student, tiny_teacher, train_tokenizer
    from caad.stage1 import generate_pseudo_gt

    root.mkdir(parents=True, exist_ok=True)
    train = root / "train_pgt.jsonl"
    generate_pseudo_gt(corpus.train, train, progress=False)
    rows = read_manifest(train)
    texts = [r.instruction for r in rows] + [r.pseudo_gt for r in rows]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    tiny_teacher(tokenizer, seed=0).save_pretrained(root / "teacher")
    tiny_student(tokenizer, seed=1).save_pretrained(root / "student")
    return Prepared(train=train, teacher=root / "teacher", student=root / "student", root=root)


def stage2_settings(prepared: Prepared, output_dir: Path, **overrides: object) -> dict:
    """A small ``stage2`` section (fast on CPU) for the prepared models."""
    settings = dict(
        train_manifest=str(prepared.train),
        teacher=str(prepared.teacher),
        student=str(prepared.student),
        output_dir=str(output_dir),
        batch_size=4,
        max_steps=3,
        lr=3.0e-3,
        scheduler="constant",
        progress=False,
        tensorboard=False,
    )
    settings.update(overrides)
    return settings


def write_config(path: Path, stage2: dict, **sections: object) -> Path:
    """A YAML config file with a ``stage2`` section (and any other sections)."""
    path.write_text(yaml.safe_dump({"stage2": stage2, **sections}), encoding="utf-8")
    return path
