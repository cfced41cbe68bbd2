"""The ``caad_topk`` config section: CAAD's settings plus the stored top-k teacher.

One section serves both halves of offline CAAD: ``caad topk write`` reads ``teacher``, ``alpha``,
``negative_mode``, ``plausibility``, ``temperature``, ``k``... and writes ``topk_store``; ``caad train
--method caad_topk`` reads the same section, loads no teacher, and refuses a store written with other
settings (naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from caad.config import Stage2Config, TrainerConfig, _check, _check_checkpoint, _check_file
from caad.config import config_field as _field

__all__ = ["TopKConfig"]


@dataclass
class TopKConfig(Stage2Config):
    """CAAD from a stored top-k contrastive teacher (method ``caad_topk``; section ``caad_topk``).

    The teacher's settings (``teacher``, ``alpha``, ``negative_mode``, ``silence_seconds``, ``noise_seed``,
    ``plausibility``, ``temperature``) are those the store is written with; training checks that they
    match the store's index.
    """

    teacher: str | None = _field(None, "teacher checkpoint folder: caad topk write runs it (training never loads it)")
    topk_store: str | None = _field(None, "folder of the stored top-k teacher (written by caad topk write)")
    k: int = _field(64, "teacher tokens stored per target token (the rest of the mass: one tail bucket)")
    topk_dtype: Literal["float16", "float32"] = _field("float16", "dtype of the stored log-probabilities")
    topk_vocab_size: int | None = _field(None, "teacher columns kept before the top-k (null: the tokenizer's size)")
    shard_examples: int = _field(1000, "caad topk write: examples per shard file")
    write_batch_size: int | None = _field(None, "caad topk write: examples per teacher forward (null: batch_size)")
    write_device: str | None = _field(None, "caad topk write: torch device of the teacher (null: cuda when available)")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        checks: list[tuple[bool, str, str]] = [
            (self.k >= 1, "k", "must be >= 1"),
            (self.topk_vocab_size is None or self.topk_vocab_size >= 1, "topk_vocab_size", "must be >= 1 (or null)"),
            (self.shard_examples >= 1, "shard_examples", "must be >= 1"),
            (self.write_batch_size is None or self.write_batch_size >= 1, "write_batch_size", "must be >= 1"),
        ]
        for ok, key, message in checks:
            _check(ok, prefix, key, f"{message}, got {getattr(self, key)!r}")

    def check_paths(self, prefix: str) -> None:
        """Training's inputs: the trainer's paths and, with ``kd_weight > 0``, the store (not the teacher)."""
        TrainerConfig.check_paths(self, prefix)
        if self.needs_teacher:
            _check(
                self.topk_store is not None, prefix, "topk_store", "is required when kd_weight > 0 (caad topk write)"
            )

    def check_write_paths(self, prefix: str) -> None:
        """The writer's inputs: the train manifest, the teacher and where the store goes."""
        _check(self.train_manifest is not None, prefix, "train_manifest", "is required (a Stage 1 manifest)")
        _check_file(prefix, "train_manifest", self.train_manifest)
        _check_file(prefix, "validation_manifest", self.validation_manifest)
        _check(self.teacher is not None, prefix, "teacher", "is required to write a store (a checkpoint folder)")
        _check_checkpoint(prefix, "teacher", self.teacher)
        _check(self.topk_store is not None, prefix, "topk_store", "is required (the folder to write)")
