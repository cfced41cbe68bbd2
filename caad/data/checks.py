"""Checks of a manifest and its audio before anything trains on it, and length limits.

A problem in the data should stop a run before it starts, with a message that names the manifest,
the row (line number and id) and the file, not surface at the training step that first reads the
row. :func:`check_manifest` reads every line and every audio file once and reports, without stopping
at the first problem:

errors (the run must not start)
    an empty manifest; a line that is not valid JSON or has a missing or mistyped field; a duplicate
    id; a required field (``label``, ``pseudo_gt`` ...) missing or blank; a missing audio file; a file
    libsndfile cannot read, or whose samples cannot be decoded to the end (truncated or corrupt); a
    file with no samples or with NaN/infinite samples; a clip shorter than ``min_seconds``, or
    longer than ``max_seconds`` when that hard limit is given;
warnings (the run may start)
    a clip longer than the model's audio window (``window_seconds``): it will be cut to its first
    ``window_seconds``, as the Qwen2-Audio processor (Whisper's feature extractor with
    ``truncation=True``) does, and is counted in :attr:`ManifestReport.num_truncated`; a
    ``sampling_rate`` field that differs from the file's own rate (the file's rate is used); a
    silent clip; a blank instruction.

:func:`load_clip` is the loader that truncates like the processor (and says so), and
:func:`fit_max_length` applies a token limit to ``prompt + target`` rows by truncating the target
or dropping the row, counting both.

For a trainer: call :func:`check_training_data` (or :func:`check_manifest` then
:meth:`ManifestReport.raise_for_errors`) and :func:`fit_max_length` after reading the config and
before creating any output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from caad.data.manifest import ManifestError, ManifestRow

__all__ = [
    "DEFAULT_MIN_SECONDS",
    "DataCheckError",
    "DataIssue",
    "LengthReport",
    "ManifestReport",
    "check_manifest",
    "check_training_data",
    "fit_max_length",
    "load_clip",
]

#: The shortest clip the models accept (0.1 s, ``caad.models.interface.MIN_AUDIO_SAMPLES``).
DEFAULT_MIN_SECONDS = 0.1
_REQUIRABLE = ("label", "pseudo_gt", "category", "instruction")


class DataCheckError(ValueError):
    """The data failed its checks; ``report`` holds every problem found."""

    def __init__(self, report: ManifestReport, max_shown: int = 20) -> None:
        self.report = report
        super().__init__(report.summary(max_shown=max_shown))


@dataclass(frozen=True)
class DataIssue:
    """One problem: where (manifest, 1-based line, row id, audio file) and what."""

    manifest: Path
    line: int | None
    row_id: str | None
    file: Path | None
    kind: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = str(self.manifest)
        if self.line is not None:
            where += f", line {self.line}"
        if self.row_id is not None:
            where += f" (row {self.row_id!r})"
        if self.file is not None:
            where += f", audio {self.file}"
        return f"{where}: {self.message}"


@dataclass
class ManifestReport:
    """What :func:`check_manifest` found in one manifest."""

    manifest: Path
    num_rows: int = 0
    num_audio_files: int = 0
    errors: list[DataIssue] = field(default_factory=list)
    warnings: list[DataIssue] = field(default_factory=list)
    num_truncated: int = 0
    """Rows whose clip is longer than the window and will be cut to it."""
    seconds: list[float] = field(default_factory=list, repr=False)
    """Duration of each readable row's clip."""
    total_audio_seconds: float = 0.0
    """Duration of the distinct readable audio files."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, int]:
        """Number of issues of each kind (errors and warnings)."""
        out: dict[str, int] = {}
        for issue in [*self.errors, *self.warnings]:
            out[issue.kind] = out.get(issue.kind, 0) + 1
        return dict(sorted(out.items()))

    def summary(self, max_shown: int = 20) -> str:
        """A readable report: totals, then up to ``max_shown`` errors and warnings, one a line."""
        lines = [
            f"{self.manifest}: {self.num_rows} rows, {self.num_audio_files} audio files, "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        ]
        if self.seconds:
            line = (
                f"  clips: {min(self.seconds):.2f} s to {max(self.seconds):.2f} s, "
                f"{self.total_audio_seconds / 3600:.2f} h of distinct audio"
            )
            if self.num_truncated:
                line += f"; {self.num_truncated} longer than the window (will be truncated)"
            lines.append(line)
        for title, issues in (("error", self.errors), ("warning", self.warnings)):
            for issue in issues[:max_shown]:
                lines.append(f"  {title}: {issue}")
            if len(issues) > max_shown:
                lines.append(f"  ... and {len(issues) - max_shown} more {title}s")
        return "\n".join(lines)

    def raise_for_errors(self, max_shown: int = 20) -> None:
        """Raise :class:`DataCheckError` when there are errors."""
        if self.errors:
            raise DataCheckError(self, max_shown)


@dataclass(frozen=True)
class _AudioInfo:
    seconds: float | None
    rate: int | None
    problem: str | None = None
    kind: str | None = None
    silent: bool = False


def _wav_missing_bytes(path: Path) -> int:
    """For a RIFF/WAVE file: how many bytes of its ``data`` chunk are missing from the file (0 when
    complete, or not a WAV, or the size is unknown). libsndfile silently reads what there is."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(12)
            if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
                return 0
            size = path.stat().st_size
            position = 12
            while position + 8 <= size:
                handle.seek(position)
                chunk = handle.read(8)
                chunk_size = int.from_bytes(chunk[4:8], "little")
                if chunk[:4] == b"data":
                    if chunk_size in (0, 0xFFFFFFFF):  # written as a stream: size unknown
                        return 0
                    return max(0, position + 8 + chunk_size - size)
                position += 8 + chunk_size + (chunk_size & 1)
    except OSError:
        return 0
    return 0


def _inspect_audio(path: Path, decode: bool) -> _AudioInfo:
    import soundfile

    if not path.exists():
        return _AudioInfo(None, None, "audio file not found", "missing_audio")
    if not path.is_file():
        return _AudioInfo(None, None, "the audio path is not a file", "missing_audio")
    try:
        info = soundfile.info(str(path))
    except Exception as error:  # noqa: BLE001 - libsndfile raises several types
        return _AudioInfo(None, None, f"cannot read the audio file ({error})", "corrupt_audio")
    missing = _wav_missing_bytes(path)
    if missing:
        return _AudioInfo(
            info.frames / info.samplerate if info.samplerate else None,
            int(info.samplerate),
            f"the audio file is truncated: its header announces {missing} more bytes of samples than it holds",
            "corrupt_audio",
        )
    if info.frames <= 0:
        return _AudioInfo(0.0, int(info.samplerate), "the audio file contains no samples", "empty_audio")
    seconds = info.frames / info.samplerate
    if not decode:
        return _AudioInfo(seconds, int(info.samplerate))
    try:
        data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # noqa: BLE001
        return _AudioInfo(seconds, int(info.samplerate), f"the audio cannot be decoded ({error})", "corrupt_audio")
    if data.shape[0] < info.frames:
        return _AudioInfo(
            seconds,
            int(info.samplerate),
            f"the audio file is truncated: its header announces {info.frames} samples, {data.shape[0]} could be read",
            "corrupt_audio",
        )
    if not np.isfinite(data).all():
        return _AudioInfo(seconds, int(info.samplerate), "the audio holds NaN or infinite samples", "corrupt_audio")
    return _AudioInfo(data.shape[0] / info.samplerate, int(info.samplerate), silent=not np.abs(data).max() > 0)


def _iter_lines(path: Path) -> Iterable[tuple[int, str]]:
    with open(path, encoding="utf-8") as handle:
        yield from enumerate(handle, start=1)


def check_manifest(
    manifest: str | os.PathLike[str],
    *,
    require: Sequence[str] = (),
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float | None = None,
    window_seconds: float | None = None,
    decode: bool = True,
    progress: bool = False,
) -> ManifestReport:
    """Check every row of ``manifest`` and every audio file it names (module docstring).

    Args:
        manifest: a JSONL manifest (:mod:`caad.data.manifest`).
        require: fields every row must have, non-blank: any of ``label``, ``pseudo_gt``,
            ``category``, ``instruction`` (Stage 2 needs ``pseudo_gt``, evaluation ``label``).
        min_seconds: shorter clips are errors (the models need 0.1 s).
        max_seconds: longer clips are errors (a hard limit; ``None``: none).
        window_seconds: the model's audio window; longer clips are counted as truncated (warnings).
        decode: decode every file to its end (finds truncated and corrupt data; slower). ``False``
            reads the headers only.
        progress: show a progress bar.

    Returns:
        a :class:`ManifestReport`. Raises only for a manifest that cannot be opened
        (``FileNotFoundError``) or bad arguments (``ValueError``).
    """
    from tqdm.auto import tqdm

    path = Path(manifest)
    unknown = [name for name in require if name not in _REQUIRABLE]
    if unknown:
        raise ValueError(f"require: unknown field(s) {unknown}; expected some of {_REQUIRABLE}")
    for value, name in ((min_seconds, "min_seconds"), (max_seconds, "max_seconds"), (window_seconds, "window_seconds")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a non-negative number or None, got {value!r}")
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if not path.is_file():
        raise ValueError(f"manifest {path} is not a file")
    report = ManifestReport(manifest=path)

    def issue(kind: str, message: str, line: int | None = None, row_id: str | None = None, file: Path | None = None,
              severity: str = "error") -> None:  # fmt: skip
        target = report.errors if severity == "error" else report.warnings
        target.append(DataIssue(path, line, row_id, file, kind, message, severity))

    try:
        lines = list(_iter_lines(path))
    except UnicodeDecodeError as error:
        issue("bad_manifest", f"not UTF-8 text ({error})")
        return report
    base_dir = path.parent.absolute()
    seen: dict[str, int] = {}
    audio_cache: dict[Path, _AudioInfo] = {}
    for number, line in tqdm(lines, desc=f"checking {path.name}", unit="row", disable=not progress):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            issue("bad_row", f"invalid JSON ({error.msg} at column {error.colno})", number)
            continue
        try:
            row = ManifestRow.from_dict(obj, None, None, base_dir)
        except ManifestError as error:
            row_id = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
            issue("bad_row", str(error), number, row_id)
            continue
        report.num_rows += 1
        if row.id in seen:
            issue("bad_row", f"duplicate id (first on line {seen[row.id]})", number, row.id)
            continue
        seen[row.id] = number
        for name in require:
            value = getattr(row, name)
            if value is None or not str(value).strip():
                issue("missing_field", f"field {name!r} is missing or blank (required here)", number, row.id)
        if "instruction" not in require and not row.instruction.strip():
            issue("blank_instruction", "the instruction is blank", number, row.id, severity="warning")
        audio_path = row.audio_path
        key = Path(os.path.abspath(audio_path))
        if key not in audio_cache:
            audio_cache[key] = _inspect_audio(audio_path, decode)
        info = audio_cache[key]
        if info.problem is not None:
            issue(info.kind or "bad_audio", info.problem, number, row.id, audio_path)
            continue
        seconds = float(info.seconds or 0.0)
        report.seconds.append(seconds)
        if seconds < min_seconds:
            issue("too_short", f"the clip is {seconds:.3f} s long; at least {min_seconds:g} s is needed", number,
                  row.id, audio_path)  # fmt: skip
        elif max_seconds is not None and seconds > max_seconds:
            issue("too_long", f"the clip is {seconds:.2f} s long; the limit is {max_seconds:g} s", number, row.id,
                  audio_path)  # fmt: skip
        elif window_seconds is not None and seconds > window_seconds:
            report.num_truncated += 1
            issue("truncated", f"the clip is {seconds:.2f} s long: only its first {window_seconds:g} s will be used",
                  number, row.id, audio_path, severity="warning")  # fmt: skip
        if info.rate is not None and info.rate != row.sampling_rate:
            issue("sampling_rate", f"field 'sampling_rate' says {row.sampling_rate} Hz, the file is at {info.rate} Hz "
                  "(the file's rate is used)", number, row.id, audio_path, severity="warning")  # fmt: skip
        if info.silent:
            issue("silent", "the clip is silent (all samples 0)", number, row.id, audio_path, severity="warning")
    report.num_audio_files = len(audio_cache)
    report.total_audio_seconds = sum(i.seconds or 0.0 for i in audio_cache.values() if i.problem is None)
    if report.num_rows == 0 and not report.errors:
        issue("empty_manifest", "the manifest has no rows")
    return report


def check_training_data(
    manifest: str | os.PathLike[str],
    *,
    window_seconds: float | None,
    require: Sequence[str] = ("pseudo_gt",),
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float | None = None,
    decode: bool = True,
    progress: bool = False,
) -> ManifestReport:
    """:func:`check_manifest` for a trainer: raises :class:`DataCheckError` (listing the problems)
    when there is any error, else returns the report (its warnings and ``num_truncated`` are for the
    run's log). Call it before creating any output folder."""
    report = check_manifest(
        manifest,
        require=require,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        window_seconds=window_seconds,
        decode=decode,
        progress=progress,
    )
    report.raise_for_errors()
    return report


def load_clip(
    path: str | os.PathLike[str],
    sampling_rate: int = 16000,
    max_samples: int | None = None,
    min_samples: int = 1,
) -> tuple[np.ndarray, bool]:
    """Read a clip as mono float32 at ``sampling_rate``; cut it to its first ``max_samples`` samples
    when longer (as the Qwen2-Audio processor does). Returns ``(waveform, truncated)``.

    Raises ``FileNotFoundError`` / :class:`caad.data.audio.AudioError` naming the file when it is
    missing or unreadable, and ``ValueError`` naming it when it is shorter than ``min_samples``.
    """
    from caad.data.audio import load_audio

    waveform = load_audio(path, sampling_rate)
    if waveform.shape[0] < min_samples:
        raise ValueError(
            f"audio {path} is {waveform.shape[0] / sampling_rate:.3f} s long; at least "
            f"{min_samples / sampling_rate:.3f} s is needed"
        )
    if max_samples is not None and waveform.shape[0] > max_samples:
        return np.ascontiguousarray(waveform[:max_samples]), True
    return waveform, False


@dataclass
class LengthReport:
    """What :func:`fit_max_length` did: rows kept, targets truncated, rows dropped (by id)."""

    max_length: int
    policy: str
    num_rows: int = 0
    truncated: list[str] = field(default_factory=list)
    filtered: list[str] = field(default_factory=list)
    longest: int = 0
    """The longest ``prompt + target`` before the limit, in tokens."""

    def summary(self) -> str:
        return (
            f"max_length {self.max_length} ({self.policy}): {self.num_rows} rows, longest {self.longest} tokens, "
            f"{len(self.truncated)} targets truncated, {len(self.filtered)} rows dropped"
        )


def fit_max_length(
    rows: Sequence[ManifestRow],
    tokenizer: Any,
    max_length: int,
    *,
    policy: str = "truncate",
    prompt_tokens: int | Callable[[ManifestRow], int] | None = None,
    target_field: str = "pseudo_gt",
    eos: bool = True,
) -> tuple[list[ManifestRow], LengthReport]:
    """Make every row's ``prompt + target`` fit in ``max_length`` tokens.

    Args:
        rows: the rows (each must have the target field).
        tokenizer: a HF tokenizer (``tokenizer(text, add_special_tokens=False)["input_ids"]``).
        max_length: the most tokens of prompt, audio tokens and target (with its ``eos``).
        policy: ``"truncate"``: cut the target to the tokens that fit (decoded back to text) and drop
            rows whose prompt alone does not leave one target token; ``"filter"``: drop every row that
            is too long; ``"error"``: raise ``ValueError`` naming the first row that is too long.
        prompt_tokens: the prompt's length in tokens, audio tokens and chat template included: a
            function of the row (the trainer knows its prompt format), or a number added to the
            instruction's token count (``None``: the instruction alone).
        target_field: the row field holding the target (``pseudo_gt``).
        eos: the target ends with one ``eos`` token that counts.

    Returns:
        ``(kept rows, report)``; rows are new objects (the inputs are not modified).
    """
    if policy not in ("truncate", "filter", "error"):
        raise ValueError(f"policy must be 'truncate', 'filter' or 'error', got {policy!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")

    def count(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    report = LengthReport(max_length=max_length, policy=policy)
    kept: list[ManifestRow] = []
    for row in rows:
        report.num_rows += 1
        target = getattr(row, target_field)
        if target is None:
            raise ValueError(f"row {row.id!r} has no {target_field}; cannot measure its length")
        if callable(prompt_tokens):
            prompt = int(prompt_tokens(row))
        else:
            prompt = len(count(row.instruction)) + int(prompt_tokens or 0)
        target_ids = count(target)
        total = prompt + len(target_ids) + int(eos)
        report.longest = max(report.longest, total)
        if total <= max_length:
            kept.append(row)
            continue
        if policy == "error":
            raise ValueError(
                f"row {row.id!r}: prompt {prompt} + target {len(target_ids) + int(eos)} tokens = {total} tokens, "
                f"more than max_length {max_length}"
            )
        room = max_length - prompt - int(eos)
        if policy == "filter" or room < 1:
            report.filtered.append(row.id)
            continue
        text = tokenizer.decode(target_ids[:room], skip_special_tokens=True).strip()
        while text and len(count(text)) > room:  # decoding may merge pieces into more tokens
            text = text[:-1].rstrip()
        if not text:
            report.filtered.append(row.id)
            continue
        report.truncated.append(row.id)
        kept.append(replace(row, **{target_field: text}))
    return kept, report
