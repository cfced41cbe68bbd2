"""``caad models assemble``: a composite student from a Whisper encoder and any local causal LM.

See :mod:`caad.models.assemble` for what is written. Refuses to replace ``--out`` unless ``--overwrite``
and checks every input before writing anything.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run_assemble"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand (``models assemble``)."""
    parser = subparsers.add_parser("models", help="build model checkpoints (assemble a student from parts)")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    actions.required = True
    assemble = actions.add_parser(
        "assemble",
        help="a composite student: Whisper encoder + new projector + a causal LM",
        description=(
            "Write a composite speech-LM checkpoint from a local Whisper checkpoint (its encoder) and a local "
            "causal LM (any architecture built into transformers): a new frame-stacking projector, the audio "
            "special tokens added to the LM's tokenizer (embeddings resized when needed), and the training "
            "plan (frozen parts, LoRA) in its config. Only safetensors weights are read."
        ),
    )
    assemble.add_argument("--audio-encoder", required=True, metavar="PATH", help="Whisper checkpoint directory")
    assemble.add_argument(
        "--llm", required=True, metavar="PATH", help="causal LM checkpoint directory (with its tokenizer)"
    )
    assemble.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint directory")
    assemble.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    assemble.add_argument(
        "--stack-factor", type=int, default=4, help="encoder frames per audio token (default: %(default)s)"
    )
    assemble.add_argument(
        "--projector-hidden-size", type=int, default=None, help="projector hidden width (default: the LM width)"
    )
    assemble.add_argument("--freeze-encoder", action="store_true", help="do not train the audio encoder")
    assemble.add_argument("--freeze-llm", action="store_true", help="do not train the LM's own weights")
    assemble.add_argument(
        "--train-only-projector", action="store_true", help="freeze the encoder and the LM (projector only)"
    )
    assemble.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the LM (needs peft; default: 0, no LoRA)")
    assemble.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default: %(default)s)")
    assemble.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    assemble.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated LM module names to adapt, e.g. add lm_head (default: %(default)s)",
    )
    assemble.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="weights dtype (default: the LM's)"
    )
    assemble.add_argument("--seed", type=int, default=0, help="projector initialisation seed (default: %(default)s)")
    assemble.set_defaults(func=run_assemble)


def run_assemble(args: argparse.Namespace) -> int:
    from caad.models.assemble import AssembleOptions, assemble_student

    options = AssembleOptions(
        stack_factor=args.stack_factor,
        projector_hidden_size=args.projector_hidden_size,
        freeze_audio_encoder=args.freeze_encoder,
        freeze_language_model=args.freeze_llm,
        train_only_projector=args.train_only_projector,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        dtype=args.dtype,
        seed=args.seed,
    )
    summary = assemble_student(args.audio_encoder, args.llm, args.out, options, overwrite=args.overwrite)
    lora = summary["lora"]
    print(
        f"wrote {summary['out']}: {summary['parameters']:,} parameters, {summary['trainable']:,} trainable"
        + (f" (+ LoRA r={lora['r']} on {', '.join(lora['target_modules'])} when training)" if lora else "")
        + f"; audio token id {summary['audio_token_id']}, {summary['tokens_added']} embedding rows added"
    )
    return 0
