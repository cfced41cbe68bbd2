"""Importers from real benchmarks into our manifests (``caad data import ...``), from local copies.

Nothing is downloaded: point them at a copy on disk.

**Dynamic-SUPERB** (:func:`import_dynamic_superb`). A task is a Hugging Face dataset with the
columns ``audio`` (the ``Audio`` feature: ``{"bytes", "path"}``, or a path string), ``instruction``,
``label`` and ``file`` (the original file name); other columns are kept in the rows' metadata.
Accepted layouts: a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a
folder holding parquet files (a hub snapshot: ``data/test-00000-of-00001.parquet``; the split is
the file name's prefix), or one parquet file. Tables are read with pyarrow (audio is not decoded by
``datasets``, so no torchcodec is needed and no cache is written). Audio bytes are written as files
under ``<out>/audio/<split>/`` in their own format; an audio path without bytes is resolved against
the dataset folder and referenced where it is. One manifest per split, ``<out>/<split>.jsonl``.
Rows: ``id`` ``<task>-<split>-<index>``, ``task`` (``--task``, default the dataset folder's name),
``label``, ``category`` (``--category``), ``choices`` (the task's distinct labels, when there are at
most :data:`caad.eval.scoring.MAX_CANDIDATES`: a classification task) and ``metadata``
(``file``, ``source``, the other columns).

**MCR-BENCH** (:func:`import_mcr_bench`). The release is ``<root>/<TASK>/<TASK>.json`` (``AQA``,
``SER``, ``VSC``) with audio files beside it; each JSON is a list of ``{"audio", "gt", "faithful",
"adversarial", "irrelevant", "neutral"}``: ``neutral`` is the question without a description, the
other three are descriptions of the audio (accurate, contradicting, unrelated). Each sample becomes
one row per condition present, ids ``mcr-<task>-<index>-<condition>``, sharing the group
``mcr-<task>-<index>``: ``instruction`` is the question (neutral) or ``f"{description} {question}"``
(the description as is when it already holds the question), ``context`` the description, ``label``
``gt``. The adversarial row's ``context_label`` is the one candidate answer its description names
(by the scorer's rules) when there is exactly one other than ``gt``, else unknown (the text
influence rate then skips that item; the shift does not need it). Audio paths are resolved against
the task folder, then the root, and referenced where they are. Manifests: ``<out>/<task>.jsonl`` and
``<out>/test.jsonl`` (all tasks).

Both write into ``<out>`` only when everything was read (a hidden staging folder renamed at the
end); ``overwrite`` replaces only a folder an earlier import wrote (it holds ``import.json``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caad.data.files import write_text_atomic
from caad.data.manifest import ManifestRow, write_manifest

__all__ = [
    "IMPORT_INFO_NAME",
    "DatasetImportError",
    "ImportResult",
    "import_dynamic_superb",
    "import_mcr_bench",
]

IMPORT_INFO_NAME = "import.json"
_AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au"}


class DatasetImportError(ValueError):
    """The source is not in the expected layout, or some of its audio cannot be read."""


@dataclass
class ImportResult:
    """Where an import wrote its manifests, and how many rows each has."""

    out_dir: Path
    manifests: dict[str, Path] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    """Source records without a label / ground truth, left out."""


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return name or "task"


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it")
            if not (out_dir / IMPORT_INFO_NAME).is_file():
                raise FileExistsError(
                    f"{out_dir} was not written by an import (it has no {IMPORT_INFO_NAME}): refusing to delete it "
                    "even with --overwrite; choose another output folder"
                )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.import-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def _finish(staging: Path, out_dir: Path, info: dict[str, Any]) -> None:
    write_text_atomic(staging / IMPORT_INFO_NAME, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
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


def _audio_info(path: Path) -> tuple[int, float]:
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as error:  # noqa: BLE001
        raise DatasetImportError(f"cannot read the audio file {path}: {error}") from error
    if info.frames <= 0:
        raise DatasetImportError(f"the audio file {path} contains no samples")
    return int(info.samplerate), info.frames / info.samplerate


def _choices(labels: Sequence[str]) -> list[str] | None:
    """The distinct labels of a classification task (``None``: one label, or too many to be one)."""
    from caad.eval.scoring import MAX_CANDIDATES

    distinct = list(dict.fromkeys(label for label in labels if label.strip()))
    return distinct if 1 < len(distinct) <= MAX_CANDIDATES else None


# ------------------------------------------------------------------------------------ Dynamic-SUPERB


def _tables(source: Path) -> Iterator[tuple[str, Any]]:
    """``(split, pyarrow table)`` of a save_to_disk folder, a parquet folder or a parquet file."""
    import pyarrow.parquet as pq

    if source.is_file():
        if source.suffix != ".parquet":
            raise DatasetImportError(f"{source}: expected a parquet file or a dataset folder")
        yield source.name.split("-")[0].split(".")[0] or "test", pq.read_table(source)
        return
    if (source / "dataset_dict.json").is_file() or (source / "state.json").is_file():
        import datasets

        loaded = datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.DatasetDict):
            for split, dataset in loaded.items():
                yield split, dataset.data.table
        else:
            yield "test", loaded.data.table
        return
    files = sorted(source.rglob("*.parquet"))
    if not files:
        raise DatasetImportError(
            f"{source}: no dataset found (expected a folder written by save_to_disk, parquet files, or a parquet file)"
        )
    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(path.name.split("-")[0].split(".")[0] or "test", []).append(path)
    import pyarrow as pa

    for split, paths in by_split.items():
        yield split, pa.concat_tables([pq.read_table(path) for path in paths])


def _write_audio(value: Any, source: Path, target_stem: Path) -> tuple[Path, bool]:
    """The audio file of one record: written from its bytes (``True``) or found on disk (``False``)."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise DatasetImportError(f"the audio column must hold {{'bytes', 'path'}} or a path, got {kind}")
    data, path = value.get("bytes"), value.get("path")
    if data:
        suffix = Path(path).suffix.lower() if path else ""
        target = target_stem.with_suffix(suffix if suffix in _AUDIO_SUFFIXES else ".wav")
        target.write_bytes(data)
        return target, True
    if value.get("array") is not None and value.get("sampling_rate"):
        import numpy as np

        from caad.data.audio import write_wav

        target = target_stem.with_suffix(".wav")
        write_wav(target, np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]))
        return target, True
    if path:
        candidate = Path(path)
        for base in ([] if candidate.is_absolute() else [source if source.is_dir() else source.parent]) + [Path()]:
            resolved = base / candidate
            if resolved.is_file():
                return resolved.absolute(), False
        raise DatasetImportError(f"audio {path!r} has no bytes and is not found under {source}")
    raise DatasetImportError("an audio value has neither bytes nor a path")


def import_dynamic_superb(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    task: str | None = None,
    category: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Import a local Dynamic-SUPERB task dataset into manifests (module docstring)."""
    from tqdm.auto import tqdm

    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise FileNotFoundError(f"dataset not found: {source}")
    task_name = task or _safe_name(source.stem if source.is_file() else source.name)
    tables = list(_tables(source))
    for split, table in tables:
        missing = [column for column in ("audio", "instruction", "label") if column not in table.column_names]
        if missing:
            raise DatasetImportError(
                f"{source} (split {split!r}): missing column(s) {missing}; Dynamic-SUPERB datasets have audio, "
                f"instruction, label and file (found {table.column_names})"
            )
    staging = _prepare_out(out_dir, overwrite)
    result = ImportResult(out_dir=out_dir)
    try:
        for split, table in tables:
            split = _safe_name(split)
            (staging / "audio" / split).mkdir(parents=True, exist_ok=True)
            records = table.to_pylist()
            labels = [str(r["label"]) for r in records if r.get("label") is not None and str(r["label"]).strip()]
            choices = _choices(labels)
            rows = []
            for index, record in enumerate(tqdm(records, desc=f"importing {task_name} {split}", disable=not progress)):
                label = record.get("label")
                if label is None or not str(label).strip():
                    result.skipped += 1
                    continue
                row_id = f"{task_name}-{split}-{index:06d}"
                audio_path, written = _write_audio(record["audio"], source, staging / "audio" / split / row_id)
                rate, _ = _audio_info(audio_path)
                metadata = {"source": "dynamic-superb", "dataset": source.name}
                for key, value in record.items():
                    if key not in ("audio", "instruction", "label") and isinstance(value, (str, int, float, bool)):
                        metadata[key] = value
                rows.append(
                    ManifestRow(
                        id=row_id,
                        audio=(audio_path.relative_to(staging).as_posix() if written else str(audio_path)),
                        sampling_rate=rate,
                        instruction=str(record.get("instruction") or ""),
                        task=task_name,
                        metadata=metadata,
                        label=str(label),
                        category=category,
                        choices=choices,
                    )
                )
            write_manifest(staging / f"{split}.jsonl", rows)
            result.manifests[split] = out_dir / f"{split}.jsonl"
            result.rows[split] = len(rows)
        _finish(
            staging,
            out_dir,
            {"format": "dynamic-superb", "source": str(source.absolute()), "task": task_name, "rows": result.rows,
             "skipped": result.skipped},
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


# ------------------------------------------------------------------------------------------- MCR-BENCH

_MCR_CONDITIONS = ("neutral", "faithful", "adversarial", "irrelevant")


def _load_mcr_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetImportError(f"{path}: not valid JSON ({error})") from error
    if isinstance(data, dict):
        for key in ("data", "samples", "examples", "items"):
            if isinstance(data.get(key), list):
                return data[key]
    if not isinstance(data, list):
        raise DatasetImportError(f"{path}: expected a JSON list of samples")
    return data


def _mcr_files(source: Path, tasks: Sequence[str] | None) -> list[tuple[str, Path]]:
    if source.is_file():
        return [(_safe_name(source.stem), source)]
    found = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        if (folder / f"{folder.name}.json").is_file():
            found.append((folder.name, folder / f"{folder.name}.json"))
    if not found:
        found = [(_safe_name(p.stem), p) for p in sorted(source.glob("*.json"))]
    if tasks:
        known = {name for name, _ in found}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise DatasetImportError(f"{source}: no task {unknown}; found {sorted(known)}")
        found = [(name, path) for name, path in found if name in tasks]
    if not found:
        raise DatasetImportError(f"{source}: no MCR-BENCH task found (expected <TASK>/<TASK>.json, e.g. SER/SER.json)")
    return found


def _prompt(question: str, description: str) -> str:
    if question and question.strip() and question.strip() in description:
        return description
    return f"{description.strip()} {question.strip()}".strip()


def import_mcr_bench(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tasks: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Import a local MCR-BENCH copy into manifests with one row per sample and condition (module
    docstring)."""
    from tqdm.auto import tqdm

    from caad.eval.normalize import normalize_text
    from caad.eval.scoring import named_candidates

    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise FileNotFoundError(f"MCR-BENCH copy not found: {source}")
    files = _mcr_files(source, tasks)
    root = source if source.is_dir() else source.parent
    staging = _prepare_out(out_dir, overwrite)
    result = ImportResult(out_dir=out_dir)
    all_rows: list[ManifestRow] = []
    try:
        for task, path in files:
            samples = _load_mcr_json(path)
            truths = [str(s["gt"]) for s in samples if isinstance(s, dict) and s.get("gt") is not None]
            choices = _choices(truths)
            rows = []
            for index, sample in enumerate(tqdm(samples, desc=f"importing MCR-BENCH {task}", disable=not progress)):
                if not isinstance(sample, dict) or sample.get("gt") is None or not sample.get("audio"):
                    result.skipped += 1
                    continue
                label = str(sample["gt"])
                audio = Path(str(sample["audio"]))
                candidates = [audio] if audio.is_absolute() else [path.parent / audio, root / audio]
                audio_path = next((c for c in candidates if c.is_file()), None)
                if audio_path is None:
                    raise DatasetImportError(f"{path}, sample {index}: audio file {sample['audio']!r} not found under "
                                       f"{path.parent} or {root}")  # fmt: skip
                rate, _ = _audio_info(audio_path)
                question = str(sample.get("neutral") or sample.get("question") or "")
                group = f"mcr-{task}-{index:05d}"
                for condition in _MCR_CONDITIONS:
                    if condition == "neutral":
                        if not question.strip():
                            continue
                        instruction, context, context_label = question, None, None
                    else:
                        description = sample.get(condition)
                        if not isinstance(description, str) or not description.strip():
                            continue
                        instruction, context, context_label = _prompt(question, description), description, None
                        if condition == "faithful":
                            context_label = label
                        elif condition == "adversarial" and choices:
                            truth = normalize_text(label)
                            named = [c for c in named_candidates(description, [label, *choices]) if c != truth]
                            named_labels = [c for c in choices if normalize_text(c) in named]
                            context_label = named_labels[0] if len(named) == 1 and len(named_labels) == 1 else None
                    rows.append(
                        ManifestRow(
                            id=f"{group}-{condition}",
                            audio=str(audio_path.absolute()),
                            sampling_rate=rate,
                            instruction=instruction,
                            task=task,
                            metadata={"source": "mcr-bench", "file": str(sample["audio"])},
                            label=label,
                            category=task,
                            condition=condition,
                            context=context,
                            context_label=context_label,
                            group=group,
                            choices=choices,
                        )
                    )
            write_manifest(staging / f"{task}.jsonl", rows)
            result.manifests[task] = out_dir / f"{task}.jsonl"
            result.rows[task] = len(rows)
            all_rows += rows
        write_manifest(staging / "test.jsonl", all_rows)
        result.manifests["test"] = out_dir / "test.jsonl"
        result.rows["test"] = len(all_rows)
        _finish(
            staging,
            out_dir,
            {"format": "mcr-bench", "source": str(source.absolute()), "rows": result.rows, "skipped": result.skipped},
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
