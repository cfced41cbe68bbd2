"""YAML configs for ``caad stage2`` and ``caad run``: ``key=value`` overrides, validated into dataclasses.

A config file is a YAML mapping with the sections below (every key optional; defaults in the
dataclasses). Command-line overrides use dotted keys and YAML values::

    caad run --config configs/demo.yaml stage2.alpha=0 stage2.lr=3e-4 output_dir=runs/x overwrite=true

Sections::

    output_dir, overwrite          caad run: the run folder (``{timestamp}`` expands) and whether an
                                   earlier run there may be replaced
    data      (DataConfig)         the built-in corpus or your manifests
    models    (ModelsConfig)       tiny teacher/student built on the fly, or local checkpoints
    stage1    (Stage1Config)       pseudo-GT generation
    warmup    (TrainConfig)        CE-only fine-tuning of the teacher on the pseudo-GT (caad run)
    stage2    (TrainConfig)        CAAD: contrastive distillation into the student
    eval      (EvalConfig)         evaluation at the end of caad run

Errors are :class:`ConfigError` (a :class:`caad.cli.UserError`: one line, exit code 2) and name the
dotted key: unknown keys (with the closest known key suggested), wrong types, values out of range,
missing files or checkpoints. Nothing is written while a config is loaded or checked.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "expand_output_dir",
    "list_keys",
    "load_config",
    "parse_overrides",
]


class ConfigError(UserError):
    """An invalid config: the message names the file and/or the dotted key."""


# ---- sections --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the examples come from.

    ``corpus_dir``: an existing built-in corpus folder (with ``corpus.json``); ``None`` synthesises a
    new one into ``<output_dir>/corpus`` with ``num_examples``, ``seed`` and ``splits``.
    ``train_manifest`` / ``eval_manifest``: your own manifests, overriding the corpus's
    ``train.jsonl`` / ``test.jsonl`` (the train manifest goes through Stage 1 first).
    """

    corpus_dir: str | None = None
    num_examples: int = 200
    seed: int = 0
    splits: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    train_manifest: str | None = None
    eval_manifest: str | None = None

    def validate(self, prefix: str) -> None:
        _check(self.num_examples >= 3, prefix, "num_examples", f"must be >= 3, got {self.num_examples}")
        _check(
            len(self.splits) == 3 and all(v >= 0 for v in self.splits) and abs(sum(self.splits) - 1) < 1e-6,
            prefix,
            "splits",
            f"must be three non-negative fractions (train, validation, test) summing to 1, got {self.splits}",
        )


@dataclass
class ModelsConfig:
    """Teacher and student.

    ``tiny: true`` trains a tokenizer on the corpus texts (``tokenizer_vocab_size``) and builds a
    tiny random teacher (``teacher_kind``) and a smaller student (``student_kind``) from
    :mod:`caad.models.tiny`. ``tiny: false`` loads the local checkpoints ``teacher`` and ``student``
    (folders written by ``save_pretrained``: ``config.json``, weights, tokenizer).
    """

    tiny: bool = True
    tokenizer_vocab_size: int = 512
    teacher_kind: Literal["qwen2_audio", "composite"] = "qwen2_audio"
    student_kind: Literal["qwen2_audio", "composite"] = "composite"
    teacher_seed: int = 0
    student_seed: int = 1
    teacher: str | None = None
    student: str | None = None

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

    generator: Literal["template", "lm"] = "template"
    model_path: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 64

    def validate(self, prefix: str) -> None:
        _check(self.batch_size >= 1, prefix, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_new_tokens >= 1, prefix, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.generator == "lm":
            _check(self.model_path is not None, prefix, "model_path", "is required with generator: lm")


@dataclass
class TrainConfig:
    """One training run of the Stage 2 trainer (also used, CE only, to warm the teacher up).

    Paths (``caad run`` fills the ones left ``null`` with its own products):
        train_manifest: manifest with ``pseudo_gt`` on every row.
        teacher: teacher checkpoint folder (not needed when ``kd_weight`` is 0).
        student: the student's starting checkpoint folder.
        output_dir: where metrics, checkpoints and the final student go; ``overwrite`` allows
            replacing an earlier run there.

    Loss (DESIGN.md section 2): ``alpha`` (0 = plain KD), ``temperature``, ``kd_weight``,
    ``ce_weight`` (``kd_weight: 0`` = CE only, no teacher), ``beta`` (0 forward KL, 1 reverse KL),
    ``plausibility`` (0 disables), ``temperature_scaling``; ``negative_mode`` the teacher's
    text-only path (``zero``: audio features zeroed, ``remove``: no audio, ``noise``).

    Optimisation: AdamW (``lr``, ``weight_decay``, ``adam_betas``, ``adam_eps``), ``scheduler``
    (``cosine``, ``linear`` or ``constant`` after a linear warm-up of ``warmup_steps``, or
    ``warmup_ratio`` of the steps), ``min_lr_ratio``, ``max_grad_norm`` (0 disables clipping).
    ``epochs`` over the manifest, or ``max_steps`` optimizer steps when set. ``batch_size`` examples
    per rank and micro-step, ``grad_accum`` micro-steps per optimizer step.

    Engine: ``precision`` (``fp32`` or ``bf16``), ``zero_stage`` 0-3 for the student,
    ``teacher_zero3`` (teacher as a ZeRO-3 inference engine), ``gradient_checkpointing``.

    Checkpoints and logs: ``save_every`` optimizer steps (0: only at the end), ``keep_checkpoints``
    (the most recent kept; 0 keeps all), ``log_every`` steps, ``seed`` (data order and RNG).
    """

    train_manifest: str | None = None
    teacher: str | None = None
    student: str | None = None
    output_dir: str | None = None
    overwrite: bool = False
    # loss
    alpha: float = 2.0
    temperature: float = 2.0
    kd_weight: float = 0.7
    ce_weight: float = 0.3
    beta: float = 0.0
    plausibility: float = 0.0
    temperature_scaling: bool = True
    negative_mode: Literal["zero", "remove", "noise"] = "zero"
    noise_seed: int = 0
    loss_backend: Literal["auto", "cpp", "torch", "triton"] = "auto"
    loss_chunk_size: int | None = None
    # optimisation
    optimizer: Literal["adamw"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    # engine
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 0
    teacher_zero3: bool = False
    gradient_checkpointing: bool = False
    # checkpoints and logs
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True

    def validate(self, prefix: str) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.alpha >= 0, "alpha", "must be >= 0 (0 means plain KD)"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.kd_weight >= 0, "kd_weight", "must be >= 0"),
            (self.ce_weight >= 0, "ce_weight", "must be >= 0"),
            (self.kd_weight + self.ce_weight > 0, "kd_weight", "kd_weight + ce_weight must be > 0"),
            (0 <= self.beta <= 1, "beta", "must be in [0, 1] (0 forward KL, 1 reverse KL)"),
            (0 <= self.plausibility < 1, "plausibility", "must be in [0, 1) (0 disables the cutoff)"),
            (
                not (self.beta == 1 and self.plausibility > 0),
                "plausibility",
                "must be 0 with beta=1 (reverse KL under a plausibility cutoff is infinite)",
            ),
            (self.loss_chunk_size is None or self.loss_chunk_size >= 1, "loss_chunk_size", "must be >= 1"),
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
            (self.save_every >= 0, "save_every", "must be >= 0 (0: only at the end)"),
            (self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 keeps all)"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
        ]
        for ok, key, message in checks:
            _check(ok, prefix, key, f"{message}, got {getattr(self, key)!r}")

    @property
    def needs_teacher(self) -> bool:
        """Whether this run uses a teacher at all (``kd_weight > 0``)."""
        return self.kd_weight > 0

    def check_paths(self, prefix: str) -> None:
        """Errors for missing inputs: the train manifest and the checkpoints this run needs."""
        _check(self.train_manifest is not None, prefix, "train_manifest", "is required (a JSONL manifest)")
        _check_file(prefix, "train_manifest", self.train_manifest)
        _check(self.student is not None, prefix, "student", "is required (a checkpoint folder)")
        _check_checkpoint(prefix, "student", self.student)
        if self.needs_teacher:
            _check(
                self.teacher is not None,
                prefix,
                "teacher",
                "is required when kd_weight > 0 (set kd_weight=0 for CE-only training)",
            )
            _check_checkpoint(prefix, "teacher", self.teacher)
        _check(self.output_dir is not None, prefix, "output_dir", "is required")


@dataclass
class WarmupConfig(TrainConfig):
    """The teacher's CE-only warm-up (:class:`TrainConfig` with ``enabled``); ``kd_weight`` must be 0."""

    enabled: bool = True
    kd_weight: float = 0.0
    ce_weight: float = 1.0
    alpha: float = 0.0
    lr: float = 1e-3
    scheduler: Literal["cosine", "linear", "constant"] = "constant"

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check(self.kd_weight == 0, prefix, "kd_weight", "must be 0: the warm-up is CE only (no teacher)")


@dataclass
class EvalConfig:
    """Evaluation at the end of ``caad run`` (``caad.eval.run_eval``).

    ``manifest``: defaults to ``data.eval_manifest`` or the corpus's ``test.jsonl``.
    ``contrastive_alpha``: alpha of the teacher's contrastive decoding (default: ``stage2.alpha``).
    """

    enabled: bool = True
    manifest: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 24
    contrastive_alpha: float | None = None

    def validate(self, prefix: str) -> None:
        _check(self.batch_size >= 1, prefix, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_new_tokens >= 1, prefix, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(
            self.contrastive_alpha is None or self.contrastive_alpha >= 0,
            prefix,
            "contrastive_alpha",
            f"must be >= 0, got {self.contrastive_alpha}",
        )


@dataclass
class CaadConfig:
    """The whole config (see the module docstring)."""

    output_dir: str = "runs/caad-{timestamp}"
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    stage2: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Value ranges of every section (types were checked on construction)."""
        _check(bool(self.output_dir), "", "output_dir", "must be a non-empty path")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)

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
        raise ConfigError(f"{_key(prefix, key)} {message}")


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
        return f"a list of {_type_name(item)}"
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


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        name = prefix or "the config"
        raise ConfigError(f"{where}{name} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}keys must be strings, got {key!r} in {prefix or 'the top level'}")
        dotted = _key(prefix, key)
        if key not in names:
            raise _unknown_key(dotted, list_keys(CaadConfig), where)
        kwargs[key] = _coerce(value, hints[key], dotted, where)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None, where: str = "") -> CaadConfig:
    """A validated :class:`CaadConfig` from plain data (``where`` prefixes error messages)."""
    config = _build(CaadConfig, data, "", where)
    try:
        config.validate()
    except ConfigError as error:
        raise ConfigError(f"{where}{error}") from None
    return config


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


def apply_overrides(data: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in the nested mapping ``data`` (a copy is returned)."""
    import copy

    data = copy.deepcopy(data)
    known = list_keys(CaadConfig)
    sections = {
        name for name, hint in typing.get_type_hints(CaadConfig).items() if dataclasses.is_dataclass(hint)
    }
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


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> CaadConfig:
    """Read a YAML config (``None``: defaults only), apply ``key=value`` overrides, validate.

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
        # fail on the file's own unknown keys before overrides are applied, so the message names the file
        _build(CaadConfig, data, "", where)
    data = apply_overrides(data, parse_overrides(overrides))
    return config_from_dict(data, where)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML/JSON dumps)."""
    return dataclasses.asdict(config)


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
