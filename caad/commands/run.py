"""``caad run``: the whole CAAD pipeline (corpus, Stage 1, models, teacher warm-up, Stage 2, evaluation)."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad run`` to the ``caad`` parser."""
    parser = subparsers.add_parser(
        "run",
        help="every stage in order: corpus, Stage 1, models, teacher warm-up, Stage 2 (CAAD), evaluation",
        description="Run the whole CAAD pipeline into one run folder (config key output_dir; "
        "'{timestamp}' in it expands to the start time). An existing run folder is never replaced "
        "unless overwrite=true.",
        epilog="example: caad run --config configs/demo.yaml stage2.alpha=0 output_dir=runs/kd-baseline",
    )
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stage2.lr=3e-4"
    )
    parser.set_defaults(func=_run)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def _run(args: argparse.Namespace) -> int:
    from caad.config import load_config

    started = time.perf_counter()
    config = load_config(args.config, args.overrides)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars of tiny models are noise
    from caad.pipeline import run_pipeline
    from caad.train.distributed import init_distributed

    result = run_pipeline(config)
    if not init_distributed().is_main:
        return 0
    last = result.stage2_last
    print()
    if result.eval_table:
        print(result.eval_table)
    print(f"caad run finished in {time.perf_counter() - started:.0f} s ({result.output_dir})")
    if result.warmup_last:
        print(f"  teacher warm-up: final CE loss {_fmt(result.warmup_last.get('ce_loss'))}")
    print(
        f"  stage 2: {last.get('step', 0)} steps, final loss {_fmt(last.get('loss'))} "
        f"(KD {_fmt(last.get('kd_loss'))}, CE {_fmt(last.get('ce_loss'))})"
    )
    print(f"  teacher:  {result.teacher}")
    print(f"  student:  {result.student}")
    print(f"  metrics:  {result.metrics}")
    if result.plot is not None:
        print(f"  plot:     {result.plot}")
    if result.eval_table:
        print(f"  results:  {result.output_dir / 'eval' / 'results.md'}")
    return 0
