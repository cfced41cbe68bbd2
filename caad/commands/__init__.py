"""Subcommands of the ``caad`` command line (see ``caad.cli``)."""
