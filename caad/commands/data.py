"""``caad data``: synthesise the built-in corpus, check a manifest, import a benchmark.

- ``caad data synth``: the built-in speech corpus (MCR-BENCH in miniature, :mod:`caad.data.synth`);
- ``caad data check MANIFEST...``: every row and audio file checked before training
  (:mod:`caad.data.checks`); exit code 1 when a manifest has errors;
- ``caad data import dynamic-superb|mcr-bench SOURCE --out DIR``: a local copy of a benchmark into
  manifests (:mod:`caad.data.importers`); nothing is downloaded.
"""

from __future__ import annotations

import argparse

from caad.cli import UserError


def _splits(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}")
    return values  # type: ignore[return-value]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``caad data`` (``synth``, ``check``, ``import``) to the ``caad`` parser."""
    parser = subparsers.add_parser(
        "data", help="datasets: synthesise the built-in corpus, check a manifest, import a benchmark"
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    _register_synth(actions)
    _register_check(actions)
    _register_import(actions)


def _register_synth(actions: argparse._SubParsersAction) -> None:
    synth = actions.add_parser(
        "synth",
        help="synthesise the built-in speech corpus (espeak-ng) with train/validation/test manifests",
        description="Synthesise the built-in speech corpus, MCR-BENCH in miniature: spoken sentences with "
        "known voice, speaking rate and pitch, Dynamic-SUPERB-style tasks (speaker gender, speaking rate, "
        "pitch, spoken content), and text contexts in the prompts. In training a context states the "
        "attribute in --context-share of the prompts and agrees with the audio with probability "
        "--context-agreement; validation and test items are asked under the four MCR-BENCH conditions "
        "(neutral, faithful, adversarial, irrelevant). Also writes text_prior.jsonl, text-only prompts "
        "whose context predicts the answer. Deterministic for a seed.",
    )
    synth.add_argument("--out", required=True, help="corpus folder to create (must not exist or be empty)")
    synth.add_argument("--num-examples", type=int, default=200, help="audio items over all splits (default 200)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--splits",
        type=_splits,
        default=(0.8, 0.1, 0.1),
        help="train,validation,test fractions of the items (default 0.8,0.1,0.1)",
    )
    synth.add_argument(
        "--context-share", type=_fraction, default=0.5,
        help="share of training prompts with a context stating the attribute (default 0.5)",
    )  # fmt: skip
    synth.add_argument(
        "--context-agreement", type=_fraction, default=0.8,
        help="probability that such a context agrees with the audio (default 0.8)",
    )  # fmt: skip
    synth.add_argument(
        "--irrelevant-share", type=_fraction, default=0.1,
        help="share of the other training prompts with an unrelated context (default 0.1)",
    )  # fmt: skip
    synth.add_argument(
        "--text-prior-examples", type=int, default=None,
        help="records in text_prior.jsonl (default: as many as training items)",
    )  # fmt: skip
    synth.add_argument("--sampling-rate", type=int, default=16000, help="rate of the WAV files (default 16000)")
    synth.add_argument("--workers", type=int, default=None, help="utterances rendered at once (default: up to 2)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from caad.data.synth import synthesize_corpus

    if args.num_examples < 1:
        raise UserError(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.text_prior_examples is not None and args.text_prior_examples < 0:
        raise UserError(f"--text-prior-examples must be >= 0, got {args.text_prior_examples}")
    paths = synthesize_corpus(
        args.out,
        num_examples=args.num_examples,
        seed=args.seed,
        overwrite=args.overwrite,
        splits=args.splits,
        sampling_rate=args.sampling_rate,
        workers=args.workers,
        progress=not args.no_progress,
        context_share=args.context_share,
        context_agreement=args.context_agreement,
        irrelevant_share=args.irrelevant_share,
        text_prior_examples=args.text_prior_examples,
    )
    print(f"corpus written to {paths.root}")
    for split, manifest in paths.manifests.items():
        print(f"  {split}: {manifest}")
    print(f"  text prior: {paths.text_prior}")
    return 0


def _register_check(actions: argparse._SubParsersAction) -> None:
    check = actions.add_parser(
        "check",
        help="check every row and audio file of manifests before training or evaluation",
        description="Read every row of each manifest and every audio file it names, and report every "
        "problem with the manifest, line, row id and file: bad JSON or fields, duplicate ids, missing "
        "required fields, missing, unreadable, truncated or empty audio, clips too short (or longer than "
        "--max-seconds). Clips longer than --window-seconds are counted: they will be cut to the window, "
        "as the Qwen2-Audio processor does. Exit code 1 when there are errors.",
    )
    check.add_argument("manifests", nargs="+", metavar="MANIFEST", help="JSONL manifest(s) to check")
    check.add_argument(
        "--require", default="",
        help="comma-separated fields every row must have: label, pseudo_gt, category, instruction",
    )  # fmt: skip
    check.add_argument("--min-seconds", type=float, default=0.1, help="shortest clip allowed (default 0.1)")
    check.add_argument("--max-seconds", type=float, default=None, help="longest clip allowed (default: none)")
    check.add_argument(
        "--window-seconds", type=float, default=30.0,
        help="the model's audio window; longer clips are counted as truncated (default 30, Whisper's)",
    )  # fmt: skip
    check.add_argument("--no-decode", action="store_true", help="read audio headers only (faster, finds less)")
    check.add_argument("--show", type=int, default=20, help="problems listed per manifest (default 20)")
    check.add_argument("--progress", action="store_true", help="show a progress bar")
    check.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from caad.data.checks import check_manifest

    require = [name.strip() for name in args.require.split(",") if name.strip()]
    status = 0
    for manifest in args.manifests:
        try:
            report = check_manifest(
                manifest,
                require=require,
                min_seconds=args.min_seconds,
                max_seconds=args.max_seconds,
                window_seconds=args.window_seconds,
                decode=not args.no_decode,
                progress=args.progress,
            )
        except FileNotFoundError as error:
            raise UserError(str(error)) from error
        except ValueError as error:
            raise UserError(f"--require: {error}" if "require" in str(error) else str(error)) from error
        print(report.summary(max_shown=args.show))
        if not report.ok:
            status = 1
    return status


def _register_import(actions: argparse._SubParsersAction) -> None:
    importer = actions.add_parser(
        "import",
        help="import a local copy of Dynamic-SUPERB or MCR-BENCH into manifests",
        description="Turn a local copy of a benchmark into caad manifests (nothing is downloaded).",
    )
    kinds = importer.add_subparsers(dest="import_kind", metavar="BENCHMARK")
    kinds.required = True
    superb = kinds.add_parser(
        "dynamic-superb",
        help="a Dynamic-SUPERB task dataset (Hugging Face datasets layout: audio, instruction, label, file)",
        description="Import a Dynamic-SUPERB task: a folder written by save_to_disk, a folder of parquet files "
        "(a hub snapshot) or a parquet file, with the columns audio, instruction, label and file. Writes "
        "<out>/<split>.jsonl and the audio under <out>/audio/.",
    )
    superb.add_argument("source", help="the local dataset (folder or parquet file)")
    superb.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    superb.add_argument("--task", default=None, help="task name in the manifests (default: the dataset's name)")
    superb.add_argument("--category", default=None, help="task category for per-category means")
    superb.add_argument("--overwrite", action="store_true", help="replace an earlier import in --out")
    superb.add_argument("--no-progress", action="store_true", help="no progress bar")
    superb.set_defaults(func=_run_import_superb)
    mcr = kinds.add_parser(
        "mcr-bench",
        help="MCR-BENCH (audio with faithful / adversarial / irrelevant / neutral texts)",
        description="Import MCR-BENCH: <source>/<TASK>/<TASK>.json (AQA, SER, VSC) with audio beside it, each "
        "sample with gt, neutral (the question), faithful, adversarial and irrelevant (descriptions). One "
        "row per sample and condition; writes <out>/<TASK>.jsonl and <out>/test.jsonl.",
    )
    mcr.add_argument("source", help="the MCR-BENCH folder (or one task's JSON file)")
    mcr.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    mcr.add_argument("--tasks", default=None, help="comma-separated tasks to import (default: all found)")
    mcr.add_argument("--overwrite", action="store_true", help="replace an earlier import in --out")
    mcr.add_argument("--no-progress", action="store_true", help="no progress bar")
    mcr.set_defaults(func=_run_import_mcr)


def _print_import(result) -> None:  # noqa: ANN001
    print(f"imported into {result.out_dir}")
    for name, path in result.manifests.items():
        print(f"  {name}: {path} ({result.rows[name]} rows)")
    if result.skipped:
        print(f"  {result.skipped} source records without a label were left out")


def _run_import_superb(args: argparse.Namespace) -> int:
    from caad.data.importers import import_dynamic_superb

    result = import_dynamic_superb(
        args.source, args.out, task=args.task, category=args.category, overwrite=args.overwrite,
        progress=not args.no_progress,
    )  # fmt: skip
    _print_import(result)
    return 0


def _run_import_mcr(args: argparse.Namespace) -> int:
    from caad.data.importers import import_mcr_bench

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    result = import_mcr_bench(
        args.source, args.out, tasks=tasks, overwrite=args.overwrite, progress=not args.no_progress
    )
    _print_import(result)
    return 0
