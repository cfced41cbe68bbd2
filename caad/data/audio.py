"""Audio I/O, resampling, log-mel features and a pitch (F0) estimate.

Works without torchaudio (no CPU build of torchaudio matches torch here): files are read and
written with ``soundfile``, resampling is a band-limited (Kaiser-windowed sinc) polyphase
interpolator in numpy, and log-mel features come from transformers' ``WhisperFeatureExtractor``
built from parameters (never from the hub). ``resample(..., backend="torchaudio")`` uses
torchaudio when it is importable and built for the installed torch.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from transformers import WhisperFeatureExtractor

__all__ = [
    "AudioError",
    "estimate_f0",
    "load_audio",
    "log_mel_features",
    "resample",
    "torchaudio_available",
    "whisper_feature_extractor",
    "write_wav",
]


class AudioError(ValueError):
    """An audio file is unreadable, empty, or a waveform argument is malformed."""


def load_audio(path: str | os.PathLike[str], target_sampling_rate: int | None = 16000) -> np.ndarray:
    """Read an audio file as a mono float32 waveform in [-1, 1].

    Args:
        path: any format libsndfile reads (WAV, FLAC, OGG, ...).
        target_sampling_rate: resample to this rate (Hz); ``None`` keeps the file's rate.

    Channels are averaged. Raises ``FileNotFoundError`` for a missing file and :class:`AudioError`
    for an unreadable or empty one (the message names the file).
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, sampling_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"cannot read audio file {path}: {error}") from error
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} contains no samples")
    waveform = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if target_sampling_rate is not None and int(target_sampling_rate) != int(sampling_rate):
        waveform = resample(waveform, int(sampling_rate), int(target_sampling_rate))
    return np.ascontiguousarray(waveform, dtype=np.float32)


def write_wav(path: str | os.PathLike[str], waveform: np.ndarray, sampling_rate: int) -> None:
    """Write a mono waveform as 16-bit PCM WAV: float input in [-1, 1] (clipped), or int16 as is."""
    import soundfile

    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise AudioError(f"write_wav expects a mono 1-D waveform, got shape {waveform.shape}")
    if waveform.dtype != np.int16:
        scaled = np.round(np.clip(waveform.astype(np.float64), -1.0, 1.0) * 32767.0)
        waveform = scaled.astype(np.int16)
    # Encode in memory and write plainly: soundfile's own file close fsyncs, ~10 ms a file.
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, int(sampling_rate), subtype="PCM_16", format="WAV")
    Path(path).write_bytes(buffer.getvalue())


@functools.lru_cache(maxsize=1)
def torchaudio_available() -> bool:
    """True when torchaudio imports and its version matches the installed torch (major.minor)."""
    try:
        import torch
        import torchaudio
    except Exception:  # noqa: BLE001 - a mismatched build can raise anything at import
        return False
    return torchaudio.__version__.split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]


def _kaiser(x: np.ndarray, beta: float) -> np.ndarray:
    inside = np.clip(1.0 - x * x, 0.0, None)
    return np.i0(beta * np.sqrt(inside)) / np.i0(beta)


def _sinc_weights(frac: np.ndarray, taps: np.ndarray, cutoff: float, half_width: int, beta: float) -> np.ndarray:
    # distance (in input samples) from the output position to each contributing input sample
    t = frac[:, None] - taps[None, :]
    return cutoff * np.sinc(cutoff * t) * _kaiser(t / half_width, beta)


@functools.lru_cache(maxsize=16)
def _polyphase_table(up: int, cutoff: float, half_width: int, beta: float) -> np.ndarray:
    taps = np.arange(-half_width + 1, half_width + 1)
    table = _sinc_weights(np.arange(up) / up, taps, cutoff, half_width, beta)
    table.setflags(write=False)
    return table


def resample(
    waveform: np.ndarray,
    orig_sampling_rate: int,
    target_sampling_rate: int,
    *,
    zero_crossings: int = 16,
    rolloff: float = 0.95,
    beta: float = 8.6,
    backend: str = "numpy",
) -> np.ndarray:
    """Band-limited resampling of a 1-D waveform (float32 out).

    Polyphase windowed-sinc interpolation: output sample ``n`` sits at input position
    ``n * orig / target`` (exact integer arithmetic), and is the sum of ``2 * W`` neighbouring input
    samples weighted by a Kaiser-windowed sinc whose cutoff is ``rolloff`` times the lower of the
    two Nyquist frequencies (so downsampling does not alias). ``W = zero_crossings / cutoff``.
    Output length is ``ceil(len * target / orig)``. ``backend="torchaudio"`` uses
    ``torchaudio.functional.resample`` instead (only when :func:`torchaudio_available`).
    """
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise AudioError(f"resample expects a mono 1-D waveform, got shape {waveform.shape}")
    for name, value in (
        ("orig_sampling_rate", orig_sampling_rate),
        ("target_sampling_rate", target_sampling_rate),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    x = waveform.astype(np.float32) / (32768.0 if waveform.dtype == np.int16 else 1.0)
    if orig_sampling_rate == target_sampling_rate or x.size == 0:
        return x.astype(np.float32)
    if backend == "torchaudio":
        if not torchaudio_available():
            raise ValueError("backend='torchaudio' needs torchaudio built for the installed torch")
        import torch
        import torchaudio

        out = torchaudio.functional.resample(torch.from_numpy(x), orig_sampling_rate, target_sampling_rate)
        return out.numpy().astype(np.float32)
    if backend != "numpy":
        raise ValueError(f"backend must be 'numpy' or 'torchaudio', got {backend!r}")

    g = math.gcd(int(orig_sampling_rate), int(target_sampling_rate))
    up, down = int(target_sampling_rate) // g, int(orig_sampling_rate) // g
    cutoff = rolloff * min(1.0, up / down)  # in units of the input Nyquist frequency
    half_width = int(math.ceil(zero_crossings / cutoff))
    taps = np.arange(-half_width + 1, half_width + 1)  # input offsets relative to floor(position)
    n_out = -(-x.size * up // down)
    padded = np.concatenate([np.zeros(half_width, np.float64), x.astype(np.float64), np.zeros(half_width + 1)])
    out = np.empty(n_out, dtype=np.float64)
    # Output n reads padded[base(n) + 1 : base(n) + 1 + 2W] with base(n) = floor(n * down / up).
    if up <= 4096:
        # Outputs n = r, r + up, r + 2 up, ... share one phase and step by `down` input samples:
        # a strided view and one matrix-vector product per phase, no gather.
        table = _polyphase_table(up, cutoff, half_width, beta)
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half_width)
        for r in range(min(up, n_out)):
            count = len(range(r, n_out, up))
            first = (r * down) // up + 1
            rows = windows[first : first + down * (count - 1) + 1 : down]
            out[r::up] = rows @ table[(r * down) % up]
    else:  # an unusual rate pair with very many phases: weights computed per output sample
        block = 16384
        for start in range(0, n_out, block):
            n = np.arange(start, min(start + block, n_out), dtype=np.int64)
            base = (n * down) // up
            weights = _sinc_weights(((n * down) % up) / up, taps, cutoff, half_width, beta)
            window = padded[(base + half_width)[:, None] + taps[None, :]]
            out[start : start + n.size] = np.einsum("ij,ij->i", window, weights)
    return out.astype(np.float32)


@functools.lru_cache(maxsize=8)
def whisper_feature_extractor(
    n_mels: int = 80,
    sampling_rate: int = 16000,
    hop_length: int = 160,
    chunk_length: int = 30,
    n_fft: int = 400,
) -> WhisperFeatureExtractor:
    """A ``WhisperFeatureExtractor`` built from parameters (no hub access); Whisper's defaults
    (80 mel bins, 16 kHz, 10 ms hop, 30 s windows; large-v3 uses 128 bins)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=sampling_rate,
        hop_length=hop_length,
        chunk_length=chunk_length,
        n_fft=n_fft,
        padding_value=0.0,
        return_attention_mask=True,
    )


def log_mel_features(
    waveforms: np.ndarray | Sequence[np.ndarray],
    sampling_rate: int = 16000,
    n_mels: int = 80,
    padding: str = "max_length",
    chunk_length: int = 30,
) -> dict[str, np.ndarray]:
    """Whisper log-mel features of one waveform or a batch.

    Args:
        waveforms: a 1-D float waveform or a sequence of them, at ``sampling_rate``.
        sampling_rate: must match the extractor's rate (resample with :func:`load_audio` first).
        n_mels: 80 (Whisper up to large-v2, Qwen2-Audio) or 128 (large-v3).
        padding: ``"max_length"`` pads/truncates to ``chunk_length`` seconds (3000 frames, what
            Whisper encoders expect); ``"longest"`` pads to the longest clip of the batch.
        chunk_length: the window in seconds for ``"max_length"``.

    Returns:
        ``{"input_features": float32 [batch, n_mels, frames], "attention_mask": int32 [batch, frames]}``.
    """
    if padding not in ("max_length", "longest"):
        raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
        batch = [waveforms]
    else:
        batch = list(waveforms)
    if not batch:
        raise AudioError("log_mel_features needs at least one waveform")
    checked = []
    for index, waveform in enumerate(batch):
        array = np.asarray(waveform, dtype=np.float32)
        if array.ndim != 1 or array.size == 0:
            raise AudioError(f"waveforms[{index}] must be a non-empty 1-D array, got shape {array.shape}")
        checked.append(array)
    extractor = whisper_feature_extractor(n_mels=n_mels, sampling_rate=sampling_rate, chunk_length=chunk_length)
    kwargs: dict[str, Any] = {"padding": padding, "return_attention_mask": True, "return_tensors": "np"}
    if padding == "max_length":
        kwargs["max_length"] = extractor.n_samples
        kwargs["truncation"] = True
    features = extractor(checked, sampling_rate=sampling_rate, **kwargs)
    frames = features["input_features"].shape[-1]
    mask = np.asarray(features["attention_mask"])
    if mask.shape[-1] != frames:  # a sample-level mask (older transformers): one entry per hop
        mask = mask[:, :: extractor.hop_length][:, :frames]
    return {
        "input_features": np.asarray(features["input_features"], dtype=np.float32),
        "attention_mask": np.asarray(mask, dtype=np.int32),
    }


def estimate_f0(
    waveform: np.ndarray,
    sampling_rate: int,
    fmin: float = 50.0,
    fmax: float = 400.0,
    frame_seconds: float = 0.06,
    hop_seconds: float = 0.02,
    voicing_threshold: float = 0.5,
) -> float:
    """Median fundamental frequency (Hz) of the voiced frames, by autocorrelation.

    Frames of ``frame_seconds`` every ``hop_seconds`` (60 ms: three periods at the 50 Hz floor; with
    40 ms the autocorrelation of a 70 Hz voice is too weak at its period and fast low male speech
    was misread); frames quieter than 10% of the loudest frame
    are skipped; in each, the lag in ``[sr/fmax, sr/fmin]`` with the largest autocorrelation is the
    period, and the frame counts as voiced when that peak is at least ``voicing_threshold`` times
    the zero-lag value. Returns ``nan`` when no frame is voiced. Good enough to tell voices and
    pitch settings apart; not a production pitch tracker.
    """
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise AudioError(f"estimate_f0 expects a mono 1-D waveform, got shape {x.shape}")
    x = x.astype(np.float64) / (32768.0 if x.dtype == np.int16 else 1.0)
    frame = int(round(frame_seconds * sampling_rate))
    hop = max(1, int(round(hop_seconds * sampling_rate)))
    min_lag = max(1, int(sampling_rate / fmax))
    max_lag = min(frame - 1, int(math.ceil(sampling_rate / fmin)))
    if x.size < frame or min_lag >= max_lag:
        return float("nan")
    starts = np.arange(0, x.size - frame + 1, hop)
    frames = x[starts[:, None] + np.arange(frame)[None, :]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    energy = np.sqrt((frames**2).mean(axis=1))
    frames = frames[energy >= 0.1 * energy.max()] if energy.max() > 0 else frames[:0]
    if frames.shape[0] == 0:
        return float("nan")
    size = 1 << int(math.ceil(math.log2(frame + max_lag + 1)))  # no circular wrap up to max_lag
    spectrum = np.fft.rfft(frames, n=size, axis=1)
    autocorr = np.fft.irfft(np.abs(spectrum) ** 2, n=size, axis=1)[:, : max_lag + 1]
    lags = min_lag + np.argmax(autocorr[:, min_lag : max_lag + 1], axis=1)
    peak = autocorr[np.arange(autocorr.shape[0]), lags]
    voiced = peak >= voicing_threshold * autocorr[:, 0]
    if not voiced.any():
        return float("nan")
    return float(np.median(sampling_rate / lags[voiced]))
