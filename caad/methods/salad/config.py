"""The ``salad`` config: the rounds loop (arms, seeds, clusters, budget) and the training settings of each round.

A config file holds one top-level section ``salad`` (:class:`SaladConfig`); its sub-mapping ``train`` holds
the cross-modal method's settings (:class:`caad.methods.crossmodal.CrossModalConfig` fields) used by every
trainer run (Stage I and each round); SALAD fills in ``train_manifest``, ``student``, ``teacher``,
``output_dir``, ``seed`` and ``max_steps`` itself. Overrides are dotted keys (``salad.rounds=3``,
``salad.train.lr=1e-3``), their values parsed as YAML. Unknown keys and bad values raise
:class:`caad.config.ConfigError` naming the dotted key, before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caad.config import ConfigError, _build, _coerce, parse_overrides
from caad.config import config_field as _field

__all__ = ["ARM_RANDOM", "BUDGET_UNITS", "SaladConfig", "load_salad_config", "salad_config_from_dict"]

ARM_RANDOM = "random"
BUDGET_UNITS = ("utterances", "seconds")
#: ``train`` keys SALAD sets per run (a config may not set them).
MANAGED_TRAIN_KEYS = ("train_manifest", "student", "teacher", "output_dir", "seed", "max_steps", "overwrite")


@dataclass
class SaladConfig:
    """SALAD (arXiv 2510.13632): Stage I cross-modal distillation, then rounds of active selection.

    Paths ``set``, ``teacher``, ``student`` left ``null`` are built under ``<output_dir>/base``: a spoken-QA set
    (:func:`caad.data.spoken_qa.synthesize_spoken_qa`), a tiny text teacher pre-trained on the set's text,
    and a tiny speech student sharing its tokenizer.
    """

    output_dir: str = _field("runs/salad", "the run's folder (never overwritten; --resume continues it)")
    set: str | None = _field(None, "a spoken-QA set folder (null: synthesise one under output_dir/base/set)")
    teacher: str | None = _field(None, "text teacher folder (null: build and pre-train a tiny one)")
    student: str | None = _field(None, "initial speech student folder (null: build a tiny one)")
    set_examples: int = _field(160, "utterances of the synthesised set (all splits), when set is null")
    set_seed: int = _field(0, "seed of the synthesised set and the tiny models")
    voices: list[str] = _field(help="voices of every synthesis", factory=lambda: ["m3", "f3", "m1", "f2"])
    rates: list[int] = _field(help="speaking rates (words per minute)", factory=lambda: [150, 190])
    pitches: list[int] = _field(help="espeak-ng pitch settings (0-100)", factory=lambda: [40, 60])
    teacher_steps: int = _field(400, "pre-training steps of the tiny text teacher, when teacher is null")
    seeds: list[int] = _field(help="seeds: each runs Stage I and every arm", factory=lambda: [0, 1])
    arms: list[str] = _field(
        help="arms after Stage I: 'random' or an active arm named by its metric (kl, js, acc_gap)",
        factory=lambda: ["kl", "random"],
    )
    clusters: int = _field(8, "k of k-means over the pool's embeddings")
    probe_per_cluster: int = _field(3, "probe utterances per cluster to measure its misalignment")
    rounds: int = _field(2, "rounds of measure -> select -> synthesise -> train after Stage I")
    budget_unit: str = _field("utterances", "unit of the synthesis budget: utterances or seconds (of audio)")
    budget_per_round: float = _field(24.0, "new training speech per round, in budget_unit")
    top_clusters: int = _field(2, "active arms spend each round's budget evenly on this many worst clusters")
    replay: bool = _field(True, "each round trains on Stage I's data plus everything synthesised so far")
    stage1_steps: int = _field(60, "optimizer steps of Stage I")
    round_steps: int = _field(30, "optimizer steps of each round")
    probe_temperature: float = _field(1.0, "softmax temperature of the KL/JS probe measures")
    eval_split: str = _field("test", "split of the set the measures are taken on (validation or test)")
    eval_max_items: int | None = _field(None, "at most this many utterances of eval_split (null: all)")
    bootstrap: int = _field(1000, "bootstrap replicates of the confidence intervals")
    progress: bool = _field(True, "progress bars")
    train: dict[str, Any] = _field(help="cross-modal method settings of every training run", factory=dict)

    def validate(self, prefix: str = "salad") -> None:
        """Check every value (errors name ``prefix.key``); builds the ``train`` section to check it too."""
        from caad.data.espeak import ESPEAK_MAX_RATE_WPM, ESPEAK_MIN_RATE_WPM, VOICES
        from caad.methods.salad.misalignment import METRICS

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key} {message}, got {getattr(self, key)!r}")

        def is_int(value: Any, low: int, high: int | None = None) -> bool:
            ok = not isinstance(value, bool) and isinstance(value, int) and value >= low
            return ok and (high is None or value <= high)

        def int_list(values: Any, low: int, high: int | None = None) -> bool:
            return isinstance(values, list) and bool(values) and all(is_int(v, low, high) for v in values)

        def distinct(values: Any) -> bool:
            return isinstance(values, list) and len(set(values)) == len(values)

        check(isinstance(self.output_dir, str) and bool(self.output_dir), "output_dir", "must be a folder path")
        for key in ("set_examples", "teacher_steps", "clusters", "probe_per_cluster", "top_clusters", "stage1_steps"):
            check(is_int(getattr(self, key), 1), key, "must be an int >= 1")
        for key in ("rounds", "round_steps", "bootstrap"):
            check(is_int(getattr(self, key), 0), key, "must be an int >= 0")
        voices_ok = isinstance(self.voices, list) and bool(self.voices) and all(v in VOICES for v in self.voices)
        check(voices_ok and distinct(self.voices), "voices", f"must be a non-empty list of distinct {sorted(VOICES)}")
        rates = f"in [{ESPEAK_MIN_RATE_WPM}, {ESPEAK_MAX_RATE_WPM}]"
        rates_ok = int_list(self.rates, ESPEAK_MIN_RATE_WPM, ESPEAK_MAX_RATE_WPM)
        check(rates_ok, "rates", f"must be a non-empty list of ints {rates}")
        check(int_list(self.pitches, 0, 100), "pitches", "must be a non-empty list of ints in [0, 100]")
        check(int_list(self.seeds, 0) and distinct(self.seeds), "seeds", "must be a list of distinct ints >= 0")
        known = (ARM_RANDOM, *METRICS)
        arms_ok = isinstance(self.arms, list) and bool(self.arms) and all(a in known for a in self.arms)
        check(arms_ok and distinct(self.arms), "arms", f"must be a non-empty list of distinct names from {list(known)}")
        check(self.budget_unit in BUDGET_UNITS, "budget_unit", f"must be one of {list(BUDGET_UNITS)}")
        amount = self.budget_per_round
        check(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, "budget_per_round",
              "must be a number > 0")  # fmt: skip
        if self.budget_unit == "utterances":
            check(float(amount).is_integer(), "budget_per_round", "must be a whole number of utterances")
        check(self.top_clusters <= self.clusters, "top_clusters", f"must be <= clusters ({self.clusters})")
        positive = isinstance(self.probe_temperature, (int, float)) and self.probe_temperature > 0
        check(positive, "probe_temperature", "must be > 0")
        check(self.eval_split in ("validation", "test"), "eval_split", "must be validation or test")
        check(self.eval_max_items is None or is_int(self.eval_max_items, 1), "eval_max_items", "must be null or >= 1")
        check(isinstance(self.train, dict), "train", "must be a mapping of cross-modal settings")
        managed = sorted(set(self.train) & set(MANAGED_TRAIN_KEYS))
        if managed:
            raise ConfigError(f"{prefix}.train: SALAD sets {', '.join(managed)} itself; remove them from the config")
        self.train_config(student="<student>", output_dir="<out>", train_manifest="<manifest>", teacher=None, seed=0,
                          max_steps=1).validate(f"{prefix}.train")  # fmt: skip

    def train_config(self, **paths: Any) -> Any:
        """A :class:`~caad.methods.crossmodal.CrossModalConfig` of ``train`` with ``paths`` (the managed keys)."""
        from caad.methods.crossmodal import CrossModalConfig

        names = {f.name for f in dataclasses.fields(CrossModalConfig)}
        unknown = sorted(set(self.train) - names)
        if unknown:
            known = ", ".join(sorted(names))
            raise ConfigError(f"salad.train.{unknown[0]}: unknown key (cross-modal settings: {known})")
        settings = {"progress": self.progress, "tensorboard": False, **self.train, **paths}
        return CrossModalConfig(**settings)

    @property
    def active_arms(self) -> list[str]:
        return [arm for arm in self.arms if arm != ARM_RANDOM]


def salad_config_from_dict(data: dict[str, Any], where: str = "") -> SaladConfig:
    """A :class:`SaladConfig` from ``{"salad": {...}}`` (or the section's mapping itself), validated."""
    section = data.get("salad", data) if isinstance(data, dict) else data
    if not isinstance(section, dict):
        raise ConfigError(f"{where}salad must be a mapping, got {type(section).__name__}")
    extra = [key for key in data if key != "salad"] if "salad" in data else []
    if extra:
        raise ConfigError(f"{where}unknown top-level key {extra[0]!r} (a SALAD config holds only 'salad')")
    hints = typing.get_type_hints(SaladConfig)
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}salad.{key}: unknown key (known: {known})")
        if key == "train":
            kwargs[key] = _train_settings(value, where)
        else:
            kwargs[key] = _coerce(value, hints[key], f"salad.{key}", where)
    config = SaladConfig(**kwargs)
    try:
        config.validate()
    except ConfigError as error:
        raise ConfigError(f"{where}{error}") from None
    return config


def _train_settings(value: Any, where: str) -> dict[str, Any]:
    """``salad.train`` checked and typed as :class:`~caad.methods.crossmodal.CrossModalConfig` fields."""
    from caad.methods.crossmodal import CrossModalConfig

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}salad.train must be a mapping of cross-modal settings, got {value!r}")
    managed = sorted(set(value) & set(MANAGED_TRAIN_KEYS))
    if managed:
        raise ConfigError(f"{where}salad.train: SALAD sets {', '.join(managed)} itself; remove them from the config")
    names = {f.name for f in dataclasses.fields(CrossModalConfig)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(
            f"{where}salad.train.{unknown[0]}: unknown key (cross-modal settings: {', '.join(sorted(names))})"
        )
    built = _build(CrossModalConfig, value, "salad.train", where)
    return {key: getattr(built, key) for key in value}


def load_salad_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> SaladConfig:
    """Read ``path`` (``None``: defaults), apply ``salad.KEY=VALUE`` overrides (``salad.train.KEY`` too), validate."""
    import yaml

    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        where = f"{path}: "
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{where}invalid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}the config must be a YAML mapping")
    data = {"salad": dict(data.get("salad") or {}), **{k: v for k, v in data.items() if k != "salad"}}
    data["salad"]["train"] = dict(data["salad"].get("train") or {})
    for key, value in parse_overrides(list(overrides)):
        parts = key.split(".")
        if parts[0] != "salad" or len(parts) not in (2, 3) or (len(parts) == 3 and parts[1] != "train"):
            raise ConfigError(f"override {key!r}: expected salad.KEY=VALUE or salad.train.KEY=VALUE")
        target = data["salad"] if len(parts) == 2 else data["salad"]["train"]
        target[parts[-1]] = value
    return salad_config_from_dict(data, where)
