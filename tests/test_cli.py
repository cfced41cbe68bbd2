"""The ``caad stage2`` and ``caad run`` commands: clear errors, earlier outputs left untouched, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage2_fixtures import prepare, stage2_settings, write_config

from caad.cli import main
from caad.train.outputs import MARKER


@pytest.fixture(scope="module")
def prepared(tiny_corpus, tmp_path_factory):
    return prepare(tiny_corpus, tmp_path_factory.mktemp("cli") / "prepared")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier_run(folder: Path) -> dict[str, bytes]:
    """A folder that looks like an earlier caad run, with a file a user cares about."""
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"kind": "stage2"}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (folder / "final").mkdir()
    (folder / "final" / "weights.bin").write_bytes(b"precious")
    return _snapshot(folder)


def test_missing_config_file(tmp_path, capsys):
    assert main(["stage2", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_unknown_key_in_file_names_file_and_suggests(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("stage2:\n  kd_wieght: 0.5\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml" in err and "'stage2.kd_wieght'" in err and "did you mean 'stage2.kd_weight'" in err


def test_bad_override(capsys):
    assert main(["stage2", "stage2.zero_stage=7"]) == 2
    assert "stage2.zero_stage must be 0, 1, 2 or 3, got 7" in capsys.readouterr().err
    assert main(["stage2", "stage2.lr"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_missing_checkpoint_and_manifest(prepared, tmp_path, capsys):
    settings = stage2_settings(prepared, tmp_path / "out", teacher=str(tmp_path / "no_teacher"))
    assert main(["stage2", "--config", str(write_config(tmp_path / "c.yaml", settings))]) == 2
    assert "stage2.teacher: checkpoint folder not found" in capsys.readouterr().err
    settings = stage2_settings(prepared, tmp_path / "out", train_manifest=str(tmp_path / "none.jsonl"))
    assert main(["stage2", "--config", str(write_config(tmp_path / "c.yaml", settings))]) == 2
    assert "stage2.train_manifest: file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_earlier_outputs_are_left_untouched(prepared, tmp_path, capsys):
    earlier = tmp_path / "earlier"
    before = _earlier_run(earlier)
    config = write_config(tmp_path / "c.yaml", stage2_settings(prepared, earlier))
    # a valid config aimed at an earlier run's folder: refused without overwrite
    assert main(["stage2", "--config", str(config)]) == 2
    assert "already holds an earlier run; set stage2.overwrite=true" in capsys.readouterr().err
    # a bad value with overwrite=true: the config error comes first, nothing is removed
    assert main(["stage2", "--config", str(config), "stage2.overwrite=true", "stage2.lr=-1"]) == 2
    assert "stage2.lr must be > 0" in capsys.readouterr().err
    # a missing checkpoint with overwrite=true: same
    assert main(["stage2", "--config", str(config), "stage2.overwrite=true", "stage2.student=/no/such"]) == 2
    assert "stage2.student: checkpoint folder not found" in capsys.readouterr().err
    assert _snapshot(earlier) == before

    # overwrite=true never deletes a folder caad did not write
    foreign = tmp_path / "my_files"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["run", "--config", str(config), f"output_dir={foreign}", "overwrite=true"]) == 2
    assert "was not written by caad" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    # caad run refuses an earlier run folder too, before doing anything
    assert main(["run", f"output_dir={earlier}"]) == 2
    assert "already holds an earlier run; set overwrite=true" in capsys.readouterr().err
    assert _snapshot(earlier) == before


def test_stage2_command_trains_and_reports(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", stage2_settings(prepared, out, max_steps=2))
    assert main(["stage2", "--config", str(config), "stage2.alpha=0"]) == 0
    import torch.distributed as dist

    assert not dist.is_initialized()  # the command destroyed the process group it started
    printed = capsys.readouterr().out
    assert "stage 2: 2 steps" in printed and str(out / "final") in printed
    assert (out / "final" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
    assert (out / "loss_curve.png").is_file()
    # --resume on a finished run: nothing left to do, outputs kept
    assert main(["stage2", "--config", str(config), "stage2.alpha=0", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # a second run into the same folder needs overwrite
    assert main(["stage2", "--config", str(config)]) == 2
    assert main(["stage2", "--config", str(config), "stage2.overwrite=true"]) == 0


@pytest.mark.slow
def test_run_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    small = [
        f"output_dir={out}",
        "data.num_examples=12",
        "models.tokenizer_vocab_size=300",
        "warmup.max_steps=2",
        "warmup.batch_size=4",
        "stage2.max_steps=2",
        "stage2.batch_size=4",
        "stage2.zero_stage=2",
        "stage2.progress=false",
        "warmup.progress=false",
        "eval.max_new_tokens=3",
    ]
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert main(["run", "--config", str(demo), *small]) == 0
    printed = capsys.readouterr().out
    for path in ("stage2/final", "stage2/metrics.jsonl", "stage2/loss_curve.png"):
        assert str(out / path) in printed
        assert (out / path).exists()
    assert (out / "warmup" / "final" / "config.json").is_file()
    assert (out / "stage1" / "train.jsonl").is_file()
    assert "| teacher |" in printed and "| student |" in printed  # the evaluation table
    assert (out / "eval" / "results.md").is_file()


def test_train_command_runs_any_registered_method(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", stage2_settings(prepared, out, max_steps=1))
    assert main(["train", "--method", "caad", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "caad [stage2]: 1 steps" in printed and str(out / "final") in printed
    # another section of the same method: the CE-only warm-up settings
    warm = tmp_path / "warm"
    sections = {"warmup": stage2_settings(prepared, warm, max_steps=1, kd_weight=0.0, teacher=None)}
    config = write_config(tmp_path / "w.yaml", stage2_settings(prepared, out), **sections)
    assert main(["distill", "--method", "caad", "--section", "warmup", "--config", str(config)]) == 0
    assert "caad [warmup]: 1 steps" in capsys.readouterr().out
    assert main(["train", "--method", "caad", "--section", "data", "--config", str(config)]) == 2
    assert "no training section 'data'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_overwrite_checks_every_input_before_replacing(prepared, tmp_path, capsys):
    import shutil

    from caad.data import read_manifest, write_manifest

    earlier = tmp_path / "earlier"
    before = _earlier_run(earlier)
    # a manifest with a row Stage 1 never filled: found before the earlier run is touched
    rows = read_manifest(prepared.train)
    rows[3].pseudo_gt = None
    bad_manifest = tmp_path / "bad.jsonl"
    write_manifest(bad_manifest, rows)
    settings = stage2_settings(prepared, earlier, train_manifest=str(bad_manifest), overwrite=True)
    assert main(["stage2", "--config", str(write_config(tmp_path / "c.yaml", settings))]) == 2
    assert "has no pseudo_gt" in capsys.readouterr().err
    assert _snapshot(earlier) == before
    # a student checkpoint whose weights cannot be read: the same
    broken = tmp_path / "broken_student"
    shutil.copytree(prepared.student, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    settings = stage2_settings(prepared, earlier, student=str(broken), overwrite=True)
    assert main(["stage2", "--config", str(write_config(tmp_path / "c.yaml", settings))]) == 2
    assert f"stage2.student: could not load the checkpoint {broken}" in capsys.readouterr().err
    assert _snapshot(earlier) == before
    # valid inputs: now the earlier run is replaced
    settings = stage2_settings(prepared, earlier, max_steps=1, overwrite=True)
    assert main(["stage2", "--config", str(write_config(tmp_path / "c.yaml", settings))]) == 0
    assert not (earlier / "final" / "weights.bin").exists() and (earlier / "final" / "config.json").is_file()


def test_run_never_warms_up_a_real_teacher_unless_asked(prepared, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        f"output_dir={out}",
        f"data.corpus_dir={tiny_corpus.root}",
        "models.tiny=false",
        f"models.teacher={prepared.teacher}",
        f"models.student={prepared.student}",
        "stage2.max_steps=1",
        "stage2.progress=false",
        "eval.enabled=false",
    ]
    assert main(["run", *args]) == 0
    printed = capsys.readouterr().out
    assert "teacher warm-up: skipped" in printed
    assert not (out / "warmup").exists()
    assert f"teacher:  {prepared.teacher}" in printed  # distilled from the checkpoint as it is
    assert (out / "stage1" / "validation.jsonl").is_file()
    assert any("val_loss" in r for r in _records(out / "stage2" / "metrics.jsonl"))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_passes_model_and_data_settings_to_every_training_section():
    from caad.config import load_config
    from caad.pipeline import _inherit

    overrides = ["models.chat_template=false", "models.allow_pickle=true", "data.min_seconds=0.5", "data.check=false"]
    config = load_config(None, [*overrides, "warmup.min_seconds=0.2"])
    stage2 = _inherit(config.stage2, config)
    assert (stage2.chat_template, stage2.allow_pickle) == (False, True)
    assert (stage2.min_seconds, stage2.data_check) == (0.5, False)
    assert _inherit(config.warmup, config).min_seconds == 0.2  # a section's own setting wins
