"""``caad salad --config configs/salad.yaml``: SALAD's Stage I and rounds of active selection, end to end.

Runs :func:`caad.methods.salad.run_salad`: builds the built-in spoken-QA set, text teacher and student when
the config names none, Stage I cross-modal distillation, then per seed and arm the rounds of measure ->
select -> synthesise -> train (each training one run of the cross-modal method on the shared trainer), and
writes ``report.json``, ``gap_per_cluster.png`` and ``measures_vs_budget.png`` into ``salad.output_dir``.
An earlier run is never overwritten; ``--resume`` continues it (also with more rounds, seeds or arms).
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "main", "register"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``caad salad`` to the ``caad`` parser (its handler: :func:`main`)."""
    parser = subparsers.add_parser(
        "salad",
        help="SALAD: cross-modal distillation, then active selection of synthetic speech (arXiv 2510.13632)",
        description="Stage I cross-modal distillation from the text teacher, then rounds of: measure each "
        "cluster's text-speech misalignment, synthesise speech for the worst clusters within a budget, train. "
        "Random selection at the same budget and Stage I alone are the baselines.",
        epilog="example: caad salad --config configs/salad.yaml salad.rounds=3 salad.arms=[kl,js,random]",
    )
    parser.add_argument("--config", default=None, help="YAML config with a 'salad' section (configs/salad.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in salad.output_dir")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. salad.rounds=3 salad.train.lr=1e-3"
    )
    parser.set_defaults(func=main)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """:func:`add_parser` under the name :mod:`caad.cli` looks for (``SUBCOMMAND_MODULES``)."""
    add_parser(subparsers)


def main(args: argparse.Namespace) -> int:
    """Run SALAD as configured; print where the report and plots are."""
    from caad.methods.salad import load_salad_config, run_salad

    config = load_salad_config(args.config, args.overrides)
    report = run_salad(config, resume=args.resume)
    print(f"salad: report {config.output_dir}/report.json")
    for arm, rows in report["arms"].items():
        if not rows:
            continue
        last = rows[-1]
        gap = last["measures"]["gap"]
        speech = last["measures"]["speech_accuracy"]
        print(
            f"  {arm}: round {last['round']}, {last['spent']['budget_units']:g} {report['budget_unit']}: "
            f"gap {gap['value']:.3f}, speech accuracy {speech['value']:.3f}"
        )
    for plot in report["plots"].values():
        if plot is not None:
            print(f"  plot: {plot}")
    return 0
