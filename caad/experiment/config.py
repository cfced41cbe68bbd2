"""The experiment's config (``caad experiment --config configs/experiment.yaml``) and its arms.

YAML layout (every key optional except ``arms``; unknown keys are errors naming the file and key)::

    suite: caad                          # caad (this layout) or spoken_qa (caad.experiment.spoken_qa_config)
    output_dir: runs/experiment          # the experiment folder ({timestamp} expands)
    seeds: [0, 1, 2]                     # model initialisation and data order, per seed
    data:   {num_examples, seed, splits, context_share, context_agreement, irrelevant_share}
    models: {tokenizer_vocab_size, teacher_kind, student_kind}
    warmup: {...}                        # the teacher's CE-only warm-up: keys of caad.config.WarmupConfig
    student: {...}                       # every student's training: keys of caad.config.Stage2Config
    eval:   {batch_size, max_new_tokens, num_bootstrap, test_items, validation_items, negative_mode,
             select_by}
    arms:                                # name -> spec, in the order of the report
      teacher_greedy: {kind: teacher}
      teacher_contrastive: {kind: teacher_contrastive, sweep: {alpha: [1, 2], plausibility: [0, 0.1]}}
      student_kd: {kind: student, train: {alpha: 0}}
      caad_adaptive: {kind: student, train: {alpha: 2}, alpha: {alpha_adaptive: true, alpha_max: 6}}

Arm kinds:

- ``teacher``: the seed's teacher, greedy decoding (``audio_mode: remove`` in ``decoding`` scores its
  text-only path instead);
- ``teacher_contrastive``: contrastive decoding; ``decoding: {alpha, plausibility}``;
- ``student``: a student trained from the seed's student initialisation: ``train`` overrides
  ``student`` (Stage2Config keys: ``alpha: 0`` is KD, ``kd_weight: 0, ce_weight: 1`` is SFT on the
  pseudo-GT), ``alpha`` holds the schedule and adaptive-alpha keys of
  :mod:`caad.experiment.alpha_method`.

``sweep: {key: [values]}`` expands an arm into one variant per combination (``key`` a ``decoding``,
``train`` or ``alpha`` key: looked up in that order of the arm's kind). A sweep arm is evaluated on
the validation split too; the variant with the best validation ``select_by`` metric (default
``accuracy_all``: the accuracy over all four text conditions) is the arm's reported setting. The test
split never chooses anything.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caad.config import (
    ConfigError,
    Stage2Config,
    config_from_dict,
    config_to_dict,
    expand_output_dir,
    parse_overrides,
)

if TYPE_CHECKING:
    from caad.experiment.spoken_qa_config import SpokenQAExperimentConfig

__all__ = [
    "ARM_KINDS",
    "SELECT_METRICS",
    "SUITES",
    "ArmSpec",
    "EvalSettings",
    "ExperimentConfig",
    "Variant",
    "fingerprint",
    "load_experiment_config",
    "read_section",
]

#: ``suite:`` values: the CAAD corpus (this module) or the spoken-QA text-teacher ablations
#: (:mod:`caad.experiment.spoken_qa_config`).
SUITES = ("caad", "spoken_qa")
ARM_KINDS = ("teacher", "teacher_contrastive", "student")
#: Metrics a sweep may be selected by on validation (higher is better for each).
SELECT_METRICS = ("accuracy", "accuracy_all", "modal_robustness")
DECODING_KEYS = ("alpha", "plausibility", "audio_mode")


def fingerprint(value: Any) -> str:
    """A short stable hash of JSON-serialisable ``value`` (what a finished unit was run with)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class DataSettings:
    num_examples: int = 2600
    seed: int = 0
    splits: list[float] = field(default_factory=lambda: [0.54, 0.15, 0.31])
    context_share: float = 0.5
    context_agreement: float = 0.8
    irrelevant_share: float = 0.1


@dataclass
class ModelSettings:
    tokenizer_vocab_size: int = 512
    teacher_kind: str = "qwen2_audio"
    student_kind: str = "composite"


@dataclass
class EvalSettings:
    batch_size: int = 16
    max_new_tokens: int = 12
    num_bootstrap: int = 1000
    test_items: int | None = None  # audio items of the test split (x its conditions); null: all
    validation_items: int | None = 100
    negative_mode: str = "remove"
    select_by: str = "accuracy_all"


@dataclass
class ArmSpec:
    """One arm as written in the config (before its sweep is expanded)."""

    name: str
    kind: str
    label: str
    train: dict[str, Any] = field(default_factory=dict)
    alpha: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Variant:
    """One setting of an arm: what is trained and/or evaluated, per seed.

    ``key`` is file-name safe and unique (``arm`` alone, or ``arm__alpha-1__plausibility-0.1``);
    ``values`` the swept values; ``train`` the full Stage2Config dict (students); ``alpha`` the alpha
    options (students); ``decoding`` the decoding options (teachers).
    """

    arm: str
    key: str
    kind: str
    label: str
    values: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    alpha: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)

    @property
    def is_student(self) -> bool:
        return self.kind == "student"

    def settings(self) -> dict[str, Any]:
        """Everything that decides this variant's results (besides the seed's shared products)."""
        return {"kind": self.kind, "train": self.train, "alpha": self.alpha, "decoding": self.decoding}


@dataclass
class ExperimentConfig:
    """The resolved experiment config (module docstring)."""

    output_dir: str = "runs/experiment"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataSettings = field(default_factory=DataSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    warmup: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    eval: EvalSettings = field(default_factory=EvalSettings)
    arms: list[ArmSpec] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        out["arms"] = {arm.pop("name"): arm for arm in out["arms"]}
        return out

    def warmup_config(self) -> Stage2Config:
        """The warm-up as a :class:`Stage2Config` (CE only); paths filled by the harness."""
        built = config_from_dict({"warmup": self.warmup}, self._where()).warmup
        names = {f.name for f in dataclasses.fields(Stage2Config)}
        return Stage2Config(**{k: v for k, v in dataclasses.asdict(built).items() if k in names})

    def student_config(self, overrides: dict[str, Any], where: str) -> Stage2Config:
        """``student`` with ``overrides`` as a checked :class:`Stage2Config`."""
        return config_from_dict({"stage2": {**self.student, **overrides}}, f"{self._where()}{where}: ").stage2

    def variants(self) -> list[Variant]:
        """Every arm's variants, in config order."""
        return [variant for arm in self.arms for variant in _expand(self, arm)]

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def _expand(config: ExperimentConfig, arm: ArmSpec) -> list[Variant]:
    where = f"arms.{arm.name}"
    keys = list(arm.sweep)
    combos = list(itertools.product(*(arm.sweep[key] for key in keys))) or [()]
    out = []
    for combo in combos:
        values = dict(zip(keys, combo))
        train, alpha, decoding = dict(arm.train), dict(arm.alpha), dict(arm.decoding)
        for key, value in values.items():
            if arm.kind != "student":
                decoding[key] = value
            elif key in _ALPHA_KEYS():
                alpha[key] = value
            else:
                train[key] = value
        suffix = "__".join(f"{key}-{_slug(value)}" for key, value in values.items())
        variant_key = f"{arm.name}__{suffix}" if suffix else arm.name
        label = arm.label + (" (" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")" if values else "")
        if arm.kind == "student":
            stage2 = config.student_config(train, where)
            from caad.experiment.alpha_method import alpha_config

            try:
                alpha_config(stage2, alpha).validate(where)
            except ConfigError as error:
                raise ConfigError(f"{config._where()}{error}") from None
            train = config_to_dict(stage2)
            for path_key in ("train_manifest", "validation_manifest", "student", "teacher", "output_dir"):
                train.pop(path_key, None)
        else:
            _check_decoding(decoding, f"{config._where()}{where}")
        out.append(Variant(arm.name, variant_key, arm.kind, label, values, train, alpha, decoding))
    return out


def _ALPHA_KEYS() -> dict[str, Any]:  # noqa: N802 - a lazy constant (avoids importing the trainer early)
    from caad.experiment.alpha_method import ALPHA_KEYS

    return ALPHA_KEYS


def _check_decoding(decoding: dict[str, Any], where: str) -> None:
    unknown = sorted(set(decoding) - set(DECODING_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown decoding key(s) {', '.join(unknown)}; known: {', '.join(DECODING_KEYS)}")
    alpha = decoding.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0):
        raise ConfigError(f"{where}: decoding alpha must be a number >= 0, got {alpha!r}")
    plausibility = decoding.get("plausibility", 0.0)
    if isinstance(plausibility, bool) or not isinstance(plausibility, (int, float)) or not 0 <= plausibility < 1:
        raise ConfigError(f"{where}: decoding plausibility must be in [0, 1), got {plausibility!r}")


# ---- loading -------------------------------------------------------------------------------------------


def common_keys(data: dict[str, Any], default_output_dir: str, where: str) -> tuple[str, list[int], dict[str, Any]]:
    """``(output_dir, seeds, arms)`` of an experiment config of any suite, checked (errors name the key)."""
    output_dir = data.get("output_dir", default_output_dir)
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{where}output_dir must be a non-empty path, got {output_dir!r}")
    seeds = data.get("seeds", [0, 1, 2])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ConfigError(f"{where}seeds must be a non-empty list of distinct ints >= 0, got {seeds!r}")
    arms = data.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{where}arms must be a non-empty mapping of arm name -> spec")
    return output_dir, list(seeds), arms


def read_section(cls: type, data: Any, name: str, where: str) -> Any:
    """The dataclass ``cls`` from the mapping ``data`` (``None``: its defaults), checked key by key.

    Each value must have its default's type, with these allowances: an int for a float (stored as a float), a
    list of numbers for a list default (stored as floats), a nested mapping for a dataclass default (read the
    same way), ``None`` or an int where the field's annotation admits ``None``. A bool is only a bool. Unknown
    keys and wrong types raise :class:`ConfigError` naming ``where`` and the dotted key (``name.key``).
    """
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{name} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; known: "
                          f"{', '.join(sorted(fields))}")
    defaults, values = cls(), {}
    for key, value in data.items():
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            values[key] = read_section(type(default), value, f"{name}.{key}", where)
            continue
        nullable = "None" in str(fields[key].type)
        if value is None or default is None:
            ok = (value is None and nullable) or (isinstance(value, int) and not isinstance(value, bool))
        elif isinstance(default, list):
            ok = isinstance(value, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            )
            value = [float(v) for v in value] if ok else value
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default)) and (isinstance(default, bool) or not isinstance(value, bool))
        if not ok:
            expected = "int or null" if default is None else type(default).__name__
            raise ConfigError(f"{where}{name}.{key} must be {expected}, got {value!r}")
        values[key] = value
    return cls(**values)


def _arm(name: Any, spec: Any, where: str) -> ArmSpec:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise ConfigError(f"{where}arm names must be letters, digits, '_', '.', '+' or '-', got {name!r}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}arms.{name} must be a mapping, got {spec!r}")
    allowed = {"kind", "label", "train", "alpha", "decoding", "sweep"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(f'arms.{name}.{k}' for k in unknown)}; known: "
                          f"{', '.join(sorted(allowed))}")
    kind = spec.get("kind")
    if kind not in ARM_KINDS:
        raise ConfigError(f"{where}arms.{name}.kind must be one of {ARM_KINDS}, got {kind!r}")
    for key in ("train", "alpha", "decoding", "sweep"):
        if not isinstance(spec.get(key, {}), dict):
            raise ConfigError(f"{where}arms.{name}.{key} must be a mapping, got {spec[key]!r}")
    if kind != "student" and (spec.get("train") or spec.get("alpha")):
        raise ConfigError(f"{where}arms.{name}: train and alpha are for kind student only")
    if kind == "student" and spec.get("decoding"):
        raise ConfigError(f"{where}arms.{name}: decoding is for the teacher kinds only (students decode greedily)")
    sweep = spec.get("sweep", {}) or {}
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}arms.{name}.sweep.{key} must be a non-empty list, got {values!r}")
    if kind == "teacher_contrastive" and "alpha" not in {**spec.get("decoding", {}), **sweep}:
        raise ConfigError(f"{where}arms.{name}: contrastive decoding needs decoding.alpha (or a sweep over alpha)")
    label = spec.get("label", name)
    if not isinstance(label, str):
        raise ConfigError(f"{where}arms.{name}.label must be a string, got {label!r}")
    return ArmSpec(name, kind, label, dict(spec.get("train") or {}), dict(spec.get("alpha") or {}),
                   dict(spec.get("decoding") or {}), {k: list(v) for k, v in sweep.items()})


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def experiment_config_from_dict(
    data: dict[str, Any], where: str = ""
) -> ExperimentConfig | SpokenQAExperimentConfig:
    """A checked :class:`ExperimentConfig` from plain data (``where`` prefixes error messages).

    ``suite: spoken_qa`` reads the text-teacher ablations instead
    (:func:`caad.experiment.spoken_qa_config.spoken_qa_config_from_dict`, a ``SpokenQAExperimentConfig``).
    """
    suite = data.get("suite", "caad")
    if suite == "spoken_qa":
        from caad.experiment.spoken_qa_config import spoken_qa_config_from_dict

        return spoken_qa_config_from_dict(data, where)
    if suite != "caad":
        raise ConfigError(f"{where}suite must be one of {', '.join(SUITES)}, got {suite!r}")
    data = {key: value for key, value in data.items() if key != "suite"}
    allowed = {"output_dir", "seeds", "data", "models", "warmup", "student", "eval", "arms"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    output_dir, seeds, arms = common_keys(data, "runs/experiment", where)
    config = ExperimentConfig(
        output_dir=output_dir,
        seeds=list(seeds),
        data=read_section(DataSettings, data.get("data"), "data", where),
        models=read_section(ModelSettings, data.get("models"), "models", where),
        warmup=dict(data.get("warmup") or {}),
        student=dict(data.get("student") or {}),
        eval=read_section(EvalSettings, data.get("eval"), "eval", where),
        arms=[_arm(name, spec, where) for name, spec in arms.items()],
        source=where.rstrip(": "),
    )
    _check_settings(config, where)
    config.warmup_config()  # the training sections' keys, types and ranges (caad.config's checks)
    config.variants()
    return config


def _check_settings(config: ExperimentConfig, where: str) -> None:
    from caad.models import NEGATIVE_MODES

    d, e = config.data, config.eval
    checks = [
        (d.num_examples >= 3, "data.num_examples", "must be >= 3"),
        (len(d.splits) == 3 and all(v >= 0 for v in d.splits) and abs(sum(d.splits) - 1) < 1e-6, "data.splits",
         "must be three non-negative fractions summing to 1"),
        (all(0 <= v <= 1 for v in (d.context_share, d.context_agreement, d.irrelevant_share)), "data",
         "context_share, context_agreement and irrelevant_share must be in [0, 1]"),
        (config.models.teacher_kind in ("qwen2_audio", "composite"), "models.teacher_kind",
         "must be qwen2_audio or composite"),
        (config.models.student_kind in ("qwen2_audio", "composite"), "models.student_kind",
         "must be qwen2_audio or composite"),
        (e.batch_size >= 1 and e.max_new_tokens >= 1, "eval", "batch_size and max_new_tokens must be >= 1"),
        (e.num_bootstrap >= 0, "eval.num_bootstrap", "must be >= 0"),
        (e.test_items is None or e.test_items >= 1, "eval.test_items", "must be >= 1 or null (all)"),
        (e.validation_items is None or e.validation_items >= 1, "eval.validation_items", "must be >= 1 or null"),
        (e.negative_mode in NEGATIVE_MODES or e.negative_mode in ("zero", "noise"), "eval.negative_mode",
         f"must be one of {NEGATIVE_MODES}"),
        (e.select_by in SELECT_METRICS, "eval.select_by", f"must be one of {SELECT_METRICS}"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{where}{key}: {message}")
    keys = [variant.key for variant in config.variants()]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigError(f"{where}arms give the same variant name twice: {', '.join(duplicates)}")


def load_experiment_config(
    path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig | SpokenQAExperimentConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides (dotted keys, YAML values), check everything.

    Raises :class:`caad.config.ConfigError` naming the file and the key for anything wrong.
    """
    import yaml

    path = Path(path)
    where = f"{path}: "
    if not path.is_file():
        raise ConfigError(f"experiment config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}the config must be a YAML mapping")
    data = copy.deepcopy(data)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    config = experiment_config_from_dict(data, where)
    config.output_dir = expand_output_dir(config.output_dir)
    return config

