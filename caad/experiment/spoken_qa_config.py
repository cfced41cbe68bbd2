"""The spoken-QA suite's config (``suite: spoken_qa``): the text-teacher ablations of issue 14 as arms.

YAML layout (every key optional except ``suite`` and ``arms``; unknown keys are errors naming the file and key)::

    suite: spoken_qa
    output_dir: runs/spoken_qa           # the experiment folder ({timestamp} expands)
    seeds: [0, 1, 2]                     # each student arm's training seed (data order, random state)
    data:   {num_examples, seed, splits, workers}     # the built-in spoken-QA set (caad.data.spoken_qa)
    models: {tokenizer_vocab_size, teacher_steps, student_text_steps, text_knowledge, student_spoken_format,
             audio_window, student_sizes: {audio, audio_layers, ...},   # caad.models.tiny.TINY_SIZES["student"]
             speech_align_steps, speech_align: {batch_size, lr, ...}}   # options of align_speech_student
    student: {...}                       # every student arm's training: trainer + answer-KD keys
    eval:   {num_bootstrap, batch_size, max_new_tokens}
    arms:                                # name -> spec, in the order of the report
      text_teacher: {kind: text_teacher}
      pre_distillation: {kind: pre_distillation}
      ce_only: {kind: student, method: crossmodal, train: {t2t: false, kd_weight: 0.0, ce_weight: 1.0}}
      sourcewise: {kind: student, method: sourcewise, acoustic_teacher: {arm: ce_only}, train: {...}}

Arm kinds:

- ``text_teacher``: the shared text teacher answering each test question as text (a reference row);
- ``pre_distillation``: the shared student before distillation, on spoken and text queries (a reference row;
  the ``forgetting`` column is measured against it);
- ``student``: per seed, the shared student trained by ``method`` (``crossmodal``, ``sourcewise`` or
  ``layerwise``) with ``student`` and then the arm's ``train`` overrides: keys of the method's config section
  (:class:`caad.methods.crossmodal.CrossModalConfig`, :class:`caad.methods.sourcewise.SourceWiseConfig`,
  :class:`caad.methods.layerwise.LayerWiseConfig`). The experiment fills the paths (manifests, student,
  teachers, output_dir) and the seed; writing them is an error. A ``sourcewise`` arm names its acoustic
  teacher as another student arm, ``acoustic_teacher: {arm: NAME}``: that arm's final student of the same
  seed (trained first; an arm that is not in the config, or a cycle, is an error naming the key).

Seeds: the set, the tokenizer, the text teacher and the student before distillation are shared by every seed
(built from ``data.seed``; the student's initialisation uses ``data.seed + 1``); seed ``s`` sets each student
arm's data order and random state. The suite has no sweeps, so nothing is chosen on any split: the validation
split only serves ``caad train --config configs/crossmodal*.yaml``'s ``validation_manifest``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

from caad.config import ConfigError, TrainerConfig, config_from_dict, config_to_dict

__all__ = [
    "METHODS",
    "QA_ARM_KINDS",
    "QAArm",
    "SpokenQAExperimentConfig",
    "spoken_qa_config_from_dict",
]

METHODS = ("crossmodal", "sourcewise", "layerwise")
REFERENCE_KINDS = ("text_teacher", "pre_distillation")
QA_ARM_KINDS = ("student", *REFERENCE_KINDS)
#: Method-config keys the experiment fills itself (paths, seed) and that a config must not set.
FILLED_KEYS = (
    "train_manifest", "validation_manifest", "student", "output_dir", "overwrite", "seed",
    "teacher", "text_teacher", "acoustic_teacher",
)  # fmt: skip
#: Keys that change how a run is watched, not its result: left out of the fingerprints.
WATCH_KEYS = ("progress", "data_check", "tensorboard", "log_every", "save_every", "keep_checkpoints")
#: The student section's defaults (the script's table settings); the config's ``student`` overrides them.
STUDENT_DEFAULTS: dict[str, Any] = {
    "max_steps": 300,
    "batch_size": 8,
    "lr": 3e-3,
    "scheduler": "cosine",
    "warmup_ratio": 0.1,
    "kd_weight": 0.5,
    "ce_weight": 0.5,
    "temperature": 2.0,
    "save_every": 0,
    "keep_checkpoints": 1,
    "log_every": 5,
    "tensorboard": False,
}


@dataclass
class QADataSettings:
    num_examples: int = 600
    seed: int = 0
    splits: list[float] = field(default_factory=lambda: [0.78, 0.02, 0.2])  # train / validation / test
    workers: int = 1  # synthesis processes (not part of the set's fingerprint: the set is the same)


#: ``models.text_knowledge``: which questions' text the text teacher and the student's LM are trained on.
#: ``"train"``: the train split's only, so the test split measures held-out combinations (can the LM add two
#: numbers it never saw added?) as much as speech. ``"all"``: every question of the universe, train,
#: validation and test, as a text LLM brings its knowledge to speech training; the spoken data still never
#: holds a validation or test question, so the test measures whether that knowledge is reached from speech
#: (the papers' modality gap) and forgetting is measured on questions the LMs know.
TEXT_KNOWLEDGE = ("train", "all")

#: ``models.speech_align``'s defaults: keyword options of :func:`caad.models.speech_align.align_speech_student`
#: (none: that function's own defaults, the settings it was measured with).
SPEECH_ALIGN_DEFAULTS: dict[str, Any] = {}
#: Its arguments the experiment passes itself.
SPEECH_ALIGN_FILLED = ("student", "train_manifest", "steps", "seed", "progress")


@dataclass
class QAModelSettings:
    tokenizer_vocab_size: int = 400
    teacher_steps: int = 300  # the text teacher's training on the train split's text
    student_text_steps: int = 500  # the student's language model, the same text first
    text_knowledge: str = "train"  # the questions whose text both LMs learn: "train" split or "all" (see below)
    student_spoken_format: float = 0.0  # share of the student LM's text examples in its spoken prompt format
    audio_window: int = 4  # the student's audio window in seconds (1-30)
    student_sizes: dict[str, Any] = field(default_factory=dict)  # overrides of caad.models.tiny's student sizes
    speech_align_steps: int = 0  # > 0: caad.models.speech_align.align_speech_student before distillation
    speech_align: dict[str, Any] = field(default_factory=lambda: dict(SPEECH_ALIGN_DEFAULTS))  # its options


@dataclass
class QAEvalSettings:
    num_bootstrap: int = 1000
    batch_size: int = 32
    max_new_tokens: int = 6


@dataclass
class QAArm:
    """One arm as written in the config. ``acoustic_teacher``: the student arm whose final student is the
    acoustic teacher of this (``sourcewise``) arm, per seed."""

    name: str
    kind: str
    label: str
    method: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    acoustic_teacher: str | None = None

    @property
    def is_student(self) -> bool:
        return self.kind == "student"


@dataclass
class SpokenQAExperimentConfig:
    """The resolved spoken-QA experiment config (module docstring)."""

    suite: str = "spoken_qa"
    output_dir: str = "runs/spoken_qa"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: QADataSettings = field(default_factory=QADataSettings)
    models: QAModelSettings = field(default_factory=QAModelSettings)
    student: dict[str, Any] = field(default_factory=dict)
    eval: QAEvalSettings = field(default_factory=QAEvalSettings)
    arms: list[QAArm] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        out["arms"] = {arm.pop("name"): {k: v for k, v in arm.items() if v not in (None, {})} for arm in out["arms"]}
        for spec in out["arms"].values():
            if "acoustic_teacher" in spec:
                spec["acoustic_teacher"] = {"arm": spec["acoustic_teacher"]}
        return out

    def arm(self, name: str) -> QAArm:
        return next(arm for arm in self.arms if arm.name == name)

    def method_config(self, arm: QAArm, **filled: Any) -> TrainerConfig:
        """``arm``'s method section (``student`` <- the arm's ``train`` <- ``filled``), checked; ``filled``
        holds the experiment's paths and seed (none at load time: only the values are checked then)."""
        assert arm.method is not None
        from caad.methods import get_method

        cls = get_method(arm.method).config_class
        known = [f.name for f in dataclasses.fields(cls)]
        for where, values in ((f"arms.{arm.name}.train", arm.train), ("student", self.student)):
            for key in values:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ConfigError(f"{self._where()}{where}.{key}: not a key of method {arm.method}'s config "
                                      f"(arm {arm.name}){hint}")
        values = {**STUDENT_DEFAULTS, **self.student, **arm.train, **filled}
        where = f"{self._where()}arms.{arm.name} (student + arms.{arm.name}.train): "
        built = config_from_dict({arm.method: values}, where, sections={arm.method: cls})
        return built.method_sections[arm.method]

    def train_settings(self, arm: QAArm) -> dict[str, Any]:
        """What decides a student arm's training besides its inputs: the method and its resolved section."""
        section = config_to_dict(self.method_config(arm))
        for key in (*FILLED_KEYS, *WATCH_KEYS):
            section.pop(key, None)
        return {"method": arm.method, "config": section}

    def ordered_arms(self) -> list[QAArm]:
        """The arms in run order: config order, each arm after the arm it learns from."""
        done: list[QAArm] = []
        names = {arm.name for arm in self.arms}

        def visit(arm: QAArm, path: tuple[str, ...]) -> None:
            if any(a.name == arm.name for a in done):
                return
            if arm.name in path:
                cycle = " -> ".join([*path[path.index(arm.name):], arm.name])
                raise ConfigError(f"{self._where()}arms.{arm.name}.acoustic_teacher: a cycle ({cycle})")
            if arm.acoustic_teacher is not None:
                if arm.acoustic_teacher not in names:
                    raise ConfigError(
                        f"{self._where()}arms.{arm.name}.acoustic_teacher.arm: no arm {arm.acoustic_teacher!r} in "
                        f"the config; arms: {', '.join(sorted(names))}"
                    )
                visit(self.arm(arm.acoustic_teacher), (*path, arm.name))
            done.append(arm)

        for arm in self.arms:
            visit(arm, ())
        return done

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""


# ---- loading ----------------------------------------------------------------------------------------------


def _training_keys(value: Any, name: str, where: str) -> dict[str, Any]:
    """The method-config overrides at ``name`` (``student`` or an arm's ``train``): a mapping without the keys
    the experiment fills (paths, seed)."""
    value = value or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{name} must be a mapping, got {value!r}")
    filled = sorted(set(value) & set(FILLED_KEYS))
    if filled:
        raise ConfigError(f"{where}{name}.{filled[0]} is filled by the experiment; remove it")
    return value


def _arm(name: Any, spec: Any, where: str) -> QAArm:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise ConfigError(f"{where}arm names must be letters, digits, '_', '.', '+' or '-', got {name!r}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}arms.{name} must be a mapping, got {spec!r}")
    allowed = {"kind", "label", "method", "train", "acoustic_teacher"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}unknown key(s) {', '.join(f'arms.{name}.{k}' for k in unknown)}; known: "
            f"{', '.join(sorted(allowed))} (suite spoken_qa has no sweeps)"
        )
    kind = spec.get("kind")
    if kind not in QA_ARM_KINDS:
        raise ConfigError(f"{where}arms.{name}.kind must be one of {', '.join(QA_ARM_KINDS)}, got {kind!r}")
    label = spec.get("label", name)
    if not isinstance(label, str):
        raise ConfigError(f"{where}arms.{name}.label must be a string, got {label!r}")
    if kind != "student":
        extra = sorted(set(spec) & {"method", "train", "acoustic_teacher"})
        if extra:
            raise ConfigError(f"{where}arms.{name}.{extra[0]}: only for kind student (this arm is a {kind})")
        return QAArm(name, kind, label)
    method = spec.get("method")
    if method not in METHODS:
        raise ConfigError(f"{where}arms.{name}.method must be one of {', '.join(METHODS)}, got {method!r}")
    train = _training_keys(spec.get("train"), f"arms.{name}.train", where)
    teacher = spec.get("acoustic_teacher")
    if teacher is not None:
        if method != "sourcewise":
            raise ConfigError(f"{where}arms.{name}.acoustic_teacher: only for method sourcewise (got {method})")
        if not isinstance(teacher, dict) or set(teacher) != {"arm"} or not isinstance(teacher["arm"], str):
            raise ConfigError(f"{where}arms.{name}.acoustic_teacher must be {{arm: NAME}} (a student arm), got "
                              f"{teacher!r}")
        if teacher["arm"] == name:
            raise ConfigError(f"{where}arms.{name}.acoustic_teacher.arm: an arm cannot be its own teacher")
        teacher = teacher["arm"]
    return QAArm(name, kind, label, method, dict(train), teacher)


def spoken_qa_config_from_dict(data: dict[str, Any], where: str = "") -> SpokenQAExperimentConfig:
    """A checked :class:`SpokenQAExperimentConfig` from plain data (``where`` prefixes error messages)."""
    allowed = {"suite", "output_dir", "seeds", "data", "models", "student", "eval", "arms"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(unknown)}; known (suite spoken_qa): "
                          f"{', '.join(sorted(allowed))}")
    data = copy.deepcopy(data)
    from caad.experiment.config import common_keys, read_section  # not at import: that module imports this one lazily

    output_dir, seeds, arms = common_keys(data, "runs/spoken_qa", where)
    student = _training_keys(data.get("student"), "student", where)
    config = SpokenQAExperimentConfig(
        output_dir=output_dir,
        seeds=list(seeds),
        data=read_section(QADataSettings, data.get("data"), "data", where),
        models=read_section(QAModelSettings, data.get("models"), "models", where),
        student=dict(student),
        eval=read_section(QAEvalSettings, data.get("eval"), "eval", where),
        arms=[_arm(name, spec, where) for name, spec in arms.items()],
        source=where.rstrip(": "),
    )
    _check_settings(config, where)
    return config


def _check_settings(config: SpokenQAExperimentConfig, where: str) -> None:
    d, m, e = config.data, config.models, config.eval
    checks = [
        (d.num_examples >= 3, "data.num_examples", "must be >= 3"),
        (len(d.splits) == 3 and all(v >= 0 for v in d.splits) and abs(sum(d.splits) - 1) < 1e-6
         and d.splits[0] > 0 and d.splits[2] > 0, "data.splits",
         "must be three non-negative fractions (train, validation, test) summing to 1, train and test > 0"),
        (d.seed >= 0, "data.seed", "must be >= 0"),
        (d.workers >= 1, "data.workers", "must be >= 1"),
        (m.tokenizer_vocab_size >= 64, "models.tokenizer_vocab_size", "must be >= 64"),
        (m.teacher_steps >= 1, "models.teacher_steps", "must be >= 1"),
        (m.student_text_steps >= 0, "models.student_text_steps", "must be >= 0"),
        (m.text_knowledge in TEXT_KNOWLEDGE, "models.text_knowledge", f"must be one of {list(TEXT_KNOWLEDGE)}"),
        (0 <= m.student_spoken_format <= 1, "models.student_spoken_format", "must be in [0, 1]"),
        (m.student_spoken_format == 0 or m.student_text_steps > 0, "models.student_spoken_format",
         "needs models.student_text_steps > 0 (it is a share of that pre-training)"),
        (1 <= m.audio_window <= 30, "models.audio_window", "must be 1-30 seconds"),
        (m.speech_align_steps >= 0, "models.speech_align_steps", "must be >= 0 (0: no speech alignment)"),
        (e.num_bootstrap >= 0, "eval.num_bootstrap", "must be >= 0"),
        (e.batch_size >= 1 and e.max_new_tokens >= 1, "eval", "batch_size and max_new_tokens must be >= 1"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{where}{key} {message}, got {_dotted(config, key)!r}")
    _check_student_sizes(m.student_sizes, where)
    m.speech_align = {**SPEECH_ALIGN_DEFAULTS, **m.speech_align}
    if m.speech_align_steps > 0:
        _check_speech_align(m.speech_align, m.speech_align_steps, where)
    kinds = [arm.kind for arm in config.arms]
    for kind in REFERENCE_KINDS:
        if kinds.count(kind) > 1:
            raise ConfigError(f"{where}arms: more than one arm of kind {kind} (a reference appears once)")
    for arm in config.ordered_arms():
        if not arm.is_student:
            continue
        if arm.acoustic_teacher is not None and not config.arm(arm.acoustic_teacher).is_student:
            raise ConfigError(f"{where}arms.{arm.name}.acoustic_teacher.arm: {arm.acoustic_teacher!r} is not a "
                              "student arm (its final student is the acoustic teacher)")
        section = config.method_config(arm)  # every key, type and range of the method's section
        if arm.method == "sourcewise" and section.needs_acoustic_teacher and arm.acoustic_teacher is None:
            raise ConfigError(f"{where}arms.{arm.name}.acoustic_teacher is required (e.g. {{arm: ce_only}}): the "
                              "acoustic teacher is another arm's final student of the same seed")


def _check_student_sizes(sizes: dict[str, Any], where: str) -> None:
    """``models.student_sizes`` against :data:`caad.models.tiny.TINY_SIZES`'s student: known keys, ints (>= 1;
    ``vocab_padding`` >= 0) and widths that their head counts divide, so a bad model fails before the set is
    synthesised."""
    from caad.models.tiny import TINY_SIZES

    for key, value in sizes.items():
        if key not in TINY_SIZES["student"]:
            raise ConfigError(f"{where}models.student_sizes.{key}: not a size of the tiny student; known: "
                              f"{', '.join(sorted(TINY_SIZES['student']))}")
        low = 0 if key == "vocab_padding" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{where}models.student_sizes.{key} must be an int >= {low}, got {value!r}")
    merged = {**TINY_SIZES["student"], **sizes}
    for width, heads in (("hidden", "heads"), ("heads", "kv_heads"), ("audio", "audio_heads")):
        if merged[width] % merged[heads]:
            raise ConfigError(f"{where}models.student_sizes: {width} ({merged[width]}) must be a multiple of "
                              f"{heads} ({merged[heads]})")


def _check_speech_align(options: dict[str, Any], steps: int, where: str) -> None:
    """``models.speech_align``'s keys against :func:`~caad.models.speech_align.align_speech_student`'s keyword
    options, and each value's type against the option's default (ranges are the function's to check)."""
    if importlib.util.find_spec("caad.models.speech_align") is None:
        raise ConfigError(f"{where}models.speech_align_steps is {steps} but caad.models.speech_align is not "
                          "available in this checkout; set it to 0")
    import inspect

    from caad.models.speech_align import align_speech_student

    parameters = {name: p for name, p in inspect.signature(align_speech_student).parameters.items()
                  if name not in SPEECH_ALIGN_FILLED and p.kind is inspect.Parameter.KEYWORD_ONLY}
    for key, value in options.items():
        if key not in parameters:
            raise ConfigError(f"{where}models.speech_align.{key}: not an option of align_speech_student; options: "
                              f"{', '.join(parameters)}")
        default = parameters[key].default
        if default is inspect.Parameter.empty or default is None:
            continue
        ok = isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool)
        ok = ok or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{where}models.speech_align.{key} must be {type(default).__name__} like its default "
                              f"{default!r}, got {value!r}")


def _dotted(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = getattr(node, part, None)
    return node
