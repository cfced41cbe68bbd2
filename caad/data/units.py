"""Discrete speech units: k-means over log-mel frames, consecutive repeats merged.

A :class:`UnitTokenizer` turns a 16 kHz waveform into a sequence of unit ids in ``[0, n_units)``:

1. **Frames.** Whisper log-mel features of the clip alone (:func:`caad.data.audio.log_mel_features`,
   ``padding="longest"``, so a clip's features never depend on the rest of a batch): ``n_mels`` bins
   every 10 ms (hop 160 at 16 kHz), only the frames of real audio.
2. **Cepstra** (``n_cepstra``, 20 by default; ``None`` skips this step): each log-mel frame is
   replaced by the first ``n_cepstra`` coefficients of its orthonormal DCT-II (MFCC-style), which
   keeps the spectral envelope (what is said) and drops the fine structure of the pitch harmonics
   (who says it, how high). The built-in corpus speaks every sentence in one of 4 voices x 3 rates x
   2 pitch levels: with the 80 log-mel bins as they are, a teacher unit LM trained on 192 clips
   stayed at chance on the StoryCloze-style pairs of :mod:`caad.eval.speech_lm` (50% of 48);
   with 20 cepstra the same run reached 58% (summed), 65% (per-unit mean), 67% (PMI scoring).
3. **Utterance normalisation** (``utterance_norm=True``, the default): the clip's mean frame
   is subtracted (cepstral-mean-style), which removes most of the channel and a part of the voice
   timbre, so units lean towards what is said rather than who says it.
4. **Stacking.** ``stack`` consecutive frames are concatenated (non-overlapping; a trailing partial
   group is dropped): with ``stack=2`` one vector of ``2 * (n_cepstra or n_mels)`` values every
   20 ms, a 50 Hz frame rate like HuBERT's.
5. **Standardisation** by the per-dimension mean and standard deviation of the training vectors.
6. **Nearest centroid** (squared Euclidean distance; ties go to the lower id) among ``n_units``
   k-means centroids: one unit per 20 ms frame (:meth:`UnitTokenizer.frame_units`).
7. **Merging repeats** (:func:`merge_repeats`): runs of one unit collapse to one unit, their lengths
   kept as durations in frames (:meth:`UnitTokenizer.encode_with_durations`).

Training (:func:`train_unit_tokenizer`) is k-means++ seeding followed by Lloyd iterations in numpy
(:func:`kmeans`), on at most ``max_frames`` vectors sampled with the seed: a pure function of the
waveforms and the arguments (same seed, same centroids). numpy rather than scikit-learn, which would
pull in scipy for one algorithm of 40 lines.

The unit rate (:meth:`UnitTokenizer.unit_rate`) is units per second of audio after merging; training
records it on the training clips in :attr:`UnitTokenizer.stats`.

Files (:meth:`UnitTokenizer.save`, :meth:`UnitTokenizer.load`), beside a model's tokenizer:
``speech_units.json`` (format, settings, training statistics) and ``speech_units.npz`` (``centroids``
``[n_units, dim]``, ``mean`` ``[dim]``, ``std`` ``[dim]``, float32), read with ``allow_pickle=False``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caad.data.audio import AudioError, log_mel_features, resample
from caad.data.files import write_text_atomic

__all__ = [
    "UNITS_FORMAT",
    "UNITS_JSON",
    "UNITS_NPZ",
    "KMeansResult",
    "UnitFeatureConfig",
    "UnitTokenizer",
    "kmeans",
    "merge_repeats",
    "train_unit_tokenizer",
]

UNITS_FORMAT = "caad-speech-units"
UNITS_VERSION = 1
UNITS_JSON = "speech_units.json"
UNITS_NPZ = "speech_units.npz"
_HOP_LENGTH = 160  # Whisper's 10 ms hop at 16 kHz (caad.data.audio.whisper_feature_extractor)


@dataclass(frozen=True)
class UnitFeatureConfig:
    """How frames are computed (module docstring, steps 1-4)."""

    sampling_rate: int = 16000
    """Rate the waveforms are given at (Hz); others are resampled to it."""
    n_mels: int = 80
    """Log-mel bins of the Whisper feature extractor (80 or 128)."""
    stack: int = 2
    """Consecutive 10 ms frames concatenated into one vector (2: 20 ms, 50 Hz)."""
    utterance_norm: bool = True
    """Subtract the clip's mean frame before stacking."""
    n_cepstra: int | None = 20
    """Keep the first ``n_cepstra`` coefficients of the orthonormal DCT-II of each log-mel frame
    (MFCC-style: the spectral envelope without the pitch harmonics); ``None`` keeps the log-mel bins.
    On the built-in corpus, 20 cepstra made the StoryCloze-style pairs far more separable than the
    80 log-mel bins (module docstring)."""

    def __post_init__(self) -> None:
        for name in ("sampling_rate", "n_mels", "stack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.sampling_rate != 16000:
            raise ValueError(f"sampling_rate must be 16000 (the Whisper feature extractor's), got {self.sampling_rate}")
        if not isinstance(self.utterance_norm, bool):
            raise ValueError(f"utterance_norm must be a bool, got {self.utterance_norm!r}")
        if self.n_cepstra is not None and (
            isinstance(self.n_cepstra, bool)
            or not isinstance(self.n_cepstra, int)
            or not 1 <= self.n_cepstra <= self.n_mels
        ):
            raise ValueError(f"n_cepstra must be None or an int in [1, n_mels={self.n_mels}], got {self.n_cepstra!r}")

    @property
    def dim(self) -> int:
        """Length of one stacked vector: ``stack * (n_cepstra or n_mels)``."""
        return self.stack * (self.n_cepstra or self.n_mels)

    @property
    def frame_rate(self) -> float:
        """Unit frames per second before merging: ``sampling_rate / (hop * stack)`` (50.0 by default)."""
        return self.sampling_rate / (_HOP_LENGTH * self.stack)


def _check_waveform(waveform: Any, name: str = "waveform") -> np.ndarray:
    array = np.asarray(waveform)
    if array.ndim != 1 or array.size == 0:
        raise AudioError(f"{name} must be a non-empty 1-D waveform, got shape {array.shape}")
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"{name} must be float in [-1, 1] or int16, got dtype {array.dtype}")
    return array.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _dct_matrix(n_mels: int, n_cepstra: int) -> np.ndarray:
    """The orthonormal DCT-II basis ``[n_mels, n_cepstra]`` (``frames @ basis`` gives the cepstra)."""
    n = np.arange(n_mels)[:, None]
    k = np.arange(n_cepstra)[None, :]
    basis = np.cos(np.pi * (n + 0.5) * k / n_mels) * np.sqrt(2.0 / n_mels)
    basis[:, 0] /= np.sqrt(2.0)
    basis.setflags(write=False)
    return basis


def stacked_frames(waveform: np.ndarray, config: UnitFeatureConfig, sampling_rate: int | None = None) -> np.ndarray:
    """The frame vectors before standardisation (steps 1-4) of one clip: float64 ``[frames, config.dim]``.

    ``sampling_rate`` is the waveform's rate (default ``config.sampling_rate``). A clip shorter than
    ``config.stack`` feature frames gives ``[0, dim]``.
    """
    x = _check_waveform(waveform)
    rate = config.sampling_rate if sampling_rate is None else sampling_rate
    if rate != config.sampling_rate:
        x = resample(x, int(rate), config.sampling_rate)
    features = log_mel_features(x, sampling_rate=config.sampling_rate, n_mels=config.n_mels, padding="longest")
    mel = features["input_features"][0]  # [n_mels, frames]
    valid = int(features["attention_mask"][0].sum())
    frames = mel[:, :valid].T.astype(np.float64)  # [frames, n_mels]
    if config.n_cepstra is not None:
        frames = frames @ _dct_matrix(config.n_mels, config.n_cepstra)
    if config.utterance_norm and frames.shape[0]:
        frames = frames - frames.mean(axis=0, keepdims=True)
    usable = (frames.shape[0] // config.stack) * config.stack
    return frames[:usable].reshape(-1, config.dim)


def merge_repeats(units: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse runs of equal consecutive units: ``(units int64 [n], durations int64 [n])``.

    ``durations[i]`` is the length of the ``i``-th run (in frames); ``durations.sum() == len(units)``.
    """
    array = np.asarray(units, dtype=np.int64).reshape(-1)
    if array.size == 0:
        return array.copy(), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], array[1:] != array[:-1]]))
    durations = np.diff(np.concatenate([starts, [array.size]]))
    return array[starts], durations.astype(np.int64)


@dataclass(frozen=True)
class KMeansResult:
    """``centroids`` float64 ``[k, dim]``, ``labels`` int64 ``[n]``, ``inertia`` (sum of squared
    distances to the assigned centroid), ``n_iter`` (Lloyd iterations run), ``converged``."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    converged: bool


def _sq_distances(x: np.ndarray, centroids: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    x_sq = (x * x).sum(axis=1) if x_sq is None else x_sq
    d = x_sq[:, None] - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(axis=1)[None, :]
    return np.maximum(d, 0.0)


def _nearest(x: np.ndarray, centroids: np.ndarray, x_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = _sq_distances(x, centroids, x_sq)
    labels = np.argmin(d, axis=1)  # first minimum: ties go to the lower id
    return labels.astype(np.int64), d[np.arange(x.shape[0]), labels]


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-6, chunk: int = 65536
) -> KMeansResult:
    """k-means++ seeding then Lloyd iterations on ``x`` ``[n, dim]`` (computed in float64).

    Seeding: the first centroid is a uniformly drawn point, each next one a point drawn with
    probability proportional to its squared distance to the nearest centroid so far
    (``numpy.random.default_rng(seed)``). Lloyd: assign every point to its nearest centroid, move each
    centroid to the mean of its points; an emptied cluster takes the point farthest from its centroid.
    Stops when no assignment changes, when the inertia falls by less than ``tol`` (relative), or after
    ``max_iter`` iterations. Deterministic for a seed. ``chunk`` bounds the rows of one distance block.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty 2-D array [n, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be an int in [1, {x.shape[0]}] (the number of points), got {k!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    x_sq = (x * x).sum(axis=1)

    def assign(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float64)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            labels[start:stop], dist[start:stop] = _nearest(x[start:stop], centroids, x_sq[start:stop])
        return labels, dist

    centroids = np.empty((k, x.shape[1]), dtype=np.float64)
    centroids[0] = x[rng.integers(n)]
    closest = np.maximum(x_sq - 2.0 * (x @ centroids[0]) + centroids[0] @ centroids[0], 0.0)
    for i in range(1, k):
        total = closest.sum()
        index = int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n))
        centroids[i] = x[index]
        closest = np.minimum(closest, np.maximum(x_sq - 2.0 * (x @ centroids[i]) + centroids[i] @ centroids[i], 0.0))

    labels, dist = assign(centroids)
    inertia = float(dist.sum())
    converged = False
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        counts = np.bincount(labels, minlength=k)
        order = np.argsort(labels, kind="stable")
        sums = np.zeros_like(centroids)
        present = np.flatnonzero(counts)
        # per-cluster sums of the points in label order (np.add.at is an order of magnitude slower)
        sums[present] = np.add.reduceat(x[order], np.concatenate([[0], np.cumsum(counts[present])[:-1]]), axis=0)
        new = centroids.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        empties = np.flatnonzero(~filled)
        if empties.size:  # re-seed each emptied cluster at one of the worst-fitted points
            worst = np.argsort(-dist, kind="stable")[: empties.size]
            new[empties] = x[worst]
        new_labels, new_dist = assign(new)
        new_inertia = float(new_dist.sum())
        changed = bool((new_labels != labels).any())
        centroids, labels, dist = new, new_labels, new_dist
        small_step = inertia - new_inertia <= tol * max(inertia, 1e-300)
        inertia = new_inertia
        if not changed or small_step:
            converged = True
            break
    return KMeansResult(centroids=centroids, labels=labels, inertia=inertia, n_iter=n_iter, converged=converged)


@dataclass
class UnitTokenizer:
    """A trained speech-unit tokenizer (module docstring).

    ``centroids`` float32 ``[n_units, dim]``, ``mean`` and ``std`` float32 ``[dim]`` (standardisation of
    the stacked vectors), ``config`` the frame settings, ``stats`` what training measured (JSON-able).
    """

    config: UnitFeatureConfig
    centroids: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    seed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dim = self.config.dim
        self.centroids = np.asarray(self.centroids, dtype=np.float32)
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.std = np.asarray(self.std, dtype=np.float32)
        if self.centroids.ndim != 2 or self.centroids.shape[1] != dim or self.centroids.shape[0] < 1:
            raise ValueError(f"centroids must be [n_units, {dim}], got shape {self.centroids.shape}")
        if self.mean.shape != (dim,) or self.std.shape != (dim,):
            raise ValueError(f"mean and std must be [{dim}], got {self.mean.shape} and {self.std.shape}")
        if not (np.isfinite(self.centroids).all() and np.isfinite(self.mean).all() and (self.std > 0).all()):
            raise ValueError("centroids and mean must be finite and std positive")

    @property
    def n_units(self) -> int:
        """Number of distinct units (the k of k-means)."""
        return int(self.centroids.shape[0])

    @property
    def frame_rate(self) -> float:
        """Unit frames per second before merging (:attr:`UnitFeatureConfig.frame_rate`)."""
        return self.config.frame_rate

    def features(self, waveform: np.ndarray, sampling_rate: int | None = None) -> np.ndarray:
        """Standardised frame vectors of one clip: float64 ``[frames, dim]`` (steps 1-5)."""
        frames = stacked_frames(waveform, self.config, sampling_rate)
        return (frames - self.mean.astype(np.float64)) / self.std.astype(np.float64)

    def frame_units(self, waveform: np.ndarray, sampling_rate: int | None = None) -> np.ndarray:
        """One unit per frame (before merging): int64 ``[frames]``."""
        vectors = self.features(waveform, sampling_rate)
        if vectors.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        return _nearest(vectors, self.centroids.astype(np.float64))[0]

    def encode_with_durations(
        self, waveform: np.ndarray, sampling_rate: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Merged units and their durations in frames: two int64 ``[n]`` arrays (:func:`merge_repeats`)."""
        return merge_repeats(self.frame_units(waveform, sampling_rate))

    def encode(self, waveform: np.ndarray, sampling_rate: int | None = None) -> np.ndarray:
        """The clip's units with consecutive repeats merged: int64 ``[n]``, values in ``[0, n_units)``."""
        return self.encode_with_durations(waveform, sampling_rate)[0]

    def unit_rate(self, waveforms: Iterable[np.ndarray], sampling_rate: int | None = None) -> float:
        """Units (after merging) per second of audio over ``waveforms``: total units / total seconds."""
        units = 0
        seconds = 0.0
        rate = self.config.sampling_rate if sampling_rate is None else sampling_rate
        for waveform in waveforms:
            units += len(self.encode(waveform, rate))
            seconds += np.asarray(waveform).shape[0] / rate
        if seconds <= 0:
            raise ValueError("unit_rate needs at least one non-empty waveform")
        return units / seconds

    def save(self, directory: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``speech_units.json`` and ``speech_units.npz`` into ``directory`` (created if needed).

        Refuses to replace existing unit files unless ``overwrite``. Returns the two paths.
        """
        directory = Path(directory)
        paths = (directory / UNITS_JSON, directory / UNITS_NPZ)
        existing = [str(path) for path in paths if path.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} already exist; pass overwrite=True to replace them")
        directory.mkdir(parents=True, exist_ok=True)
        info = {
            "format": UNITS_FORMAT,
            "version": UNITS_VERSION,
            "n_units": self.n_units,
            "seed": self.seed,
            "config": asdict(self.config),
            "frame_rate_hz": self.frame_rate,
            "stats": self.stats,
        }
        temporary = directory / f".{UNITS_NPZ}.tmp-{os.getpid()}.npz"
        np.savez(temporary, centroids=self.centroids, mean=self.mean, std=self.std)
        os.replace(temporary, paths[1])
        write_text_atomic(paths[0], json.dumps(info, indent=2) + "\n")
        return paths

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> UnitTokenizer:
        """Read a tokenizer written by :meth:`save` (no pickle: ``numpy.load(allow_pickle=False)``)."""
        directory = Path(directory)
        json_path, npz_path = directory / UNITS_JSON, directory / UNITS_NPZ
        for path in (json_path, npz_path):
            if not path.is_file():
                raise FileNotFoundError(f"speech-unit tokenizer file not found: {path}")
        try:
            info = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_path}: invalid JSON ({error.msg})") from error
        if not isinstance(info, dict) or info.get("format") != UNITS_FORMAT:
            raise ValueError(f"{json_path} is not a caad speech-unit tokenizer (format {UNITS_FORMAT!r})")
        if info.get("version") != UNITS_VERSION:
            raise ValueError(f"{json_path}: unsupported version {info.get('version')!r} (expected {UNITS_VERSION})")
        try:
            config = UnitFeatureConfig(**info["config"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{json_path}: malformed 'config' ({error})") from error
        with np.load(npz_path, allow_pickle=False) as arrays:
            missing = {"centroids", "mean", "std"} - set(arrays.files)
            if missing:
                raise ValueError(f"{npz_path} lacks arrays {sorted(missing)}")
            tokenizer = cls(
                config=config,
                centroids=arrays["centroids"],
                mean=arrays["mean"],
                std=arrays["std"],
                seed=int(info.get("seed", 0)),
                stats=dict(info.get("stats") or {}),
            )
        if tokenizer.n_units != info.get("n_units"):
            raise ValueError(
                f"{json_path} says n_units={info.get('n_units')} but the centroids hold {tokenizer.n_units}"
            )
        return tokenizer


def train_unit_tokenizer(
    waveforms: Iterable[np.ndarray],
    n_units: int = 64,
    seed: int = 0,
    config: UnitFeatureConfig | None = None,
    max_frames: int = 200_000,
    max_iter: int = 100,
    sampling_rate: int | None = None,
    progress: bool = False,
) -> UnitTokenizer:
    """Train a :class:`UnitTokenizer` on ``waveforms`` (16 kHz mono unless ``sampling_rate`` says otherwise).

    Args:
        waveforms: the training clips (1-D float in [-1, 1] or int16).
        n_units: the number of units (k of k-means); at most the number of training frames.
        seed: seeds the frame sample and the k-means++ draws; same inputs and seed, same tokenizer.
        config: frame settings (default :class:`UnitFeatureConfig`).
        max_frames: at most this many frame vectors (a seeded sample, in corpus order) go into k-means.
        max_iter: Lloyd iterations at most.
        sampling_rate: the rate of ``waveforms`` (default ``config.sampling_rate``).
        progress: show a progress bar over the clips (stderr).

    ``stats`` of the result: ``n_clips``, ``seconds`` (audio), ``n_frames`` (vectors computed),
    ``n_frames_used``, ``kmeans_seconds`` (wall time of :func:`kmeans`), ``n_iter``, ``converged``,
    ``inertia_per_frame``, ``unit_rate_hz`` (merged units per second on the training clips) and
    ``units_used`` (distinct units emitted on them).
    """
    from tqdm.auto import tqdm

    config = UnitFeatureConfig() if config is None else config
    if not isinstance(config, UnitFeatureConfig):
        raise TypeError(f"config must be a UnitFeatureConfig, got {type(config).__name__}")
    if isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 2:
        raise ValueError(f"n_units must be an int >= 2, got {n_units!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < n_units:
        raise ValueError(f"max_frames must be an int >= n_units ({n_units}), got {max_frames!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rate = config.sampling_rate if sampling_rate is None else sampling_rate
    per_clip: list[np.ndarray] = []
    seconds = 0.0
    for index, waveform in enumerate(tqdm(waveforms, desc="unit features", unit="clip", disable=not progress)):
        array = _check_waveform(waveform, f"waveforms[{index}]")
        seconds += array.size / rate
        per_clip.append(stacked_frames(array, config, rate))
    if not per_clip:
        raise ValueError("train_unit_tokenizer needs at least one waveform")
    frames = np.concatenate(per_clip, axis=0)
    if frames.shape[0] < n_units:
        raise ValueError(f"only {frames.shape[0]} frames in the training audio, fewer than n_units={n_units}")
    rng = np.random.default_rng([seed, 1])
    if frames.shape[0] > max_frames:
        chosen = np.sort(rng.choice(frames.shape[0], size=max_frames, replace=False))
        sample = frames[chosen]
    else:
        sample = frames
    mean = sample.mean(axis=0)
    std = np.maximum(sample.std(axis=0), 1e-5)
    start = time.perf_counter()
    result = kmeans((sample - mean) / std, n_units, seed=seed, max_iter=max_iter)
    kmeans_seconds = time.perf_counter() - start
    tokenizer = UnitTokenizer(config=config, centroids=result.centroids, mean=mean, std=std, seed=seed)
    merged = 0
    used: set[int] = set()
    for clip in per_clip:
        if clip.shape[0]:
            labels = _nearest((clip - tokenizer.mean) / tokenizer.std, tokenizer.centroids.astype(np.float64))[0]
            units, _ = merge_repeats(labels)
            merged += units.size
            used.update(int(u) for u in np.unique(units))
    tokenizer.stats = {
        "n_clips": len(per_clip),
        "seconds": round(seconds, 3),
        "n_frames": int(frames.shape[0]),
        "n_frames_used": int(sample.shape[0]),
        "kmeans_seconds": round(kmeans_seconds, 3),
        "n_iter": result.n_iter,
        "converged": result.converged,
        "inertia_per_frame": result.inertia / sample.shape[0],
        "unit_rate_hz": merged / seconds if seconds > 0 else math.nan,
        "units_used": len(used),
    }
    return tokenizer
