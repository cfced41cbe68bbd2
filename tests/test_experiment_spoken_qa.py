"""``caad experiment`` with ``suite: spoken_qa`` (the text-teacher ablations): the config, its arm dependencies and
errors, the report, and the miniature experiment end to end through the ``caad`` command (set-up only, then the
arms with --resume), its resume and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caad.cli import UserError
from caad.config import ConfigError
from caad.experiment.config import experiment_config_from_dict, load_experiment_config
from caad.experiment.spoken_qa import SHARED_UNITS, plan_spoken_qa_units
from caad.experiment.spoken_qa_config import SpokenQAExperimentConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINI = CONFIGS / "experiment_crossmodal_mini.yaml"
FULL = CONFIGS / "experiment_crossmodal.yaml"


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _arms(**extra: dict) -> dict:
    arms = {
        "ce_only": {"kind": "student", "method": "crossmodal", "train": {"t2t": False, "kd_weight": 0.0}},
        "sourcewise": {"kind": "student", "method": "sourcewise", "acoustic_teacher": {"arm": "ce_only"}},
    }
    return {"suite": "spoken_qa", "arms": {**arms, **extra}}


# ---- the config (fast) ----------------------------------------------------------------------------------


def test_full_config_plans_the_table_with_each_arm_after_its_acoustic_teacher(tmp_path):
    config = load_experiment_config(FULL, [f"output_dir={tmp_path}"])
    assert isinstance(config, SpokenQAExperimentConfig) and config.seeds == [0, 1, 2]
    students = [arm.name for arm in config.arms if arm.is_student]
    assert students == ["ce_only", "crossmodal", "crossmodal_s2t", "crossmodal_t2t", "sourcewise", "layerwise"]
    units = [name for name, _ in plan_spoken_qa_units(config)]
    assert units[:4] == list(SHARED_UNITS)
    assert units[4:6] == ["arms/text_teacher/test", "arms/pre_distillation/test"]  # references: once, not per seed
    for seed in (0, 1, 2):
        assert units.index(f"arms/ce_only/seed-{seed}/train") < units.index(f"arms/sourcewise/seed-{seed}/train")
    assert len(units) == 4 + 2 + 3 * 6 * 2
    assert [name for name, _ in plan_spoken_qa_units(config, setup_only=True)] == list(SHARED_UNITS)


def test_an_arm_written_before_its_teacher_runs_after_it():
    data = _arms()
    data["arms"] = {"sourcewise": data["arms"]["sourcewise"], "ce_only": data["arms"]["ce_only"]}
    config = experiment_config_from_dict(data)
    assert [arm.name for arm in config.ordered_arms()] == ["ce_only", "sourcewise"]
    assert [arm.name for arm in config.arms] == ["sourcewise", "ce_only"]  # the report keeps the config order


def test_fingerprints_follow_inputs_through_the_arm_dependency(tmp_path):
    def plan(*overrides: str) -> dict:
        return dict(plan_spoken_qa_units(load_experiment_config(MINI, [f"output_dir={tmp_path}", *overrides])))

    base = plan()
    teacher_changed = plan("arms.ce_only.train.lr=0.01")
    assert teacher_changed["arms/ce_only/seed-0/train"] != base["arms/ce_only/seed-0/train"]
    assert teacher_changed["arms/sourcewise/seed-0/train"] != base["arms/sourcewise/seed-0/train"]  # via its teacher
    assert teacher_changed["arms/crossmodal/seed-0/train"] == base["arms/crossmodal/seed-0/train"]
    text_changed = plan("models.teacher_steps=5")
    assert text_changed["shared/student"] == base["shared/student"]
    assert text_changed["arms/text_teacher/test"] != base["arms/text_teacher/test"]
    assert text_changed["arms/crossmodal/seed-0/train"] != base["arms/crossmodal/seed-0/train"]
    quiet = plan("data.workers=2", "student.log_every=1", "eval.num_bootstrap=10")  # how it runs, not what
    assert quiet == base


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"suite": "speech"}, r"suite must be one of caad, spoken_qa"),
        ({"bogus": 1}, r"unknown key\(s\) bogus"),
        ({"data": {"num_exmaples": 5}}, r"data\.num_exmaples"),
        ({"models": {"speech_align_steps": 2, "speech_align": {"steps": 3}}},
         r"models\.speech_align\.steps: not an option of align_speech_student"),
        ({"models": {"speech_align_steps": 2, "speech_align": {"lr": "fast"}}}, r"models\.speech_align\.lr must be"),
        ({"arms": {"a": {"kind": "student", "method": "caad"}}}, r"arms\.a\.method must be one of crossmodal"),
        ({"arms": {"a": {"kind": "oracle"}}}, r"arms\.a\.kind must be one of student, text_teacher"),
        ({"arms": {"a": {"kind": "student", "method": "sourcewise", "acoustic_teacher": {"arm": "ce"}}}},
         r"arms\.a\.acoustic_teacher\.arm: no arm 'ce'"),
        ({"arms": {"a": {"kind": "student", "method": "sourcewise"}}}, r"arms\.a\.acoustic_teacher is required"),
        ({"arms": {"a": {"kind": "student", "method": "crossmodal", "acoustic_teacher": {"arm": "b"}}}},
         r"arms\.a\.acoustic_teacher: only for method sourcewise"),
        ({"arms": {"a": {"kind": "student", "method": "sourcewise", "acoustic_teacher": {"arm": "b"}},
                   "b": {"kind": "student", "method": "sourcewise", "acoustic_teacher": {"arm": "a"}}}},
         r"arms\.a\.acoustic_teacher: a cycle \(a -> b -> a\)"),
        ({"arms": {"a": {"kind": "student", "method": "sourcewise", "acoustic_teacher": {"arm": "t"}},
                   "t": {"kind": "text_teacher"}}}, r"'t' is not a student arm"),
        ({"arms": {"a": {"kind": "student", "method": "crossmodal", "sweep": {"lr": [1]}}}}, r"arms\.a\.sweep"),
        ({"arms": {"a": {"kind": "student", "method": "crossmodal", "train": {"t2tt": True}}}},
         r"arms\.a\.train\.t2tt: not a key of method crossmodal's config \(arm a\); did you mean 't2t'"),
        ({"student": {"t2t": False}}, r"student\.t2t: not a key of method sourcewise's config \(arm sourcewise\)"),
        ({"arms": {"a": {"kind": "student", "method": "crossmodal", "train": {"teacher": "x"}}}},
         r"arms\.a\.train\.teacher is filled by the experiment"),
        ({"arms": {"a": {"kind": "student", "method": "crossmodal", "train": {"t2t": False, "s2t": False}}}},
         r"crossmodal\.t2t and s2t are both false"),
        ({"arms": {"a": {"kind": "text_teacher", "method": "crossmodal"}}}, r"arms\.a\.method: only for kind"),
        ({"arms": {"a": {"kind": "text_teacher"}, "b": {"kind": "text_teacher"}}}, "more than one arm of kind"),
        ({"student": {"max_steps": 0}}, r"max_steps must be >= 1"),
        ({"data": {"splits": [1.0, 0.0, 0.0]}}, r"data\.splits"),
        ({"models": {"text_knowledge": "test"}}, r"models\.text_knowledge must be one of \['train', 'all'\]"),
        ({"models": {"student_sizes": {"audio_width": 64}}}, r"models\.student_sizes\.audio_width: not a size"),
        ({"models": {"student_sizes": {"audio": 0}}}, r"models\.student_sizes\.audio must be an int >= 1"),
        ({"models": {"student_sizes": {"audio": 100, "audio_heads": 3}}},
         r"models\.student_sizes: audio \(100\) must be a multiple of audio_heads \(3\)"),
        ({"models": {"student_spoken_format": 1.5}}, r"models\.student_spoken_format must be in \[0, 1\]"),
        ({"models": {"student_spoken_format": 0.5, "student_text_steps": 0}},
         r"models\.student_spoken_format needs models\.student_text_steps > 0"),
    ],
)
def test_config_errors_name_the_key(patch, match):
    data = {**_arms(), **patch}
    with pytest.raises(ConfigError, match=match):
        experiment_config_from_dict(data, "x.yaml: ")


def test_setup_only_is_refused_for_the_caad_suite(tmp_path):
    from caad.experiment.harness import run_experiment

    config = load_experiment_config(CONFIGS / "experiment_mini.yaml", [f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(UserError, match="--setup-only is for suite spoken_qa"):
        run_experiment(config, setup_only=True, progress=False, log=lambda message: None)
    assert not (tmp_path / "x").exists()


# ---- the report on hand-made records (fast) ------------------------------------------------------------


def test_report_table_and_plot_from_records(tmp_path):
    from caad.experiment.spoken_qa_report import markdown, plot, summarize_arms

    config = experiment_config_from_dict(
        {**_arms(pre={"kind": "pre_distillation"}, teacher={"kind": "text_teacher"}), "seeds": [0, 1],
         "eval": {"num_bootstrap": 0}}
    )

    def write(unit: str, text: list[bool], speech: list[bool] | None = None) -> None:
        folder = tmp_path / "arms" / unit
        folder.mkdir(parents=True)
        task = ("addition", "facts")  # q0, q2: addition; q1, q3: facts
        records = [{"group": f"q{i}", "task": task[i % 2], "modality": "text", "correct": c}
                   for i, c in enumerate(text)]
        records += [{"group": f"q{i}", "task": task[i % 2], "modality": "speech", "correct": c}
                    for i, c in enumerate(speech or [])]
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "done.json").write_text("{}")

    write("pre/test", [True, True, True, True], [False] * 4)
    write("teacher/test", [True, True, True, False])
    write("ce_only/seed-0/test", [True, False, False, False], [True, True, False, False])
    write("ce_only/seed-1/test", [True, True, False, False], [True, False, False, False])
    write("sourcewise/seed-0/test", [False] * 4, [False] * 4)
    with pytest.raises(RuntimeError, match="not finished"):
        summarize_arms(config, tmp_path)
    write("sourcewise/seed-1/test", [True] * 4, [True] * 4)
    rows = summarize_arms(config, tmp_path, {"arms/ce_only/seed-1/train": 2.5})
    assert list(rows) == ["ce_only", "sourcewise", "pre", "teacher"]  # config order
    ce = rows["ce_only"]["measures"]
    assert ce["text_accuracy"]["value"] == pytest.approx((0.25 + 0.5) / 2)
    assert ce["speech_accuracy"]["value"] == pytest.approx((0.5 + 0.25) / 2)
    assert ce["forgetting"]["value"] == pytest.approx(1.0 - 0.375)
    assert ce["teacher_gap"]["value"] == pytest.approx(0.75 - 0.375)
    assert rows["ce_only"]["per_seed"] == {0: {"text_accuracy": 0.25, "speech_accuracy": 0.5},
                                           1: {"text_accuracy": 0.5, "speech_accuracy": 0.25}}
    assert rows["ce_only"]["train_seconds"] == [0.0, 2.5]
    # speech [T, T, F, F] and [T, F, F, F]: addition (q0, q2) 2 of 4 right, facts (q1, q3) 1 of 4
    assert rows["ce_only"]["speech_by_task"] == {"addition": 0.5, "facts": 0.25}
    assert rows["teacher"]["speech_by_task"] == {}  # a text-only reference
    assert rows["pre"]["measures"]["forgetting"]["value"] is None  # references have no references
    results = {
        "experiment": {"command": "caad experiment --config x.yaml", "seeds": [0, 1], "unit_seconds_total": 60.0,
                       "unit_cpu_seconds_total": 30.0, "student": {"max_steps": 2, "lr": 0.1, "output": "x"},
                       "machine": {"commit": "abc123+dirty", "cpu": "Some CPU", "cores": 2, "torch": "2",
                                   "torch_threads": 1}},
        "test": {"utterances": 8, "items": 4, "chance_accuracy": 0.25,
                 "chance_by_task": {"addition": 0.05, "facts": 0.125}},
        "rows": rows,
    }
    text = markdown(results)
    assert "Command: `caad experiment --config x.yaml`" in text and "`abc123+dirty`" in text
    assert "chance (uniform guess among each question's choices): 25.0%" in text
    assert "every student arm: max_steps 2, lr 0.1, then" in text  # the training keys only
    main_table, by_task = text.split("Speech accuracy by task")
    table = [line for line in main_table.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == ["ce_only", "sourcewise", "pre", "teacher"]
    assert table[0].split(" | ")[2:5] == ["37.5", "37.5", "+0.0"]  # no bootstrap: point values only
    assert "`ce_only` s0: 25/50, s1: 50/25" in text
    assert "| arm | addition (chance 5) | facts (chance 12) |" in text
    assert "| `ce_only` | 50 | 25 |" in by_task and "`pre` | 0 | 0 |" in by_task and "`teacher`" not in by_task
    plot(results, tmp_path / "plots" / "gap.png")
    assert (tmp_path / "plots" / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the miniature experiment through the caad command (slow: ~20 s on 2 cores) ------------------------------


def _caad(*argv: str) -> int:
    from caad.cli import main

    return main(["experiment", "--config", str(MINI), "--no-progress", *argv])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("spoken_qa") / "mini"
    assert _caad("--setup-only", f"output_dir={out}") == 0
    shared = {name: json.loads((out / name / "done.json").read_text()) for name in SHARED_UNITS}
    assert not (out / "arms").exists() and not (out / "results.json").exists()
    assert _caad("--resume", f"output_dir={out}") == 0
    return out, shared


@pytest.mark.slow
def test_setup_only_builds_what_the_method_configs_read_and_the_arms_reuse_it(finished):
    out, shared = finished
    for name in SHARED_UNITS:  # finished once, by the set-up; the full run skipped them
        assert json.loads((out / name / "done.json").read_text()) == shared[name]
    assert (out / "shared/set/train.jsonl").is_file() and (out / "shared/set/validation.jsonl").is_file()
    for model in ("text_teacher", "student"):
        assert (out / "shared" / model / "config.json").is_file()
    runs = json.loads((out / "experiment.json").read_text())["runs"]
    assert [(run["action"], run["setup_only"]) for run in runs] == [("create", True), ("resume", False)]
    assert runs[1]["command"] == f"caad experiment --config {MINI} --resume --no-progress output_dir={out}"


@pytest.mark.slow
def test_mini_experiment_reports_the_table_from_its_records(finished):
    out, _ = finished
    from caad.data.manifest import read_manifest

    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["text_teacher", "pre_distillation", "ce_only", "sourcewise", "crossmodal"]
    test_rows = read_manifest(out / "shared/set/test.jsonl")
    groups = {row.group for row in test_rows}
    assert results["test"]["utterances"] == len(test_rows) and results["test"]["items"] == len(groups)
    for arm in ("ce_only", "sourcewise", "crossmodal"):
        lines = (out / f"arms/{arm}/seed-0/test/records.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        speech = [r for r in records if r["modality"] == "speech"]
        text = [r for r in records if r["modality"] == "text"]
        assert len(speech) == len(test_rows) and sorted(r["group"] for r in text) == sorted(groups)
        # one text record per item: the text accuracy is the plain fraction right
        expected = sum(r["correct"] for r in text) / len(text)
        assert results["rows"][arm]["measures"]["text_accuracy"]["value"] == pytest.approx(expected)
        assert (out / f"arms/{arm}/seed-0/train/run/final/config.json").is_file()
        assert not (out / f"arms/{arm}/seed-0/train/run/checkpoints").exists()
    teacher_records = (out / "arms/text_teacher/test/records.jsonl").read_text().splitlines()
    assert {json.loads(line)["modality"] for line in teacher_records} == {"text"}
    # the sourcewise arm learned from the ce_only arm's student of the same seed
    run_config = (out / "arms/sourcewise/seed-0/train/run/config.yaml").read_text()
    assert f"acoustic_teacher: {out}/arms/ce_only/seed-0/train/run/final" in run_config
    markdown = (out / "results.md").read_text()
    for arm in results["rows"]:
        assert f"| `{arm}` |" in markdown
    assert f"Command: `caad experiment --config {MINI} --resume --no-progress output_dir={out}`" in markdown
    assert results["experiment"]["machine"]["cores"] >= 1 and "commit" in results["experiment"]["machine"]
    assert (out / "plots/modality_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_mini_experiment_refuses_to_overwrite_and_resumes_only_unfinished_units(finished, capsys):
    from caad.experiment.harness import run_experiment

    out, _ = finished
    before = _snapshot(out)
    assert _caad(f"output_dir={out}") == 2
    assert "--resume" in capsys.readouterr().err
    assert _caad("--resume", f"output_dir={out}", "arms.ce_only.train.lr=0.01") == 2
    error = capsys.readouterr().err
    assert "arms/ce_only/seed-0/train was finished with other settings" in error and "--overwrite" in error
    assert _snapshot(out) == before  # both refusals happened before anything was written
    caad_suite = load_experiment_config(CONFIGS / "experiment_mini.yaml", [f"output_dir={out}"])
    with pytest.raises(UserError, match="holds a suite spoken_qa experiment and this config is suite caad"):
        run_experiment(caad_suite, resume=True, progress=False, log=lambda message: None)
    assert _snapshot(out) == before

    unfinished = "arms/crossmodal/seed-0/test"
    (out / unfinished / "done.json").unlink()
    kept = (out / "arms/crossmodal/seed-0/train/done.json").read_text()
    config = load_experiment_config(MINI, [f"output_dir={out}"])
    result = run_experiment(config, resume=True, progress=False, log=lambda message: None)
    assert result.ran == [unfinished]
    assert len(result.skipped) == len(plan_spoken_qa_units(config)) - 1
    assert (out / "arms/crossmodal/seed-0/train/done.json").read_text() == kept
    assert (out / unfinished / "done.json").is_file() and (out / "results.json").is_file()


@pytest.mark.slow
def test_setup_only_aligns_the_student_to_speech_when_asked(tmp_path):
    pytest.importorskip("caad.models.speech_align")
    out = tmp_path / "aligned"
    options = "models.speech_align={batch_size: 3, eval_clips: 2}"
    assert _caad("--setup-only", f"output_dir={out}", "models.speech_align_steps=2", options) == 0
    info = json.loads((out / "shared/student/done.json").read_text())
    assert isinstance(info["speech_align"], dict) and info["speech_align"]  # the function's metrics, kept
    unaligned = dict(plan_spoken_qa_units(load_experiment_config(MINI, [f"output_dir={out}"]), setup_only=True))
    aligned = dict(plan_spoken_qa_units(load_experiment_config(
        MINI, [f"output_dir={out}", "models.speech_align_steps=2", options]), setup_only=True))
    assert aligned["shared/student"] != unaligned["shared/student"]
    assert aligned["shared/text_teacher"] == unaligned["shared/text_teacher"]


@pytest.mark.slow
def test_setup_only_teaches_both_lms_every_question_and_the_spoken_format_when_asked(tmp_path):
    from caad.data.spoken_qa_items import all_items

    out = tmp_path / "knowledge"
    extra = ["models.text_knowledge=all", "models.student_spoken_format=0.5"]
    assert _caad("--setup-only", f"output_dir={out}", *extra) == 0
    for model in ("text_teacher", "student"):  # every question of the universe, the test split's included
        assert json.loads((out / "shared" / model / "done.json").read_text())["text_items"] == len(all_items())
    base = dict(plan_spoken_qa_units(load_experiment_config(MINI, [f"output_dir={out}"]), setup_only=True))
    knowledge = dict(plan_spoken_qa_units(load_experiment_config(
        MINI, [f"output_dir={out}", extra[0]]), setup_only=True))
    spoken = dict(plan_spoken_qa_units(load_experiment_config(MINI, [f"output_dir={out}", *extra]), setup_only=True))
    assert knowledge["shared/text_teacher"] == spoken["shared/text_teacher"] != base["shared/text_teacher"]
    assert len({str(base["shared/student"]), str(knowledge["shared/student"]), str(spoken["shared/student"])}) == 3
    assert base["shared/set"] == knowledge["shared/set"] == spoken["shared/set"]
