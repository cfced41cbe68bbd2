"""caad.data: the built-in speech corpus, manifests, audio I/O and features, the espeak-ng wrapper."""

from __future__ import annotations

import json
import os
import re
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
from caad.data.synth import split_counts
from caad.data.tasks import make_specs
from caad.stage1.templates import contains_label

SENTENCE = "The quick brown fox jumps over the lazy river today."


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- corpus


def test_corpus_layout_and_audio(tiny_corpus, tiny_corpus_rows):
    info = json.loads(tiny_corpus.info.read_text())
    assert info["num_examples"] == 24 and info["seed"] == 0
    assert sum(info["splits"].values()) == 24
    assert set(tiny_corpus.manifests) == {"train", "validation", "test"}
    assert all(info["splits"][name] >= 1 for name in tiny_corpus.manifests)
    assert len(tiny_corpus_rows) == 24 and len({row.id for row in tiny_corpus_rows}) == 24
    for row in tiny_corpus_rows:
        assert row.audio_path.is_file()
        assert not Path(row.audio).is_absolute()  # the corpus folder can be moved
        waveform = load_audio(row.audio_path)
        assert waveform.dtype == np.float32 and waveform.ndim == 1
        assert row.sampling_rate == 16000
        assert abs(waveform.size / 16000 - row.metadata["duration_s"]) < 1e-3
        assert 0.05 < np.abs(waveform).max() <= 1.0
    # every voice x rate x pitch combination once in a 24-example corpus; tasks balanced
    combos = {(r.metadata["speaker"], r.metadata["rate"], r.metadata["pitch"]) for r in tiny_corpus_rows}
    assert len(combos) == 24
    tasks = defaultdict(int)
    for row in tiny_corpus_rows:
        tasks[row.task] += 1
    assert dict(tasks) == {"speaker_gender": 6, "speaking_rate": 6, "pitch_level": 6, "spoken_content": 6}


def test_labels_and_hints_match_metadata(tiny_corpus_rows):
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
        if row.task == "spoken_content":
            assert m["keyword"] in row.instruction and m["distractor"] in row.instruction
        # the contradicting hint suggests a wrong answer and names it; the neutral one names no label
        assert row.hint_contradicting_label != row.label
        assert row.hint_neutral and row.hint_contradicting
        assert not contains_label(row.hint_neutral, row.label)
        hint_words = {
            "male": ("man", "male"),
            "female": ("woman", "female"),
            "slow": ("slowly",),
            "fast": ("fast",),
            "low": ("low-pitched",),
            "high": ("high-pitched",),
        }.get(row.hint_contradicting_label, (row.hint_contradicting_label,))
        assert any(word in re.findall(r"[a-z-]+", row.hint_contradicting.lower()) for word in hint_words), row


def test_durations_differ_by_speaking_rate(tiny_corpus_rows):
    slow, _ = synthesize(SENTENCE, "m3", rate_wpm=120)
    fast, _ = synthesize(SENTENCE, "m3", rate_wpm=240)
    assert slow.size > 1.5 * fast.size
    per_word = defaultdict(list)
    for row in tiny_corpus_rows:
        per_word[row.metadata["rate"]].append(row.metadata["duration_s"] / row.metadata["num_words"])
    assert min(per_word["slow"]) > max(per_word["fast"])
    assert np.mean(per_word["slow"]) > np.mean(per_word["normal"]) > np.mean(per_word["fast"])


def test_pitch_differs_by_setting_and_voice(tiny_corpus_rows):
    f0 = {}
    for voice in VOICES:
        for pitch in (25, 75):
            samples, rate = synthesize(SENTENCE, voice, pitch=pitch)
            f0[voice, pitch] = estimate_f0(samples, rate)
    for voice in VOICES:
        assert f0[voice, 75] > 1.3 * f0[voice, 25], f0
    for male in ("m3", "m1"):
        for female in ("f3", "f2"):
            for pitch in (25, 75):
                assert f0[female, pitch] > 1.5 * f0[male, pitch], f0
    # in the corpus: the measured F0 (recomputed from the files) follows the settings
    by = defaultdict(list)
    for row in tiny_corpus_rows:
        measured = estimate_f0(load_audio(row.audio_path), 16000)
        assert abs(measured - row.metadata["f0_hz"]) < 0.5
        by[row.metadata["speaker"], row.metadata["pitch"]].append(measured)
        by[row.metadata["gender"]].append(measured)
    for voice in VOICES:
        assert min(by[voice, "high"]) > max(by[voice, "low"])
    assert np.mean(by["female"]) > 1.5 * np.mean(by["male"])


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
    real_row, calls = synth._row, []

    def failing_row(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_row(*args, **kwargs)

    monkeypatch.setattr(synth, "_row", failing_row)
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
    ]
    path = write_manifest(corpus / "m.jsonl", rows)
    back = read_manifest(path)
    assert back[0].extra == {"custom": [1, 2]} and back[0].label == "male"
    assert back[1].hint_neutral == "n" and back[1].metadata == {"nested": {"k": 1}}
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
    assert dataset[0]["hint_contradicting"] == rows[0].hint_contradicting


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
    assert len(read_manifest(out / "train.jsonl")) + len(read_manifest(out / "test.jsonl")) == 2
    assert cli_main(args) == 2
    assert "overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert cli_main(["data", "synth", "--out", str(tmp_path / "z"), "--num-examples", "0", "--no-progress"]) == 2
    assert os.listdir(tmp_path) == ["cli"]
