"""Writing files atomically with the permissions the user's umask gives new files.

``tempfile.NamedTemporaryFile`` creates its file with mode ``0600`` whatever the umask, and an atomic
write renames that file into place: without care, every manifest or result written that way ends
up readable by its owner only, while files written with ``open()`` get ``0666 & ~umask`` (usually
``0644``). :func:`write_text_atomic` and :func:`apply_umask` keep both kinds consistent.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["apply_umask", "default_file_mode", "open_atomic", "write_text_atomic"]

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file here: ``0o666 & ~umask``."""
    with _UMASK_LOCK:  # reading the umask means setting it; other threads must not see the 0
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the permissions of a file created with ``open()`` (see the module docstring)."""
    os.chmod(path, default_file_mode())


class open_atomic:  # noqa: N801 - used like open()
    """``with open_atomic(path) as handle: handle.write(...)``: a text file written to a temporary
    file in the same folder, flushed to disk, given the umask's mode and renamed over ``path`` when
    the block ends without an exception (removed otherwise). Creates the parent folder."""

    def __init__(self, path: str | os.PathLike[str], encoding: str = "utf-8") -> None:
        self.path = Path(path)
        self.encoding = encoding

    def __enter__(self):  # noqa: ANN204
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = tempfile.NamedTemporaryFile(
            "w",
            encoding=self.encoding,
            dir=self.path.parent,
            prefix=f".{self.path.name}.",
            suffix=".tmp",
            delete=False,
        )
        return self._handle

    def __exit__(self, exc_type, exc, traceback) -> None:  # noqa: ANN001
        handle = self._handle
        try:
            if exc_type is None:
                handle.flush()
                os.fsync(handle.fileno())
            handle.close()
            if exc_type is None:
                apply_umask(handle.name)
                os.replace(handle.name, self.path)
        finally:
            if os.path.exists(handle.name):
                os.unlink(handle.name)


def write_text_atomic(path: str | os.PathLike[str], text: str | Iterable[str]) -> Path:
    """Write ``text`` (a string, or strings written one after the other) atomically to ``path``."""
    path = Path(path)
    with open_atomic(path) as handle:
        if isinstance(text, str):
            handle.write(text)
        else:
            for part in text:
                handle.write(part)
    return path
