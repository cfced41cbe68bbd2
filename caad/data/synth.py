"""The built-in synthetic speech corpus (``caad data synth``): MCR-BENCH in miniature.

Layout of a corpus folder::

    corpus.json                     what was generated (seed, sizes, settings); marks a caad corpus
    train.jsonl                     one manifest per split (see caad.data.manifest)
    validation.jsonl
    test.jsonl
    text_prior.jsonl                text-only prompts and answers for a text phase of the teacher's LM
    audio/<split>/<item>.wav        16-bit PCM mono WAV at ``sampling_rate`` (16 kHz by default)

What the corpus is (see :mod:`caad.data.tasks` for the tasks, voices and contexts): every audio item
is one spoken sentence (espeak-ng, known voice, rate and pitch) asked one task. In ``train.jsonl``
each item is one row whose prompt carries a text context stating the attribute with probability
``context_share``; such a context agrees with the audio with probability ``context_agreement``
(else it contradicts it), and a prompt without one gets an unrelated context with probability
``irrelevant_share``. In ``validation.jsonl`` and ``test.jsonl`` every item is asked under each of
MCR-BENCH's four text conditions (``neutral``, ``faithful``, ``adversarial``, ``irrelevant``): one
row per item and condition, ids ``<item>-<condition>``, the rows of an item sharing its audio file
and its ``group``. Rows carry ``condition``, ``context``, ``context_label`` (the answer the context
states) and ``choices`` (the candidate answers); the ``instruction`` is the full prompt
(``f"{context} {question}"``), so training and evaluation need nothing else to use the contexts.

``text_prior.jsonl`` holds one JSON object a line (no audio): ``id``, ``task``, ``category``,
``context``, ``instruction``, ``answer`` (the target text), ``label``, ``context_label``; the
context always states the answer (:func:`caad.data.tasks.make_text_prior`). Read it with
:func:`read_text_prior`.

The corpus is a pure function of its arguments (all but ``workers``, ``progress`` and
``overwrite``): the same arguments give byte-identical files (see :mod:`caad.data.espeak` for how
the synthesiser is made reproducible). A corpus is built in a hidden sibling folder and moved into
place only when complete, so ``out_dir`` never holds a half-written corpus, even after an
interruption.
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
from typing import Any

import numpy as np

from caad.data.audio import estimate_f0, resample, write_wav
from caad.data.espeak import VOICES, synthesize_many
from caad.data.files import write_text_atomic
from caad.data.manifest import ManifestRow, write_manifest
from caad.data.tasks import (
    CONDITIONS,
    PITCH_SETTINGS,
    RATE_LEVELS,
    TASKS,
    ContextSettings,
    ExampleSpec,
    Prompt,
    condition_prompt,
    make_specs,
    make_text_prior,
    train_prompt,
)

__all__ = [
    "CORPUS_INFO_NAME",
    "SPLIT_NAMES",
    "TEXT_PRIOR_NAME",
    "CorpusPaths",
    "read_text_prior",
    "split_counts",
    "synthesize_corpus",
]

CORPUS_INFO_NAME = "corpus.json"
TEXT_PRIOR_NAME = "text_prior.jsonl"
SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")
CORPUS_FORMAT = "caad-synthetic-speech-corpus"
CORPUS_VERSION = 2


@dataclass(frozen=True)
class CorpusPaths:
    """Where a corpus lies: ``root``, one manifest per split, ``corpus.json`` and the text-prior file."""

    root: Path
    manifests: dict[str, Path] = field(default_factory=dict)

    @property
    def info(self) -> Path:
        return self.root / CORPUS_INFO_NAME

    @property
    def text_prior(self) -> Path:
        return self.root / TEXT_PRIOR_NAME

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
            f"{out_dir} already exists and is not empty; pass overwrite=True to replace the corpus in it"
        )
    if not (out_dir / CORPUS_INFO_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} is not a caad corpus (it has no {CORPUS_INFO_NAME}): refusing to delete its contents "
            "even with overwrite=True; choose another output folder"
        )
    corpus_entries = {CORPUS_INFO_NAME, TEXT_PRIOR_NAME, "audio", *(f"{name}.jsonl" for name in SPLIT_NAMES)}
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


def _item_id(seed: int, spec: ExampleSpec) -> str:
    return f"caad-s{seed}-{spec.index:06d}"


def _audio_row_fields(
    spec: ExampleSpec,
    split: str,
    seed: int,
    pcm: np.ndarray,
    espeak_rate: int,
    sampling_rate: int,
    audio_root: Path,
) -> tuple[str, dict[str, Any]]:
    """Write the item's WAV file; returns its relative path and the item's metadata."""
    relative = Path("audio") / split / f"{_item_id(seed, spec)}.wav"
    waveform = resample(pcm, espeak_rate, sampling_rate)
    write_wav(audio_root / relative, waveform, sampling_rate)
    metadata = spec.metadata()
    metadata["duration_s"] = round(waveform.size / sampling_rate, 3)
    f0 = estimate_f0(waveform, sampling_rate)
    metadata["f0_hz"] = None if np.isnan(f0) else round(f0, 1)
    metadata["num_words"] = len(spec.text.split())
    return relative.as_posix(), metadata


def _manifest_row(
    spec: ExampleSpec, prompt: Prompt, row_id: str, group: str, audio: str, sampling_rate: int, metadata: dict
) -> ManifestRow:
    return ManifestRow(
        id=row_id,
        audio=audio,
        sampling_rate=sampling_rate,
        instruction=prompt.instruction,
        task=spec.task,
        metadata=dict(metadata),
        label=spec.label,
        category=spec.category,
        condition=prompt.condition,
        context=prompt.context,
        context_label=prompt.context_label,
        group=group,
        choices=list(spec.choices),
    )


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def read_text_prior(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``text_prior.jsonl`` file (module docstring); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text-prior file not found: {path}")
    records = []
    required = ("id", "task", "instruction", "answer")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict) or any(not isinstance(record.get(key), str) for key in required):
                raise ValueError(f"{path}, line {number}: expected an object with string fields {required}")
            records.append(record)
    return records


def synthesize_corpus(
    out_dir: str | os.PathLike[str],
    num_examples: int = 200,
    seed: int = 0,
    overwrite: bool = False,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    sampling_rate: int = 16000,
    workers: int | None = None,
    progress: bool = True,
    context_share: float = 0.5,
    context_agreement: float = 0.8,
    irrelevant_share: float = 0.1,
    text_prior_examples: int | None = None,
    eval_conditions: Sequence[str] = CONDITIONS,
) -> CorpusPaths:
    """Synthesise the built-in speech corpus into ``out_dir`` (module docstring).

    Args:
        out_dir: the corpus folder; must not exist or be empty, unless ``overwrite``.
        num_examples: number of audio items over all splits (validation and test have one row per
            item and condition, so ``len(test.jsonl)`` is ``len(eval_conditions)`` times its items).
        seed: everything (sentences, settings, tasks, contexts, splits) follows from it.
        overwrite: replace an existing corpus in ``out_dir`` (only a folder holding ``corpus.json``
            is ever replaced; the old corpus is removed only after the new one is complete).
        splits: train / validation / test fractions of the items.
        sampling_rate: rate of the written WAV files (espeak-ng renders at 22050 Hz; resampled).
        workers: utterances rendered at once (default: up to 2, the CPU count); the output does not
            depend on it.
        progress: show a progress bar (stderr).
        context_share: probability that a training prompt has a context stating the attribute.
        context_agreement: probability that such a context agrees with the audio.
        irrelevant_share: probability that a training prompt without one has an unrelated context.
        text_prior_examples: records in ``text_prior.jsonl`` (default: as many as training items;
            0 writes an empty file).
        eval_conditions: the conditions each validation and test item is asked under.

    Returns:
        :class:`CorpusPaths` with the manifest of each split.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate < 8000:
        raise ValueError(f"sampling_rate must be an int >= 8000, got {sampling_rate!r}")
    settings = ContextSettings(
        context_share=_check_fraction(context_share, "context_share"),
        context_agreement=_check_fraction(context_agreement, "context_agreement"),
        irrelevant_share=_check_fraction(irrelevant_share, "irrelevant_share"),
    )
    conditions = tuple(eval_conditions)
    if not conditions or any(c not in CONDITIONS for c in conditions) or len(set(conditions)) != len(conditions):
        raise ValueError(f"eval_conditions must be distinct names from {CONDITIONS}, got {tuple(eval_conditions)!r}")
    if text_prior_examples is not None and (
        isinstance(text_prior_examples, bool) or not isinstance(text_prior_examples, int) or text_prior_examples < 0
    ):
        raise ValueError(f"text_prior_examples must be a non-negative int or None, got {text_prior_examples!r}")
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
    num_text = counts[0] if text_prior_examples is None else text_prior_examples

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
                audio, metadata = _audio_row_fields(spec, split, seed, pcm, espeak_rate, sampling_rate, staging)
                item = _item_id(seed, spec)
                if split == "train":
                    prompt = train_prompt(spec, settings, seed)
                    rows[split].append(_manifest_row(spec, prompt, item, item, audio, sampling_rate, metadata))
                else:
                    for condition in conditions:
                        prompt = condition_prompt(spec, condition, seed)
                        row_id = f"{item}-{condition}"
                        rows[split].append(_manifest_row(spec, prompt, row_id, item, audio, sampling_rate, metadata))
                bar.update(1)
        manifests = {}
        for name in SPLIT_NAMES:
            write_manifest(staging / f"{name}.jsonl", rows[name])
            manifests[name] = out_dir / f"{name}.jsonl"
        text_prior = make_text_prior(num_text, seed) if num_text else []
        write_text_atomic(
            staging / TEXT_PRIOR_NAME, (json.dumps(record, ensure_ascii=False) + "\n" for record in text_prior)
        )
        train_conditions = {c: sum(1 for row in rows["train"] if row.condition == c) for c in CONDITIONS}
        info = {
            "format": CORPUS_FORMAT,
            "version": CORPUS_VERSION,
            "seed": seed,
            "num_examples": num_examples,
            "splits": {name: count for name, count in zip(SPLIT_NAMES, counts)},
            "rows": {name: len(rows[name]) for name in SPLIT_NAMES},
            "sampling_rate": sampling_rate,
            "synthesizer": "libespeak-ng (espeakng-loader wheel)",
            "voices": {name: voice.gender for name, voice in VOICES.items()},
            "rate_levels_wpm": RATE_LEVELS,
            "pitch_settings": PITCH_SETTINGS,
            "tasks": list(TASKS),
            "contexts": {
                "context_share": settings.context_share,
                "context_agreement": settings.context_agreement,
                "irrelevant_share": settings.irrelevant_share,
                "train_conditions": train_conditions,
                "eval_conditions": list(conditions),
            },
            "text_prior_examples": len(text_prior),
        }
        write_text_atomic(staging / CORPUS_INFO_NAME, json.dumps(info, indent=2) + "\n")
        _check_out_dir(out_dir, overwrite)  # again: something may have appeared there meanwhile
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CorpusPaths(root=out_dir, manifests=manifests)
