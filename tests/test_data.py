"""caad.data: the built-in speech corpus, manifests, audio I/O and features, the espeak-ng wrapper."""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile

from caad.cli import main as cli_main
from caad.data import (
    VOICES,
    AudioError,
    ManifestError,
    ManifestRow,
    as_dataset,
    estimate_f0,
    load_audio,
    log_mel_features,
    read_manifest,
    resample,
    synthesize,
    synthesize_corpus,
    write_manifest,
)
from caad.data.synth import read_text_prior, split_counts
from caad.data.tasks import (
    KEYWORDS,
    PITCH_JITTER,
    PITCH_SETTINGS,
    ContextSettings,
    make_specs,
    make_text_prior,
    train_prompt,
)
from caad.eval import is_correct, normalize_text

SENTENCE = "The quick brown fox jumps over the lazy river today."


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- corpus

#: Words by which a context may state each label (an independent reading of the contexts).
STATES = {
    "male": ("male", "man"),
    "female": ("female", "woman"),
    "slow": ("slow", "slowly"),
    "normal": ("normal",),
    "fast": ("fast", "quickly"),
    "low": ("low",),
    "high": ("high",),
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _states(context: str, label: str) -> bool:
    return any(word in _words(context) for word in STATES.get(label, (label,)))


def test_corpus_layout_and_audio(tiny_corpus, tiny_corpus_rows):
    info = json.loads(tiny_corpus.info.read_text())
    assert info["num_examples"] == 24 and info["seed"] == 0
    assert info["splits"] == {"train": 19, "validation": 3, "test": 2}
    assert info["rows"] == {"train": 19, "validation": 12, "test": 8}
    assert set(tiny_corpus.manifests) == {"train", "validation", "test"}
    items = {row.group: row for row in tiny_corpus_rows}
    assert len(tiny_corpus_rows) == 39 and len({row.id for row in tiny_corpus_rows}) == 39 and len(items) == 24
    for split in ("validation", "test"):
        rows = read_manifest(tiny_corpus[split])
        by_group = defaultdict(list)
        for row in rows:
            by_group[row.group].append(row)
        for group, members in by_group.items():
            assert [r.condition for r in members] == ["neutral", "faithful", "adversarial", "irrelevant"]
            assert [r.id for r in members] == [f"{group}-{r.condition}" for r in members]
            assert len({r.audio for r in members}) == 1 and len({r.label for r in members}) == 1
    for row in items.values():
        assert row.audio_path.is_file()
        assert not Path(row.audio).is_absolute()  # the corpus folder can be moved
        waveform = load_audio(row.audio_path)
        assert waveform.dtype == np.float32 and waveform.ndim == 1
        assert row.sampling_rate == 16000
        assert abs(waveform.size / 16000 - row.metadata["duration_s"]) < 1e-3
        assert 0.05 < np.abs(waveform).max() <= 1.0
    assert len(list((tiny_corpus.root / "audio").rglob("*.wav"))) == 24
    # every voice x rate x pitch combination once among the 24 items; tasks balanced
    combos = {(r.metadata["speaker"], r.metadata["rate"], r.metadata["pitch"]) for r in items.values()}
    assert len(combos) == 24
    tasks = defaultdict(int)
    for row in items.values():
        tasks[row.task] += 1
    assert dict(tasks) == {"speaker_gender": 6, "speaking_rate": 6, "pitch_level": 6, "spoken_content": 6}


def test_labels_contexts_and_choices(tiny_corpus_rows):
    for row in tiny_corpus_rows:
        m = row.metadata
        assert m["gender"] == VOICES[m["speaker"]].gender
        expected = {
            "speaker_gender": m["gender"],
            "speaking_rate": m["rate"],
            "pitch_level": m["pitch"],
            "spoken_content": m["keyword"],
        }[row.task]
        assert row.label == expected
        assert row.category in ("speaker", "paralinguistics", "content")
        words = m["transcript"].lower().strip(".?").split()
        assert m["keyword"] in words and m["distractor"] not in words
        choices = {
            "speaker_gender": {"male", "female"},
            "speaking_rate": {"slow", "normal", "fast"},
            "pitch_level": {"low", "high"},
            "spoken_content": {m["keyword"], m["distractor"]},
        }[row.task]
        assert set(row.choices) == choices
        question = row.instruction if row.context is None else row.instruction[len(row.context) + 1 :]
        assert row.instruction == (question if row.context is None else f"{row.context} {question}")
        assert all(choice in _words(question) for choice in choices)  # every question lists its options
        # echoing the prompt is never right: it names every option
        assert not is_correct(row.instruction, row.label, row.choices)
        if row.condition == "neutral":
            assert row.context is None and row.context_label is None
        elif row.condition == "irrelevant":
            assert row.context_label is None
            assert not any(_states(row.context, label) for label in [*STATES, *KEYWORDS]), row.context
        else:
            assert (row.context_label == row.label) == (row.condition == "faithful")
            assert row.context_label in row.choices
            assert _states(row.context, row.context_label), row.context
            others = [c for c in row.choices if c != row.context_label]
            assert not any(_states(row.context, other) for other in others), row.context


def test_faithful_and_adversarial_contexts_differ_only_in_the_label(tiny_corpus):
    rows = read_manifest(tiny_corpus.validation) + read_manifest(tiny_corpus.test)
    by_group = defaultdict(dict)
    for row in rows:
        by_group[row.group][row.condition] = row
    for members in by_group.values():
        faithful, adversarial = members["faithful"].context, members["adversarial"].context
        assert faithful.split(":")[0] == adversarial.split(":")[0]  # the same source (caption, note, ...)
        assert faithful != adversarial


def test_training_context_rates_match_configuration():
    """Drawn per example: the share and the agreement are binomial, within 4.5 standard deviations."""
    specs = make_specs(4000, 3)
    settings = ContextSettings(context_share=0.6, context_agreement=0.7, irrelevant_share=0.25)
    conditions = [train_prompt(spec, settings, 3).condition for spec in specs]
    counts = {c: conditions.count(c) for c in ("neutral", "faithful", "adversarial", "irrelevant")}

    def within(successes: int, trials: int, p: float) -> bool:
        return abs(successes - trials * p) <= 4.5 * math.sqrt(trials * p * (1 - p))

    contexted = counts["faithful"] + counts["adversarial"]
    assert within(contexted, 4000, 0.6)
    assert within(counts["faithful"], contexted, 0.7)
    assert within(counts["irrelevant"], 4000 - contexted, 0.25)
    assert train_prompt(specs[5], settings, 3) == train_prompt(specs[5], settings, 3)  # a pure function
    # the extremes are exact
    always = ContextSettings(context_share=1.0, context_agreement=1.0, irrelevant_share=0.0)
    assert {train_prompt(spec, always, 0).condition for spec in specs[:300]} == {"faithful"}
    never = ContextSettings(context_share=0.0, context_agreement=0.5, irrelevant_share=0.0)
    assert {train_prompt(spec, never, 0).condition for spec in specs[:300]} == {"neutral"}
    with pytest.raises(ValueError, match="context_agreement"):
        ContextSettings(context_agreement=1.5)


def test_corpus_records_its_context_settings(tmp_path):
    paths = synthesize_corpus(
        tmp_path / "c", num_examples=8, seed=4, splits=(1.0, 0.0, 0.0), context_share=1.0, context_agreement=0.0,
        irrelevant_share=0.0, text_prior_examples=5, progress=False,
    )  # fmt: skip
    rows = read_manifest(paths.train)
    assert {row.condition for row in rows} == {"adversarial"}
    assert all(row.context_label != row.label for row in rows)
    info = json.loads(paths.info.read_text())
    assert info["contexts"]["train_conditions"]["adversarial"] == 8 and info["text_prior_examples"] == 5
    assert len(read_text_prior(paths.text_prior)) == 5
    with pytest.raises(ValueError, match="context_share"):
        synthesize_corpus(tmp_path / "d", num_examples=3, context_share=2.0, progress=False)
    with pytest.raises(ValueError, match="eval_conditions"):
        synthesize_corpus(tmp_path / "d", num_examples=3, eval_conditions=("neutral", "sarcastic"), progress=False)
    assert not (tmp_path / "d").exists()


def test_splits_are_disjoint(tiny_corpus):
    seen: dict[str, str] = {}
    for split, manifest in tiny_corpus.manifests.items():
        rows = read_manifest(manifest)
        for row in rows:
            for key in (row.group, row.audio_path.resolve().as_posix(), row.metadata["transcript"]):
                assert seen.setdefault(key, split) == split, (key, split)
            assert row.audio.startswith(f"audio/{split}/")


def test_text_prior_corpus():
    records = make_text_prior(400, seed=2)
    assert records == make_text_prior(400, seed=2)
    assert len({r["id"] for r in records}) == 400
    for record in records:
        assert record["instruction"].startswith(record["context"] + " ")
        assert record["label"] == record["context_label"]  # the context is the only evidence, and right
        choices = {"speaker_gender": ("male", "female"), "speaking_rate": ("slow", "normal", "fast"),
                   "pitch_level": ("low", "high")}.get(record["task"])  # fmt: skip
        if choices is None:  # spoken content: the two words in the question
            choices = tuple(w for w in KEYWORDS if w in _words(record["instruction"]))
        assert record["label"] in choices and _states(record["context"], record["label"])
        assert is_correct(record["answer"], record["label"], choices)
        assert normalize_text(record["answer"]).split()[0] == normalize_text(record["label"])  # the label first
    labels = defaultdict(int)
    for record in records:
        if record["task"] == "speaker_gender":
            labels[record["label"]] += 1
    assert min(labels.values()) > 20  # both answers occur
    # with agreement 0.5, about half of the answers follow the context
    half = make_text_prior(1000, seed=2, agreement=0.5)
    follows = sum(r["label"] == r["context_label"] for r in half)
    assert abs(follows - 500) <= 4.5 * math.sqrt(250)


def test_durations_differ_by_speaking_rate(tiny_corpus_rows):
    slow, _ = synthesize(SENTENCE, "m3", rate_wpm=120)
    fast, _ = synthesize(SENTENCE, "m3", rate_wpm=240)
    assert slow.size > 1.5 * fast.size
    per_word = defaultdict(list)
    for row in {r.group: r for r in tiny_corpus_rows}.values():
        per_word[row.metadata["rate"]].append(row.metadata["duration_s"] / row.metadata["num_words"])
    assert min(per_word["slow"]) > max(per_word["fast"])
    assert np.mean(per_word["slow"]) > np.mean(per_word["normal"]) > np.mean(per_word["fast"])


def test_pitch_bands_are_well_separated(tiny_corpus_rows):
    """The four (gender, pitch) cells fall in F0 bands at least 1.2x apart; within a voice, high is
    at least 1.4x low (measured on fresh renders at the jitter's extremes and on the corpus)."""
    f0 = defaultdict(list)
    for voice, levels in PITCH_SETTINGS.items():
        for level, setting in levels.items():
            for offset in (-PITCH_JITTER, PITCH_JITTER):
                samples, rate = synthesize(SENTENCE, voice, rate_wpm=240, pitch=min(100, max(0, setting + offset)))
                f0[VOICES[voice].gender, level].append(estimate_f0(samples, rate))
                f0[voice, level].append(f0[VOICES[voice].gender, level][-1])
    bands = [("male", "low"), ("male", "high"), ("female", "low"), ("female", "high")]
    for lower, upper in zip(bands, bands[1:]):
        assert min(f0[upper]) > 1.2 * max(f0[lower]), (lower, upper, f0)
    for voice in VOICES:
        assert min(f0[voice, "high"]) > 1.4 * max(f0[voice, "low"]), (voice, f0)
    # in the corpus: the recorded F0 is the measured one, and the cells do not overlap
    by = defaultdict(list)
    for row in {r.group: r for r in tiny_corpus_rows}.values():
        measured = estimate_f0(load_audio(row.audio_path), 16000)
        assert abs(measured - row.metadata["f0_hz"]) < 0.5
        by[row.metadata["gender"], row.metadata["pitch"]].append(measured)
    for lower, upper in zip(bands, bands[1:]):
        assert min(by[upper]) > max(by[lower]), (lower, upper, by)


def test_synthesize_is_reproducible_in_any_order():
    first, rate = synthesize(SENTENCE, "f3", rate_wpm=200, pitch=60)
    synthesize("Something else entirely.", "m1", rate_wpm=100, pitch=10)
    again, _ = synthesize(SENTENCE, "f3", rate_wpm=200, pitch=60)
    assert rate == 22050 and first.dtype == np.int16
    np.testing.assert_array_equal(first, again)


def test_same_seed_same_bytes_different_seed_differs(tiny_corpus, tmp_path):
    again = synthesize_corpus(tmp_path / "again", num_examples=24, seed=0, progress=False, workers=1)
    assert _tree_bytes(again.root) == _tree_bytes(tiny_corpus.root)
    other = synthesize_corpus(tmp_path / "other", num_examples=24, seed=1, progress=False)
    assert other.train.read_bytes() != tiny_corpus.train.read_bytes()
    first_audio = sorted((other.root / "audio").rglob("*.wav"))[0].read_bytes()
    assert first_audio not in set(_tree_bytes(tiny_corpus.root).values())


def test_same_seed_same_bytes_across_processes(tmp_path):
    here = synthesize_corpus(tmp_path / "here", num_examples=4, seed=7, progress=False)
    code = (
        "import sys; from caad.data import synthesize_corpus; "
        "synthesize_corpus(sys.argv[1], num_examples=4, seed=7, progress=False)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, timeout=120)
    assert _tree_bytes(tmp_path / "there") == _tree_bytes(here.root)


def test_split_counts():
    assert split_counts(200, (0.8, 0.1, 0.1)) == [160, 20, 20]
    assert split_counts(24, (0.8, 0.1, 0.1)) == [19, 3, 2]
    assert split_counts(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert split_counts(5, (1.0, 0.0, 0.0)) == [5, 0, 0]
    with pytest.raises(ValueError, match="summing to 1"):
        split_counts(10, (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="too small"):
        split_counts(2, (0.8, 0.1, 0.1))
    assert make_specs(5, 3) == make_specs(5, 3)
    with pytest.raises(ValueError, match="num_examples"):
        make_specs(0, 0)


def test_refuses_to_overwrite_and_replaces_cleanly(tmp_path):
    out = tmp_path / "corpus"
    synthesize_corpus(out, num_examples=3, seed=0, progress=False)
    before = _tree_bytes(out)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize_corpus(out, num_examples=3, seed=1, progress=False)
    assert _tree_bytes(out) == before
    replaced = synthesize_corpus(out, num_examples=3, seed=1, progress=False, overwrite=True)
    assert replaced.root == out and _tree_bytes(out) != before
    assert not any(p.name.startswith(".corpus") for p in tmp_path.iterdir())  # no staging/old folders left
    assert {p.name for p in (out / "audio" / "train").iterdir()} == {
        f"{r.id}.wav" for r in read_manifest(out / "train.jsonl")
    }

    # a folder that is not a corpus, or a corpus holding the user's own files, is never deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a caad corpus"):
        synthesize_corpus(mine, num_examples=3, seed=0, progress=False, overwrite=True)
    (out / "train.pgt.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="train.pgt.jsonl"):
        synthesize_corpus(out, num_examples=3, seed=0, progress=False, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious" and (out / "train.pgt.jsonl").exists()
    # an empty folder is fine without overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    synthesize_corpus(empty, num_examples=3, seed=0, progress=False)


def test_interrupted_synthesis_leaves_nothing_half_written(tmp_path, monkeypatch):
    import caad.data.synth as synth

    out = tmp_path / "corpus"
    synthesize_corpus(out, num_examples=3, seed=0, progress=False)
    before = _tree_bytes(out)
    real_row, calls = synth._audio_row_fields, []

    def failing_row(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_row(*args, **kwargs)

    monkeypatch.setattr(synth, "_audio_row_fields", failing_row)
    with pytest.raises(KeyboardInterrupt):
        synthesize_corpus(out, num_examples=6, seed=5, progress=False, overwrite=True)
    assert _tree_bytes(out) == before  # the old corpus is untouched
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        synthesize_corpus(tmp_path / "new", num_examples=6, seed=5, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_synth_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="num_examples"):
        synthesize_corpus(tmp_path / "x", num_examples=0, progress=False)
    with pytest.raises(ValueError, match="splits"):
        synthesize_corpus(tmp_path / "x", num_examples=5, splits=(0.5, 0.5), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        synthesize_corpus(tmp_path / "file", num_examples=3, progress=False)
    with pytest.raises(ValueError, match="text"):
        synthesize("   ")
    with pytest.raises(ValueError, match="unknown voice"):
        synthesize("hello", voice="nobody at all")
    with pytest.raises(ValueError, match="rate_wpm"):
        synthesize("hello", rate_wpm=20)
    with pytest.raises(ValueError, match="pitch"):
        synthesize("hello", pitch=101)


# --------------------------------------------------------------------------------------------- manifest

GOOD = {"id": "a", "audio": "a.wav", "sampling_rate": 16000, "instruction": "Q?", "task": "t"}


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "instruction"} | {"id": "b"}), "instruction", "missing"),
        (json.dumps(GOOD | {"id": "b", "sampling_rate": "16000"}), "sampling_rate", "positive integer"),
        (json.dumps(GOOD | {"id": "b", "sampling_rate": True}), "sampling_rate", "positive integer"),
        (json.dumps(GOOD | {"id": "b", "audio": ""}), "audio", "non-empty string"),
        (json.dumps(GOOD | {"id": "b", "metadata": [1]}), "metadata", "JSON object"),
        (json.dumps(GOOD | {"id": "b", "label": 3}), "label", "string or null"),
        (json.dumps(GOOD), "id", "duplicate id 'a' (first on line 1)"),
        (json.dumps(GOOD | {"id": "b", "condition": "sarcastic"}), "condition", "expected one of neutral"),
        (json.dumps(GOOD | {"id": "b", "choices": "male"}), "choices", "list of non-empty strings"),
        (json.dumps(GOOD | {"id": "b", "choices": ["male", ""]}), "choices", "list of non-empty strings"),
    ],
)
def test_manifest_reader_names_line_and_field(tmp_path, line, field, expected):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(ManifestError, match=re.escape(expected)) as info:
        read_manifest(path)
    assert info.value.line == 3 and info.value.field == field
    assert f"{path}, line 3" in str(info.value)
    if field:
        assert f"field {field!r}" in str(info.value)


def test_manifest_missing_file_and_partial_last_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"id": "b", "aud')
    with pytest.raises(ManifestError, match="line 2"):
        read_manifest(path)
    assert [row.id for row in read_manifest(path, allow_partial_last_line=True)] == ["a"]


def test_manifest_roundtrip_paths_and_extra_keys(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [
        ManifestRow(
            id="x1",
            audio="audio/x1.wav",
            sampling_rate=16000,
            instruction="Q",
            task="t",
            metadata={"gender": "male"},
            label="male",
            extra={"custom": [1, 2]},
        ),
        GOOD | {"id": "x2", "hint_neutral": "n", "metadata": {"nested": {"k": 1}}},
        GOOD | {"id": "x3", "condition": "adversarial", "context": "c.", "context_label": "male", "group": "g",
                "choices": ["male", "female"]},  # fmt: skip
    ]
    path = write_manifest(corpus / "m.jsonl", rows)
    back = read_manifest(path)
    assert back[0].extra == {"custom": [1, 2]} and back[0].label == "male"
    assert back[1].hint_neutral == "n" and back[1].metadata == {"nested": {"k": 1}}
    assert (back[2].condition, back[2].context, back[2].context_label, back[2].group, back[2].choices) == (
        "adversarial", "c.", "male", "g", ["male", "female"]
    )  # fmt: skip
    assert back[0].audio_path == corpus.absolute() / "audio" / "x1.wav"
    with pytest.raises(FileExistsError, match="overwrite"):
        write_manifest(path, back)
    # written elsewhere: paths still point at the same files; under the folder they stay relative
    elsewhere = read_manifest(write_manifest(tmp_path / "runs" / "m.jsonl", back))
    assert elsewhere[0].audio_path == back[0].audio_path and Path(elsewhere[0].audio).is_absolute()
    inside = read_manifest(write_manifest(tmp_path / "m.jsonl", back))
    assert inside[0].audio == "corpus/audio/x1.wav"
    # a failing write leaves neither the target nor a temporary file
    with pytest.raises(ManifestError, match="duplicate id"):
        write_manifest(tmp_path / "dup.jsonl", [GOOD, GOOD])
    assert not (tmp_path / "dup.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_as_dataset(tiny_corpus):
    dataset = as_dataset(tiny_corpus.train)
    rows = read_manifest(tiny_corpus.train)
    assert len(dataset) == len(rows)
    assert dataset[0]["id"] == rows[0].id and Path(dataset[0]["audio"]).is_file()
    assert json.loads(dataset[0]["metadata"]) == rows[0].metadata
    assert dataset[0]["context"] == rows[0].context and dataset[0]["choices"] == rows[0].choices
    assert dataset[0]["condition"] == rows[0].condition


# ------------------------------------------------------------------------------------------------ audio


def test_resample_is_band_limited_and_accurate():
    t = np.arange(22050 * 2) / 22050
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, 22050, 16000)
    assert out.dtype == np.float32 and out.size == 32000
    expected = np.sin(2 * np.pi * 440 * np.arange(out.size) / 16000)
    assert np.abs(out[200:-200] - expected[200:-200]).max() < 1e-3
    alias = resample(np.sin(2 * np.pi * 10000 * t), 22050, 16000)  # above the new Nyquist: removed
    assert np.sqrt(np.mean(alias[200:-200] ** 2)) < 1e-3
    up = resample(np.sin(2 * np.pi * 300 * np.arange(8000) / 8000), 8000, 16000)
    assert np.abs(up[200:-200] - np.sin(2 * np.pi * 300 * np.arange(up.size) / 16000)[200:-200]).max() < 1e-3
    np.testing.assert_array_equal(resample(tone, 22050, 22050), tone)


def test_load_audio_resamples_mixes_and_reports_errors(tmp_path):
    stereo = np.stack([np.full(2205, 0.5), np.full(2205, -0.1)], axis=1)
    soundfile.write(tmp_path / "s.wav", stereo, 22050, subtype="FLOAT")
    mono = load_audio(tmp_path / "s.wav")
    assert mono.size == 1600 and abs(float(mono[400:1200].mean()) - 0.2) < 1e-3
    assert load_audio(tmp_path / "s.wav", target_sampling_rate=None).size == 2205
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(AudioError, match="bad.wav"):
        load_audio(tmp_path / "bad.wav")


def test_log_mel_features(tiny_corpus_rows):
    waves = [load_audio(row.audio_path) for row in tiny_corpus_rows[:3]]
    full = log_mel_features(waves)
    assert full["input_features"].shape == (3, 80, 3000) and full["input_features"].dtype == np.float32
    assert full["attention_mask"].shape == (3, 3000)
    np.testing.assert_array_equal(full["attention_mask"].sum(1), [-(-w.size // 160) for w in waves])
    longest = log_mel_features(waves, padding="longest", n_mels=128)
    frames = max(w.size for w in waves) // 160
    assert longest["input_features"].shape == (3, 128, frames)
    assert longest["attention_mask"].shape == (3, frames)
    np.testing.assert_array_equal(longest["attention_mask"].sum(1), [min(-(-w.size // 160), frames) for w in waves])
    single = log_mel_features(waves[0])
    assert single["input_features"].shape == (1, 80, 3000)
    with pytest.raises(ValueError, match="padding"):
        log_mel_features(waves, padding="shortest")


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_data_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--num-examples", "3", "--seed", "2", "--no-progress"]
    assert cli_main(args) == 0
    assert "corpus written" in capsys.readouterr().out
    test_items = {row.group for row in read_manifest(out / "test.jsonl")}
    assert len(read_manifest(out / "train.jsonl")) + len(test_items) == 2
    assert cli_main(args) == 2
    assert "overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert cli_main(["data", "synth", "--out", str(tmp_path / "z"), "--num-examples", "0", "--no-progress"]) == 2
    assert os.listdir(tmp_path) == ["cli"]


def test_cli_data_synth_context_options(tmp_path, capsys):
    out = tmp_path / "ctx"
    argv = ["data", "synth", "--out", str(out), "--num-examples", "4", "--splits", "1,0,0", "--no-progress",
            "--context-share", "1", "--context-agreement", "1", "--text-prior-examples", "3"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "text prior" in capsys.readouterr().out
    assert {row.condition for row in read_manifest(out / "train.jsonl")} == {"faithful"}
    assert len(read_text_prior(out / "text_prior.jsonl")) == 3
    with pytest.raises(SystemExit):
        cli_main(["data", "synth", "--out", str(tmp_path / "x"), "--context-share", "1.5"])
    assert "expected a number in [0, 1]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, mask):
    from caad.data.files import write_text_atomic

    old = os.umask(mask)
    try:
        manifest = write_manifest(tmp_path / "m.jsonl", [GOOD])
        text = write_text_atomic(tmp_path / "t.json", "{}\n")
        with open(tmp_path / "plain.txt", "w") as handle:  # what open() gives, the reference
            handle.write("x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~mask
    assert stat.S_IMODE(manifest.stat().st_mode) == expected
    assert stat.S_IMODE(text.stat().st_mode) == expected


# ------------------------------------------------------------------------------------------ data checks


def _wav_bytes(seconds: float, rate: int = 16000, frequency: float = 220.0) -> bytes:
    t = np.arange(int(round(seconds * rate))) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * frequency * t), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture()
def checked_manifest(tmp_path):
    """A manifest with one row of each kind of problem; returns (path, {kind: line number})."""
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "good.wav").write_bytes(_wav_bytes(1.0))
    (audio / "long.wav").write_bytes(_wav_bytes(3.0))
    (audio / "huge.wav").write_bytes(_wav_bytes(6.0))
    (audio / "short.wav").write_bytes(_wav_bytes(0.05))
    (audio / "garbage.wav").write_bytes(b"RIFF not really a wave file at all")
    (audio / "cut.wav").write_bytes(_wav_bytes(1.0)[:9000])  # header announces 1 s, data stops short
    (audio / "rate.wav").write_bytes(_wav_bytes(1.0, rate=8000))
    base = {"sampling_rate": 16000, "instruction": "Q?", "task": "t", "label": "yes", "pseudo_gt": "Yes."}
    lines = [
        base | {"id": "good", "audio": "audio/good.wav"},
        base | {"id": "missing", "audio": "audio/nope.wav"},
        base | {"id": "garbage", "audio": "audio/garbage.wav"},
        base | {"id": "cut", "audio": "audio/cut.wav"},
        base | {"id": "short", "audio": "audio/short.wav"},
        base | {"id": "huge", "audio": "audio/huge.wav"},
        base | {"id": "long", "audio": "audio/long.wav"},
        base | {"id": "nopgt", "audio": "audio/good.wav", "pseudo_gt": None},
        base | {"id": "rate", "audio": "audio/rate.wav"},
        base | {"id": "badrate", "audio": "audio/good.wav", "sampling_rate": "16k"},
        base | {"id": "good", "audio": "audio/good.wav"},
    ]
    text = [json.dumps(line) for line in lines]
    text.insert(3, "{not json")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(text) + "\n")
    return path


def test_check_manifest_finds_every_problem(checked_manifest, tmp_path):
    from caad.data import check_manifest

    report = check_manifest(checked_manifest, require=["pseudo_gt"], max_seconds=5.0, window_seconds=2.0)
    assert not report.ok
    errors = {(issue.line, issue.kind) for issue in report.errors}
    assert errors == {
        (2, "missing_audio"),
        (3, "corrupt_audio"),
        (4, "bad_row"),  # invalid JSON
        (5, "corrupt_audio"),  # truncated data
        (6, "too_short"),
        (7, "too_long"),
        (9, "missing_field"),
        (11, "bad_row"),  # sampling_rate is not an int
        (12, "bad_row"),  # duplicate id
    }
    warnings = {(issue.line, issue.kind) for issue in report.warnings}
    assert warnings == {(8, "truncated"), (10, "sampling_rate")}
    assert report.num_truncated == 1
    # every message names the manifest, the line, the row and (for audio problems) the file
    by_line = {issue.line: str(issue) for issue in report.errors}
    assert by_line[2].startswith(f"{checked_manifest}, line 2 (row 'missing'), audio ")
    assert "nope.wav" in by_line[2] and "not found" in by_line[2]
    assert "garbage.wav" in by_line[3] and "cut.wav" in by_line[5] and "truncated" in by_line[5]
    assert "0.050 s long" in by_line[6] and "limit is 5 s" in by_line[7]
    assert "invalid JSON" in by_line[4] and "'sampling_rate'" in by_line[11] and "duplicate id" in by_line[12]
    summary = report.summary()
    assert "9 errors" in summary and "2 warnings" in summary
    with pytest.raises(ValueError, match=r"line 2 \(row 'missing'\)"):
        report.raise_for_errors()
    # headers only: the same problems here (the WAV header tells the truncated file)
    quick = check_manifest(checked_manifest, require=["pseudo_gt"], max_seconds=5.0, window_seconds=2.0, decode=False)
    assert {(i.line, i.kind) for i in quick.errors} == errors
    # an empty manifest is an error, not a success
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert [issue.kind for issue in check_manifest(empty).errors] == ["empty_manifest"]
    with pytest.raises(ValueError, match="require"):
        check_manifest(checked_manifest, require=["labels"])
    with pytest.raises(FileNotFoundError):
        check_manifest(tmp_path / "none.jsonl")


def test_check_training_data_and_clean_corpus(tiny_corpus, checked_manifest):
    from caad.data import DataCheckError, check_training_data

    for manifest in tiny_corpus.manifests.values():
        report = check_training_data(manifest, window_seconds=10.0, require=("label",))
        assert report.ok and not report.warnings and report.num_rows > 0
    with pytest.raises(DataCheckError) as info:
        check_training_data(checked_manifest, window_seconds=30.0)
    assert info.value.report.num_rows == 10
    assert "missing" in str(info.value)


def test_cli_data_check(checked_manifest, tiny_corpus, capsys):
    assert cli_main(["data", "check", str(tiny_corpus.test), "--require", "label"]) == 0
    assert "0 errors" in capsys.readouterr().out
    assert cli_main(["data", "check", str(checked_manifest), "--window-seconds", "2", "--max-seconds", "5"]) == 1
    out = capsys.readouterr().out
    assert f"{checked_manifest}, line 2 (row 'missing')" in out and "1 longer than the window" in out
    assert cli_main(["data", "check", str(checked_manifest), "--require", "nothing"]) == 2
    assert "--require" in capsys.readouterr().err


def test_load_clip_truncates_like_the_processor(tmp_path):
    from caad.data import load_clip

    (tmp_path / "a.wav").write_bytes(_wav_bytes(2.0))
    full, cut = load_clip(tmp_path / "a.wav", 16000)
    assert not cut and full.size == 32000
    head, cut = load_clip(tmp_path / "a.wav", 16000, max_samples=16000)
    assert cut and head.size == 16000
    np.testing.assert_array_equal(head, full[:16000])  # the first window, as the processor keeps
    with pytest.raises(ValueError, match=r"a\.wav is 2\.000 s long"):
        load_clip(tmp_path / "a.wav", 16000, min_samples=40000)


class _Words:
    """Whitespace tokenizer: one token per word (an exact reference); ids index a growing vocabulary."""

    def __init__(self) -> None:
        self.vocab: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab.append(word)
            ids.append(self.vocab.index(word))
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.vocab[i] for i in ids)


def test_fit_max_length():
    from caad.data import fit_max_length

    tokenizer = _Words()
    rows = [
        ManifestRow(id=f"r{n}", audio="a.wav", sampling_rate=16000, instruction="one two three", task="t",
                    pseudo_gt=" ".join(f"w{i}" for i in range(n)))  # fmt: skip
        for n in (2, 6, 12)
    ]
    # prompt: 3 words + 4 (audio tokens) = 7; target n words + eos
    kept, report = fit_max_length(rows, tokenizer, 14, prompt_tokens=4)
    assert [r.id for r in kept] == ["r2", "r6", "r12"] and report.truncated == ["r12"] and report.filtered == []
    assert kept[2].pseudo_gt == "w0 w1 w2 w3 w4 w5" and rows[2].pseudo_gt.endswith("w11")  # inputs untouched
    assert 7 + len(kept[2].pseudo_gt.split()) + 1 == 14 and report.longest == 7 + 12 + 1
    kept, report = fit_max_length(rows, tokenizer, 14, policy="filter", prompt_tokens=4)
    assert [r.id for r in kept] == ["r2", "r6"] and report.filtered == ["r12"]
    kept, report = fit_max_length(rows, tokenizer, 8, prompt_tokens=lambda row: 7)
    assert kept == [] and report.filtered == ["r2", "r6", "r12"]  # no room for one target token
    with pytest.raises(ValueError, match="row 'r12'.*max_length 14"):
        fit_max_length(rows, tokenizer, 14, policy="error", prompt_tokens=4)
    with pytest.raises(ValueError, match="policy"):
        fit_max_length(rows, tokenizer, 14, policy="drop")
    assert "1 targets truncated" in fit_max_length(rows, tokenizer, 14, prompt_tokens=4)[1].summary()


# ------------------------------------------------------------------------------------------- importers


def _superb_dataset(folder: Path) -> Path:
    """A tiny Dynamic-SUPERB-like dataset: the HF columns and features, written with save_to_disk and
    as a hub-style parquet snapshot (no torchcodec needed: the audio is stored as bytes)."""
    import datasets
    import pyarrow as pa

    features = datasets.Features(
        {
            "file": datasets.Value("string"),
            "audio": datasets.Audio(sampling_rate=16000),
            "instruction": datasets.Value("string"),
            "label": datasets.Value("string"),
        }
    )
    labels = ["happy", "sad", "happy", None]
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "file": [f"clip{i}.wav" for i in range(4)],
            "audio": pa.array(
                [
                    {"bytes": _wav_bytes(0.5 + 0.1 * i, frequency=200 + 50 * i), "path": f"clip{i}.wav"}
                    for i in range(4)
                ],
                type=audio_type,
            ),
            "instruction": ["Is the speaker happy or sad? Answer happy or sad."] * 4,
            "label": labels,
        }
    )
    dataset = datasets.Dataset(table, info=datasets.DatasetInfo(features=features))
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(folder / "EmotionRecognition_Tiny"))
    snapshot = folder / "snapshot" / "data"
    snapshot.mkdir(parents=True)
    dataset.to_parquet(str(snapshot / "test-00000-of-00001.parquet"))
    return folder / "EmotionRecognition_Tiny"


def test_import_dynamic_superb(tmp_path, capsys):
    from caad.data import DatasetImportError, import_dynamic_superb

    source = _superb_dataset(tmp_path)
    result = import_dynamic_superb(source, tmp_path / "out", category="paralinguistics", progress=False)
    assert result.rows == {"test": 3} and result.skipped == 1
    rows = read_manifest(tmp_path / "out" / "test.jsonl")
    assert [r.id for r in rows] == [f"EmotionRecognition_Tiny-test-00000{i}" for i in range(3)]
    assert [r.label for r in rows] == ["happy", "sad", "happy"]
    for index, row in enumerate(rows):
        assert row.task == "EmotionRecognition_Tiny" and row.category == "paralinguistics"
        assert row.choices == ["happy", "sad"] and row.metadata["file"] == f"clip{index}.wav"
        assert row.sampling_rate == 16000 and not Path(row.audio).is_absolute()
        expected, _ = soundfile.read(io.BytesIO(_wav_bytes(0.5 + 0.1 * index, frequency=200 + 50 * index)))
        np.testing.assert_allclose(load_audio(row.audio_path), expected, atol=1e-4)
    assert check_manifest_ok(tmp_path / "out" / "test.jsonl")
    # the parquet snapshot gives the same rows; the split comes from the file name
    snap = import_dynamic_superb(tmp_path / "snapshot", tmp_path / "out2", task="Emo", progress=False)
    assert snap.rows == {"test": 3}
    assert [r.label for r in read_manifest(tmp_path / "out2" / "test.jsonl")] == ["happy", "sad", "happy"]
    # no silent overwrite; --overwrite replaces an earlier import only
    with pytest.raises(FileExistsError, match="overwrite"):
        import_dynamic_superb(source, tmp_path / "out", progress=False)
    import_dynamic_superb(source, tmp_path / "out", overwrite=True, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not written by an import"):
        import_dynamic_superb(source, mine, overwrite=True, progress=False)
    with pytest.raises(DatasetImportError, match="no dataset found"):
        import_dynamic_superb(mine, tmp_path / "out3", progress=False)
    assert not (tmp_path / "out3").exists()
    # the command line
    argv = ["data", "import", "dynamic-superb", str(source), "--out", str(tmp_path / "cli"), "--no-progress"]
    assert cli_main(argv) == 0
    assert "test.jsonl (3 rows)" in capsys.readouterr().out


def check_manifest_ok(path: Path) -> bool:
    from caad.data import check_manifest

    return check_manifest(path, require=["label"]).ok


def _mcr_bench(folder: Path) -> Path:
    """A tiny MCR-BENCH copy: SER/SER.json (the release's keys) with audio beside it."""
    root = folder / "MCR-BENCH"
    (root / "SER" / "audio").mkdir(parents=True)
    samples = []
    for index, (truth, wrong) in enumerate([("happy", "sad"), ("sad", "angry"), ("angry", "happy")]):
        (root / "SER" / "audio" / f"{index}.wav").write_bytes(_wav_bytes(0.4 + 0.1 * index))
        samples.append(
            {
                "audio": f"audio/{index}.wav",
                "gt": truth,
                "neutral": "What emotion does the speaker express: happy, sad or angry?",
                "faithful": f"The speaker sounds {truth}.",
                "adversarial": f"The speaker sounds {wrong}." if index < 2 else "The speaker is calm, not happy.",
                "irrelevant": "A car passes by on a wet road.",
            }
        )
    samples.append({"audio": "audio/0.wav", "neutral": "no ground truth"})
    (root / "SER" / "SER.json").write_text(json.dumps(samples))
    return root


def test_import_mcr_bench(tmp_path, capsys):
    from caad.data import DatasetImportError, import_mcr_bench
    from caad.eval.runner import task_labels

    source = _mcr_bench(tmp_path)
    result = import_mcr_bench(source, tmp_path / "out", progress=False)
    assert result.rows == {"SER": 12, "test": 12} and result.skipped == 1
    rows = read_manifest(tmp_path / "out" / "test.jsonl")
    groups = defaultdict(dict)
    for row in rows:
        groups[row.group][row.condition] = row
    assert list(groups) == ["mcr-SER-00000", "mcr-SER-00001", "mcr-SER-00002"]
    question = "What emotion does the speaker express: happy, sad or angry?"
    for members in groups.values():
        assert set(members) == {"neutral", "faithful", "adversarial", "irrelevant"}
        assert members["neutral"].instruction == question and members["neutral"].context is None
        for condition in ("faithful", "adversarial", "irrelevant"):
            row = members[condition]
            assert row.instruction == f"{row.context} {question}" and row.id == f"{row.group}-{condition}"
        assert members["faithful"].context_label == members["faithful"].label
        assert len({r.audio_path.resolve() for r in members.values()}) == 1
    assert [groups[g]["adversarial"].context_label for g in groups] == ["sad", "angry", None]  # "not happy": negated
    assert rows[0].choices == ["happy", "sad", "angry"] and task_labels(rows)["SER"] == ["happy", "sad", "angry"]
    assert check_manifest_ok(tmp_path / "out" / "SER.jsonl")
    with pytest.raises(DatasetImportError, match="no task"):
        import_mcr_bench(source, tmp_path / "o2", tasks=["AQA"], progress=False)
    (source / "SER" / "audio" / "1.wav").unlink()
    with pytest.raises(DatasetImportError, match="sample 1: audio file 'audio/1.wav' not found"):
        import_mcr_bench(source, tmp_path / "o3", progress=False)
    assert not (tmp_path / "o3").exists()
    assert cli_main(["data", "import", "mcr-bench", str(source), "--out", str(tmp_path / "o4")]) == 2
    assert "not found" in capsys.readouterr().err
