"""``caad eval``: Dynamic-SUPERB-style accuracy and MCR-BENCH bias metrics of a speech LM on a manifest.

Writes ``<out>/<name>.predictions.jsonl`` as it goes, then ``<out>/<name>.json`` (metrics) and
``<out>/<name>.md`` (markdown table) (see :mod:`caad.eval.runner`), prints the table and any warning
(too few items to mean much), and refuses to replace existing result files unless ``--overwrite``.
The run is named after the model and the decoding unless ``--name`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

__all__ = ["register", "run"]


def _default_name(model: str, alpha: float | None, negative_mode: str = "remove", plausibility: float = 0.0,
                  audio_mode: str = "positive") -> str:  # fmt: skip
    from caad.eval.runner import default_run_name

    return default_run_name(model, alpha, negative_mode, plausibility, audio_mode)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    from caad.models.interface import DEFAULT_NEGATIVE_MODE, NEGATIVE_MODE_ALIASES, NEGATIVE_MODES

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a speech LM on a manifest (accuracy, text-condition bias metrics)",
        description=(
            "Answer every labelled row of a manifest with a speech LM (batched greedy decoding, or "
            "contrastive decoding with --contrastive-alpha) and score the answers Dynamic-SUPERB style: "
            "right when the answer names the label, no other candidate label, and does not negate it. "
            "Rows with text contexts (MCR-BENCH conditions: neutral, faithful, adversarial, irrelevant) "
            "also give the text influence rate, the shift and the modal robustness. Every figure comes "
            "with a 95%% bootstrap interval. Writes <out>/<name>.predictions.jsonl as it goes, then "
            "<out>/<name>.json and <out>/<name>.md."
        ),
    )
    negative_choices = (*NEGATIVE_MODES, *NEGATIVE_MODE_ALIASES)
    parser.add_argument("--model", required=True, help="checkpoint directory (save_pretrained form)")
    parser.add_argument("--manifest", required=True, help="JSONL manifest with labels (e.g. test.jsonl)")
    parser.add_argument("--out", default="eval", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--name",
        default=None,
        help="run name: file stem and table row (default: from the model and the decoding, e.g. "
        "stage2-final-greedy or teacher-cd-a2-remove)",
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
        choices=negative_choices,
        default=DEFAULT_NEGATIVE_MODE,
        help="negative path of contrastive decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--plausibility",
        type=float,
        default=0.0,
        help="adaptive plausibility cutoff of contrastive decoding in [0, 1) (default: off)",
    )
    parser.add_argument(
        "--audio-mode",
        choices=("positive", *negative_choices),
        default="positive",
        help="greedy decoding on this path: positive (the audio, default) or a negative mode, to measure "
        "what the model answers without the audio",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=24, help="most tokens per answer (default: %(default)s)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap replicates of the intervals (default: %(default)s)"
    )
    parser.add_argument(
        "--chat-template",
        choices=("auto", "on", "off"),
        default="auto",
        help="prompts in the tokenizer's chat template: auto (when it has one, as in training), on, off",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="also read .bin/.pt weights (weights_only)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a tokenizer that ships code")
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
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.contrastive_alpha is not None and args.audio_mode != "positive":
        raise UserError("--audio-mode: contrastive decoding (--contrastive-alpha) runs on the positive path")
    name = args.name or _default_name(
        args.model, args.contrastive_alpha, args.negative_mode, args.plausibility, args.audio_mode
    )
    try:
        result_paths(args.out, name)
    except ValueError as error:
        raise UserError(f"--name: {error}") from error
    if not args.overwrite:
        check_outputs_free(args.out, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # printed below, once, in the command's words
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
            audio_mode=args.audio_mode,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            num_bootstrap=args.bootstrap,
            load_options={
                "chat_template": {"auto": None, "on": True, "off": False}[args.chat_template],
                "allow_pickle": args.allow_pickle,
                "trust_remote_code": args.trust_remote_code,
            },
        )
    paths = result_paths(args.out, name)
    print(markdown_table({name: metrics}), end="")
    print(f"metrics: {paths['json']}\ntable: {paths['markdown']}\npredictions: {paths['predictions']}")
    for warning in metrics.get("warnings") or []:
        print(f"caad eval: warning: {warning}", file=sys.stderr)
    return 0
