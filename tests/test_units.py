"""Speech units: k-means, merging repeats, the unit tokenizer's determinism, files and unit rate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caad.data.units import (
    UNITS_JSON,
    UNITS_NPZ,
    UnitFeatureConfig,
    UnitTokenizer,
    kmeans,
    merge_repeats,
    stacked_frames,
    train_unit_tokenizer,
)


def _blobs(seed: int = 0, per: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    truth = np.repeat(np.arange(4), per)
    return centres[truth] + rng.normal(scale=0.5, size=(truth.size, 3)), truth


def test_kmeans_recovers_separated_blobs_and_is_a_lloyd_fixed_point():
    x, truth = _blobs()
    result = kmeans(x, 4, seed=3)
    assert result.converged
    # the partition equals the generating one up to a relabelling
    pairs = set(zip(truth.tolist(), result.labels.tolist()))
    assert len(pairs) == 4 and len({label for _, label in pairs}) == 4
    # fixed point: every point sits at its nearest centroid (brute force), every centroid is its points' mean
    brute = ((x[:, None, :] - result.centroids[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(result.labels, brute.argmin(1))
    for k in range(4):
        np.testing.assert_allclose(result.centroids[k], x[result.labels == k].mean(0), atol=1e-9)
    np.testing.assert_allclose(result.inertia, brute.min(1).sum(), rtol=1e-9)


def test_kmeans_is_deterministic_for_a_seed_and_checks_arguments():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    a, b = kmeans(x, 7, seed=5), kmeans(x, 7, seed=5)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(kmeans(x, 7, seed=6).centroids, a.centroids)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 301)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.full((3, 2), np.nan), 2)


def test_merge_repeats_against_a_python_loop():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 3, size=200)
    units, durations = merge_repeats(frames)
    expected_units, expected_durations = [], []
    for value in frames.tolist():
        if expected_units and expected_units[-1] == value:
            expected_durations[-1] += 1
        else:
            expected_units.append(value)
            expected_durations.append(1)
    assert units.tolist() == expected_units and durations.tolist() == expected_durations
    assert merge_repeats([])[0].size == 0


def test_stacked_frames_shapes_and_rate():
    config = UnitFeatureConfig(stack=2, n_cepstra=None)
    assert config.frame_rate == 50.0 and config.dim == 160 and UnitFeatureConfig().dim == 40
    one_second = np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000).astype(np.float32) * 0.3
    frames = stacked_frames(one_second, config)
    assert frames.shape[1] == 160 and abs(frames.shape[0] - 50) <= 1
    # utterance normalisation: the unstacked frames have zero mean per mel bin
    np.testing.assert_allclose(frames.reshape(-1, 80).mean(0), 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="sampling_rate"):
        UnitFeatureConfig(sampling_rate=8000)


def test_cepstra_are_an_orthonormal_dct_of_the_log_mel_frames():
    rng = np.random.default_rng(4)
    waveform = (0.1 * rng.normal(size=8000)).astype(np.float32)
    mel = stacked_frames(waveform, UnitFeatureConfig(utterance_norm=False, n_cepstra=None)).reshape(-1, 80)
    full = stacked_frames(waveform, UnitFeatureConfig(utterance_norm=False, n_cepstra=80)).reshape(-1, 80)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), np.linalg.norm(mel, axis=1), rtol=1e-9)  # a rotation
    np.testing.assert_allclose(full[:, 0], mel.sum(1) / np.sqrt(80), rtol=1e-9)  # DC term
    # the k-th coefficient is the projection on cos(pi (n + 1/2) k / N), up to the normalisation
    k = 5
    cosine = np.cos(np.pi * (np.arange(80) + 0.5) * k / 80)
    np.testing.assert_allclose(full[:, k], mel @ cosine * np.sqrt(2 / 80), rtol=1e-9, atol=1e-9)
    short = stacked_frames(waveform, UnitFeatureConfig(utterance_norm=False, n_cepstra=20, stack=1))
    np.testing.assert_allclose(short, full[:, :20], atol=1e-9)
    with pytest.raises(ValueError, match="n_cepstra"):
        UnitFeatureConfig(n_cepstra=81)


@pytest.fixture(scope="module")
def corpus_waveforms(tiny_corpus_rows):
    from caad.data import load_audio

    paths = sorted({row.audio_path for row in tiny_corpus_rows})
    return [load_audio(path) for path in paths]


@pytest.fixture(scope="module")
def unit_tokenizer(corpus_waveforms):
    return train_unit_tokenizer(corpus_waveforms[:12], n_units=32, seed=0)


def test_unit_tokenizer_is_deterministic_and_seeded(corpus_waveforms, unit_tokenizer):
    again = train_unit_tokenizer(corpus_waveforms[:12], n_units=32, seed=0)
    np.testing.assert_array_equal(again.centroids, unit_tokenizer.centroids)
    for waveform in corpus_waveforms[12:15]:
        np.testing.assert_array_equal(again.encode(waveform), unit_tokenizer.encode(waveform))
    other = train_unit_tokenizer(corpus_waveforms[:12], n_units=32, seed=1)
    assert not np.array_equal(other.centroids, unit_tokenizer.centroids)


def test_encode_merges_the_nearest_centroid_frames(corpus_waveforms, unit_tokenizer):
    waveform = corpus_waveforms[13]
    vectors = unit_tokenizer.features(waveform)
    brute = ((vectors[:, None, :] - unit_tokenizer.centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(unit_tokenizer.frame_units(waveform), brute)
    units, durations = unit_tokenizer.encode_with_durations(waveform)
    assert (units[1:] != units[:-1]).all()
    assert durations.sum() == brute.size and units.min() >= 0 and units.max() < 32
    # units per second: merged units over the clip's seconds, and fewer than frames per second
    rate = unit_tokenizer.unit_rate([waveform])
    assert rate == pytest.approx(units.size / (waveform.size / 16000))
    assert 0 < unit_tokenizer.stats["unit_rate_hz"] < unit_tokenizer.frame_rate
    # int16 samples are read as samples / 32768
    as_int16 = np.round(waveform * 32767).astype(np.int16)
    np.testing.assert_array_equal(unit_tokenizer.encode(as_int16), unit_tokenizer.encode(as_int16 / 32768.0))


def test_save_load_round_trip_without_pickle(tmp_path, corpus_waveforms, unit_tokenizer):
    json_path, npz_path = unit_tokenizer.save(tmp_path)
    assert json_path.name == UNITS_JSON and npz_path.name == UNITS_NPZ
    info = json.loads(json_path.read_text())
    assert info["n_units"] == 32 and info["stats"]["n_clips"] == 12
    loaded = UnitTokenizer.load(tmp_path)
    np.testing.assert_array_equal(loaded.centroids, unit_tokenizer.centroids)
    assert loaded.config == unit_tokenizer.config
    np.testing.assert_array_equal(loaded.encode(corpus_waveforms[14]), unit_tokenizer.encode(corpus_waveforms[14]))
    with pytest.raises(FileExistsError):
        unit_tokenizer.save(tmp_path)
    with np.load(npz_path, allow_pickle=False) as arrays:
        assert all(arrays[name].dtype == np.float32 for name in arrays.files)
    info["format"] = "something-else"
    json_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="not a caad speech-unit tokenizer"):
        UnitTokenizer.load(tmp_path)


def test_train_checks_arguments(corpus_waveforms):
    with pytest.raises(ValueError, match="n_units"):
        train_unit_tokenizer(corpus_waveforms[:1], n_units=1)
    with pytest.raises(ValueError, match="fewer than n_units"):
        train_unit_tokenizer([corpus_waveforms[0][:3200]], n_units=64, max_frames=64)
    with pytest.raises(ValueError, match="at least one"):
        train_unit_tokenizer([], n_units=4)
