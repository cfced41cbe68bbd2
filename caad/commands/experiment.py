"""``caad experiment``: the CAAD experiment (arms x seeds); see :mod:`caad.experiment`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad experiment`` to the ``caad`` parser."""
    from caad.experiment.cli import add_parser

    add_parser(subparsers)
