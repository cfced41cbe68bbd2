"""caad.config: YAML + key=value overrides, validated into dataclasses with errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from caad.cli import UserError
from caad.config import (
    CaadConfig,
    ConfigError,
    Stage2Config,
    TrainerConfig,
    config_field,
    config_to_dict,
    describe_keys,
    expand_output_dir,
    list_keys,
    load_config,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_caad_settings():
    config = load_config(None)
    assert isinstance(config, CaadConfig)
    s2 = config.stage2
    assert (s2.alpha, s2.temperature, s2.kd_weight, s2.ce_weight, s2.beta, s2.plausibility) == (
        2,
        2,
        0.7,
        0.3,
        0,
        0,
    )
    assert s2.negative_mode == "remove" and s2.optimizer == "adamw"
    assert config.warmup.kd_weight == 0 and config.warmup.ce_weight == 1
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize("name", ["demo.yaml", "qwen2_audio_7b_zero3.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.stage2.kd_weight > 0


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage2:\n  lr: 1e-4\n  zero_stage: 2\ndata:\n  num_examples: 50\n")
    overrides = ["stage2.lr=3e-4", "stage2.alpha=0", "data.splits=[0.5, 0.25, 0.25]", "eval.enabled=false"]
    config = load_config(path, overrides)
    assert config.stage2.lr == pytest.approx(3e-4)  # "1e-4"/"3e-4" (no dot) are numbers, not strings
    assert config.stage2.zero_stage == 2
    assert config.stage2.alpha == 0.0 and isinstance(config.stage2.alpha, float)
    assert config.data.num_examples == 50 and config.data.splits == [0.5, 0.25, 0.25]
    assert config.eval.enabled is False


def test_parse_overrides_values_are_yaml():
    assert parse_overrides(["a.b=1", "c=true", "d=null", "e=x/y.jsonl", "f=[1, 2]"]) == [
        ("a.b", 1),
        ("c", True),
        ("d", None),
        ("e", "x/y.jsonl"),
        ("f", [1, 2]),
    ]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["stage2.lr"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage2.alpah=1"], "unknown key 'stage2.alpah'; did you mean 'stage2.alpha'"),
        (["stage2.learning_rat=1"], "unknown key 'stage2.learning_rat'"),
        (["kd_weight=0.5"], "did you mean '(stage2|warmup).kd_weight'"),
        (["stage2.lr=fast"], "stage2.lr must be a number, got 'fast'"),
        (["stage2.batch_size=2.5"], "stage2.batch_size must be an integer"),
        (["stage2.overwrite=yes please"], "stage2.overwrite must be true or false"),
        (["stage2.negative_mode=silence"], "stage2.negative_mode must be one of 'remove', 'silence_fixed_length'"),
        (["stage2.precision=fp16"], "stage2.precision must be one of 'fp32', 'bf16'"),
        (["stage2.zero_stage=4"], "stage2.zero_stage must be 0, 1, 2 or 3"),
        (["stage2.temperature=0"], "stage2.temperature must be > 0"),
        (["stage2.alpha=-1"], "stage2.alpha must be >= 0"),
        (["stage2.plausibility=1"], r"stage2.plausibility must be in \[0, 1\)"),
        (["stage2.beta=1", "stage2.plausibility=0.1"], "reverse KL"),
        (["stage2.kd_weight=0", "stage2.ce_weight=0"], "kd_weight \\+ ce_weight must be > 0"),
        (["warmup.kd_weight=0.5"], "warmup.kd_weight must be 0"),
        (["data.splits=[0.5, 0.5]"], "data.splits must be three"),
        (["stage2=1"], "stage2 is a section"),
        (["models.tiny=false"], "models.teacher is required when models.tiny is false"),
        (["stage1.generator=lm"], "stage1.model_path is required"),
        (["stage2.adam_betas=[0.9]"], "stage2.adam_betas must be two numbers"),
        (["stage2.max_steps=0"], "stage2.max_steps must be >= 1"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_errors_in_the_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage2:\n  temprature: 2\n")
    expected = r"bad\.yaml: unknown key 'stage2\.temprature'; did you mean 'stage2\.temperature'"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    path.write_text("stage2: [1, 2]\n")
    with pytest.raises(ConfigError, match="stage2 must be a mapping"):
        load_config(path)
    path.write_text("stage2:\n  lr: [oops\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_inputs_are_reported(tmp_path):
    config = Stage2Config(train_manifest=str(tmp_path / "nope.jsonl"), student="x", output_dir="o")
    with pytest.raises(ConfigError, match="stage2.train_manifest: file not found"):
        config.check_paths("stage2")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    (tmp_path / "empty_ckpt").mkdir()
    config = Stage2Config(train_manifest=str(manifest), student=str(tmp_path / "empty_ckpt"), output_dir="o")
    with pytest.raises(ConfigError, match="stage2.student: .* is not a model checkpoint \\(no config.json"):
        config.check_paths("stage2")
    (tmp_path / "empty_ckpt" / "config.json").write_text("{}")
    config = Stage2Config(
        train_manifest=str(manifest),
        student=str(tmp_path / "empty_ckpt"),
        output_dir="o",
        teacher=str(tmp_path / "no_teacher"),
    )
    with pytest.raises(ConfigError, match="stage2.teacher: checkpoint folder not found"):
        config.check_paths("stage2")
    config.kd_weight = 0.0  # CE only: no teacher needed
    config.check_paths("stage2")
    run = load_config(None, [f"data.corpus_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="data.corpus_dir: .* is not a caad corpus"):
        run.check_run_paths()


def test_every_key_is_listed():
    keys = list_keys()
    assert "stage2.alpha" in keys and "warmup.enabled" in keys and "eval.contrastive_alpha" in keys
    assert "output_dir" in keys and "data" in keys


def test_timestamped_output_dir(tmp_path):
    import datetime

    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    first = expand_output_dir(str(tmp_path / "demo-{timestamp}"), now)
    assert first.endswith("demo-20260102-030405")
    Path(first).mkdir()
    assert expand_output_dir(str(tmp_path / "demo-{timestamp}"), now) == first + "-2"
    assert expand_output_dir("plain/dir") == "plain/dir"


def test_warmup_only_for_tiny_models_unless_asked():
    config = load_config(None)
    assert config.warmup.enabled is None
    assert config.warmup.resolved_enabled(tiny_models=True) is True
    assert config.warmup.resolved_enabled(tiny_models=False) is False
    assert load_config(None, ["warmup.enabled=true"]).warmup.resolved_enabled(tiny_models=False) is True
    assert load_config(None, ["warmup.enabled=false"]).warmup.resolved_enabled(tiny_models=True) is False


def test_training_defaults_save_checkpoints():
    assert load_config(None).stage2.save_every > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage2.offload_optimizer=cpu"], "stage2.offload_optimizer needs zero_stage >= 1"),
        (["stage2.zero_stage=2", "stage2.offload_param=cpu"], "stage2.offload_param needs zero_stage 3"),
        (["stage2.zero_stage=3", "stage2.offload_param=nvme"], "stage2.offload_nvme_path is required"),
        (["stage2.offload_optimizer=gpu"], "stage2.offload_optimizer must be one of 'none', 'cpu', 'nvme'"),
        (["stage2.eval_every=-1"], "stage2.eval_every must be >= 0"),
    ],
)
def test_engine_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_validation_needs_a_manifest(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    config = Stage2Config(
        train_manifest=str(manifest), student=str(tmp_path / "ckpt"), output_dir="o", kd_weight=0.0, eval_every=5
    )
    with pytest.raises(ConfigError, match="stage2.validation_manifest is required with eval_every > 0"):
        config.check_paths("stage2")
    config.validation_manifest = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="stage2.validation_manifest: file not found"):
        config.check_paths("stage2")


def test_every_key_has_a_one_line_help():
    rows = describe_keys()
    assert {key for key, *_ in rows} == set(list_keys())
    for key, _type, _default, help_text in rows:
        assert help_text and "\n" not in help_text, key
    assert ("stage2.alpha", "a number", 2.0) == next(r[:3] for r in rows if r[0] == "stage2.alpha")


def test_negative_and_audio_modes_match_the_models():
    from typing import get_args

    from caad.config import AudioMode, NegativeMode
    from caad.models import AUDIO_MODES, NEGATIVE_MODE_ALIASES, NEGATIVE_MODES

    assert set(get_args(NegativeMode)) == set(NEGATIVE_MODES) | set(NEGATIVE_MODE_ALIASES)
    assert set(get_args(AudioMode)) == set(AUDIO_MODES) | set(NEGATIVE_MODE_ALIASES)
    config = load_config(None)
    assert config.stage2.negative_mode == "remove" and config.eval.audio_mode == "positive"
    silence = load_config(None, ["stage2.negative_mode=silence_fixed_length", "stage2.silence_seconds=2"]).stage2
    assert (silence.negative_mode, silence.silence_seconds) == ("silence_fixed_length", 2.0)
    with pytest.raises(ConfigError, match="stage2.negative_mode must be one of 'remove'"):
        load_config(None, ["stage2.negative_mode=blank"])
    with pytest.raises(ConfigError, match="stage2.silence_seconds must be between 0.1 and 30"):
        load_config(None, ["stage2.silence_seconds=0"])
    with pytest.raises(ConfigError, match="stage2.max_length must be >= 2"):
        load_config(None, ["stage2.max_length=1"])
    with pytest.raises(ConfigError, match="data.context_share must be in \\[0, 1\\]"):
        load_config(None, ["data.context_share=1.5"])
    with pytest.raises(ConfigError, match="data.max_seconds must be > min_seconds"):
        load_config(None, ["data.max_seconds=0.05"])


@dataclasses.dataclass
class _ToyConfig(TrainerConfig):
    """A method's own config section, declared outside caad.config."""

    weight: float = config_field(0.5, "the toy method's weight")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.weight < 0:
            raise ConfigError(f"{prefix}.weight must be >= 0, got {self.weight}")


def _register_toy() -> type:
    from caad.methods import register_method
    from caad.train.method import Method

    class Toy(Method):
        name = "test-config-toy"
        section = "toy_section"
        config_class = _ToyConfig

    return register_method(Toy)


def test_a_method_declares_its_config_section_in_its_own_module(tmp_path):
    _register_toy()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"toy_section": {"weight": 2.0, "lr": 0.1}, "stage2": {"alpha": 1.0}}))
    config = load_config(path, ["toy_section.batch_size=3"])
    toy = config.section("toy_section")
    assert isinstance(toy, _ToyConfig) and (toy.weight, toy.lr, toy.batch_size) == (2.0, 0.1, 3)
    assert config.stage2.alpha == 1.0
    assert config_to_dict(config)["toy_section"]["weight"] == 2.0
    # absent from the file: defaults, when the caller names the section (caad train --method does)
    assert load_config(None, [], {"toy_section": _ToyConfig}).section("toy_section").weight == 0.5
    with pytest.raises(ConfigError, match="unknown key 'toy_section.wieght'; did you mean 'toy_section.weight'"):
        load_config(path, ["toy_section.wieght=1"])
    path.write_text(yaml.safe_dump({"toy_section": {"lrr": 0.1}}))
    with pytest.raises(ConfigError, match="c.yaml: unknown key 'toy_section.lrr'; did you mean 'toy_section.lr'"):
        load_config(path)
    with pytest.raises(ConfigError, match="toy_section.weight must be >= 0"):
        load_config(None, ["toy_section.weight=-1"])
    with pytest.raises(ConfigError, match="unknown key 'nosuch_section.x'"):
        load_config(None, ["nosuch_section.x=1"])
    # an ordinary config imports no method module
    assert config.method_sections.keys() == {"toy_section"}
    assert load_config(None).method_sections == {}


@dataclasses.dataclass
class _Stage2Variant(Stage2Config):
    """A CAAD variant's config: the stage2 section with one more key."""

    extra_knob: float = config_field(1.0, "a variant's own key")


def test_a_method_variant_reads_a_builtin_section_with_its_subclass(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage2": {"extra_knob": 3.0}}))
    config = load_config(path, ["stage2.alpha=1"], {"stage2": _Stage2Variant})
    assert isinstance(config.stage2, _Stage2Variant)
    assert (config.stage2.extra_knob, config.stage2.alpha) == (3.0, 1.0)
    assert isinstance(load_config(None, [], {"stage2": _Stage2Variant}).stage2, _Stage2Variant)
    with pytest.raises(ConfigError, match="unknown key 'stage2.extra_knob'"):
        load_config(path)
    assert type(load_config(None, [], {"stage2": Stage2Config}).stage2) is Stage2Config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    """A key renamed in code but not in configs/ would only show when a user runs that config."""
    if path.name.startswith("experiment"):
        from caad.experiment.config import load_experiment_config

        assert load_experiment_config(path, []).seeds
    elif path.name == "salad.yaml":  # caad salad's own file
        from caad.methods.salad import load_salad_config

        load_salad_config(path)
    else:
        load_config(path)
