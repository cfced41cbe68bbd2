"""The built-in spoken question-answering set: paired text and speech queries whose answers need content.

What it is. Short closed-vocabulary questions with one-word answers (spoken arithmetic over digits,
comparisons, counting, and facts from a fixed table; :mod:`caad.data.spoken_qa_items` lists them and
how the splits hold out combinations). Every item exists twice: as **text** (``text_query``, what a text
teacher reads, and what measures forgetting) and as **speech**, the same string rendered by the built-in
espeak-ng synthesiser (:mod:`caad.data.espeak`) with several voices, speaking rates and pitches, each
recorded in the row's metadata. The speech row's ``instruction`` is a fixed request
(:data:`SPOKEN_INSTRUCTION`) that names no content: the question is only in the audio.

Layout of a set folder (:func:`synthesize_spoken_qa`)::

    spoken_qa.json                  what was generated (seed, sizes, voices, held-out keys); marks the folder
    train.jsonl                     spoken rows, one manifest per split (caad.data.manifest)
    validation.jsonl
    test.jsonl
    text_train.jsonl                every question of the split as text, one QAItem a line
    text_validation.jsonl
    text_test.jsonl
    audio/<split>/<row id>.wav      16-bit PCM mono WAV at ``sampling_rate`` (16 kHz by default)

Spoken rows (manifest fields): ``id`` (``sqa-s<seed>-<split>-<n>``), ``audio``, ``sampling_rate``,
``instruction`` (:data:`SPOKEN_INSTRUCTION`), ``task``, ``category``, ``label`` (the one-word answer),
``choices`` (the candidate answers), ``group`` (the text item's id: every rendering of one question
shares it), ``pseudo_gt`` (the reference answer, ``pseudo_gt_generator = "reference"``, so the rows
train as they are), the extra key ``text_query`` (the question as text), and ``metadata``:
``transcript`` (= ``text_query``), ``query_id``, ``key``, ``template``, the item's own fields
(operands, relation, subject), ``voice``, ``gender``, ``rate_wpm``, ``pitch_setting``, ``f0_hz``,
``duration_s``. Text items: :meth:`~caad.data.spoken_qa_items.QAItem.to_dict` (``id``, ``task``,
``category``, ``text_query``, ``answer``, ``choices``, ``key``, ``template``, ``metadata``).

Which questions are spoken. Each split's text file holds all its questions; its ``n`` utterances are
drawn task-balanced (tasks in seeded blocks, each task's questions in a seeded cycle, so no question is
spoken twice before all of its task's were spoken once) and every block of ``len(voices) * len(rates) *
len(pitches)`` consecutive utterances uses each voice x rate x pitch combination once. More speech for
chosen questions later (SALAD's synthesis budget): :func:`synthesize_items`.

Determinism: the set is a pure function of its arguments (all but ``workers``, ``progress`` and
``overwrite``): byte-identical files for the same arguments. It is built in a hidden sibling folder and
moved into place when complete; an existing folder is replaced only with ``overwrite=True`` and only
when it is a spoken-QA set holding nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caad.data.audio import estimate_f0, resample, write_wav
from caad.data.espeak import ESPEAK_MAX_RATE_WPM, ESPEAK_MIN_RATE_WPM, VOICES, synthesize_many
from caad.data.files import write_text_atomic
from caad.data.manifest import ManifestRow, write_manifest
from caad.data.spoken_qa_items import QA_SPLITS, QA_TASKS, QAItem, all_items, chance_accuracy, split_items
from caad.data.synth import split_counts

__all__ = [
    "DEFAULT_PITCHES",
    "DEFAULT_RATES_WPM",
    "DEFAULT_VOICES",
    "SPOKEN_INSTRUCTION",
    "SPOKEN_QA_INFO_NAME",
    "SpokenQAPaths",
    "SynthesisResult",
    "load_spoken_qa",
    "plan_utterances",
    "qa_tokenizer_texts",
    "read_text_items",
    "synthesize_items",
    "synthesize_spoken_qa",
    "write_text_items",
]

SPOKEN_QA_INFO_NAME = "spoken_qa.json"
SPOKEN_QA_FORMAT = "caad-spoken-qa"
SPOKEN_QA_VERSION = 1
#: The instruction of every spoken row: it names no content, so the answer needs the audio.
SPOKEN_INSTRUCTION = "Answer the question in the recording with one word."
DEFAULT_VOICES: tuple[str, ...] = tuple(VOICES)
#: Speaking rates (words per minute) and espeak-ng pitch settings (0-100, relative to the voice).
DEFAULT_RATES_WPM: tuple[int, ...] = (140, 175, 210)
DEFAULT_PITCHES: tuple[int, ...] = (35, 50, 65)
_REFERENCE_GENERATOR = "reference"


@dataclass(frozen=True)
class SpokenQAPaths:
    """Where a spoken-QA set lies: ``root``, the spoken manifest and the text file of each split."""

    root: Path
    manifests: dict[str, Path] = field(default_factory=dict)
    text: dict[str, Path] = field(default_factory=dict)

    @property
    def info(self) -> Path:
        return self.root / SPOKEN_QA_INFO_NAME

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

    def items(self, split: str) -> list[QAItem]:
        """The text items of ``split`` (:func:`read_text_items`)."""
        return read_text_items(self.text[split])


@dataclass
class SynthesisResult:
    """What :func:`synthesize_items` rendered: the manifest rows (audio paths relative to the output
    folder), how many utterances and how many seconds of audio, and whether a budget stopped it early."""

    rows: list[ManifestRow]
    num_utterances: int
    audio_seconds: float
    stopped_by_budget: bool = False


# ---- checks -------------------------------------------------------------------------------------


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
        high is not None and value > high
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)


def _check_settings(
    voices: Sequence[str], rates: Sequence[int], pitches: Sequence[int]
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    if isinstance(voices, str) or not voices or any(v not in VOICES for v in voices):
        raise ValueError(f"voices must be a non-empty list of names from {sorted(VOICES)}, got {voices!r}")
    if len(set(voices)) != len(voices):
        raise ValueError(f"voices must be distinct, got {voices!r}")
    if isinstance(rates, (str, int)) or not rates:
        raise ValueError(f"rates must be a non-empty list of words-per-minute ints, got {rates!r}")
    checked_rates = tuple(
        _check_int(r, "rates[...]", ESPEAK_MIN_RATE_WPM, ESPEAK_MAX_RATE_WPM) for r in rates
    )
    if isinstance(pitches, (str, int)) or not pitches:
        raise ValueError(f"pitches must be a non-empty list of ints in [0, 100], got {pitches!r}")
    checked_pitches = tuple(_check_int(p, "pitches[...]", 0, 100) for p in pitches)
    return tuple(voices), checked_rates, checked_pitches


def _check_output_args(sampling_rate: Any, instruction: Any, workers: Any) -> tuple[int, str, int]:
    sampling_rate = _check_int(sampling_rate, "sampling_rate", 8000)
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
    if workers is None:
        workers = max(1, min(2, os.cpu_count() or 1))
    return sampling_rate, instruction, _check_int(workers, "workers", 1)


def _check_items(items: Iterable[QAItem]) -> list[QAItem]:
    items = list(items)
    for index, item in enumerate(items):
        if not isinstance(item, QAItem):
            raise TypeError(f"items[{index}] must be a QAItem, got {type(item).__name__}")
    return items


# ---- planning -----------------------------------------------------------------------------------


def plan_utterances(items: Sequence[QAItem], count: int, seed: int, salt: str = "") -> list[QAItem]:
    """Which items ``count`` utterances speak, in order (module docstring: task-balanced cycles).

    A pure function of ``(items, count, seed, salt)``. ``items`` may be empty only when ``count`` is 0.
    """
    count = _check_int(count, "count", 0)
    if count and not items:
        raise ValueError(f"cannot plan {count} utterances over no items")
    rng = random.Random(f"caad-spoken-qa-plan-{seed}-{salt}")
    by_task: dict[str, list[QAItem]] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    tasks = [task for task in QA_TASKS if task in by_task] + [task for task in by_task if task not in QA_TASKS]
    queues: dict[str, list[QAItem]] = {task: [] for task in tasks}
    task_block: list[str] = []
    out: list[QAItem] = []
    for _ in range(count):
        if not task_block:
            task_block = rng.sample(tasks, len(tasks))
        task = task_block.pop()
        if not queues[task]:
            queues[task] = rng.sample(by_task[task], len(by_task[task]))
        out.append(queues[task].pop())
    return out


def _settings_plan(
    count: int, voices: Sequence[str], rates: Sequence[int], pitches: Sequence[int], seed: int, salt: str
) -> list[tuple[str, int, int]]:
    """``count`` (voice, rate, pitch) settings; every block of all combinations uses each once."""
    combos = [(v, r, p) for v in voices for r in rates for p in pitches]
    rng = random.Random(f"caad-spoken-qa-voices-{seed}-{salt}")
    out: list[tuple[str, int, int]] = []
    block: list[tuple[str, int, int]] = []
    for _ in range(count):
        if not block:
            block = rng.sample(combos, len(combos))
        out.append(block.pop())
    return out


# ---- synthesis ----------------------------------------------------------------------------------


def _row(
    item: QAItem,
    row_id: str,
    audio: str,
    sampling_rate: int,
    setting: tuple[str, int, int],
    waveform: np.ndarray,
    instruction: str,
    base_dir: Path,
) -> ManifestRow:
    voice, rate, pitch = setting
    f0 = estimate_f0(waveform, sampling_rate)
    metadata = {
        "transcript": item.text_query,
        "query_id": item.id,
        "key": item.key,
        "template": item.template,
        **dict(item.metadata),
        "voice": voice,
        "gender": VOICES[voice].gender,
        "rate_wpm": rate,
        "pitch_setting": pitch,
        "f0_hz": None if np.isnan(f0) else round(float(f0), 1),
        "duration_s": round(waveform.size / sampling_rate, 3),
    }
    return ManifestRow(
        id=row_id,
        audio=audio,
        sampling_rate=sampling_rate,
        instruction=instruction,
        task=item.task,
        metadata=metadata,
        label=item.answer,
        category=item.category,
        pseudo_gt=item.answer,
        pseudo_gt_generator=_REFERENCE_GENERATOR,
        group=item.id,
        choices=list(item.choices),
        extra={"text_query": item.text_query},
        base_dir=base_dir,
    )


def synthesize_items(
    items: Iterable[QAItem],
    out_dir: str | os.PathLike[str],
    *,
    voices: Sequence[str] = DEFAULT_VOICES,
    rates: Sequence[int] = DEFAULT_RATES_WPM,
    pitches: Sequence[int] = DEFAULT_PITCHES,
    seed: int = 0,
    id_prefix: str = "sqa",
    renderings_per_item: int = 1,
    audio_dir: str = "audio",
    max_utterances: int | None = None,
    max_seconds: float | None = None,
    sampling_rate: int = 16000,
    instruction: str = SPOKEN_INSTRUCTION,
    workers: int | None = None,
    progress: bool = True,
    progress_label: str = "synthesising spoken questions",
    overwrite: bool = False,
) -> SynthesisResult:
    """Speak chosen text items: WAV files under ``out_dir/audio_dir`` and their manifest rows.

    The items are spoken in order, each ``renderings_per_item`` times in a row; utterance ``k`` gets the
    id ``f"{id_prefix}-{k:06d}"`` and the ``k``-th voice x rate x pitch setting of a balanced seeded cycle
    (seeded by ``seed`` and ``id_prefix``: use a new prefix per call, e.g. per SALAD round, for fresh
    ids and settings). Budgets: at most ``max_utterances`` utterances, and at most ``max_seconds`` of
    audio in all: the first utterance that would pass it is dropped (its file is not written) and
    synthesis stops (``stopped_by_budget``). Nothing is written when an argument is bad or when a WAV
    file to be written exists already (unless ``overwrite``). The caller writes the rows as a manifest
    (:func:`caad.data.write_manifest`); their ``audio`` is relative to ``out_dir``. An interrupted call
    leaves the WAV files written so far (rerun with ``overwrite=True``). ``progress_label``: the
    progress bar's text.

    Returns:
        :class:`SynthesisResult`: the rows, ``num_utterances`` and ``audio_seconds`` (the sum of the
        kept clips' durations at ``sampling_rate``).
    """
    from tqdm.auto import tqdm

    items = _check_items(items)
    voices, rates, pitches = _check_settings(voices, rates, pitches)
    seed = _check_int(seed, "seed", -(2**63))
    renderings_per_item = _check_int(renderings_per_item, "renderings_per_item", 1)
    sampling_rate, instruction, workers = _check_output_args(sampling_rate, instruction, workers)
    if max_utterances is not None:
        max_utterances = _check_int(max_utterances, "max_utterances", 0)
    if max_seconds is not None and (
        isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds >= 0
    ):
        raise ValueError(f"max_seconds must be a non-negative number of seconds or None, got {max_seconds!r}")
    if not isinstance(id_prefix, str) or not id_prefix or any(c in id_prefix for c in "/\\ "):
        raise ValueError(f"id_prefix must be a non-empty string without slashes or spaces, got {id_prefix!r}")
    outside = not isinstance(audio_dir, str) or Path(audio_dir).is_absolute() or ".." in Path(audio_dir).parts
    if outside or not audio_dir:
        raise ValueError(f"audio_dir must be a relative folder inside out_dir, got {audio_dir!r}")

    spoken = [item for item in items for _ in range(renderings_per_item)]
    if max_utterances is not None:
        spoken = spoken[:max_utterances]
    settings = _settings_plan(len(spoken), voices, rates, pitches, seed, id_prefix)
    out_dir = Path(out_dir)
    base_dir = out_dir.absolute()
    relative = [Path(audio_dir) / f"{id_prefix}-{k:06d}.wav" for k in range(len(spoken))]
    if not overwrite:
        existing = [str(out_dir / path) for path in relative if (out_dir / path).exists()]
        if existing:
            raise FileExistsError(
                f"{len(existing)} audio file(s) to be written exist already (first: {existing[0]}); "
                "choose another id_prefix or audio_dir, or pass overwrite=True"
            )
    (out_dir / audio_dir).mkdir(parents=True, exist_ok=True)

    rows: list[ManifestRow] = []
    seconds = 0.0
    stopped = False
    requests = [(item.text_query, voice, rate, pitch) for item, (voice, rate, pitch) in zip(spoken, settings)]
    with (
        tqdm(total=len(spoken), desc=progress_label, unit="utt", disable=not progress) as bar,
        contextlib.closing(synthesize_many(requests, workers=workers)) as rendered,
    ):
        for k, (item, setting, (pcm, espeak_rate)) in enumerate(zip(spoken, settings, rendered)):
            waveform = resample(pcm, espeak_rate, sampling_rate)
            duration = waveform.size / sampling_rate
            if max_seconds is not None and seconds + duration > max_seconds:
                stopped = True
                break
            write_wav(out_dir / relative[k], waveform, sampling_rate)
            row_id = f"{id_prefix}-{k:06d}"
            rows.append(
                _row(item, row_id, relative[k].as_posix(), sampling_rate, setting, waveform, instruction, base_dir)
            )
            seconds += duration
            bar.update(1)
    return SynthesisResult(rows=rows, num_utterances=len(rows), audio_seconds=seconds, stopped_by_budget=stopped)


# ---- text items -----------------------------------------------------------------------------------


def write_text_items(path: str | os.PathLike[str], items: Iterable[QAItem], overwrite: bool = False) -> Path:
    """Write items as JSONL (one :meth:`QAItem.to_dict` a line), atomically; refuses to replace a file
    unless ``overwrite``."""
    path = Path(path)
    items = _check_items(items)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    return write_text_atomic(path, (json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in items))


def read_text_items(path: str | os.PathLike[str]) -> list[QAItem]:
    """The items of a ``text_<split>.jsonl`` file; a ``ValueError`` names the line of a bad record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text items file not found: {path}")
    items = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = QAItem.from_dict(json.loads(line))
            except (json.JSONDecodeError, ValueError) as error:
                raise ValueError(f"{path}, line {number}: {error}") from error
            if item.id in seen:
                raise ValueError(f"{path}, line {number}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    return items


def qa_tokenizer_texts(items: Iterable[QAItem], instruction: str = SPOKEN_INSTRUCTION) -> list[str]:
    """Texts to train a tokenizer shared by the text teacher and the speech student on: the queries,
    the answers and the spoken instruction (:func:`caad.models.train_tokenizer`)."""
    texts = [instruction]
    for item in _check_items(items):
        texts += [item.text_query, item.answer]
    return texts


# ---- the set --------------------------------------------------------------------------------------

_ENTRIES = {
    SPOKEN_QA_INFO_NAME,
    "audio",
    *(f"{name}.jsonl" for name in QA_SPLITS),
    *(f"text_{name}.jsonl" for name in QA_SPLITS),
}


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; pass overwrite=True to replace the set in it"
        )
    if not (out_dir / SPOKEN_QA_INFO_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} is not a spoken-QA set (no {SPOKEN_QA_INFO_NAME}): refusing to delete its contents even "
            "with overwrite=True; choose another output folder"
        )
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in _ENTRIES)
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds files that are not part of the set ({', '.join(foreign[:5])}): refusing to delete "
            "them even with overwrite=True"
        )


def _move_into_place(staging: Path, out_dir: Path) -> None:
    old = None
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


def synthesize_spoken_qa(
    out_dir: str | os.PathLike[str],
    num_examples: int = 600,
    seed: int = 0,
    *,
    voices: Sequence[str] = DEFAULT_VOICES,
    rates: Sequence[int] = DEFAULT_RATES_WPM,
    pitches: Sequence[int] = DEFAULT_PITCHES,
    tasks: Sequence[str] = QA_TASKS,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    holdout_fraction: float = 0.2,
    sampling_rate: int = 16000,
    instruction: str = SPOKEN_INSTRUCTION,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> SpokenQAPaths:
    """Build the spoken-QA set in ``out_dir`` (module docstring: layout, fields, determinism).

    Args:
        out_dir: the set's folder; must not exist or be empty, unless ``overwrite``.
        num_examples: spoken utterances over all splits (text items are all written, whatever this is).
        seed: the held-out keys, which questions are spoken and with which settings all follow from it.
        voices: voice names from :data:`caad.data.espeak.VOICES`.
        rates: speaking rates in words per minute.
        pitches: espeak-ng pitch settings (0-100).
        tasks: the tasks to include (:data:`~caad.data.spoken_qa_items.QA_TASKS`).
        splits: train / validation / test fractions of the utterances.
        holdout_fraction: fraction of each task's keys held out of training (half validation, half test).
        sampling_rate: rate of the WAV files.
        instruction: the instruction of every spoken row.
        workers: utterances rendered at once (default up to 2); the output does not depend on it.
        progress: show a progress bar.
        overwrite: replace an earlier set in ``out_dir`` (only a folder holding ``spoken_qa.json`` and
            nothing foreign); the old set is removed only after the new one is complete.

    Returns:
        :class:`SpokenQAPaths`.
    """
    out_dir = Path(out_dir)
    num_examples = _check_int(num_examples, "num_examples", 1)
    seed = _check_int(seed, "seed", -(2**63))
    voices, rates, pitches = _check_settings(voices, rates, pitches)
    sampling_rate, instruction, workers = _check_output_args(sampling_rate, instruction, workers)
    counts = split_counts(num_examples, splits)
    items_by_split = split_items(all_items(tasks), seed, holdout_fraction)
    for name, count in zip(QA_SPLITS, counts):
        if count and not items_by_split[name]:
            raise ValueError(
                f"the {name} split has no questions (holdout_fraction={holdout_fraction}) but {count} utterances "
                "were asked for it; raise holdout_fraction or set its fraction in splits to 0"
            )
    _check_out_dir(out_dir, overwrite)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        stats: dict[str, dict[str, Any]] = {}
        for name, count in zip(QA_SPLITS, counts):
            split_items_ = items_by_split[name]
            spoken = plan_utterances(split_items_, count, seed, salt=name)
            result = synthesize_items(
                spoken,
                staging,
                voices=voices,
                rates=rates,
                pitches=pitches,
                seed=seed,
                id_prefix=f"sqa-s{seed}-{name}",
                audio_dir=f"audio/{name}",
                sampling_rate=sampling_rate,
                instruction=instruction,
                workers=workers,
                progress=progress,
                progress_label=f"synthesising {name} questions",
            )
            write_manifest(staging / f"{name}.jsonl", result.rows)
            write_text_items(staging / f"text_{name}.jsonl", split_items_)
            stats[name] = {
                "utterances": result.num_utterances,
                "audio_seconds": round(result.audio_seconds, 3),
                "text_items": len(split_items_),
                "spoken_questions": len({item.id for item in spoken}),
                "chance_accuracy_text": round(chance_accuracy(split_items_), 4) if split_items_ else None,
                "held_out_keys": sorted({item.key for item in split_items_}) if name != "train" else None,
            }
        info = {
            "format": SPOKEN_QA_FORMAT,
            "version": SPOKEN_QA_VERSION,
            "seed": seed,
            "num_examples": num_examples,
            "splits": dict(zip(QA_SPLITS, (float(f) for f in splits))),
            "holdout_fraction": holdout_fraction,
            "holdout_units": {
                "addition": "unordered operand pair",
                "comparison": "unordered operand pair",
                "subtraction": "ordered operand pair",
                "counting": "direction and number",
                "facts": "fact and phrasing (every fact keeps a training phrasing)",
            },
            "tasks": list(dict.fromkeys(tasks)),
            "instruction": instruction,
            "sampling_rate": sampling_rate,
            "synthesizer": "libespeak-ng (espeakng-loader wheel)",
            "voices": {name: VOICES[name].gender for name in voices},
            "rates_wpm": list(rates),
            "pitches": list(pitches),
            "stats": stats,
        }
        write_text_atomic(staging / SPOKEN_QA_INFO_NAME, json.dumps(info, indent=2) + "\n")
        _check_out_dir(out_dir, overwrite)  # again: something may have appeared there meanwhile
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _paths(out_dir)


def _paths(root: Path) -> SpokenQAPaths:
    return SpokenQAPaths(
        root=root,
        manifests={name: root / f"{name}.jsonl" for name in QA_SPLITS},
        text={name: root / f"text_{name}.jsonl" for name in QA_SPLITS},
    )


def load_spoken_qa(root: str | os.PathLike[str]) -> SpokenQAPaths:
    """The paths of an existing set (checks ``spoken_qa.json`` and that every file is there)."""
    root = Path(root)
    info_path = root / SPOKEN_QA_INFO_NAME
    if not info_path.is_file():
        raise FileNotFoundError(f"{root} is not a spoken-QA set: {SPOKEN_QA_INFO_NAME} not found")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{info_path}: invalid JSON ({error.msg})") from error
    if not isinstance(info, dict) or info.get("format") != SPOKEN_QA_FORMAT:
        raise ValueError(f"{info_path}: not a {SPOKEN_QA_FORMAT} description")
    paths = _paths(root)
    missing = [str(p) for p in (*paths.manifests.values(), *paths.text.values()) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"spoken-QA set {root} is incomplete: missing {', '.join(missing)}")
    return paths
