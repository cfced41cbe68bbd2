"""Speech synthesis with libespeak-ng through ctypes (the ``espeakng-loader`` wheel; no system package).

Facts this module relies on (checked on the machines this was built on):
``espeak_Initialize(2 /*synchronous*/, 0, data_path, 0)`` returns the sampling rate (22050 Hz);
samples arrive as int16 through the callback set with ``espeak_SetSynthCallback``;
``espeak_SetParameter(1, wpm, 0)`` sets the rate, ``espeak_SetParameter(3, p, 0)`` the pitch (0-100);
``espeak_SetVoiceByName(b"en+f3")`` selects a voice variant.

Reproducibility. libespeak-ng keeps state between utterances in C ``static`` variables (the phase of
the pitch "flutter", the wave generator, the echo buffer), which no API call resets, and its
"breath" noise differs from process to process. So, in one process, the same call twice gives
slightly different samples. This module therefore

* ships its own voice variants (:data:`VOICES`): copies of the stock ``m3``/``m1``/``f3``/``f2``
  variants without the ``breath`` line, in a private overlay of the espeak data folder (symlinks to
  the wheel's files plus the variant files, in a temporary folder removed at exit);
* initialises the engine once in this process and never synthesises in it: every utterance is
  rendered in a short-lived forked child (``os.fork``), which starts from the same freshly
  initialised state. The samples are then a pure function of ``(text, voice, rate, pitch)``, the
  same bytes in every process and in any order of calls.

Where ``os.fork`` does not exist (Windows) the utterance is rendered in this process and is not
bit-reproducible. Thread safety: there is one global engine; a module lock serialises the
initialisation, the forks and any in-process synthesis, so :func:`synthesize` may be called from
several threads.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ESPEAK_MAX_RATE_WPM",
    "ESPEAK_MIN_RATE_WPM",
    "VOICES",
    "EspeakError",
    "Voice",
    "resolve_voice",
    "synthesize",
    "synthesize_many",
]

#: espeak-ng's accepted speaking-rate range, in words per minute.
ESPEAK_MIN_RATE_WPM = 80
ESPEAK_MAX_RATE_WPM = 450

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3


class EspeakError(RuntimeError):
    """libespeak-ng could not be loaded, initialised, or failed to synthesise."""


@dataclass(frozen=True)
class Voice:
    """A voice variant of the built-in corpus."""

    name: str
    """Short name used in manifests (``"m3"``)."""
    gender: str
    """``"male"`` or ``"female"``."""
    base_variant: str
    """The stock espeak-ng variant it is derived from (``voices/!v/<base_variant>``)."""

    @property
    def espeak_name(self) -> str:
        """The name passed to ``espeak_SetVoiceByName`` (English with our variant)."""
        return f"en+caad{self.name}"


#: The corpus voices: two male and two female variants of English (stock variants minus "breath").
VOICES: dict[str, Voice] = {
    "m3": Voice("m3", "male", "m3"),
    "m1": Voice("m1", "male", "m1"),
    "f3": Voice("f3", "female", "f3"),
    "f2": Voice("f2", "female", "f2"),
}
_ALIASES = {"male": "m3", "female": "f3"}

_LOCK = threading.RLock()
_ENGINE: _Engine | None = None

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def resolve_voice(voice: str) -> str:
    """The espeak-ng voice name for ``voice``: a key of :data:`VOICES`, ``"male"``/``"female"``, or a
    raw espeak-ng name (``"en+m3"``; raw stock names are not guaranteed bit-reproducible)."""
    if not isinstance(voice, str) or not voice:
        raise ValueError(f"voice must be a non-empty string, got {voice!r}")
    key = _ALIASES.get(voice, voice)
    if key in VOICES:
        return VOICES[key].espeak_name
    if "+" in voice or re.fullmatch(r"[a-z]{2,3}(-[a-z0-9]+)*", voice):
        return voice
    raise ValueError(f"unknown voice {voice!r}: expected one of {sorted(VOICES)} or 'male'/'female'")


def _make_data_overlay() -> Path:
    """A temporary espeak-ng data folder: symlinks to the wheel's data plus our voice variants."""
    try:
        import espeakng_loader
    except ImportError as error:  # pragma: no cover - dependency of caad[train]
        raise EspeakError(
            "the espeakng-loader package is required for speech synthesis (pip install espeakng-loader)"
        ) from error
    source = Path(espeakng_loader.get_data_path())
    root = Path(tempfile.mkdtemp(prefix="caad-espeak-"))
    owner = os.getpid()

    def _cleanup() -> None:  # only in the process that made it, not in a forked child that exits normally
        if os.getpid() == owner:
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(_cleanup)
    data = root / "espeak-ng-data"
    data.mkdir()
    for entry in source.iterdir():
        if entry.name != "voices":
            (data / entry.name).symlink_to(entry)
    variants = data / "voices" / "!v"
    variants.mkdir(parents=True)
    for entry in (source / "voices" / "!v").iterdir():
        (variants / entry.name).symlink_to(entry)
    for voice in VOICES.values():
        stock = (source / "voices" / "!v" / voice.base_variant).read_text(encoding="utf-8")
        lines = [line for line in stock.splitlines() if not re.match(r"\s*breath\b", line)]
        lines = [f"name caad-{voice.name}" if line.startswith("name ") else line for line in lines]
        (variants / f"caad{voice.name}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


class _Engine:
    """The loaded library, initialised once (never synthesising in this process on POSIX)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as error:  # pragma: no cover
            raise EspeakError("the espeakng-loader package is required for speech synthesis") from error
        library_path = espeakng_loader.get_library_path()
        try:
            lib = ctypes.CDLL(library_path)
        except OSError as error:
            raise EspeakError(f"cannot load libespeak-ng from {library_path}: {error}") from error
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        self.data_path = _make_data_overlay()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {rate}) with data path {self.data_path}")
        self.lib = lib
        self.sampling_rate = int(rate)
        self._chunks: list[bytes] = []
        self._callback = _SynthCallback(self._on_samples)  # kept alive as long as the engine
        lib.espeak_SetSynthCallback(self._callback)
        self._libc = None
        try:
            self._libc = ctypes.CDLL(None)
        except OSError:  # pragma: no cover - non-POSIX
            self._libc = None

    def _on_samples(self, wav: ctypes.POINTER(ctypes.c_short), count: int, events: int) -> int:
        if count > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, 2 * count))
        return 0  # continue

    def render(self, text: str, espeak_voice: str, rate_wpm: int, pitch: int) -> bytes:
        """Synthesise in the calling process; returns little-endian int16 PCM bytes."""
        self._chunks = []
        if self._libc is not None and hasattr(self._libc, "srand"):
            self._libc.srand(0)  # espeak-ng draws noise from rand(): make it repeatable
        status = self.lib.espeak_SetVoiceByName(espeak_voice.encode())
        if status != 0:
            raise EspeakError(f"espeak-ng does not know the voice {espeak_voice!r} (error {status})")
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        encoded = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if status != 0:
            raise EspeakError(f"espeak_Synth failed with error {status} for text {text[:60]!r}")
        self.lib.espeak_Synchronize()
        return b"".join(self._chunks)


def _engine() -> _Engine:
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def _check_request(text: str, voice: str, rate_wpm: int, pitch: int) -> tuple[str, str, int, int]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    espeak_voice = resolve_voice(voice)
    if isinstance(rate_wpm, bool) or not isinstance(rate_wpm, (int, np.integer)):
        raise ValueError(f"rate_wpm must be an int (words per minute), got {rate_wpm!r}")
    if not ESPEAK_MIN_RATE_WPM <= rate_wpm <= ESPEAK_MAX_RATE_WPM:
        raise ValueError(f"rate_wpm must be in [{ESPEAK_MIN_RATE_WPM}, {ESPEAK_MAX_RATE_WPM}], got {rate_wpm}")
    if isinstance(pitch, bool) or not isinstance(pitch, (int, np.integer)) or not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be an int in [0, 100], got {pitch!r}")
    return text, espeak_voice, int(rate_wpm), int(pitch)


class _Child:
    """One forked child rendering one utterance into a pipe."""

    def __init__(self, engine: _Engine, request: tuple[str, str, int, int]) -> None:
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a multi-threaded process; the child only calls
            # into libespeak-ng and writes to a pipe, then _exit()s.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, reported through the pipe
            code = 0
            try:
                os.close(read_fd)
                try:
                    payload = b"\x00" + engine.render(*request)
                except BaseException as error:  # noqa: BLE001 - reported to the parent
                    payload = b"\x01" + f"{type(error).__name__}: {error}".encode("utf-8", "replace")
                    code = 1
                view = memoryview(payload)
                while view:
                    written = os.write(write_fd, view)
                    view = view[written:]
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid = pid
        self.read_fd = read_fd
        self.request = request

    def result(self) -> bytes:
        chunks = []
        try:
            while True:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self.read_fd)
            _, status = os.waitpid(self.pid, 0)
        payload = b"".join(chunks)
        if os.WIFSIGNALED(status):
            raise EspeakError(
                f"the espeak-ng worker process died with signal {os.WTERMSIG(status)} "
                f"while synthesising {self.request[0][:60]!r}"
            )
        if not payload:
            raise EspeakError(f"the espeak-ng worker returned nothing for {self.request[0][:60]!r}")
        if payload[:1] != b"\x00":
            raise EspeakError(f"espeak-ng failed: {payload[1:].decode('utf-8', 'replace')}")
        return payload[1:]

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.close(self.read_fd)
        except OSError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def synthesize_many(
    requests: Iterable[tuple[str, str, int, int]], workers: int = 1
) -> Iterator[tuple[np.ndarray, int]]:
    """Render ``(text, voice, rate_wpm, pitch)`` requests, yielding ``(int16 samples, sampling_rate)``
    in request order, with up to ``workers`` utterances rendered at once (forked children; the
    output does not depend on ``workers``). See :func:`synthesize` for the arguments."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    engine = _engine()
    checked = (_check_request(*request) for request in requests)
    if not hasattr(os, "fork"):  # pragma: no cover - Windows: in-process, not bit-reproducible
        for request in checked:
            with _LOCK:
                pcm = engine.render(*request)
            yield np.frombuffer(pcm, dtype="<i2").astype(np.int16), engine.sampling_rate
        return
    pending: deque[_Child] = deque()
    try:
        for request in checked:
            with _LOCK:
                pending.append(_Child(engine, request))
            if len(pending) >= workers:
                yield (
                    np.frombuffer(pending.popleft().result(), dtype="<i2").astype(np.int16),
                    engine.sampling_rate,
                )
        while pending:
            yield (
                np.frombuffer(pending.popleft().result(), dtype="<i2").astype(np.int16),
                engine.sampling_rate,
            )
    finally:
        while pending:
            pending.popleft().kill()


def synthesize(text: str, voice: str = "m3", rate_wpm: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Synthesise English speech with libespeak-ng.

    Args:
        text: what to say (UTF-8 text; no SSML).
        voice: a key of :data:`VOICES` (``"m3"``, ``"m1"``, ``"f3"``, ``"f2"``), ``"male"`` (= m3),
            ``"female"`` (= f3), or a raw espeak-ng voice name such as ``"en+m3"``.
        rate_wpm: speaking rate in words per minute, in [80, 450] (espeak-ng's default is 175).
        pitch: espeak-ng's pitch parameter in [0, 100], relative to the voice's range (50 = default).

    Returns:
        ``(samples, sampling_rate)``: mono int16 samples at espeak-ng's rate (22050 Hz).
        Bit-reproducible for the voices of :data:`VOICES` on POSIX (see the module docstring).
    """
    return next(synthesize_many([(text, voice, rate_wpm, pitch)], workers=1))
