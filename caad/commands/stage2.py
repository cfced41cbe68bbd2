"""``caad stage2``: contrastive audio-aware distillation of the student (DeepSpeed ZeRO)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad stage2`` to the ``caad`` parser."""
    parser = subparsers.add_parser(
        "stage2",
        help="Stage 2: distil the teacher (audio-aware vs text-only paths) into the student",
        description="Stage 2 of CAAD: synchronised teacher forcing on prompt + pseudo-GT, the teacher's "
        "positive and negative paths in one forward, the fused-linear contrastive KD loss, DeepSpeed ZeRO "
        "0-3 for the student. Reads the `stage2` section of the config (train_manifest, teacher, student, "
        "output_dir, loss and optimisation settings). One process as is; many with `deepspeed` or "
        "`torchrun`.",
        epilog="example: caad stage2 --config configs/demo.yaml "
        "stage2.train_manifest=runs/x/stage1/train.jsonl stage2.teacher=runs/x/warmup/final "
        "stage2.student=runs/x/models/student_init stage2.output_dir=runs/s2",
    )
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in stage2.output_dir")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stage2.lr=3e-4"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from caad.config import load_config

    config = load_config(args.config, args.overrides)
    from caad.stage2 import train_stage2

    result = train_stage2(config.stage2, resume=args.resume)
    from caad.stage2.distributed import init_distributed

    if init_distributed().is_main:
        print(f"stage 2: {result.steps} steps; last loss {result.last.get('loss', float('nan')):.4f}")
        print(f"  student:  {result.final_model}")
        print(f"  metrics:  {result.metrics}")
        if result.plot is not None:
            print(f"  plot:     {result.plot}")
    return 0
