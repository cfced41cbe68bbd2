"""``caad config show [SECTION]``: every config key with its type, default and one-line help.

Generated from the dataclasses that validate configs (:func:`caad.config.describe_keys`), so the
listing cannot drift from what ``caad run`` / ``caad train`` accept. Method sections declared in
the methods' own modules (``crossmodal``, ``layerwise`` ...) are included. With ``--config FILE``
(and ``key=value`` overrides) each key also shows the value that file resolves to.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

__all__ = ["format_value", "register", "sections", "show"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad config show`` to the ``caad`` parser."""
    parser = subparsers.add_parser(
        "config",
        help="list the config keys: type, default and meaning (caad config show [SECTION])",
        description="Inspect the YAML config that caad run, caad stage2 and caad train read.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    show_parser = actions.add_parser(
        "show",
        help="every key of a section (or of all) with its type, default and one-line help",
        description="List every config key with its type, default and one-line help; a SECTION (e.g. stage2, "
        "data, crossmodal) lists only that section. With --config FILE, each key also shows the value the "
        "file (plus KEY=VALUE overrides) resolves to.",
        epilog="examples: caad config show stage2 | caad config show crossmodal | "
        "caad config show stage2 --config configs/demo.yaml stage2.lr=3e-4",
    )
    show_parser.add_argument("--config", default=None, help="also show the values this YAML file resolves to")
    # one positional list (argparse cannot take an optional SECTION and KEY=VALUEs around --config)
    show_parser.add_argument(
        "items",
        nargs="*",
        metavar="[SECTION] [KEY=VALUE ...]",
        help="one section (default: all), then config overrides applied to the shown values",
    )
    show_parser.set_defaults(func=_run)


def sections() -> dict[str, tuple[type, str]]:
    """``name -> (config class, one-line help)`` of every section: built-in ones, then the methods'."""
    from caad.config import CaadConfig
    from caad.methods import method_sections

    out: dict[str, tuple[type, str]] = {}
    for f in dataclasses.fields(CaadConfig):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out[f.name] = (f.default_factory, f.metadata.get("help", ""))
    for name, cls in method_sections().items():
        if name not in out:
            doc = (cls.__doc__ or "").strip().splitlines()
            out[name] = (cls, doc[0].replace("``", "") if doc else "")
    return out


def format_value(value: Any) -> str:
    """A value as it is written in YAML / on the command line (``null``, ``true``, ``[0.8, 0.1]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() else value
    return str(value)


def show(section: str | None = None, values: dict[str, Any] | None = None) -> str:
    """The listing of ``section`` (``None``: all); ``values``: a resolved config (nested dict) to show too.

    Raises :class:`caad.cli.UserError` naming the known sections for an unknown ``section``.
    """
    from caad.cli import UserError
    from caad.config import CaadConfig, describe_keys

    known = sections()
    if section is not None and section not in known and section not in ("output_dir", "overwrite"):
        raise UserError(f"unknown config section {section!r}; known sections: {', '.join(known)}")
    lines: list[str] = []
    top = [row for row in describe_keys(CaadConfig) if "." not in row[0] and row[1] != "section"]
    if section is None or section in ("output_dir", "overwrite"):
        lines.append("(top level)")
        lines += _rows([row for row in top if section is None or row[0] == section], values)
    for name, (cls, help_text) in known.items():
        if section is not None and name != section:
            continue
        lines.append("")
        lines.append(f"{name}: {help_text}" if help_text else f"{name}:")
        lines += _rows(describe_keys(cls, name), values)
    return "\n".join(lines).lstrip("\n") + "\n"


def _rows(rows: list[tuple[str, str, Any, str]], values: dict[str, Any] | None) -> list[str]:
    out = []
    for key, type_name, default, help_text in rows:
        line = f"  {key}  ({type_name})  default {format_value(default)}"
        if values is not None:
            node: Any = values
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            line += f"  value {format_value(node)}" + ("" if node == default else "  (changed)")
        out.append(line)
        if help_text:
            out.append(f"      {help_text}")
    return out


def _run(args: argparse.Namespace) -> int:
    from caad.cli import UserError

    items = list(args.items)
    section = items.pop(0) if items and "=" not in items[0] else None
    stray = [item for item in items if "=" not in item]
    if stray:
        raise UserError(f"give one SECTION, then KEY=VALUE overrides; got {' '.join(args.items)!r}")
    if section is not None:
        show(section)  # an unknown section is an error before any config is read
    args.section, args.overrides = section, items
    values = None
    if args.config is not None or args.overrides:
        from caad.config import CaadConfig, config_to_dict, load_config

        known = sections()
        builtin = {f.name for f in dataclasses.fields(CaadConfig)}
        method = args.section in known and args.section not in builtin
        extra = {args.section: known[args.section][0]} if method else None
        values = config_to_dict(load_config(args.config, args.overrides, extra))
    print(show(args.section, values), end="")
    return 0
