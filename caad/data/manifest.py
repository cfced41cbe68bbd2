"""The JSONL manifest: one example a line.

Schema (keys of one line's JSON object)::

    id                        str, required, unique in the file
    audio                     str, required: path of the audio file, relative to the manifest's folder
                              (or absolute)
    sampling_rate             int > 0, required: the rate of the audio file (Hz)
    instruction               str, required: the question/instruction asked about the audio
    task                      str, required: task name (Dynamic-SUPERB style, e.g. "speaker_gender")
    metadata                  object, optional (default {}): transcript and audio-derived attributes
                              (the built-in corpus: transcript, speaker, voice, gender, rate, rate_wpm,
                              pitch, pitch_setting, f0_hz, duration_s, keyword, distractor, ...)
    label                     str, optional: the short reference answer
    category                  str, optional: a task category for per-category means
    pseudo_gt                 str, optional: the Stage 1 target answer
    pseudo_gt_generator       str, optional: which Stage 1 generator wrote pseudo_gt
    hint_neutral              str, optional: a neutral text hint (linguistic-bias measure)
    hint_contradicting        str, optional: a text hint that contradicts the audio
    hint_contradicting_label  str, optional: the (wrong) answer the contradicting hint suggests
    condition                 str, optional: the prompt's text condition (MCR-BENCH): "neutral",
                              "faithful", "adversarial" or "irrelevant" (see caad.data.tasks)
    context                   str, optional: the text context the instruction starts with
    context_label             str, optional: the answer that context states (adversarial: a wrong one)
    group                     str, optional: the id of the underlying item; the rows of one item
                              under different conditions share it (paired comparisons, bootstrap)
    choices                   list of str, optional: the candidate answers of the question (scoring
                              marks an answer that names more than one of them as wrong)

The legacy hint fields (``hint_*``) are still read: evaluation asks such a row under the neutral
(no hint), irrelevant (``hint_neutral``) and adversarial (``hint_contradicting``) conditions.

Any other keys are kept as they are (:attr:`ManifestRow.extra`) and written back, so a tool that
reads a manifest and writes a new one loses nothing.

Reading is plain ``json`` line by line (not HF ``datasets``): errors can then name the line and
the field, rows may carry metadata objects of different shapes, and no cache files are written next
to the user's data. :func:`as_dataset` converts rows to a ``datasets.Dataset`` for code that wants
``map``/``shuffle``/``shard`` (metadata goes in as a JSON string column, since Arrow needs one schema).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from caad.data.files import open_atomic

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "CONDITIONS",
    "ManifestError",
    "ManifestRow",
    "ManifestWriter",
    "as_dataset",
    "read_manifest",
    "write_manifest",
]

_REQUIRED_STR = ("id", "audio", "instruction", "task")
_OPTIONAL_STR = (
    "label",
    "category",
    "pseudo_gt",
    "pseudo_gt_generator",
    "hint_neutral",
    "hint_contradicting",
    "hint_contradicting_label",
    "condition",
    "context",
    "context_label",
    "group",
)
#: The text conditions a row's ``condition`` may name (MCR-BENCH's four).
CONDITIONS: tuple[str, ...] = ("neutral", "faithful", "adversarial", "irrelevant")
_KNOWN = set(_REQUIRED_STR) | set(_OPTIONAL_STR) | {"sampling_rate", "metadata", "choices"}


class ManifestError(ValueError):
    """A manifest file or row is malformed. ``path``, ``line`` (1-based) and ``field`` say where."""

    def __init__(
        self,
        message: str,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.line = line
        self.field = field
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        if field is not None:
            message = f"field {field!r}: {message}"
        super().__init__(where + message)


@dataclass
class ManifestRow:
    """One example of a manifest (see the module docstring for the fields)."""

    id: str
    audio: str
    sampling_rate: int
    instruction: str
    task: str
    metadata: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    category: str | None = None
    pseudo_gt: str | None = None
    pseudo_gt_generator: str | None = None
    hint_neutral: str | None = None
    hint_contradicting: str | None = None
    hint_contradicting_label: str | None = None
    condition: str | None = None
    context: str | None = None
    context_label: str | None = None
    group: str | None = None
    choices: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown keys of the line, kept and written back unchanged."""
    base_dir: Path | None = field(default=None, compare=False, repr=False)
    """The folder of the manifest the row was read from (relative ``audio`` paths start there)."""

    @property
    def audio_path(self) -> Path:
        """The audio file's path: ``audio`` resolved against :attr:`base_dir` when relative."""
        path = Path(self.audio)
        if path.is_absolute() or self.base_dir is None:
            return path
        return self.base_dir / path

    def to_dict(self, manifest_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The JSON object of the row. With ``manifest_dir`` (the folder it will be written to), the
        audio path is rewritten so it still points at the same file: relative when the file lies
        under ``manifest_dir``, absolute otherwise."""
        audio = self.audio
        if manifest_dir is not None and self.base_dir is not None:
            target = Path(os.path.abspath(self.audio_path))
            folder = Path(os.path.abspath(manifest_dir))
            try:
                audio = target.relative_to(folder).as_posix()
            except ValueError:
                audio = str(target)
        out: dict[str, Any] = {
            "id": self.id,
            "audio": audio,
            "sampling_rate": self.sampling_rate,
            "instruction": self.instruction,
            "task": self.task,
            "metadata": self.metadata,
        }
        for name in _OPTIONAL_STR:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.choices is not None:
            out["choices"] = list(self.choices)
        for key, value in self.extra.items():
            if key not in out:
                out[key] = value
        return out

    @classmethod
    def from_dict(
        cls,
        obj: Any,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        base_dir: Path | None = None,
    ) -> ManifestRow:
        """Validate one parsed JSON value; raises :class:`ManifestError` naming the line and field."""
        if not isinstance(obj, dict):
            raise ManifestError(f"expected a JSON object, got {type(obj).__name__}", path, line)
        for name in _REQUIRED_STR:
            if name not in obj:
                raise ManifestError("missing (required)", path, line, name)
            value = obj[name]
            if not isinstance(value, str) or (name in ("id", "audio", "task") and not value.strip()):
                raise ManifestError(f"expected a non-empty string, got {value!r}", path, line, name)
        if "sampling_rate" not in obj:
            raise ManifestError("missing (required)", path, line, "sampling_rate")
        rate = obj["sampling_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise ManifestError(f"expected a positive integer (Hz), got {rate!r}", path, line, "sampling_rate")
        metadata = obj.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise ManifestError(f"expected a JSON object, got {type(metadata).__name__}", path, line, "metadata")
        optional: dict[str, str | None] = {}
        for name in _OPTIONAL_STR:
            value = obj.get(name)
            if value is not None and not isinstance(value, str):
                raise ManifestError(f"expected a string or null, got {value!r}", path, line, name)
            optional[name] = value
        if optional["condition"] is not None and optional["condition"] not in CONDITIONS:
            raise ManifestError(
                f"expected one of {', '.join(CONDITIONS)}, got {optional['condition']!r}", path, line, "condition"
            )
        choices = obj.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise ManifestError(f"expected a list of non-empty strings or null, got {choices!r}", path, line, "choices")
        extra = {key: value for key, value in obj.items() if key not in _KNOWN}
        return cls(
            id=obj["id"],
            audio=obj["audio"],
            sampling_rate=rate,
            instruction=obj["instruction"],
            task=obj["task"],
            metadata=metadata,
            choices=None if choices is None else list(choices),
            extra=extra,
            base_dir=base_dir,
            **optional,
        )


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as handle:
        yield from enumerate(handle, start=1)


def read_manifest(path: str | os.PathLike[str], allow_partial_last_line: bool = False) -> list[ManifestRow]:
    """Read and validate a JSONL manifest.

    Blank lines are skipped. Raises ``FileNotFoundError`` for a missing file and
    :class:`ManifestError` (naming the file, line and field) for invalid JSON, a missing or
    mistyped field, or a duplicate ``id``. Relative audio paths resolve against the manifest's
    folder (:attr:`ManifestRow.audio_path`).

    ``allow_partial_last_line``: a last line that is not newline-terminated and not valid JSON (a
    write that was interrupted) is ignored instead of being an error; used to resume.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if not path.is_file():
        raise ManifestError("is not a file", path)
    base_dir = path.parent.absolute()
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    try:
        lines = list(_iter_lines(path))
    except UnicodeDecodeError as error:
        raise ManifestError(f"not UTF-8 text ({error})", path) from error
    for number, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            if allow_partial_last_line and number == len(lines) and not line.endswith("\n"):
                break
            raise ManifestError(f"invalid JSON ({error.msg} at column {error.colno})", path, number) from error
        row = ManifestRow.from_dict(obj, path, number, base_dir)
        if row.id in seen:
            raise ManifestError(f"duplicate id {row.id!r} (first on line {seen[row.id]})", path, number, "id")
        seen[row.id] = number
        rows.append(row)
    return rows


def _dump(row: ManifestRow | dict[str, Any], manifest_dir: Path, index: int) -> str:
    if isinstance(row, dict):
        row = ManifestRow.from_dict(row, line=index + 1)
    elif not isinstance(row, ManifestRow):
        raise TypeError(f"rows[{index}] must be a ManifestRow or dict, got {type(row).__name__}")
    return json.dumps(row.to_dict(manifest_dir), ensure_ascii=False) + "\n"


def write_manifest(
    path: str | os.PathLike[str], rows: Iterable[ManifestRow | dict[str, Any]], overwrite: bool = False
) -> Path:
    """Write rows as a JSONL manifest, atomically (a temporary file in the same folder, renamed),
    with the permissions the user's umask gives new files.

    Refuses (``FileExistsError``) to replace an existing file unless ``overwrite``. Rows read from
    another manifest keep pointing at their audio (see :meth:`ManifestRow.to_dict`). Duplicate ids
    are a :class:`ManifestError`. Returns the path.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a manifest file")
    manifest_dir = path.parent.absolute()
    with open_atomic(path) as handle:
        seen: set[str] = set()
        for index, row in enumerate(rows):
            text = _dump(row, manifest_dir, index)
            row_id = row.id if isinstance(row, ManifestRow) else row["id"]
            if row_id in seen:
                raise ManifestError(f"duplicate id {row_id!r}", path, index + 1, "id")
            seen.add(row_id)
            handle.write(text)
    return path


class ManifestWriter:
    """Append rows to a manifest one at a time, each flushed to disk as soon as written.

    For long jobs that must leave a valid prefix when interrupted (Stage 1). Use as a context
    manager. ``mode="w"`` truncates (the caller decides whether that is allowed), ``"a"`` appends;
    on append, a partial last line left by an interrupted writer is cut off first (or completed
    with its newline when it is whole JSON, matching ``read_manifest(allow_partial_last_line=True)``).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "a") -> None:
        if mode not in ("a", "w"):
            raise ValueError(f"mode must be 'a' or 'w', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._manifest_dir = self.path.parent.absolute()
        if mode == "a" and self.path.exists():
            _truncate_partial_last_line(self.path)
        self._handle: IO[str] | None = open(self.path, mode, encoding="utf-8")
        self.count = 0

    def write(self, row: ManifestRow) -> None:
        """Write one row and flush it."""
        if self._handle is None:
            raise ValueError(f"ManifestWriter for {self.path} is closed")
        self._handle.write(_dump(row, self._manifest_dir, self.count))
        self._handle.flush()
        self.count += 1

    def close(self) -> None:
        """Flush to disk (fsync) and close."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _truncate_partial_last_line(path: Path) -> None:
    """Repair the end of a file left by an interrupted writer: a last line without a newline is
    completed with one when it is a whole JSON value (it was read as a row), else cut off."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        position = size
        chunk = 4096
        line_start = 0
        while position > 0:
            start = max(0, position - chunk)
            handle.seek(start)
            data = handle.read(position - start)
            newline = data.rfind(b"\n")
            if newline >= 0:
                line_start = start + newline + 1
                break
            position = start
        handle.seek(line_start)
        tail = handle.read()
        try:
            json.loads(tail.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            handle.truncate(line_start)
        else:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")


def as_dataset(rows_or_path: str | os.PathLike[str] | Iterable[ManifestRow]) -> datasets.Dataset:
    """The rows as a HF ``datasets.Dataset`` (in memory).

    Columns: ``id``, ``audio`` (absolute path string), ``sampling_rate``, ``instruction``, ``task``,
    the optional string fields (``None`` where absent), ``choices`` (a list of strings or ``None``),
    and ``metadata`` as a JSON string (rows may
    have metadata of different shapes; ``json.loads`` it back). Audio is not decoded.
    """
    import datasets

    rows = read_manifest(rows_or_path) if isinstance(rows_or_path, (str, os.PathLike)) else list(rows_or_path)
    records = []
    for row in rows:
        record: dict[str, Any] = {
            "id": row.id,
            "audio": str(Path(os.path.abspath(row.audio_path))),
            "sampling_rate": row.sampling_rate,
            "instruction": row.instruction,
            "task": row.task,
        }
        for name in _OPTIONAL_STR:
            record[name] = getattr(row, name)
        record["choices"] = None if row.choices is None else list(row.choices)
        record["metadata"] = json.dumps(row.metadata, ensure_ascii=False, sort_keys=True)
        records.append(record)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "audio": datasets.Value("string"),
            "sampling_rate": datasets.Value("int64"),
            "instruction": datasets.Value("string"),
            "task": datasets.Value("string"),
            **{name: datasets.Value("string") for name in _OPTIONAL_STR},
            "choices": datasets.Sequence(datasets.Value("string")),
            "metadata": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(records, features=features)
