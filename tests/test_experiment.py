"""``caad experiment``: the config, the miniature experiment end to end, its resume and its refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from caad.cli import UserError
from caad.config import ConfigError
from caad.experiment.config import experiment_config_from_dict, load_experiment_config, read_section
from caad.experiment.harness import plan_units
from caad.experiment.store import check_experiment_dir

MINI = Path(__file__).resolve().parents[1] / "configs" / "experiment_mini.yaml"
# smaller still than the committed mini config: CI checks the machinery, not the result
TINY = [
    "data.num_examples=24",
    "warmup.batch_size=4",
    "student.batch_size=4",
    "eval.validation_items=3",
    "eval.max_new_tokens=3",
]


@dataclasses.dataclass
class _Inner:
    width: int = 4


@dataclasses.dataclass
class _Section:
    rate: float = 0.5
    steps: int = 3
    limit: int | None = 10
    optional: int | None = None
    flag: bool = False
    name: str = "x"
    splits: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.5])
    options: dict = dataclasses.field(default_factory=dict)
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_read_section_types_follow_the_defaults():
    assert read_section(_Section, None, "s", "") == _Section()
    got = read_section(_Section, {"rate": 2, "limit": None, "optional": 7, "flag": True, "splits": [1, 0],
                                  "options": {"a": 1}, "inner": {"width": 8}}, "s", "")
    assert got == _Section(rate=2.0, limit=None, optional=7, flag=True, splits=[1.0, 0.0], options={"a": 1},
                           inner=_Inner(8))
    assert isinstance(got.rate, float) and all(isinstance(v, float) for v in got.splits)
    for data, message in [
        ({"steps": 1.5}, r"f\.yaml: s\.steps must be int, got 1\.5"),
        ({"steps": True}, r"s\.steps must be int, got True"),
        ({"steps": None}, r"s\.steps must be int, got None"),  # its annotation does not admit None
        ({"optional": "3"}, r"s\.optional must be int or null"),
        ({"rate": False}, r"s\.rate must be float"),
        ({"flag": 1}, r"s\.flag must be bool"),
        ({"splits": [0.5, "a"]}, r"s\.splits must be list"),
        ({"inner": {"width": "8"}}, r"s\.inner\.width must be int"),
        ({"inner": {"depth": 1}}, r"unknown key\(s\) s\.inner\.depth; known: width"),
        ({"rat": 1.0}, r"unknown key\(s\) s\.rat; known: flag, inner, limit"),
        ([1], r"s must be a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message):
            read_section(_Section, data, "s", "f.yaml: ")


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# ---- the config (fast) ----------------------------------------------------------------------------------


def test_config_expands_sweeps_into_variants_and_plans_validation_only_for_sweeps(tmp_path):
    config = load_experiment_config(MINI, [f"output_dir={tmp_path / 'x'}", "seeds=[3, 4]"])
    keys = [v.key for v in config.variants()]
    assert keys == ["teacher_contrastive__alpha-1", "teacher_contrastive__alpha-2", "caad_adaptive"]
    units = [name for name, _ in plan_units(config)]
    assert units[:3] == ["shared/corpus", "shared/stage1", "shared/tokenizer"]
    for seed in (3, 4):
        assert f"seed-{seed}/teacher" in units and f"arms/caad_adaptive/seed-{seed}/train" in units
        assert f"arms/teacher_contrastive__alpha-2/seed-{seed}/validation" in units
        assert f"arms/caad_adaptive/seed-{seed}/validation" not in units  # one variant: nothing to choose


def test_unit_fingerprints_follow_their_inputs(tmp_path):
    base = dict(plan_units(load_experiment_config(MINI, [f"output_dir={tmp_path}"])))
    changed = dict(plan_units(load_experiment_config(MINI, [f"output_dir={tmp_path}", "student.lr=0.01"])))
    assert base["seed-0/teacher"] == changed["seed-0/teacher"]  # the teacher does not depend on the students
    assert base["arms/caad_adaptive/seed-0/train"] != changed["arms/caad_adaptive/seed-0/train"]
    unit = "arms/teacher_contrastive__alpha-1/seed-0/test"
    assert base[unit] == changed[unit]


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"bogus": 1}, "unknown key"),
        ({"arms": {}}, "arms must be a non-empty mapping"),
        ({"arms": {"a": {"kind": "oracle"}}}, "kind must be one of"),
        ({"arms": {"a": {"kind": "teacher_contrastive"}}}, "needs decoding.alpha"),
        ({"arms": {"a": {"kind": "student", "train": {"alpha": -1}}}}, "alpha"),
        ({"arms": {"a": {"kind": "student", "alpha": {"alpha_schedule": "linear"}}}}, "alpha_schedule"),
        ({"arms": {"a": {"kind": "student", "train": {"lr": "fast"}}}}, "lr"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"eval": {"select_by": "loss"}}, "select_by"),
    ],
)
def test_config_errors_name_the_key(patch, match):
    data = {"arms": {"teacher_greedy": {"kind": "teacher"}}, **patch}
    with pytest.raises(ConfigError, match=match):
        experiment_config_from_dict(data, "x.yaml: ")


def test_a_folder_that_is_not_an_experiment_is_never_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for flags in ({"resume": False, "overwrite": False}, {"resume": False, "overwrite": True}, {"resume": True,
                                                                                               "overwrite": False}):
        with pytest.raises(UserError, match="not a caad experiment"):
            check_experiment_dir(tmp_path, **flags)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- the miniature experiment end to end (slow: about a minute on 2 cores) --------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from caad.experiment.harness import run_experiment

    out = tmp_path_factory.mktemp("experiment") / "mini"
    config = load_experiment_config(MINI, [f"output_dir={out}", *TINY])
    result = run_experiment(config, progress=False, log=lambda message: None)
    return config, out, result


@pytest.mark.slow
def test_mini_experiment_writes_results_tables_and_plots(finished):
    config, out, result = finished
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"teacher_contrastive", "caad_adaptive"}
    sweep = results["arms"]["teacher_contrastive"]
    assert sweep["selected"] in sweep["variants"] and sweep["select_by"] == "validation accuracy_all"
    assert set(sweep["validation_scores"]) == set(sweep["variants"])
    for key, variant in results["variants"].items():
        records = (out / "arms" / key / "seed-0" / "test" / "records.jsonl").read_text().splitlines()
        assert len(records) == 6 * 4  # 6 test items under the four text conditions
        assert variant["test"]["num_items"] == 6 and variant["test"]["num_seeds"] == 1
        assert {"value", "low", "high", "n"} <= set(variant["test"]["accuracy"])
    assert results["variants"]["caad_adaptive"]["validation"] is None
    markdown = (out / "results.md").read_text()
    assert "teacher, contrastive decoding" in markdown and "(chosen on validation)" in markdown
    for plot in ("alpha_sweep.png", "per_task.png", "per_condition.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result.ran) == len(plan_units(config)) and not result.skipped
    # the student's alpha: warm-up schedule 0 -> 2 over 2 steps, adaptive with that mean
    metrics = [json.loads(line) for line in
               (out / "arms/caad_adaptive/seed-0/train/train/metrics.jsonl").read_text().splitlines()]
    alphas = [m["alpha"] for m in metrics if "alpha" in m]
    assert alphas[0] == pytest.approx(0.0) and alphas[1] == pytest.approx(1.0, rel=1e-4)
    assert alphas[-1] == pytest.approx(2.0, rel=0.3)  # clipping at alpha_max may lower the mean


@pytest.mark.slow
def test_mini_experiment_refuses_to_overwrite_and_resumes_only_unfinished_units(finished):
    from caad.experiment.harness import run_experiment

    config, out, _ = finished
    before = _snapshot(out)
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        run_experiment(config, progress=False, log=lambda message: None)
    changed = load_experiment_config(MINI, [f"output_dir={out}", *TINY[:-1], "eval.max_new_tokens=4"])
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        run_experiment(changed, resume=True, progress=False, log=lambda message: None)
    assert _snapshot(out) == before  # both refusals happened before anything was written

    # an interrupted evaluation: its folder without done.json
    unfinished = "arms/caad_adaptive/seed-0/test"
    (out / unfinished / "done.json").unlink()
    kept = (out / "arms/caad_adaptive/seed-0/train/done.json").read_text()
    result = run_experiment(config, resume=True, progress=False, log=lambda message: None)
    assert result.ran == [unfinished]
    assert len(result.skipped) == len(plan_units(config)) - 1
    assert (out / "arms/caad_adaptive/seed-0/train/done.json").read_text() == kept
    assert (out / unfinished / "done.json").is_file() and (out / "results.json").is_file()
    runs = json.loads((out / "experiment.json").read_text())["runs"]
    assert [run["action"] for run in runs] == ["create", "resume"]


def test_side_by_side_table_reports_neutral_adversarial_and_text_influence():
    from caad.eval import summarize
    from caad.experiment.side_by_side import side_by_side_table

    def records(adversarial_right: list[bool]) -> list[dict]:
        out = []
        for i, right in enumerate(adversarial_right):
            common = {"group": f"g{i}", "task": "speaker_gender", "category": "speaker"}
            out.append({**common, "condition": "neutral", "correct": True, "follows_context": None})
            out.append({**common, "condition": "adversarial", "correct": right, "follows_context": not right})
        return out

    table = side_by_side_table({
        "student KD": summarize(records([True, False, False, False]), num_bootstrap=0),
        "student CAAD": summarize(records([True, True, True, False]), num_bootstrap=0),
    })
    lines = table.splitlines()
    assert lines[2] == "| student KD | 100% | 25% | 75% | 75% |"
    assert lines[3] == "| student CAAD | 100% | 75% | 25% | 25% |"
    assert "4 items per condition" in table
