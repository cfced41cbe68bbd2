"""The ``caad stage2`` and ``caad run`` commands: clear errors, earlier outputs left untouched, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage2_fixtures import prepare, stage2_settings, write_config

from caad.cli import main
from caad.stage2.outputs import MARKER


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
