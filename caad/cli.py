"""The ``caad`` command: ``caad data synth``, ``caad stage1``, ``caad stage2``, ``caad train``, ``caad run``,
``caad eval``.

Each subcommand lives in ``caad.commands.<name>`` and provides ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returns an exit code). A
:class:`UserError` (and ``ValueError``, missing files) prints one line and exits with 2; a
:class:`CommandInterrupted` (a signal, state saved) prints how to continue and exits with
``128 + signal``. A process group a command started (training) is shut down before the process exits. Error messages
of library functions spell options as Python keywords (``overwrite=True``); the command prints its
own flags (``--overwrite``) instead (:func:`cli_spelling`). The dependencies' deprecation warnings
(transformers, ``torch.jit``, DeepSpeed) are not shown (:func:`quiet_dependency_warnings`).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import warnings

SUBCOMMAND_MODULES = (
    "data", "stage1", "stage2", "train", "run", "eval", "models", "experiment", "salad", "config", "topk",
)


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
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Set ``cli_parser`` on every leaf (sub)command's namespace, for :func:`cli_spelling`."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        parser.set_defaults(cli_parser=parser)
    for action in children:
        for child in set(action.choices.values()):
            _remember_parsers(child)


_PYTHON_FLAG = re.compile(r"\b([a-z][a-z0-9_]*)=(True|False)\b")


def cli_spelling(message: str, parser: argparse.ArgumentParser | None) -> str:
    """``message`` with the library's Python spellings of the command's flags in the command line's.

    Library functions name their keyword arguments (``pass overwrite=True to replace it``, ``or
    resume=True``), which is right for API users; the command prints its own options instead:
    ``name=True`` becomes ``--name`` when the command has that flag, or ``leave out --no-name`` when
    it has the negation; ``name=False`` becomes ``--no-name``. Anything else is left as it is.
    """
    if parser is None:
        return message
    flags = {
        action.dest: max(action.option_strings, key=len)
        for action in parser._actions
        if action.option_strings and isinstance(action, argparse._StoreTrueAction)
    }

    def replace(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2) == "True"
        if value and name in flags:
            return flags[name]
        if value and f"no_{name}" in flags:
            return f"leave out {flags[f'no_{name}']}"
        if not value and f"no_{name}" in flags:
            return flags[f"no_{name}"]
        return match.group(0)

    return _PYTHON_FLAG.sub(replace, message)


def _shutdown_distributed(success: bool) -> None:
    """Destroy the process group a command started (after a barrier when every rank succeeded)."""
    module = sys.modules.get("caad.train.distributed")
    if module is not None:
        module.shutdown_distributed(wait=success)


#: Modules whose deprecation notices (FutureWarning, DeprecationWarning) are for their callers' developers,
#: not for someone running ``caad``: hidden by the command only (the library leaves warnings alone).
DEPENDENCY_MODULES = (r"transformers(\.|$)", r"torch\.jit(\.|$)", r"deepspeed(\.|$)")


def quiet_dependency_warnings() -> None:
    """Ignore the dependencies' deprecation warnings (by category and module, :data:`DEPENDENCY_MODULES`);
    every other warning, caad's own included, is still shown. Call inside ``warnings.catch_warnings()``."""
    for module in DEPENDENCY_MODULES:
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=module)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes a positional list once: ``caad config show stage2 --config F k=v`` leaves k=v over
        if not hasattr(args, "items") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items = [*args.items, *extra]
    success = False
    try:
        with warnings.catch_warnings():
            quiet_dependency_warnings()
            code = int(args.func(args) or 0)
        success = True
        return code
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as error:
        message = cli_spelling(str(error), getattr(args, "cli_parser", None))
        print(f"caad {args.command}: error: {message}", file=sys.stderr)
        return 2
    except CommandInterrupted as error:
        print(f"caad {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        _shutdown_distributed(success)


if __name__ == "__main__":
    sys.exit(main())
