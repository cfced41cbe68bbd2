"""``caad experiment --config configs/experiment.yaml [--resume | --overwrite] [KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["add_parser", "main"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``caad experiment`` to the ``caad`` parser (``func`` is :func:`main`)."""
    parser = subparsers.add_parser(
        "experiment",
        help="arms x seeds: teacher greedy/contrastive, student SFT/KD/CAAD, alpha sweeps, schedules, adaptive alpha",
        description="Run the CAAD experiment of a config into its output_dir: per seed one teacher shared by every "
        "arm; results.json, results.md and plots/ at the end. An existing experiment is never replaced "
        "unless --overwrite; --resume continues one (finished arms are skipped).",
        epilog="example: caad experiment --config configs/experiment_mini.yaml output_dir=runs/mini",
    )
    parser.add_argument("--config", required=True, help="experiment YAML (configs/experiment.yaml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the experiment in output_dir")
    group.add_argument("--overwrite", action="store_true", help="replace the experiment in output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. seeds=[0]")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the experiment of ``args``; prints the results table. Returns the exit code."""
    from caad.experiment.config import load_experiment_config
    from caad.experiment.harness import run_experiment

    config = load_experiment_config(args.config, args.overrides)
    command = "caad " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    result = run_experiment(
        config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, command=command
    )
    print(result.results_md.read_text(encoding="utf-8"))
    print(f"caad experiment: {result.output_dir} ({result.seconds:.0f} s; {len(result.ran)} unit(s) run, "
          f"{len(result.skipped)} already finished)")
    return 0
