"""The ``caad`` command: ``caad data synth``, ``caad stage1``, ``caad stage2``, ``caad run``, ``caad eval``.

Each subcommand lives in ``caad.commands.<name>`` and provides ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("data", "stage1", "stage2", "run", "eval")


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2, no traceback."""


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"caad {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
