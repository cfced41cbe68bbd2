"""YAML configs for ``caad train``, ``caad stage2`` and ``caad run``: ``key=value`` overrides, validated
into dataclasses.

A config file is a YAML mapping with the sections below (every key optional; defaults in the
dataclasses). Command-line overrides use dotted keys and YAML values::

    caad run --config configs/demo.yaml stage2.alpha=0 stage2.lr=3e-4 output_dir=runs/x overwrite=true

Sections::

    output_dir, overwrite          caad run: the run folder (``{timestamp}`` expands) and whether an
                                   earlier run there may be replaced
    data      (DataConfig)         the built-in corpus or your manifests
    models    (ModelsConfig)       tiny teacher/student built on the fly, or local checkpoints
    stage1    (Stage1Config)       pseudo-GT generation
    warmup    (WarmupConfig)       CE-only fine-tuning of the tiny teacher on the pseudo-GT (caad run)
    stage2    (Stage2Config)       CAAD: contrastive distillation into the student (method ``caad``)
    eval      (EvalConfig)         evaluation at the end of caad run

A training section is one run of the method-agnostic trainer (:mod:`caad.train`): its dataclass
subclasses :class:`TrainerConfig` (paths, optimisation, engine, checkpoints, logs: what the trainer
reads) and adds the method's own fields (what the method reads; for CAAD: the teacher and the loss).
A new method declares its section in its own module: a :class:`TrainerConfig` subclass (fields made
with :func:`config_field`) set as its ``Method.config_class``, under its ``Method.section`` name. A
config file may then hold that section at the top level (the registered methods are looked up when a
top-level key is not a built-in section: :func:`method_sections`), overrides may set its keys, and
``caad train --method NAME`` reads it (:attr:`CaadConfig.method_sections`).

Every field is declared with :func:`_field` and a one-line help (``dataclasses.fields(cls)[i].metadata
["help"]``; :func:`describe_keys` lists them all). Errors are :class:`ConfigError` (a
:class:`caad.cli.UserError`: one line, exit code 2) and name the dotted key: unknown keys (with the
closest known key suggested), wrong types, values out of range, missing files or checkpoints. An error
about a ``key=value`` override names the override (``command line override stage2.lr=abc: stage2.lr
must be a number, got 'abc'``), one about the file names the file. Nothing is written while a config is
loaded or checked. ``caad config show [SECTION]`` prints :func:`describe_keys`.

Why not pydantic or OmegaConf (issue 17; measured on this file, 900 lines): about 110 lines are the
generic machinery a library would replace (``_type_name``, ``_coerce``, ``_build``, ``_unknown_key``);
the rest is ~110 field declarations with their help (the same length as ``Field(default, description=)``)
and the range checks in ``validate`` (~180 lines: cross-field rules such as offload needing a ZeRO stage,
which stay as validators in any library). A pydantic port would remove at most those ~110 lines and
add a message translator: pydantic's errors are ``1 validation error for Stage2Config\nlr\n  Input
should be a valid number [type=float_parsing, ...]`` (a tuple path, no file, no command-line source,
no "did you mean"), and it coerces ``"1"`` to ``1`` and ``1`` to ``True`` unless every model is
strict. pydantic is also not a core dependency of ``caad``
(it arrives only with DeepSpeed in the ``train`` extra), and methods declare their sections as plain
``@dataclass`` subclasses of :class:`TrainerConfig` in their own modules (five today): porting means
changing every method's config class and keeping dataclass access (``dataclasses.asdict``,
``fields``) working for the trainer's resume checks. OmegaConf's structured configs take the same
dataclasses but carry no help text, report ``Value 'abc' could not be converted to Float`` with
``full_key`` and no source, do not support ``Literal`` types, and would be a new dependency. So the
hand-written coercion stays: it is small, has no dependency, and gives the messages above.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from caad.cli import UserError

__all__ = [
    "CaadConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelsConfig",
    "Stage1Config",
    "Stage2Config",
    "TrainerConfig",
    "WarmupConfig",
    "apply_overrides",
    "config_field",
    "config_to_dict",
    "describe_keys",
    "dump_config",
    "expand_output_dir",
    "list_keys",
    "load_config",
    "method_sections",
    "parse_overrides",
]


class ConfigError(UserError):
    """An invalid config: the message names the file and/or the dotted key (``key``: that dotted key
    when the error is about one value, so that a caller can say where the value came from)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def config_field(
    default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None
) -> Any:
    """A dataclass field with its one-line ``help`` in the metadata (``factory`` for mutable defaults).

    Use it for the fields of a method's own config class (a :class:`TrainerConfig` subclass declared
    in the method's module), as this module does for its sections.
    """
    metadata = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_field = config_field


OffloadDevice = Literal["none", "cpu", "nvme"]
#: ``caad.models.NEGATIVE_MODES`` and their old aliases (tests check that the two lists agree; the
#: models package is not imported here, so that reading a config stays fast).
NegativeMode = Literal[
    "remove", "silence_fixed_length", "zero_features_keep_length", "noise_keep_length", "zero", "noise"
]
#: ``caad.models.AUDIO_MODES`` (the positive path and the negative modes) and the aliases.
AudioMode = Literal[
    "positive", "remove", "silence_fixed_length", "zero_features_keep_length", "noise_keep_length", "zero", "noise"
]


# ---- sections --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the examples come from: the built-in corpus (synthesised or existing) or your manifests."""

    corpus_dir: str | None = _field(None, "an existing built-in corpus folder; null synthesises one into the run")
    num_examples: int = _field(200, "examples of the synthesised corpus (all splits)")
    seed: int = _field(0, "seed of the synthesised corpus")
    splits: list[float] = _field(help="train, validation, test fractions", factory=lambda: [0.8, 0.1, 0.1])
    train_manifest: str | None = _field(None, "your own train manifest (goes through Stage 1 first)")
    validation_manifest: str | None = _field(
        None, "your own validation manifest (default: the corpus's validation.jsonl)"
    )
    eval_manifest: str | None = _field(None, "your own evaluation manifest (default: the corpus's test.jsonl)")
    # the synthesised corpus's text contexts and text prior (caad.data.synthesize_corpus)
    context_share: float = _field(0.5, "share of training prompts with a text context stating the attribute")
    context_agreement: float = _field(0.8, "share of those contexts that agree with the audio")
    irrelevant_share: float = _field(0.1, "share of the other training prompts given an unrelated text context")
    text_prior_examples: int | None = _field(
        None, "text-only examples of the corpus's text prior (null: as many as the train split)"
    )
    # checks of every row and audio file before training (caad.data.checks; also caad data check)
    check: bool = _field(True, "check every manifest row and audio file before anything trains")
    min_seconds: float = _field(0.1, "clips shorter than this are errors")
    max_seconds: float | None = _field(None, "clips longer than this are errors (null: longer clips are truncated)")
    decode_check: bool = _field(True, "decode every audio file to the end while checking (finds corrupt files)")

    def validate(self, prefix: str) -> None:
        _check(self.num_examples >= 3, prefix, "num_examples", f"must be >= 3, got {self.num_examples}")
        for key in ("context_share", "context_agreement", "irrelevant_share"):
            value = getattr(self, key)
            _check(0 <= value <= 1, prefix, key, f"must be in [0, 1], got {value}")
        _check(
            self.text_prior_examples is None or self.text_prior_examples >= 0,
            prefix,
            "text_prior_examples",
            f"must be >= 0 (or null), got {self.text_prior_examples}",
        )
        _check(self.min_seconds >= 0, prefix, "min_seconds", f"must be >= 0, got {self.min_seconds}")
        _check(
            self.max_seconds is None or self.max_seconds > self.min_seconds,
            prefix,
            "max_seconds",
            f"must be > min_seconds ({self.min_seconds}) or null, got {self.max_seconds}",
        )
        _check(
            len(self.splits) == 3 and all(v >= 0 for v in self.splits) and abs(sum(self.splits) - 1) < 1e-6,
            prefix,
            "splits",
            f"must be three non-negative fractions (train, validation, test) summing to 1, got {self.splits}",
        )


@dataclass
class ModelsConfig:
    """Teacher and student: tiny random ones built on the fly (``tiny: true``) or local checkpoints.

    ``tiny: true`` trains a tokenizer on the corpus texts and builds a tiny teacher and a smaller
    student from :mod:`caad.models.tiny`; ``tiny: false`` loads folders written by ``save_pretrained``.
    """

    tiny: bool = _field(True, "build a tiny tokenizer, teacher and student (false: load teacher/student)")
    tokenizer_vocab_size: int = _field(512, "vocabulary of the tiny tokenizer")
    teacher_kind: Literal["qwen2_audio", "composite"] = _field("qwen2_audio", "architecture of the tiny teacher")
    student_kind: Literal["qwen2_audio", "composite"] = _field("composite", "architecture of the tiny student")
    teacher_seed: int = _field(0, "initialisation seed of the tiny teacher")
    student_seed: int = _field(1, "initialisation seed of the tiny student")
    teacher: str | None = _field(None, "teacher checkpoint folder (tiny: false)")
    student: str | None = _field(None, "student checkpoint folder (tiny: false)")
    # how every model of caad run is loaded (fills the training sections' keys left null)
    chat_template: bool | None = _field(None, "prompts in the tokenizer's chat template (null: when it has one)")
    allow_pickle: bool = _field(False, "also read .bin/.pt weights (weights_only); default safetensors only")
    trust_remote_code: bool = _field(False, "allow a tokenizer that ships Python code")
    low_memory: bool = _field(True, "read weights straight onto the device (no second copy in host memory)")

    def validate(self, prefix: str) -> None:
        _check(
            self.tokenizer_vocab_size >= 262,
            prefix,
            "tokenizer_vocab_size",
            f"must be >= 262 (256 bytes + 6 special tokens), got {self.tokenizer_vocab_size}",
        )
        if not self.tiny:
            for key in ("teacher", "student"):
                _check(
                    getattr(self, key) is not None,
                    prefix,
                    key,
                    "is required when models.tiny is false (a local checkpoint folder)",
                )


@dataclass
class Stage1Config:
    """Pseudo-GT generation (:func:`caad.stage1.generate_pseudo_gt`)."""

    generator: Literal["template", "lm"] = _field("template", "template (offline, deterministic) or lm")
    model_path: str | None = _field(None, "generator lm: a local Hugging Face causal LM folder")
    batch_size: int = _field(8, "rows per LM batch")
    max_new_tokens: int = _field(64, "generator lm: most tokens per answer")

    def validate(self, prefix: str) -> None:
        _check(self.batch_size >= 1, prefix, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_new_tokens >= 1, prefix, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.generator == "lm":
            _check(self.model_path is not None, prefix, "model_path", "is required with generator: lm")


@dataclass
class TrainerConfig:
    """One run of the method-agnostic trainer (:mod:`caad.train`): what every method shares.

    A method's section subclasses it with the method's own fields (:class:`Stage2Config` for CAAD).
    ``caad run`` fills the paths left ``null`` with its own products.
    """

    # paths
    train_manifest: str | None = _field(None, "train manifest (JSONL; CAAD: pseudo_gt on every row)")
    validation_manifest: str | None = _field(None, "validation manifest; its loss every eval_every steps")
    student: str | None = _field(None, "the student's starting checkpoint folder")
    output_dir: str | None = _field(None, "metrics, checkpoints and the final student go here")
    overwrite: bool = _field(False, "replace an earlier run in output_dir (only once the new run can start)")
    # optimisation
    optimizer: Literal["adamw"] = _field("adamw", "AdamW (torch's; DeepSpeed's CPU Adam with optimizer offload)")
    lr: float = _field(1e-4, "peak learning rate")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    adam_betas: list[float] = _field(help="AdamW betas", factory=lambda: [0.9, 0.999])
    adam_eps: float = _field(1e-8, "AdamW epsilon")
    scheduler: Literal["cosine", "linear", "constant"] = _field("cosine", "LR schedule after the warm-up")
    warmup_steps: int = _field(0, "linear LR warm-up steps (0: use warmup_ratio)")
    warmup_ratio: float = _field(0.0, "LR warm-up steps as a fraction of all steps")
    min_lr_ratio: float = _field(0.0, "the schedule decays to lr x min_lr_ratio")
    max_grad_norm: float = _field(1.0, "gradient clipping by global norm (0 disables)")
    epochs: int = _field(1, "passes over the train manifest")
    max_steps: int | None = _field(None, "optimizer steps; overrides epochs when set")
    batch_size: int = _field(4, "examples per rank and micro-step")
    grad_accum: int = _field(1, "micro-steps per optimizer step")
    # loading the models (caad run: keys left at their defaults take models.<key>)
    chat_template: bool | None = _field(None, "prompts in the tokenizer's chat template (null: when it has one)")
    allow_pickle: bool = _field(False, "also read .bin/.pt weights (weights_only); default safetensors only")
    trust_remote_code: bool = _field(False, "allow a tokenizer that ships Python code")
    low_memory: bool = _field(True, "read weights straight onto the device (no second copy in host memory)")
    # checks of the manifests before anything is written (caad run: keys left at defaults take data.<key>)
    data_check: bool = _field(True, "check every manifest row and audio file before anything is written")
    min_seconds: float = _field(0.1, "clips shorter than this are errors")
    max_seconds: float | None = _field(None, "clips longer than this are errors (null: cut to the model's window)")
    decode_check: bool = _field(True, "decode every audio file to the end while checking (finds corrupt files)")
    # engine
    precision: Literal["fp32", "bf16"] = _field("fp32", "fp32, or bf16 weights/activations with fp32 master weights")
    zero_stage: int = _field(0, "DeepSpeed ZeRO stage 0-3 of the student")
    teacher_zero3: bool = _field(False, "frozen teachers as ZeRO-3 inference engines (partitioned over ranks)")
    gradient_checkpointing: bool = _field(False, "recompute the student's activations in backward")
    offload_optimizer: OffloadDevice = _field("none", "ZeRO-Offload of optimizer states and step (zero_stage >= 1)")
    offload_param: OffloadDevice = _field("none", "ZeRO-Infinity offload of parameters (zero_stage 3)")
    offload_nvme_path: str | None = _field(None, "folder on a fast NVMe drive for offload 'nvme'")
    # checkpoints and logs
    save_every: int = _field(100, "resumable checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = _field(2, "most recent checkpoints kept (0 keeps all)")
    log_every: int = _field(1, "metrics every N optimizer steps")
    eval_every: int = _field(0, "validation loss every N optimizer steps (0: never; needs validation_manifest)")
    seed: int = _field(0, "data order and random state")
    tensorboard: bool = _field(True, "TensorBoard event files too (when tensorboard is installed)")
    progress: bool = _field(True, "progress bar")

    def validate(self, prefix: str) -> None:
        """Value ranges of the trainer's fields (types were checked on construction)."""
        checks: list[tuple[bool, str, str]] = [
            (self.lr > 0, "lr", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (
                len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                "adam_betas",
                "must be two numbers in [0, 1)",
            ),
            (self.adam_eps > 0, "adam_eps", "must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 (or null)"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (0 <= self.zero_stage <= 3, "zero_stage", "must be 0, 1, 2 or 3"),
            (
                self.offload_optimizer == "none" or self.zero_stage >= 1,
                "offload_optimizer",
                "needs zero_stage >= 1 (the optimizer states must be partitioned to be offloaded)",
            ),
            (self.offload_param == "none" or self.zero_stage == 3, "offload_param", "needs zero_stage 3"),
            (
                "nvme" not in (self.offload_optimizer, self.offload_param) or self.offload_nvme_path is not None,
                "offload_nvme_path",
                "is required with offload 'nvme' (a folder on the NVMe drive)",
            ),
            (self.save_every >= 0, "save_every", "must be >= 0 (0: only at the end)"),
            (self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 keeps all)"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (self.eval_every >= 0, "eval_every", "must be >= 0 (0: no validation)"),
            (self.min_seconds >= 0, "min_seconds", "must be >= 0"),
            (
                self.max_seconds is None or self.max_seconds > self.min_seconds,
                "max_seconds",
                "must be > min_seconds (or null)",
            ),
        ]
        for ok, key, message in checks:
            _check(ok, prefix, key, f"{message}, got {getattr(self, key)!r}")

    def check_paths(self, prefix: str) -> None:
        """Errors for missing inputs: the manifests and the student checkpoint (methods add theirs)."""
        _check(self.train_manifest is not None, prefix, "train_manifest", "is required (a JSONL manifest)")
        _check_file(prefix, "train_manifest", self.train_manifest)
        _check(
            self.eval_every == 0 or self.validation_manifest is not None,
            prefix,
            "validation_manifest",
            f"is required with eval_every > 0 (got eval_every={self.eval_every})",
        )
        _check_file(prefix, "validation_manifest", self.validation_manifest)
        _check(self.student is not None, prefix, "student", "is required (a checkpoint folder)")
        _check_checkpoint(prefix, "student", self.student)
        _check(self.output_dir is not None, prefix, "output_dir", "is required")


@dataclass
class Stage2Config(TrainerConfig):
    """CAAD (method ``caad``): the trainer's fields plus the teacher and the loss (docs/math.md).

    ``alpha: 0`` is plain KD (no negative path); ``kd_weight: 0`` is CE-only fine-tuning with no teacher.
    """

    teacher: str | None = _field(None, "teacher checkpoint folder (not needed when kd_weight is 0)")
    alpha: float = _field(2.0, "contrastive strength: (1 + alpha) z_pos - alpha z_neg; 0 = plain KD")
    temperature: float = _field(2.0, "softmax temperature of teacher and student")
    kd_weight: float = _field(0.7, "weight of the divergence (0: CE only, no teacher)")
    ce_weight: float = _field(0.3, "weight of the cross-entropy on the pseudo-GT")
    beta: float = _field(0.0, "divergence: 0 forward KL, 1 reverse KL, between: generalised JSD")
    plausibility: float = _field(0.0, "adaptive plausibility cutoff of the contrastive teacher (0 disables)")
    temperature_scaling: bool = _field(True, "multiply the divergence by temperature^2")
    negative_mode: NegativeMode = _field(
        "remove", "the teacher's negative path (caad.models NEGATIVE_MODES; zero/noise: old aliases)"
    )
    silence_seconds: float = _field(1.0, "length of the 'silence_fixed_length' negative path's audio block")
    noise_seed: int = _field(0, "seed of the 'noise_keep_length' negative path")
    max_length: int | None = _field(None, "most tokens of prompt + audio + pseudo-GT per example (null: no limit)")
    max_length_policy: Literal["truncate", "filter", "error"] = _field(
        "truncate", "examples over max_length: cut the pseudo-GT, drop the example, or stop with an error"
    )
    loss_backend: Literal["auto", "cpp", "torch", "triton"] = _field("auto", "kernel backend of the fused loss")
    loss_chunk_size: int | None = _field(None, "rows per chunk of the fused loss (null: automatic)")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        checks: list[tuple[bool, str, str]] = [
            (self.alpha >= 0, "alpha", "must be >= 0 (0 means plain KD)"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.kd_weight >= 0, "kd_weight", "must be >= 0"),
            (self.ce_weight >= 0, "ce_weight", "must be >= 0"),
            (self.kd_weight + self.ce_weight > 0, "kd_weight", "kd_weight + ce_weight must be > 0"),
            (0 <= self.beta <= 1, "beta", "must be in [0, 1]"),
            (0 <= self.plausibility < 1, "plausibility", "must be in [0, 1) (0 disables the cutoff)"),
            (
                not (self.beta == 1 and self.plausibility > 0),
                "plausibility",
                "must be 0 with beta=1 (reverse KL under a plausibility cutoff is infinite)",
            ),
            (self.loss_chunk_size is None or self.loss_chunk_size >= 1, "loss_chunk_size", "must be >= 1"),
            (0.1 <= self.silence_seconds <= 30.0, "silence_seconds", "must be between 0.1 and 30 seconds"),
            (self.max_length is None or self.max_length >= 2, "max_length", "must be >= 2 (or null)"),
        ]
        for ok, key, message in checks:
            _check(ok, prefix, key, f"{message}, got {getattr(self, key)!r}")

    @property
    def needs_teacher(self) -> bool:
        """Whether this run uses a teacher at all (``kd_weight > 0``)."""
        return self.kd_weight > 0

    def check_paths(self, prefix: str) -> None:
        super().check_paths(prefix)
        if self.needs_teacher:
            _check(
                self.teacher is not None,
                prefix,
                "teacher",
                "is required when kd_weight > 0 (set kd_weight=0 for CE-only training)",
            )
            _check_checkpoint(prefix, "teacher", self.teacher)


@dataclass
class WarmupConfig(Stage2Config):
    """The tiny teacher's CE-only warm-up before Stage 2 (``caad run``); ``kd_weight`` must be 0.

    ``enabled: null`` (the default) warms up only the built-in tiny teacher (``models.tiny: true``): a
    real checkpoint is never changed unless you ask with ``enabled: true``.
    """

    enabled: bool | None = _field(None, "warm the teacher up (null: only the built-in tiny teacher)")
    kd_weight: float = _field(0.0, "must be 0: the warm-up is CE only")
    ce_weight: float = _field(1.0, "weight of the cross-entropy on the pseudo-GT")
    alpha: float = _field(0.0, "unused (no teacher)")
    lr: float = _field(1e-3, "peak learning rate")
    scheduler: Literal["cosine", "linear", "constant"] = _field("constant", "LR schedule after the warm-up")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check(self.kd_weight == 0, prefix, "kd_weight", "must be 0: the warm-up is CE only (no teacher)")

    def resolved_enabled(self, tiny_models: bool) -> bool:
        """Whether ``caad run`` warms the teacher up: ``enabled``, or when unset, only a tiny teacher."""
        return tiny_models if self.enabled is None else self.enabled


@dataclass
class EvalConfig:
    """Evaluation at the end of ``caad run`` (``caad.eval.run_eval``)."""

    enabled: bool = _field(True, "evaluate teacher and student at the end of caad run")
    manifest: str | None = _field(None, "manifest to evaluate on (default: data.eval_manifest or test.jsonl)")
    batch_size: int = _field(8, "rows per generation batch")
    max_new_tokens: int = _field(24, "most tokens per answer")
    contrastive_alpha: float | None = _field(None, "alpha of the teacher's contrastive decoding (null: stage2.alpha)")
    audio_mode: AudioMode = _field("positive", "the path greedy decoding runs on: the audio, or a negative mode")
    num_bootstrap: int = _field(1000, "bootstrap replicates of the confidence intervals")
    side_by_side: bool = _field(
        False,
        "also train a standard-KD student (stage2 with alpha=0) and end with a side-by-side: teacher greedy "
        "vs contrastive, student KD vs CAAD, neutral vs adversarial context",
    )

    def validate(self, prefix: str) -> None:
        _check(self.batch_size >= 1, prefix, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_new_tokens >= 1, prefix, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(
            self.contrastive_alpha is None or self.contrastive_alpha >= 0,
            prefix,
            "contrastive_alpha",
            f"must be >= 0, got {self.contrastive_alpha}",
        )
        _check(self.num_bootstrap >= 1, prefix, "num_bootstrap", f"must be >= 1, got {self.num_bootstrap}")


@dataclass
class CaadConfig:
    """The whole config (see the module docstring)."""

    output_dir: str = _field("runs/caad-{timestamp}", "caad run: the run folder ({timestamp} expands)")
    overwrite: bool = _field(False, "caad run: replace an earlier run in output_dir")
    data: DataConfig = _field(help="the built-in corpus or your manifests", factory=DataConfig)
    models: ModelsConfig = _field(help="teacher and student", factory=ModelsConfig)
    stage1: Stage1Config = _field(help="pseudo-GT generation", factory=Stage1Config)
    warmup: WarmupConfig = _field(help="the tiny teacher's CE-only warm-up (caad run)", factory=WarmupConfig)
    stage2: Stage2Config = _field(help="CAAD: contrastive distillation (method caad)", factory=Stage2Config)
    eval: EvalConfig = _field(help="evaluation at the end of caad run", factory=EvalConfig)

    def __post_init__(self) -> None:
        #: sections declared by methods in their own modules (:func:`method_sections`), by name
        self.method_sections: dict[str, TrainerConfig] = {}

    def validate(self) -> None:
        """Value ranges of every section (types were checked on construction)."""
        _check(bool(self.output_dir), "", "output_dir", "must be a non-empty path")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        for name, value in self.method_sections.items():
            value.validate(name)

    def section(self, name: str) -> Any:
        """The section ``name`` (a :class:`ConfigError` naming the known training sections if absent)."""
        known = [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), TrainerConfig)]
        known += list(self.method_sections)
        if name not in known:
            raise ConfigError(f"no training section {name!r} in the config; training sections: {', '.join(known)}")
        return self.method_sections[name] if name in self.method_sections else getattr(self, name)

    def check_run_paths(self) -> None:
        """Errors for inputs of ``caad run`` that do not exist (before anything is written)."""
        if self.data.corpus_dir is not None:
            corpus = Path(self.data.corpus_dir)
            if not corpus.is_dir():
                raise ConfigError(f"data.corpus_dir: folder not found: {corpus}")
            if not (corpus / "corpus.json").is_file():
                raise ConfigError(
                    f"data.corpus_dir: {corpus} is not a caad corpus (no corpus.json); "
                    "create one with `caad data synth`"
                )
        _check_file("data", "train_manifest", self.data.train_manifest)
        _check_file("data", "validation_manifest", self.data.validation_manifest)
        _check_file("data", "eval_manifest", self.data.eval_manifest)
        _check_file("eval", "manifest", self.eval.manifest)
        if not self.models.tiny:
            _check_checkpoint("models", "teacher", self.models.teacher)
            _check_checkpoint("models", "student", self.models.student)
        if self.stage1.generator == "lm" and self.stage1.model_path is not None:
            if not Path(self.stage1.model_path).is_dir():
                raise ConfigError(f"stage1.model_path: folder not found: {self.stage1.model_path}")


# ---- checks ----------------------------------------------------------------------------------------


def _key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check(ok: bool, prefix: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{_key(prefix, key)} {message}", key=_key(prefix, key))


def _check_file(prefix: str, key: str, path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{_key(prefix, key)}: file not found: {path}")


def _check_checkpoint(prefix: str, key: str, path: str | None) -> None:
    if path is None:
        return
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{_key(prefix, key)}: checkpoint folder not found: {path}")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{_key(prefix, key)}: {path} is not a model checkpoint (no config.json; "
            "expected a folder written by save_pretrained)"
        )


# ---- building dataclasses from plain data -----------------------------------------------------------


def list_keys(cls: type = CaadConfig, prefix: str = "") -> list[str]:
    """Every valid dotted key of ``cls`` (sections and their fields)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = _key(prefix, f.name)
        keys.append(key)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(list_keys(hint, key))
    return keys


def describe_keys(cls: type = CaadConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, help)`` of every field of ``cls``, sections included."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _key(prefix, f.name)
        hint = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # pragma: no cover - every field has a default
            default = None
        if dataclasses.is_dataclass(hint):
            rows.append((key, "section", None, f.metadata.get("help", "")))
            rows.extend(describe_keys(hint, key))
        else:
            rows.append((key, _type_name(hint), default, f.metadata.get("help", "")))
    return rows


def _unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        # also try the last component alone (e.g. "stage2.lerning_rate" -> "stage2.lr" is hopeless,
        # but "stage2.alpah" -> "stage2.alpha" is found above; "alpha" -> "stage2.alpha" here)
        tails = {k.rsplit(".", 1)[-1]: k for k in known}
        hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.8)
        close = [tails[hit[0]]] if hit else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}unknown key {key!r}{hint}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(item, _type_name(item))}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """``value`` as type ``hint``, or a :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{where}{key} must be {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{key} must be {_type_name(hint)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" (no dot) as a string: accept any float spelling
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{key} must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}{key} must be a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}{key} must be a non-empty string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, where)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # pragma: no cover


def _build(
    cls: type, data: Any, prefix: str, where: str, sections: Mapping[str, type] | None = None
) -> Any:
    """``cls`` from the mapping ``data``; for :class:`CaadConfig`, ``sections`` (name -> config class)
    are the method sections it may also hold (:attr:`CaadConfig.method_sections`)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        name = prefix or "the config"
        raise ConfigError(f"{where}{name} must be a mapping of keys to values, got {data!r}")
    sections = dict(sections or {})
    top = cls is CaadConfig
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, extra = {}, {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}keys must be strings, got {key!r} in {prefix or 'the top level'}")
        dotted = _key(prefix, key)
        if top and key in sections:
            section = _build(sections[key], value, key, where, sections)
            if key in names:  # a built-in section read with a method's subclass of its class
                kwargs[key] = section
            else:
                extra[key] = section
        elif key not in names:
            raise _unknown_key(dotted, _known_keys(sections), where)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted, where)
    if top:
        for name, section_class in sections.items():
            if name in names and name not in kwargs:
                kwargs[name] = section_class()
    out = cls(**kwargs)
    if top:
        out.method_sections = {
            name: extra.get(name) or section() for name, section in sections.items() if name not in names
        }
    return out


def _known_keys(sections: Mapping[str, type] | None = None) -> list[str]:
    keys = list_keys(CaadConfig)
    for name, cls in (sections or {}).items():
        keys += [name, *list_keys(cls, name)]
    return keys


def method_sections(names: Sequence[str] = ()) -> dict[str, type]:
    """Config sections that methods declare in their own modules (``Method.section`` ->
    ``Method.config_class``), for those of ``names`` that are not :class:`CaadConfig` fields.

    Imports the registered methods (:mod:`caad.methods`) only when some name is not a built-in
    section, so that reading an ordinary config imports no method.
    """
    builtin = {f.name for f in dataclasses.fields(CaadConfig)}
    wanted = [name for name in names if name not in builtin]
    if not wanted:
        return {}
    from caad.methods import method_sections as declared

    try:
        return {name: cls for name, cls in declared(wanted).items() if name not in builtin}
    except (ImportError, ValueError) as error:
        raise ConfigError(f"config sections {', '.join(map(repr, wanted))}: {error}") from error


def config_from_dict(
    data: Mapping[str, Any] | None,
    where: str = "",
    sections: Mapping[str, type] | None = None,
    sources: Mapping[str, str] | None = None,
) -> CaadConfig:
    """A validated :class:`CaadConfig` from plain data (``where`` prefixes error messages; ``sections``:
    method sections it may hold besides the built-in ones, name -> config class; ``sources``: dotted
    key -> the prefix naming where that key's value came from, e.g. a command-line override, used
    instead of ``where`` for a value out of range)."""
    if sections is None:
        sections = method_sections(list(data or {}))
    config = _build(CaadConfig, data, "", where, sections)
    try:
        config.validate()
    except ConfigError as error:
        origin = where
        for key, source in (sources or {}).items():
            if error.key is not None and (error.key == key or error.key.startswith(f"{key}.")):
                origin = source
        raise ConfigError(f"{origin}{error}", key=error.key) from None
    return config


def _hint_of(key: str, sections: Mapping[str, type]) -> Any:
    """The type of the dotted ``key`` (a known key of :class:`CaadConfig` or of a method section)."""
    first, *rest = key.split(".")
    hint = sections[first] if first in sections else typing.get_type_hints(CaadConfig)[first]
    for part in rest:
        hint = typing.get_type_hints(hint)[part]
    return hint


# ---- overrides, loading, dumping --------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``[("a.b", 1), ("c", [1, 2])]``; values are parsed as YAML."""
    import yaml

    out = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stage2.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({error})") from None
        out.append((key, value))
    return out


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[tuple[str, Any]], sections: Mapping[str, type] | None = None
) -> dict[str, Any]:
    """Set each dotted key in the nested mapping ``data`` (a copy is returned); ``sections``: method
    sections whose keys are valid too (name -> config class)."""
    import copy

    data = copy.deepcopy(data)
    known = _known_keys(sections)
    sections = {
        name for name, hint in typing.get_type_hints(CaadConfig).items() if dataclasses.is_dataclass(hint)
    } | set(sections or {})
    for key, value in overrides:
        if key not in known:
            raise _unknown_key(key, known, "override: ")
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in sections and not isinstance(value, dict):
            raise ConfigError(f"override: {key} is a section; set one of its keys, e.g. {key}.<key>=value")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override: {part} must be a mapping in the config file")
            node = child
        node[parts[-1]] = value
    return data


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    sections: Mapping[str, type] | None = None,
) -> CaadConfig:
    """Read a YAML config (``None``: defaults only), apply ``key=value`` overrides, validate.

    ``sections`` (name -> :class:`TrainerConfig` subclass): method sections the config may hold
    besides the built-in ones, always present in the result (defaults when the file has none); a
    built-in section's name with a subclass of its class reads that section with the subclass (a
    method's variant of e.g. ``stage2``), other built-in names are ignored. Any other top-level key
    that is not a built-in section is looked up among the registered methods' sections
    (:func:`method_sections`).

    Raises :class:`ConfigError` for a missing or unreadable file, invalid YAML, unknown keys, wrong
    types and out-of-range values; the message names the file and the dotted key.
    """
    import yaml

    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path}: "
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"{where}invalid YAML: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{where}not UTF-8 text: {error}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}the config must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    parsed = parse_overrides(overrides)
    hints = typing.get_type_hints(CaadConfig)
    given = {  # built-in sections only with a subclass of their own class (a method's variant)
        k: v for k, v in (sections or {}).items() if k not in hints or (v is not hints[k] and issubclass(v, hints[k]))
    }
    names = [name for name in (*data, *(key.split(".", 1)[0] for key, _ in parsed)) if name not in given]
    sections = {**method_sections(names), **given}
    if path is not None:
        # fail on the file's own unknown keys before overrides are applied, so the message names the file
        _build(CaadConfig, data, "", where, sections)
    # each override's own key and type, so that an error names the override rather than the file
    known = _known_keys(sections)
    sources: dict[str, str] = {}
    for item, (key, value) in zip(overrides, parsed):
        origin = f"command line override {item.strip()}: "
        if key not in known:
            raise _unknown_key(key, known, origin)
        hint = _hint_of(key, sections)
        if dataclasses.is_dataclass(hint) and not isinstance(value, dict):
            raise ConfigError(f"{origin}{key} is a section; set one of its keys, e.g. {key}.<key>=value")
        _coerce(value, hint, key, origin)
        sources[key] = origin
    data = apply_overrides(data, parsed, sections)
    return config_from_dict(data, where, sections, sources)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML/JSON dumps), method sections included."""
    out = dataclasses.asdict(config)
    for name, section in getattr(config, "method_sections", {}).items():
        out[name] = dataclasses.asdict(section)
    return out


def dump_config(config: Any, path: str | os.PathLike[str]) -> None:
    """Write ``config`` as YAML (the resolved config of a run, for the record)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def expand_output_dir(template: str, now: datetime.datetime | None = None) -> str:
    """Expand ``{timestamp}`` (``YYYYmmdd-HHMMSS``) in an output folder; a taken name gets ``-2``, ``-3``."""
    if "{timestamp}" not in template:
        return template
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    candidate = template.replace("{timestamp}", stamp)
    base, index = candidate, 2
    while os.path.exists(candidate):
        candidate = f"{base}-{index}"
        index += 1
    return candidate
