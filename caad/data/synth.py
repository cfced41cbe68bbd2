"""The built-in synthetic speech corpus (``caad data synth``).

Layout of a corpus folder::

    corpus.json                     what was generated (seed, sizes, settings); marks a caad corpus
    train.jsonl                     one manifest per split (see caad.data.manifest)
    validation.jsonl
    test.jsonl
    audio/<split>/<id>.wav          16-bit PCM mono WAV at ``sampling_rate`` (16 kHz by default)

The corpus is a pure function of ``(num_examples, seed, splits, sampling_rate)``: the same
arguments give byte-identical files (see :mod:`caad.data.espeak` for how the synthesiser is made
reproducible). A corpus is built in a hidden sibling folder and moved into place only when
complete, so ``out_dir`` never holds a half-written corpus, even after an interruption.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caad.data.audio import estimate_f0, resample, write_wav
from caad.data.espeak import VOICES, synthesize_many
from caad.data.manifest import ManifestRow, write_manifest
from caad.data.tasks import PITCH_LEVELS, RATE_LEVELS, TASKS, ExampleSpec, make_specs

__all__ = ["CORPUS_INFO_NAME", "SPLIT_NAMES", "CorpusPaths", "split_counts", "synthesize_corpus"]

CORPUS_INFO_NAME = "corpus.json"
SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")
CORPUS_FORMAT = "caad-synthetic-speech-corpus"
CORPUS_VERSION = 1


@dataclass(frozen=True)
class CorpusPaths:
    """Where a corpus lies: ``root``, one manifest per split, and ``corpus.json``."""

    root: Path
    manifests: dict[str, Path] = field(default_factory=dict)

    @property
    def info(self) -> Path:
        return self.root / CORPUS_INFO_NAME

    @property
    def train(self) -> Path:
        return self.manifests["train"]

    @property
    def validation(self) -> Path:
        return self.manifests["validation"]

    @property
    def test(self) -> Path:
        return self.manifests["test"]

    def __getitem__(self, split: str) -> Path:
        return self.manifests[split]


def split_counts(num_examples: int, splits: Sequence[float]) -> list[int]:
    """Examples per split: fractions rounded (largest remainders), every non-zero split >= 1."""
    if len(splits) != len(SPLIT_NAMES):
        raise ValueError(f"splits must give {len(SPLIT_NAMES)} fractions (train, validation, test), got {splits!r}")
    fractions = [float(value) for value in splits]
    if any(value < 0 for value in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"splits must be non-negative fractions summing to 1, got {tuple(splits)!r}")
    nonzero = sum(1 for value in fractions if value > 0)
    if num_examples < nonzero:
        raise ValueError(f"num_examples={num_examples} is too small for {nonzero} non-empty splits")
    exact = [value * num_examples for value in fractions]
    counts = [int(value) for value in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: num_examples - sum(counts)]:
        counts[i] += 1
    for i, value in enumerate(fractions):  # a requested split is never empty
        while value > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) to replace the corpus in it"
        )
    if not (out_dir / CORPUS_INFO_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} is not a caad corpus (it has no {CORPUS_INFO_NAME}): refusing to delete its contents "
            "even with overwrite=True; choose another output folder"
        )
    corpus_entries = {CORPUS_INFO_NAME, "audio", *(f"{name}.jsonl" for name in SPLIT_NAMES)}
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in corpus_entries)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out_dir} holds files that are not part of the corpus ({shown}): refusing to delete them even "
            "with overwrite=True; move them elsewhere or choose another output folder"
        )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``out_dir``, replacing an earlier corpus there."""
    old: Path | None = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _row(
    spec: ExampleSpec,
    split: str,
    seed: int,
    pcm: np.ndarray,
    espeak_rate: int,
    sampling_rate: int,
    audio_root: Path,
) -> ManifestRow:
    example_id = f"caad-s{seed}-{spec.index:06d}"
    relative = Path("audio") / split / f"{example_id}.wav"
    waveform = resample(pcm, espeak_rate, sampling_rate)
    write_wav(audio_root / relative, waveform, sampling_rate)
    metadata = spec.metadata()
    metadata["duration_s"] = round(waveform.size / sampling_rate, 3)
    f0 = estimate_f0(waveform, sampling_rate)
    metadata["f0_hz"] = None if np.isnan(f0) else round(f0, 1)
    metadata["num_words"] = len(spec.text.split())
    return ManifestRow(
        id=example_id,
        audio=relative.as_posix(),
        sampling_rate=sampling_rate,
        instruction=spec.instruction,
        task=spec.task,
        metadata=metadata,
        label=spec.label,
        category=spec.category,
        hint_neutral=spec.hint_neutral,
        hint_contradicting=spec.hint_contradicting,
        hint_contradicting_label=spec.hint_contradicting_label,
    )


def synthesize_corpus(
    out_dir: str | os.PathLike[str],
    num_examples: int = 200,
    seed: int = 0,
    overwrite: bool = False,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    sampling_rate: int = 16000,
    workers: int | None = None,
    progress: bool = True,
) -> CorpusPaths:
    """Synthesise the built-in speech corpus into ``out_dir``.

    Args:
        out_dir: the corpus folder; must not exist or be empty, unless ``overwrite``.
        num_examples: number of examples over all splits.
        seed: everything (sentences, settings, tasks, splits) follows from it.
        overwrite: replace an existing corpus in ``out_dir`` (only a folder holding ``corpus.json``
            is ever replaced; the old corpus is removed only after the new one is complete).
        splits: train / validation / test fractions.
        sampling_rate: rate of the written WAV files (espeak-ng renders at 22050 Hz; resampled).
        workers: utterances rendered at once (default: up to 2, the CPU count); the output does not
            depend on it.
        progress: show a progress bar (stderr).

    Returns:
        :class:`CorpusPaths` with the manifest of each split.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate < 8000:
        raise ValueError(f"sampling_rate must be an int >= 8000, got {sampling_rate!r}")
    specs = make_specs(num_examples, seed)
    counts = split_counts(num_examples, splits)
    _check_out_dir(out_dir, overwrite)
    if workers is None:
        workers = max(1, min(2, os.cpu_count() or 1))

    order = list(range(num_examples))
    random.Random(f"caad-splits-{seed}").shuffle(order)  # split assignment
    split_of: dict[int, str] = {}
    start = 0
    for name, count in zip(SPLIT_NAMES, counts):
        for index in sorted(order[start : start + count]):
            split_of[index] = name
        start += count

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        for name in SPLIT_NAMES:
            (staging / "audio" / name).mkdir(parents=True)
        rows: dict[str, list[ManifestRow]] = {name: [] for name in SPLIT_NAMES}
        requests = [(spec.text, spec.voice, spec.rate_wpm, spec.pitch_setting) for spec in specs]
        with tqdm(total=num_examples, desc="synthesising speech", unit="utt", disable=not progress) as bar:
            for spec, (pcm, espeak_rate) in zip(specs, synthesize_many(requests, workers=workers)):
                split = split_of[spec.index]
                rows[split].append(_row(spec, split, seed, pcm, espeak_rate, sampling_rate, staging))
                bar.update(1)
        manifests = {}
        for name in SPLIT_NAMES:
            write_manifest(staging / f"{name}.jsonl", rows[name])
            manifests[name] = out_dir / f"{name}.jsonl"
        info = {
            "format": CORPUS_FORMAT,
            "version": CORPUS_VERSION,
            "seed": seed,
            "num_examples": num_examples,
            "splits": {name: len(rows[name]) for name in SPLIT_NAMES},
            "sampling_rate": sampling_rate,
            "synthesizer": "libespeak-ng (espeakng-loader wheel)",
            "voices": {name: voice.gender for name, voice in VOICES.items()},
            "rate_levels_wpm": RATE_LEVELS,
            "pitch_levels": PITCH_LEVELS,
            "tasks": list(TASKS),
        }
        (staging / CORPUS_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _check_out_dir(out_dir, overwrite)  # again: something may have appeared there meanwhile
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CorpusPaths(root=out_dir, manifests=manifests)
