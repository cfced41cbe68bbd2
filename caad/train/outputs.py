"""Output folders that never replace a user's files unless asked.

Every folder caad writes a run into holds a marker file, :data:`MARKER`. A folder may be used when
it does not exist or is empty; an existing run's folder is replaced only with ``overwrite`` (and
only when it holds the marker, so ``overwrite=true`` never deletes a folder caad did not create);
``resume`` keeps it as it is.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

from caad.cli import UserError

__all__ = ["MARKER", "check_output_dir", "prepare_output_dir"]

MARKER = "caad_output.json"


def _is_ours(path: Path) -> bool:
    return (path / MARKER).is_file()


def check_output_dir(
    path: str | os.PathLike[str], *, overwrite: bool, resume: bool, key: str, resumable: bool = True
) -> str:
    """What :func:`prepare_output_dir` would do: ``"create"``, ``"replace"`` or ``"resume"``; writes nothing.

    Raises :class:`~caad.cli.UserError` (naming the config ``key``) when the folder holds an earlier
    run and neither ``overwrite`` nor ``resume`` is set, or holds files caad did not write
    (``resumable``: whether the message may suggest ``resume=True``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}: {path} exists and is not a folder")
    if not path.exists() or not any(path.iterdir()):
        return "create"
    if not _is_ours(path):
        raise UserError(
            f"{key}: {path} is not empty and was not written by caad (no {MARKER}); "
            "refusing to write into it or delete it: choose another folder"
        )
    if resume:
        return "resume"
    if overwrite:
        return "replace"
    overwrite_key = f"{key.rsplit('.', 1)[0]}.overwrite" if "." in key else "overwrite"
    raise UserError(
        f"{key}: {path} already holds an earlier run; set {overwrite_key}=true to replace it, "
        + ("resume=True to continue it, " if resumable else "")
        + "or choose another folder"
    )


def prepare_output_dir(path: str | os.PathLike[str], *, overwrite: bool, resume: bool, key: str, kind: str) -> str:
    """Create (or clear, or keep for resuming) ``path`` and write its marker; returns the action taken."""
    path = Path(path)
    action = check_output_dir(path, overwrite=overwrite, resume=resume, key=key)
    if action == "replace":
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not _is_ours(path):
        info = {"kind": kind, "created": datetime.datetime.now().isoformat(timespec="seconds")}
        (path / MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")
    return action
