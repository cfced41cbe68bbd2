"""Stop cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler, ``kill``): finish the optimizer step,
save a resumable checkpoint, exit.

The first signal only sets a flag; the trainer checks it after each optimizer step (all ranks agree
through an all-reduce, so a signal that reached one rank stops them all at the same step), saves a
checkpoint and raises :class:`TrainingInterrupted`. The handler is then removed: a second signal
acts as usual (Ctrl-C raises ``KeyboardInterrupt`` at once).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from caad.cli import CommandInterrupted

__all__ = ["Interruption", "TrainingInterrupted"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(CommandInterrupted):
    """Training stopped on a signal after saving a checkpoint (``signal_number``, ``step``, ``checkpoint``)."""

    def __init__(self, signal_number: int, step: int, checkpoint: str, resume_hint: str) -> None:
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signal_number).name
        super().__init__(
            f"{name} received: stopped after optimizer step {step}, checkpoint saved in {checkpoint}; "
            f"continue with {resume_hint}"
        )

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, the shell convention (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signal_number


class Interruption:
    """Context manager: catch SIGINT/SIGTERM while training (main thread only; elsewhere a no-op).

    ``requested`` is the signal number received, 0 if none.
    """

    def __init__(self, name: str = "training") -> None:
        self.name = name
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signum
        self._restore()
        print(
            f"\n{self.name}: {signal.Signals(signum).name} received, saving a checkpoint after this step "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> Interruption:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
