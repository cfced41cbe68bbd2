"""``caad experiment --config configs/experiment.yaml [--resume | --overwrite] [--setup-only] [KEY=VALUE ...]``.

The config's ``suite`` picks the experiment: ``caad`` (:mod:`caad.experiment.harness`) or ``spoken_qa`` (the
text-teacher ablations, :mod:`caad.experiment.spoken_qa`; ``--setup-only`` builds its shared set and models).
"""

from __future__ import annotations

import argparse
import shlex

__all__ = ["add_parser", "command_line", "main"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``caad experiment`` to the ``caad`` parser (``func`` is :func:`main`)."""
    parser = subparsers.add_parser(
        "experiment",
        help="arms x seeds with intervals: the CAAD arms (suite caad) or the text-teacher ablations (suite spoken_qa)",
        description="Run the experiment of a config into its output_dir: suite caad (per seed one teacher shared by "
        "every arm: teacher greedy/contrastive, student SFT/KD/CAAD, alpha sweeps) or suite spoken_qa (a shared "
        "text teacher and student; cross-modal, source-wise and layer-wise arms: forgetting and modality gap); "
        "results.json, results.md and plots/ at the end. An existing experiment is never replaced unless "
        "--overwrite; --resume continues one (finished arms are skipped).",
        epilog="examples: caad experiment --config configs/experiment_mini.yaml output_dir=runs/mini; "
        "caad experiment --config configs/experiment_crossmodal.yaml --setup-only output_dir=runs/spoken_qa",
    )
    parser.add_argument("--config", required=True, help="experiment YAML (configs/experiment.yaml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the experiment in output_dir")
    group.add_argument("--overwrite", action="store_true", help="replace the experiment in output_dir")
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="suite spoken_qa: build only the shared set, tokenizer, text teacher and student (for caad train "
        "--config configs/crossmodal*.yaml), no arms",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. seeds=[0]")
    parser.set_defaults(func=main)
    return parser


def command_line(args: argparse.Namespace) -> list[str]:
    """The ``caad experiment`` command of ``args`` as words (the report's provenance; from the parsed arguments,
    so it is right however the command was started)."""
    flags = [flag for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite),
                                   ("--setup-only", args.setup_only), ("--no-progress", args.no_progress)) if on]
    return ["caad", "experiment", "--config", args.config, *flags, *args.overrides]


def main(args: argparse.Namespace) -> int:
    """Run the experiment of ``args``; prints the results table. Returns the exit code."""
    from caad.experiment.config import load_experiment_config
    from caad.experiment.harness import run_experiment

    config = load_experiment_config(args.config, args.overrides)
    command = " ".join(shlex.quote(a) for a in command_line(args))
    result = run_experiment(
        config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, command=command,
        setup_only=args.setup_only,
    )
    if result.results_md is None:
        print(f"caad experiment: set-up in {result.output_dir}/shared ({result.seconds:.0f} s; {len(result.ran)} "
              f"unit(s) run, {len(result.skipped)} already finished)")
        return 0
    print(result.results_md.read_text(encoding="utf-8"))
    print(f"caad experiment: {result.output_dir} ({result.seconds:.0f} s; {len(result.ran)} unit(s) run, "
          f"{len(result.skipped)} already finished)")
    return 0
