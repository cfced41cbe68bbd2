"""``caad data synth``: synthesise the built-in speech corpus."""

from __future__ import annotations

import argparse

from caad.cli import UserError


def _splits(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}")
    return values  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad data`` (with its ``synth`` subcommand) to the ``caad`` parser."""
    parser = subparsers.add_parser("data", help="datasets: synthesise the built-in speech corpus")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    synth = actions.add_parser(
        "synth",
        help="synthesise the built-in speech corpus (espeak-ng) with train/validation/test manifests",
        description="Synthesise the built-in speech corpus: spoken sentences with known voice, speaking "
        "rate and pitch, and Dynamic-SUPERB-style tasks (speaker gender, speaking rate, pitch, spoken "
        "content). Deterministic for a seed.",
    )
    synth.add_argument("--out", required=True, help="corpus folder to create (must not exist or be empty)")
    synth.add_argument("--num-examples", type=int, default=200, help="examples over all splits (default 200)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--splits",
        type=_splits,
        default=(0.8, 0.1, 0.1),
        help="train,validation,test fractions (default 0.8,0.1,0.1)",
    )
    synth.add_argument("--sampling-rate", type=int, default=16000, help="rate of the WAV files (default 16000)")
    synth.add_argument("--workers", type=int, default=None, help="utterances rendered at once (default: up to 2)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from caad.data.synth import synthesize_corpus

    if args.num_examples < 1:
        raise UserError(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    paths = synthesize_corpus(
        args.out,
        num_examples=args.num_examples,
        seed=args.seed,
        overwrite=args.overwrite,
        splits=args.splits,
        sampling_rate=args.sampling_rate,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"corpus written to {paths.root}")
    for split, manifest in paths.manifests.items():
        print(f"  {split}: {manifest}")
    return 0
