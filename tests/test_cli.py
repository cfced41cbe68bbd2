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
    # the demo ends with the side-by-side: the same student trained with standard KD (alpha=0) too
    assert (out / "stage2_kd" / "final" / "config.json").is_file()
    side_by_side = printed[printed.index("Side by side:") :]
    for row in ("teacher, greedy", "teacher, contrastive", "student, standard KD (alpha=0)", "student, CAAD (alpha=2)"):
        assert f"| {row}" in side_by_side
    assert "| no context (neutral) | contradicting context (adversarial) |" in side_by_side


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


# ---- caad config show -----------------------------------------------------------------------------------


def test_config_show_lists_every_key_with_type_default_and_help(capsys):
    import dataclasses

    from caad.config import Stage2Config, describe_keys

    assert main(["config", "show", "stage2"]) == 0
    printed = capsys.readouterr().out
    rows = describe_keys(Stage2Config, "stage2")
    assert len(rows) == len(dataclasses.fields(Stage2Config)) > 40
    for key, type_name, _default, help_text in rows:
        assert f"  {key}  ({type_name})  default " in printed and help_text in printed
    assert "  stage2.lr  (a number)  default 0.0001\n      peak learning rate\n" in printed
    assert "  stage2.teacher  (a string or null)  default null\n" in printed
    assert "  stage2.adam_betas  (a list of numbers)  default [0.9, 0.999]\n" in printed
    assert "data.num_examples" not in printed  # only the section asked for


def test_config_show_includes_method_sections_and_all(capsys):
    import dataclasses

    from caad.config import TrainerConfig, describe_keys
    from caad.methods import method_sections

    cls = method_sections(["crossmodal"])["crossmodal"]
    assert main(["config", "show", "crossmodal"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("crossmodal: ")
    own = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(TrainerConfig)}
    assert own and all(f"  crossmodal.{name}  (" in printed for name in own)  # the method's own keys too
    for key, type_name, _default, help_text in describe_keys(cls, "crossmodal"):
        assert f"  {key}  ({type_name})" in printed and help_text in printed
    assert main(["config", "show"]) == 0
    everything = capsys.readouterr().out
    for key in ("output_dir", "data.splits", "models.tiny", "eval.audio_mode", "stage2.alpha", "crossmodal.lr"):
        assert f"  {key}  (" in everything, key


def test_config_show_unknown_section_lists_the_known_ones(capsys):
    assert main(["config", "show", "stage3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config section 'stage3'" in err
    for name in ("data", "models", "stage1", "warmup", "stage2", "eval", "crossmodal", "layerwise"):
        assert name in err.split("known sections:")[1]


def test_config_show_with_a_file_shows_the_resolved_values(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("stage2:\n  lr: 0.003\n  epochs: 2\n")
    assert main(["config", "show", "stage2", "--config", str(path), "stage2.epochs=5"]) == 0
    printed = capsys.readouterr().out
    assert "  stage2.lr  (a number)  default 0.0001  value 0.003  (changed)\n" in printed
    assert "  stage2.epochs  (an integer)  default 1  value 5  (changed)\n" in printed
    assert "  stage2.alpha  (a number)  default 2.0  value 2.0\n" in printed
    # the file is validated as caad train would: its errors are the same
    assert main(["config", "show", "stage2", "--config", str(path), "stage2.lr=abc"]) == 2
    assert "command line override stage2.lr=abc: stage2.lr must be a number, got 'abc'" in capsys.readouterr().err


# ---- where a bad value came from ------------------------------------------------------------------------


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("stage2:\n  alpha: 1.0\n")
    cases = [
        ("stage2.lr=abc", "command line override stage2.lr=abc: stage2.lr must be a number, got 'abc'"),
        (
            "stage2.alpah=1",
            "command line override stage2.alpah=1: unknown key 'stage2.alpah'; did you mean 'stage2.alpha'?",
        ),
        ("stage2.lr=-1", "command line override stage2.lr=-1: stage2.lr must be > 0, got -1.0"),
        ("stage2.zero_stage=7", "command line override stage2.zero_stage=7: stage2.zero_stage must be 0, 1, 2 or 3"),
    ]
    for override, message in cases:
        assert main(["stage2", "--config", str(path), override]) == 2
        err = capsys.readouterr().err
        assert message in err and "c.yaml" not in err, err
    # the same range error from the file names the file
    path.write_text("stage2:\n  lr: -1\n")
    assert main(["stage2", "--config", str(path)]) == 2
    assert f"{path}: stage2.lr must be > 0, got -1.0" in capsys.readouterr().err
    assert main(["stage2", "--config", str(path), "stage2.lr=1e-3", "stage2.alpha=-1"]) == 2
    assert "command line override stage2.alpha=-1: stage2.alpha must be >= 0" in capsys.readouterr().err


# ---- the command line's spellings -----------------------------------------------------------------------


def test_library_errors_are_printed_with_the_commands_flags(tiny_corpus, tmp_path, capsys):
    from caad.stage1 import generate_pseudo_gt

    out = tmp_path / "pgt.jsonl"
    assert main(["stage1", "--manifest", str(tiny_corpus.train), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    with pytest.raises(FileExistsError, match=r"pass overwrite=True to replace it, or resume=True"):
        generate_pseudo_gt(tiny_corpus.train, out, resume=False, progress=False)
    assert main(["stage1", "--manifest", str(tiny_corpus.train), "--out", str(out), "--no-resume"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it, or leave out --no-resume to continue it" in err, err
    assert "=True" not in err

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "mine.txt").write_text("mine")
    assert main(["data", "synth", "--out", str(corpus), "--num-examples", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace" in err and "=True" not in err, err


def test_cli_spelling_of_the_training_commands():
    from caad.cli import build_parser, cli_spelling

    parser = build_parser()
    stage2 = parser.parse_args(["stage2"]).cli_parser
    message = "resume=True: runs/x was trained with different lr; pass force_resume=True to continue"
    expected = "--resume: runs/x was trained with different lr; pass --force-resume to continue"
    assert cli_spelling(message, stage2) == expected
    train = parser.parse_args(["train", "--method", "caad"]).cli_parser
    assert cli_spelling(message, train).startswith("--resume: ")
    # a command without such a flag keeps the text as it is; config keys (=true) are never touched
    run = parser.parse_args(["run"]).cli_parser
    assert cli_spelling(message, run) == message
    assert cli_spelling("set stage2.overwrite=true", stage2) == "set stage2.overwrite=true"


def test_earlier_run_folder_errors_name_the_flag_or_the_key(prepared, tmp_path, capsys):
    from caad.cli import UserError
    from caad.train.outputs import check_output_dir

    earlier = tmp_path / "earlier"
    _earlier_run(earlier)
    with pytest.raises(UserError, match="set stage2.overwrite=true to replace it, resume=True to continue it"):
        check_output_dir(earlier, overwrite=False, resume=False, key="stage2.output_dir")
    config = write_config(tmp_path / "c.yaml", stage2_settings(prepared, earlier))
    assert main(["stage2", "--config", str(config)]) == 2
    assert "set stage2.overwrite=true to replace it, --resume to continue it" in capsys.readouterr().err
    # caad run cannot resume: it does not suggest it
    assert main(["run", f"output_dir={earlier}"]) == 2
    err = capsys.readouterr().err
    assert "set overwrite=true to replace it, or choose another folder" in err and "resume" not in err


def test_dependency_deprecation_warnings_stay_out_of_the_output(tiny_corpus, tmp_path):
    """A real `caad stage1` run in a fresh interpreter (no pytest warning capture) whose work triggers
    transformers' FutureWarning and torch.jit's DeprecationWarning: neither reaches stderr, caad's own
    warning does."""
    import os
    import subprocess
    import sys

    script = """
import sys, warnings
import caad.stage1

real = caad.stage1.generate_pseudo_gt

def noisy(*args, **kwargs):
    import torch
    import transformers
    transformers.PretrainedConfig().rope_scaling = None  # transformers: FutureWarning
    try:
        torch.jit.script_method(lambda self: None)  # torch.jit: DeprecationWarning (then no source: OSError)
    except OSError:
        pass
    warnings.warn("caad's own warning", UserWarning)
    return real(*args, **kwargs)

caad.stage1.generate_pseudo_gt = noisy
from caad.cli import main
sys.exit(main(sys.argv[1:]))
"""
    args = ["stage1", "--manifest", str(tiny_corpus.train), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    # -W default shows DeprecationWarnings everywhere: only the command's own filter can hide them
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", script, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "caad's own warning" in done.stderr
    assert "FutureWarning" not in done.stderr and "rope_scaling" not in done.stderr, done.stderr
    assert "DeprecationWarning" not in done.stderr, done.stderr
    # the same calls outside the command do warn (the test notices a trigger that stopped working)
    control = (
        "import torch, transformers\n"
        "transformers.PretrainedConfig().rope_scaling = None\n"
        "try:\n    torch.jit.script_method(lambda self: None)\nexcept OSError:\n    pass\n"
    )
    bare = subprocess.run([sys.executable, "-W", "default", "-c", control], capture_output=True, text=True, env=env)
    assert "FutureWarning" in bare.stderr and "DeprecationWarning" in bare.stderr, bare.stderr
