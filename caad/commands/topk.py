"""``caad topk write``: store CAAD's contrastive teacher's top-k log-probabilities for offline training.

Reads the ``caad_topk`` section (:class:`caad.methods.caad_topk.TopKConfig`): the teacher and its
settings, the Stage 1 manifests, ``k`` and the store folder ``topk_store``; ``caad train --method
caad_topk`` then trains from the store with no teacher in memory.
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad topk write`` to the ``caad`` parser."""
    parser = subparsers.add_parser(
        "topk",
        help="offline distillation: store a teacher's top-k contrastive log-probabilities",
        description="Offline CAAD: write the contrastive teacher's top-k log-probabilities per target token "
        "once, then train with 'caad train --method caad_topk' without the teacher in memory.",
    )
    actions = parser.add_subparsers(dest="topk_command", metavar="ACTION", required=True)
    write = actions.add_parser(
        "write",
        help="run the teacher over the Stage 1 manifests and write the top-k store",
        description="Run CAAD's teacher (positive and negative paths, teacher-forced on prompt + pseudo-GT) "
        "over the train (and validation) manifest and write, per target token, the k largest "
        "log_softmax(z_hat / temperature) to <section>.topk_store (written to a temporary folder, moved into "
        "place when complete).",
        epilog="example: caad topk write --config configs/demo.yaml caad_topk.train_manifest=runs/x/stage1/train.jsonl "
        "caad_topk.teacher=runs/x/warmup/final caad_topk.topk_store=runs/x/topk caad_topk.k=64",
    )
    write.add_argument("--config", default=None, help="YAML config file with a caad_topk section")
    write.add_argument("--section", default="caad_topk", help="config section to read (default caad_topk)")
    write.add_argument("--overwrite", action="store_true", help="replace an existing store")
    write.add_argument("--no-progress", action="store_true", help="no progress bar")
    write.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. caad_topk.k=32")
    write.set_defaults(func=_write)


def _write(args: argparse.Namespace) -> int:
    from caad.config import load_config
    from caad.methods.caad_topk import TopKConfig, TopKStore, write_topk_store

    config = load_config(args.config, args.overrides, {args.section: TopKConfig}).section(args.section)
    path = write_topk_store(config, section=args.section, overwrite=args.overwrite, progress=not args.no_progress)
    store = TopKStore(path)
    rows = sum(int(n) for _, n in store.examples.values())
    print(f"top-k store: {len(store)} examples, {rows} target tokens, k={store.meta['k']}, written to {path}")
    return 0
