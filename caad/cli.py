"""The ``caad`` command: ``caad data synth``, ``caad stage1``, ``caad stage2``, ``caad train``, ``caad run``,
``caad eval``.

Each subcommand lives in ``caad.commands.<name>`` and provides ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returns an exit code). A
:class:`UserError` (and ``ValueError``, missing files) prints one line and exits with 2; a
:class:`CommandInterrupted` (a signal, state saved) prints how to continue and exits with
``128 + signal``. A process group a command started (training) is shut down before the process exits.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("data", "stage1", "stage2", "train", "run", "eval", "models", "experiment", "salad")


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2, no traceback."""


class CommandInterrupted(Exception):
    """A command stopped on SIGINT/SIGTERM after saving what it needs to continue; ``exit_code``."""

    exit_code = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caad", description="Contrastive Audio-Aware Distillation of speech LMs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"caad.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"caad.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def _shutdown_distributed(success: bool) -> None:
    """Destroy the process group a command started (after a barrier when every rank succeeded)."""
    module = sys.modules.get("caad.train.distributed")
    if module is not None:
        module.shutdown_distributed(wait=success)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    success = False
    try:
        code = int(args.func(args) or 0)
        success = True
        return code
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"caad {args.command}: error: {error}", file=sys.stderr)
        return 2
    except CommandInterrupted as error:
        print(f"caad {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        _shutdown_distributed(success)


if __name__ == "__main__":
    sys.exit(main())
