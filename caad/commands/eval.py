"""``caad eval``: Dynamic-SUPERB-style accuracy and the linguistic-bias shift of a speech LM on a manifest.

Writes ``<out>/<name>.json`` (metrics), ``<out>/<name>.md`` (markdown table) and
``<out>/<name>.predictions.jsonl`` (see :mod:`caad.eval.runner`), prints the table, and refuses to
replace existing result files unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["register", "run"]


def _default_name(model: str, alpha: float | None) -> str:
    stem = Path(os.path.abspath(model)).name or "model"
    return f"{stem}-greedy" if alpha is None else f"{stem}-contrastive-a{alpha:g}"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a speech LM on a manifest (accuracy, linguistic-bias shift)",
        description=(
            "Answer every labelled row of a manifest with a speech LM (batched greedy decoding, or "
            "contrastive decoding with --contrastive-alpha), score the answers Dynamic-SUPERB style "
            "(normalised label contained in the normalised answer), and measure the linguistic-bias "
            "shift with the rows' neutral and contradicting hints. Writes <out>/<name>.json, "
            "<out>/<name>.md and <out>/<name>.predictions.jsonl."
        ),
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (save_pretrained form)")
    parser.add_argument("--manifest", required=True, help="JSONL manifest with labels (e.g. test.jsonl)")
    parser.add_argument("--out", default="eval", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--name", default=None, help="run name: file stem and table row (default: <model dir>-<decoding>)"
    )
    parser.add_argument(
        "--contrastive-alpha",
        type=float,
        default=None,
        metavar="A",
        help="contrastive decoding (1+A)*z_pos - A*z_neg; default: greedy decoding",
    )
    parser.add_argument(
        "--negative-mode",
        choices=("zero", "remove", "noise"),
        default="zero",
        help="negative path of contrastive decoding (default: %(default)s, audio features zeroed)",
    )
    parser.add_argument(
        "--plausibility",
        type=float,
        default=0.0,
        help="adaptive plausibility cutoff of contrastive decoding in [0, 1) (default: off)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=24, help="most tokens per answer (default: %(default)s)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``caad eval`` for parsed arguments; returns the exit code."""
    from caad.cli import UserError
    from caad.eval.runner import check_outputs_free, markdown_table, result_paths, run_eval

    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model!r}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"--model {args.model!r}: not a checkpoint directory (no config.json)")
    if not os.path.isfile(args.manifest):
        raise UserError(f"--manifest {args.manifest!r}: no such file")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    name = args.name or _default_name(args.model, args.contrastive_alpha)
    try:
        result_paths(args.out, name)
    except ValueError as error:
        raise UserError(f"--name: {error}") from error
    if not args.overwrite:
        check_outputs_free(args.out, name)
    metrics = run_eval(
        args.model,
        args.manifest,
        args.out,
        name=name,
        contrastive_alpha=args.contrastive_alpha,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        negative_mode=args.negative_mode,
        plausibility=args.plausibility,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    paths = result_paths(args.out, name)
    print(markdown_table({name: metrics}), end="")
    print(f"metrics: {paths['json']}\ntable: {paths['markdown']}\npredictions: {paths['predictions']}")
    return 0
