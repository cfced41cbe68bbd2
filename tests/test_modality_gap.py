"""Forgetting and modality-gap measures (caad.eval.modality_gap) on hand-made answers with known values (no
training here; the table built from them is tested in tests/test_experiment_spoken_qa.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caad.data.audio import write_wav
from caad.data.manifest import ManifestRow
from caad.eval.modality_gap import MEASURES, format_estimate, modality_measures, student_records, text_teacher_records


def _records(text: dict[str, bool], speech: dict[str, list[bool]] | None = None) -> list[dict]:
    out = [{"group": g, "modality": "text", "correct": c} for g, c in text.items()]
    for g, values in (speech or {}).items():
        out += [{"group": g, "modality": "speech", "correct": c} for c in values]
    return out


# student: text 3/4 right; speech 2 renderings per item, 3/8 right
STUDENT = _records(
    {"a": True, "b": True, "c": True, "d": False},
    {"a": [True, False], "b": [False, False], "c": [True, True], "d": [False, False]},
)
PRE = _records({"a": True, "b": True, "c": True, "d": True, "x": False})  # 4/4 on the student's items ("x" ignored)
TEACHER = _records({"a": True, "b": False, "c": True, "d": True})  # 3/4


def test_known_values():
    m = modality_measures(STUDENT, pre=PRE, teacher=TEACHER, num_bootstrap=0)
    assert m["text_accuracy"]["value"] == pytest.approx(0.75)
    assert m["speech_accuracy"]["value"] == pytest.approx(3 / 8)
    assert m["modality_gap"]["value"] == pytest.approx(0.75 - 3 / 8)
    assert m["pre_text_accuracy"]["value"] == pytest.approx(1.0)
    assert m["forgetting"]["value"] == pytest.approx(0.25)
    assert m["teacher_text_accuracy"]["value"] == pytest.approx(0.75)
    assert m["teacher_gap"]["value"] == pytest.approx(0.0)
    assert m["num_items"] == 4 and m["num_seeds"] == 1
    assert {k: m[k]["n"] for k in MEASURES} == dict.fromkeys(MEASURES, 4)
    assert all(m[k]["low"] is None and m[k]["high"] is None for k in MEASURES)


def test_without_references_or_speech_the_measures_are_undefined():
    m = modality_measures(_records({"a": True, "b": False}), num_bootstrap=50)
    assert m["text_accuracy"]["value"] == pytest.approx(0.5)
    for key in ("speech_accuracy", "modality_gap", "forgetting", "teacher_gap", "pre_text_accuracy"):
        assert m[key]["value"] is None and m[key]["low"] is None
    assert m["speech_accuracy"]["n"] == 0


def test_items_weigh_alike_however_often_spoken():
    # "a" spoken 3 times (all right), "b" once (wrong): speech accuracy (1 + 0) / 2, not 3 / 4
    student = _records({"a": True, "b": False}, {"a": [True, True, True], "b": [False]})
    m = modality_measures(student, num_bootstrap=0)
    assert m["speech_accuracy"]["value"] == pytest.approx(0.5)
    assert m["modality_gap"]["value"] == pytest.approx(0.0)
    partial = modality_measures(_records({"a": True}, {"a": [True, False, False, False]}), num_bootstrap=0)
    assert partial["modality_gap"]["value"] == pytest.approx(0.75)


def test_gap_only_on_items_with_both_modalities():
    student = _records({"a": True, "b": False}, {"a": [False], "c": [True]})
    m = modality_measures(student, num_bootstrap=0)
    assert m["text_accuracy"]["value"] == pytest.approx(0.5)
    assert m["speech_accuracy"]["value"] == pytest.approx(0.5)
    assert m["modality_gap"]["value"] == pytest.approx(1.0)  # item "a": text right, speech wrong
    assert m["modality_gap"]["n"] == 1


def test_seeds_average_and_intervals_cover_the_value():
    per_seed = {
        0: _records({"a": True, "b": True, "c": False, "d": False}, {g: [True] for g in "abcd"}),
        1: _records({"a": True, "b": True, "c": True, "d": False}, {g: [False] for g in "abcd"}),
    }
    m = modality_measures(per_seed, num_bootstrap=500, seed=3)
    assert m["num_seeds"] == 2
    assert m["text_accuracy"]["value"] == pytest.approx((0.5 + 0.75) / 2)
    assert m["speech_accuracy"]["value"] == pytest.approx(0.5)
    for key in ("text_accuracy", "speech_accuracy", "modality_gap"):
        assert m[key]["low"] <= m[key]["value"] <= m[key]["high"]
    again = modality_measures(per_seed, num_bootstrap=500, seed=3)
    assert again == m  # reproducible for a seed


def test_paired_comparisons_have_zero_width_intervals():
    # speech answers equal to text answers item by item (and seed by seed): every replicate's gap is 0,
    # however the items and seeds are drawn; an unpaired bootstrap would give a wide interval
    rng = np.random.default_rng(0)
    per_seed = {}
    for s in range(3):
        answers = {f"q{i}": bool(rng.random() < 0.5) for i in range(40)}
        per_seed[s] = _records(answers, {g: [c] for g, c in answers.items()})
    m = modality_measures(per_seed, pre=per_seed[0], num_bootstrap=300)
    assert m["modality_gap"]["low"] == m["modality_gap"]["high"] == pytest.approx(0.0)
    assert m["text_accuracy"]["high"] - m["text_accuracy"]["low"] > 0.1
    same = modality_measures(per_seed[1], pre=per_seed[1], teacher=per_seed[1], num_bootstrap=300)
    assert same["forgetting"]["low"] == same["forgetting"]["high"] == pytest.approx(0.0)
    assert same["teacher_gap"]["low"] == same["teacher_gap"]["high"] == pytest.approx(0.0)


def test_interval_matches_a_naive_item_bootstrap():
    rng = np.random.default_rng(1)
    text = rng.random(60) < 0.7
    speech = rng.random(60) < 0.4
    records = _records(
        {f"q{i}": bool(c) for i, c in enumerate(text)}, {f"q{i}": [bool(c)] for i, c in enumerate(speech)}
    )
    m = modality_measures(records, num_bootstrap=4000, seed=0)
    draws = rng.integers(0, 60, size=(4000, 60))  # an independent loop-free reference
    naive = {
        "text_accuracy": text[draws].mean(1),
        "speech_accuracy": speech[draws].mean(1),
        "modality_gap": (text[draws].astype(float) - speech[draws]).mean(1),
    }
    for key, values in naive.items():
        low, high = np.percentile(values, [2.5, 97.5])
        assert m[key]["low"] == pytest.approx(low, abs=0.025)
        assert m[key]["high"] == pytest.approx(high, abs=0.025)


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="modality must be one of"):
        modality_measures([{"group": "a", "modality": "audio", "correct": True}])
    with pytest.raises(ValueError, match="correct must be a bool"):
        modality_measures([{"group": "a", "modality": "text", "correct": 1}])
    with pytest.raises(ValueError, match=r"teacher\[0\] has no text record of 1 student item"):
        modality_measures(STUDENT, teacher=_records({"a": True, "b": True, "c": True}))
    with pytest.raises(ValueError, match="num_bootstrap"):
        modality_measures(STUDENT, num_bootstrap=-1)


def test_format_estimate():
    assert format_estimate({"value": 0.5, "low": 0.25, "high": 0.75}) == "50.0 [25.0, 75.0]"
    assert format_estimate({"value": 0.1, "low": -0.05, "high": 0.2}, signed=True) == "+10.0 [-5.0, +20.0]"
    assert format_estimate({"value": None}) == "-"


# ---- answering, with stand-in models --------------------------------------------------------------


def _rows(tmp_path: Path) -> list[ManifestRow]:
    rows = []
    for index, (group, label, query) in enumerate(
        [("q1", "seven", "What is three plus four?"), ("q1", "seven", "What is three plus four?"),
         ("q2", "two", "Which is smaller, six or two?")]
    ):  # fmt: skip
        write_wav(tmp_path / f"{index}.wav", np.zeros(1600, dtype=np.float32), 16000)
        rows.append(
            ManifestRow(
                id=f"r{index}",
                audio=f"{index}.wav",
                sampling_rate=16000,
                instruction="Answer the question in the recording with one word.",
                task="addition" if group == "q1" else "comparison",
                label=label,
                choices=["two", "six"] if group == "q2" else ["six", "seven", "eight"],
                group=group,
                extra={"text_query": query},
                base_dir=tmp_path,
            )
        )
    return rows


class _Student:
    """Answers 'seven' to every spoken query, and 'six or two' (names two candidates: wrong) to text ones."""

    def __init__(self):
        self.calls = []

    def generate(self, audio, instructions, *, max_new_tokens, audio_mode="positive"):
        self.calls.append((audio_mode, list(instructions)))
        return ["seven" if audio_mode == "positive" else "six or two" for _ in instructions]


def test_student_records_hear_every_row_and_read_every_question_once(tmp_path):
    model = _Student()
    records = student_records(model, _rows(tmp_path), batch_size=2, progress=False)
    speech = [r for r in records if r["modality"] == "speech"]
    text = [r for r in records if r["modality"] == "text"]
    assert [r["id"] for r in speech] == ["r0", "r1", "r2"] and [r["group"] for r in text] == ["q1", "q2"]
    assert [r["correct"] for r in speech] == [True, True, False]
    assert [r["correct"] for r in text] == [False, False]
    text_calls = [instructions for mode, instructions in model.calls if mode == "remove"]
    assert text_calls == [["What is three plus four?", "Which is smaller, six or two?"]]
    m = modality_measures(records, num_bootstrap=0)
    # q1 heard twice (both right), q2 once (wrong): items weigh alike
    assert m["speech_accuracy"]["value"] == pytest.approx(0.5) and m["text_accuracy"]["value"] == 0.0


def test_text_teacher_records(tmp_path, monkeypatch):
    import caad.models.text_lm as text_lm

    monkeypatch.setattr(text_lm, "generate_text_answers", lambda model, tok, queries, **kw: ["Seven.", "six"])
    records = text_teacher_records(None, None, _rows(tmp_path))
    assert [(r["group"], r["modality"], r["correct"]) for r in records] == [("q1", "text", True), ("q2", "text", False)]
