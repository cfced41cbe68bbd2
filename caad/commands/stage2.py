"""``caad stage2``: contrastive audio-aware distillation of the student (DeepSpeed ZeRO).

The same as ``caad train --method caad`` (the ``stage2`` section).
"""

from __future__ import annotations

import argparse

from caad.commands.train import add_training_arguments, run_training


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad stage2`` to the ``caad`` parser."""
    parser = subparsers.add_parser(
        "stage2",
        help="Stage 2: distil the teacher (audio-aware vs text-only paths) into the student",
        description="Stage 2 of CAAD (= caad train --method caad): synchronised teacher forcing on prompt + "
        "pseudo-GT, the teacher's positive and negative paths in one forward, the fused-linear contrastive KD "
        "loss, DeepSpeed ZeRO 0-3 for the student. Reads the `stage2` section of the config (train_manifest, "
        "teacher, student, output_dir, loss and optimisation settings). One process as is; many with "
        "`deepspeed` or `torchrun`. Ctrl-C saves a checkpoint; --resume continues it.",
        epilog="example: caad stage2 --config configs/demo.yaml "
        "stage2.train_manifest=runs/x/stage1/train.jsonl stage2.teacher=runs/x/warmup/final "
        "stage2.student=runs/x/models/student_init stage2.output_dir=runs/s2",
    )
    add_training_arguments(parser, "stage2")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return run_training(args, "caad", "stage2", label="stage 2")
