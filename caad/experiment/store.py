"""The experiment folder: refusing an earlier experiment, finished units, resume.

An experiment is a tree of *units* (the corpus, the tokenizer, a seed's teacher, a student, one
evaluation...). A unit is finished when its folder holds ``done.json``, written last and atomically,
with the unit's fingerprint (a hash of every setting and input that decides its result). Resuming:

- a finished unit with the same fingerprint is skipped;
- a finished unit with another fingerprint (its settings changed) stops the run with an error that
  names the unit: nothing is replaced unless ``--overwrite`` (the whole experiment starts over);
- an unfinished unit (a folder without ``done.json``: interrupted) is removed and run again.

The folder itself: ``experiment.json`` marks it as an experiment. A folder that exists and is not
empty is refused unless ``resume`` (continue it) or ``overwrite`` (replace it, only if it is an
experiment folder); both checks happen before anything is written.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caad.cli import UserError
from caad.data.files import write_text_atomic
from caad.experiment.config import fingerprint

__all__ = ["MARKER", "PlannedUnits", "UnitStore", "check_experiment_dir", "prepare_experiment_dir"]

MARKER = "experiment.json"
DONE = "done.json"


def check_experiment_dir(path: str | os.PathLike[str], *, resume: bool, overwrite: bool, suite: str = "caad") -> str:
    """``"create"``, ``"resume"`` or ``"replace"`` for the experiment folder ``path``; writes nothing.

    Raises :class:`~caad.cli.UserError` for an earlier experiment without ``--resume``/``--overwrite``,
    for a non-empty folder that is not an experiment (never written into or deleted), and for resuming
    an experiment of another ``suite`` (a marker run without a suite is a ``caad`` one).
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the experiment, or replace it")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir: {path} exists and is not a folder")
    if not path.exists() or not any(path.iterdir()):
        return "create"
    if not (path / MARKER).is_file():
        raise UserError(
            f"output_dir: {path} is not empty and is not a caad experiment (no {MARKER}); refusing to write "
            "into it or delete it: choose another output_dir"
        )
    if resume:
        earlier = _suites(path / MARKER)
        if earlier - {suite}:
            raise UserError(
                f"output_dir: {path} holds a suite {', '.join(sorted(earlier))} experiment and this config is suite "
                f"{suite}; --resume only continues the same suite: choose another output_dir"
            )
        return "resume"
    if overwrite:
        return "replace"
    raise UserError(
        f"output_dir: {path} already holds an experiment; pass --resume to continue it (finished arms are "
        "kept), --overwrite to replace it, or choose another output_dir"
    )


def _suites(marker: Path) -> set[str]:
    """The suites of the runs recorded in ``marker`` (an unreadable marker counts as none)."""
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    runs = record.get("runs", []) if isinstance(record, dict) else []
    return {str(run.get("suite", "caad")) for run in runs if isinstance(run, dict)}


def prepare_experiment_dir(path: str | os.PathLike[str], action: str, info: dict[str, Any]) -> None:
    """Create (or replace) the folder and write its marker with ``info``; on resume, add this run to it."""
    path = Path(path)
    if action == "replace":
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    now = datetime.datetime.now().isoformat(timespec="seconds")
    record = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {"created": now, "runs": []}
    record.setdefault("runs", []).append({"started": now, "action": action, **info})
    write_text_atomic(marker, json.dumps(record, indent=2, default=str) + "\n")


class UnitStore:
    """Runs units once (module docstring); ``skipped`` and ``ran`` list the units of this invocation."""

    def __init__(self, root: str | os.PathLike[str], *, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.log = log
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def folder(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> dict[str, Any] | None:
        """The ``done.json`` of unit ``name`` or ``None``."""
        marker = self.folder(name) / DONE
        if not marker.is_file():
            return None
        return json.loads(marker.read_text(encoding="utf-8"))

    def check(self, name: str, settings: Any) -> bool:
        """Whether unit ``name`` is finished with these ``settings``; an error if it finished with others."""
        info = self.done(name)
        if info is None:
            return False
        if info.get("fingerprint") != fingerprint(settings):
            raise UserError(
                f"{self.folder(name)} was finished with other settings than this config gives (its inputs or "
                "settings changed); pass --overwrite to run the experiment again from scratch, or use another "
                "output_dir"
            )
        return True

    def run(self, name: str, settings: Any, work: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
        """Run ``work(folder)`` unless unit ``name`` is finished; returns its ``done.json`` content."""
        if self.check(name, settings):
            self.skipped.append(name)
            return self.done(name) or {}
        folder = self.folder(name)
        if folder.exists():
            self.log(f"{name}: unfinished earlier attempt removed, running it again")
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        started, cpu = time.perf_counter(), time.process_time()
        extra = work(folder) or {}
        info = {
            "fingerprint": fingerprint(settings),
            "seconds": round(time.perf_counter() - started, 3),
            "cpu_seconds": round(time.process_time() - cpu, 3),  # all threads of this process
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            **extra,
        }
        write_text_atomic(folder / DONE, json.dumps(info, indent=2, default=str) + "\n")
        self.ran.append(name)
        return info


class PlannedUnits:
    """The units of one invocation's plan (``[(name, settings)]``), each run through ``store`` by name, with a
    progress bar that ticks once per unit, run or skipped. ``name in plan`` tells whether the plan has it."""

    def __init__(self, store: UnitStore, units: list[tuple[str, Any]], *, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.store = store
        self.settings = dict(units)
        self.bar = tqdm(total=len(units), desc="experiment", unit="unit", disable=not progress, position=0)

    def __contains__(self, name: object) -> bool:
        return name in self.settings

    def run(self, name: str, work: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
        """:meth:`UnitStore.run` of unit ``name`` with its planned settings."""
        self.bar.set_postfix_str(name, refresh=True)
        info = self.store.run(name, self.settings[name], work)
        self.bar.update(1)
        return info

    def close(self) -> None:
        self.bar.close()
