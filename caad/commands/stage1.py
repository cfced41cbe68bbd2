"""``caad stage1``: write a manifest with one pseudo-GT answer per example."""

from __future__ import annotations

import argparse

from caad.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad stage1`` to the ``caad`` parser."""
    parser = subparsers.add_parser(
        "stage1",
        help="pseudo-GT generation: a new manifest with one target answer per example",
        description="Stage 1 of CAAD: turn each example's metadata and instruction into a target "
        "answer (pseudo-GT). Writes a new manifest, row by row; an interrupted run is resumed by "
        "running the same command again.",
    )
    parser.add_argument("--manifest", required=True, help="input JSONL manifest (never modified)")
    parser.add_argument("--out", required=True, help="output JSONL manifest")
    parser.add_argument(
        "--generator",
        choices=("template", "lm"),
        default="template",
        help="answer generator (default: template)",
    )
    parser.add_argument("--model", default=None, help="--generator lm: folder of a local HF causal LM")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per LM batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="--generator lm: answer length (default 64)")
    parser.add_argument("--device", default="cpu", help="--generator lm: torch device (default cpu)")
    parser.add_argument("--no-resume", action="store_true", help="fail if --out exists instead of continuing it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out from scratch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from caad.stage1 import generate_pseudo_gt

    if args.generator == "lm" and args.model is None:
        raise UserError("--generator lm needs --model PATH (a folder with a saved causal LM)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    result = generate_pseudo_gt(
        args.manifest,
        args.out,
        generator=args.generator,
        model_path=args.model,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
    )
    print(
        f"stage 1: {result.num_generated} rows generated, {result.num_skipped} kept from an earlier run, "
        f"written to {result.output}"
    )
    if result.num_fallbacks:
        print(
            f"stage 1: the LM answer was replaced by the template answer in {result.num_fallbacks} rows "
            f"({result.num_fallback_empty} empty, {result.num_fallback_no_label} without the label)"
        )
    return 0
