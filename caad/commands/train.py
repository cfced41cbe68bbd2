"""``caad train --method NAME``: any registered distillation method on the shared trainer.

The method reads its own config section (``--section``, default the method's: ``stage2`` for
``caad``), which holds the trainer's settings (paths, optimisation, DeepSpeed, checkpoints) and the
method's own. ``caad stage2`` is ``caad train --method caad``. One process as is; many with
``deepspeed`` or ``torchrun`` (every rank runs the same command).
"""

from __future__ import annotations

import argparse

__all__ = ["add_training_arguments", "register", "run_training"]


def add_training_arguments(parser: argparse.ArgumentParser, section_hint: str) -> None:
    """The options every training command shares: --config, --resume, --force-resume, overrides."""
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument(
        "--resume", action="store_true", help=f"continue the run in {section_hint}.output_dir from its last checkpoint"
    )
    parser.add_argument(
        "--force-resume",
        action="store_true",
        help="--resume even though the learning rate or a key method setting (e.g. teacher, alpha) changed",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {section_hint}.lr=3e-4"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad train`` (alias ``caad distill``) to the ``caad`` parser."""
    from caad.methods import available_methods

    parser = subparsers.add_parser(
        "train",
        aliases=["distill"],
        help="train a student with any registered distillation method (DeepSpeed ZeRO)",
        description="Run one training of a distillation method on the shared trainer: the method's config "
        "section gives the train manifest, the student, the output folder, the optimisation and DeepSpeed "
        "settings and the method's own (teachers, loss). Interrupt with Ctrl-C (or SIGTERM): a checkpoint "
        "is saved and --resume continues exactly.",
        epilog="example: caad train --method caad --config configs/demo.yaml "
        "stage2.train_manifest=runs/x/stage1/train.jsonl stage2.teacher=runs/x/warmup/final "
        "stage2.student=runs/x/models/student_init stage2.output_dir=runs/s2",
    )
    parser.add_argument("--method", required=True, choices=available_methods(), help="the distillation method")
    parser.add_argument(
        "--section", default=None, help="config section to read (default: the method's own, e.g. stage2 for caad)"
    )
    add_training_arguments(parser, "<section>")
    parser.set_defaults(func=_run)


def run_training(args: argparse.Namespace, method_name: str, section: str | None, label: str | None = None) -> int:
    """Load the config, run ``method_name`` on ``section``, print where the products are (``label``: the
    summary's first word, default ``<method> [<section>]``)."""
    from caad.config import load_config
    from caad.methods import get_method

    method_class = get_method(method_name)
    section = section or method_class.section
    config = load_config(args.config, args.overrides, {section: method_class.config_class}).section(section)
    method = method_class(config, section)
    from caad.train import train
    from caad.train.distributed import init_distributed

    result = train(method, resume=args.resume or args.force_resume, force_resume=args.force_resume)
    if init_distributed().is_main:
        title = label or f"{method_name} [{section}]"
        print(f"{title}: {result.steps} steps; last loss {result.last.get('loss', float('nan')):.4f}")
        if result.last.get("val_loss") is not None:
            print(f"  validation loss {result.last['val_loss']:.4f}")
        print(f"  student:  {result.final_model}")
        print(f"  metrics:  {result.metrics}")
        if result.plot is not None:
            print(f"  plot:     {result.plot}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_training(args, args.method, args.section)
