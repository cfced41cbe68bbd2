"""caad.config: YAML + key=value overrides, validated into dataclasses with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from caad.cli import UserError
from caad.config import (
    CaadConfig,
    ConfigError,
    TrainConfig,
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
    assert s2.negative_mode == "zero" and s2.optimizer == "adamw"
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
        (["stage2.negative_mode=silence"], "stage2.negative_mode must be one of 'zero', 'remove', 'noise'"),
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
    config = TrainConfig(train_manifest=str(tmp_path / "nope.jsonl"), student="x", output_dir="o")
    with pytest.raises(ConfigError, match="stage2.train_manifest: file not found"):
        config.check_paths("stage2")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    (tmp_path / "empty_ckpt").mkdir()
    config = TrainConfig(train_manifest=str(manifest), student=str(tmp_path / "empty_ckpt"), output_dir="o")
    with pytest.raises(ConfigError, match="stage2.student: .* is not a model checkpoint \\(no config.json"):
        config.check_paths("stage2")
    (tmp_path / "empty_ckpt" / "config.json").write_text("{}")
    config = TrainConfig(
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
