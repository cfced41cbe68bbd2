"""Interleaved speech-text sequences for unit language models: the format, the corpus builder, batches.

**Vocabulary.** A causal LM's tokenizer gets ``n_units`` unit tokens ``<u0>`` ... ``<u{n_units-1}>`` and
two modality markers, ``<text>`` and ``<speech>``, as added special tokens
(:func:`add_unit_tokens`): the markers first, then the units in order, so unit ``u`` has token id
``first_unit_id + u`` (:class:`UnitVocab`).

**Sequence format** (one example)::

    [bos] <marker> content <marker> content ... eos

A sequence is a list of :class:`Segment`\\ s, each opened by its modality marker (SpiritLM-style: a
marker wherever the modality starts or switches, no closing markers). A speech segment's content is
unit tokens only (merged units, :mod:`caad.data.units`); a text segment's content is the tokenizer's
encoding of its text, tokenized on its own (so it never merges with a neighbour) and holding no unit
or marker token. ``bos`` is left out when the tokenizer has none. :func:`encode_segments` and
:func:`decode_ids` are inverses: decoding an encoded sequence gives back the same segments (units
and text, exactly, for a byte-level BPE tokenizer).

**Kinds of examples** built from a corpus clip (:func:`build_examples`; a clip is one spoken sentence
with its transcript, :func:`corpus_clips`):

==================  =================================================================================
``"speech"``        ``<speech> units(clip)``: speech only
``"text"``          ``<text> transcript``: text only
``"speech_text"``   ``<speech> units(clip) <text> transcript``: a clip-level switch (speech, then its text)
``"text_speech"``   ``<text> transcript <speech> units(clip)``: a clip-level switch (text, then speech)
``"mixed"``         a switch at a word boundary inside the sentence: ``<text> w[:k] <speech> units(w[k:])``
                    or ``<speech> units(w[:k]) <text> w[k:]`` (the order and ``k`` in ``[1, n-1]``
                    drawn per clip)
==================  =================================================================================

espeak-ng gives no word timings through the synthesis API the corpus uses, so the clip's own audio
cannot be cut at a word. A ``"mixed"`` example's speech span is therefore **synthesised on its own**
with the clip's voice, speaking rate and pitch (``metadata["speaker"]``, ``["rate_wpm"]``,
``["pitch_setting"]`` of the built-in corpus), resampled and quantised like the corpus audio
(:func:`synthesize_spans`), then encoded to units. Every random choice comes from a generator seeded
by ``(seed, clip id, kind)``, and synthesis is bit-reproducible, so the examples are a pure function
of the clips, the unit tokenizer and the seed.

**Batches** (:func:`collate`): right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (int64
``[batch, T]``; labels unshifted, Hugging Face style, ``-100`` on padding) and ``unit_mask`` (bool
``[batch, T]``, True where the label is a unit token), what a trainer's batch builder hands a
causal LM.

Examples can be stored as JSONL (:func:`write_examples`, :func:`read_examples`), one object a line:
``{"id", "kind", "source", "speech_seconds", "segments": [{"speech": [u, ...]} | {"text": "..."}]}``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from caad.data.audio import load_audio, resample
from caad.data.files import write_text_atomic
from caad.data.manifest import read_manifest

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from caad.data.units import UnitTokenizer

__all__ = [
    "EXAMPLE_KINDS",
    "IGNORE_INDEX",
    "SPEECH_MARKER",
    "TEXT_MARKER",
    "Clip",
    "InterleavedExample",
    "Segment",
    "UnitVocab",
    "add_unit_tokens",
    "build_examples",
    "collate",
    "corpus_clips",
    "decode_ids",
    "encode_examples",
    "encode_segments",
    "read_examples",
    "synthesize_spans",
    "unit_token",
    "write_examples",
]

SPEECH_MARKER = "<speech>"
TEXT_MARKER = "<text>"
IGNORE_INDEX = -100
EXAMPLE_KINDS: tuple[str, ...] = ("speech", "text", "speech_text", "text_speech", "mixed")
_MODALITIES = ("speech", "text")


def unit_token(index: int) -> str:
    """The token string of unit ``index``: ``"<u{index}>"``."""
    return f"<u{int(index)}>"


@dataclass(frozen=True)
class UnitVocab:
    """Token ids of the interleaved format in one tokenizer (module docstring).

    Unit ``u`` is token ``first_unit_id + u``; ``bos_id`` is ``None`` when the tokenizer has no bos.
    """

    n_units: int
    first_unit_id: int
    speech_id: int
    text_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None

    @property
    def unit_ids(self) -> range:
        """The token ids of units ``0 .. n_units-1``, in order."""
        return range(self.first_unit_id, self.first_unit_id + self.n_units)

    def is_unit(self, ids: Any) -> Any:
        """Elementwise: whether each id (int, numpy array or tensor) is a unit token."""
        return (ids >= self.first_unit_id) & (ids < self.first_unit_id + self.n_units)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> UnitVocab:
        """Read the ids from a tokenizer that went through :func:`add_unit_tokens`; a ``ValueError``
        says what is missing or out of order."""
        vocab = tokenizer.get_vocab()
        for marker in (SPEECH_MARKER, TEXT_MARKER, unit_token(0)):
            if marker not in vocab:
                raise ValueError(f"tokenizer has no {marker!r} token; call add_unit_tokens(tokenizer, n_units) first")
        n_units = 0
        while unit_token(n_units) in vocab:
            n_units += 1
        first = vocab[unit_token(0)]
        for index in range(n_units):
            if vocab[unit_token(index)] != first + index:
                raise ValueError(
                    f"unit tokens are not contiguous: {unit_token(index)} has id {vocab[unit_token(index)]}, "
                    f"expected {first + index}"
                )
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token (needed to end a sequence)")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            n_units=n_units,
            first_unit_id=int(first),
            speech_id=int(vocab[SPEECH_MARKER]),
            text_id=int(vocab[TEXT_MARKER]),
            eos_id=int(tokenizer.eos_token_id),
            pad_id=int(pad),
            bos_id=None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        )


def add_unit_tokens(tokenizer: Any, n_units: int) -> UnitVocab:
    """Add ``<text>``, ``<speech>`` and ``<u0>`` ... ``<u{n_units-1}>`` to ``tokenizer`` (in place) as
    special tokens; returns their ids. A tokenizer that already has unit tokens must have exactly
    ``n_units`` of them (then nothing is added)."""
    if isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 1:
        raise ValueError(f"n_units must be a positive int, got {n_units!r}")
    vocab = tokenizer.get_vocab()
    if unit_token(0) in vocab:
        existing = UnitVocab.from_tokenizer(tokenizer)
        if existing.n_units != n_units:
            raise ValueError(f"tokenizer already has {existing.n_units} unit tokens, not n_units={n_units}")
        return existing
    tokens = [TEXT_MARKER, SPEECH_MARKER] + [unit_token(i) for i in range(n_units)]
    tokenizer.add_tokens(tokens, special_tokens=True)
    return UnitVocab.from_tokenizer(tokenizer)


@dataclass(frozen=True)
class Segment:
    """One span of one modality: ``"speech"`` with ``units`` (ints in ``[0, n_units)``) or ``"text"``
    with ``text``."""

    modality: str
    units: tuple[int, ...] = ()
    text: str = ""

    def __post_init__(self) -> None:
        if self.modality not in _MODALITIES:
            raise ValueError(f"modality must be 'speech' or 'text', got {self.modality!r}")
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        if self.modality == "speech" and (self.text or not self.units):
            raise ValueError("a speech segment needs units and no text")
        if self.modality == "text" and (self.units or not self.text):
            raise ValueError("a text segment needs a non-empty text and no units")

    @classmethod
    def speech(cls, units: Iterable[int]) -> Segment:
        return cls("speech", units=tuple(units))

    @classmethod
    def of_text(cls, text: str) -> Segment:
        return cls("text", text=text)

    def to_json(self) -> dict[str, Any]:
        return {"speech": list(self.units)} if self.modality == "speech" else {"text": self.text}


def encode_segments(
    tokenizer: Any, vocab: UnitVocab, segments: Sequence[Segment], add_bos: bool = True, add_eos: bool = True
) -> list[int]:
    """Token ids of a sequence (module docstring): ``[bos] (marker content)* eos``.

    Raises ``ValueError`` for an empty sequence, a unit outside ``[0, vocab.n_units)``, or a text whose
    encoding holds a marker or unit token (text must not spell ``<speech>``, ``<text>`` or ``<uN>``).
    """
    if not segments:
        raise ValueError("segments must hold at least one Segment")
    ids: list[int] = []
    if add_bos and vocab.bos_id is not None:
        ids.append(vocab.bos_id)
    for index, segment in enumerate(segments):
        if not isinstance(segment, Segment):
            raise TypeError(f"segments[{index}] must be a Segment, got {type(segment).__name__}")
        if segment.modality == "speech":
            units = np.asarray(segment.units, dtype=np.int64)
            if units.min() < 0 or units.max() >= vocab.n_units:
                raise ValueError(
                    f"segments[{index}]: units must lie in [0, {vocab.n_units}), got {units.min()}..{units.max()}"
                )
            ids.append(vocab.speech_id)
            ids.extend((units + vocab.first_unit_id).tolist())
        else:
            text_ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
            reserved = [i for i in text_ids if i in (vocab.speech_id, vocab.text_id) or vocab.is_unit(i)]
            if reserved:
                raise ValueError(
                    f"segments[{index}]: the text spells reserved tokens {reserved}: {segment.text[:60]!r}"
                )
            ids.append(vocab.text_id)
            ids.extend(text_ids)
    if add_eos:
        ids.append(vocab.eos_id)
    return ids


def decode_ids(tokenizer: Any, vocab: UnitVocab, ids: Sequence[int]) -> list[Segment]:
    """The segments of a sequence of :func:`encode_segments` (a leading bos, a trailing eos and
    trailing padding are dropped). Raises ``ValueError`` for content before the first marker, a unit
    token in a text segment or a non-unit token in a speech segment, or an empty segment."""
    ids = [int(i) for i in ids]
    while ids and ids[-1] == vocab.pad_id and vocab.pad_id != vocab.eos_id:
        ids.pop()
    if ids and vocab.bos_id is not None and ids[0] == vocab.bos_id:
        ids = ids[1:]
    if ids and ids[-1] == vocab.eos_id:
        ids = ids[:-1]
    segments: list[Segment] = []
    modality: str | None = None
    content: list[int] = []

    def close() -> None:
        if modality is None:
            return
        if not content:
            raise ValueError(f"empty {modality} segment at segment {len(segments)}")
        if modality == "speech":
            if not all(vocab.is_unit(i) for i in content):
                raise ValueError(f"speech segment {len(segments)} holds non-unit tokens")
            segments.append(Segment.speech(i - vocab.first_unit_id for i in content))
        else:
            if any(vocab.is_unit(i) for i in content):
                raise ValueError(f"text segment {len(segments)} holds unit tokens")
            segments.append(Segment.of_text(tokenizer.decode(content, clean_up_tokenization_spaces=False)))

    for position, token in enumerate(ids):
        if token in (vocab.speech_id, vocab.text_id):
            close()
            modality = "speech" if token == vocab.speech_id else "text"
            content = []
        elif modality is None:
            raise ValueError(f"token {token} at position {position} comes before any modality marker")
        else:
            content.append(token)
    close()
    return segments


@dataclass(frozen=True)
class Clip:
    """One corpus clip: its audio file, transcript, and the voice settings that rendered it (``None``
    when the manifest does not say: such a clip cannot be re-synthesised in parts)."""

    id: str
    audio_path: Path
    transcript: str
    voice: str | None = None
    rate_wpm: int | None = None
    pitch: int | None = None

    @property
    def words(self) -> list[str]:
        return self.transcript.split()

    @property
    def can_resynthesise(self) -> bool:
        return self.voice is not None and self.rate_wpm is not None and self.pitch is not None


def corpus_clips(manifests: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Clip]:
    """The distinct clips of one or more manifests, in file order.

    Rows sharing an audio file (the built-in corpus asks each validation/test item under four
    conditions) give one clip, named by the row's ``group`` (else its ``id``). The transcript is
    ``metadata["transcript"]`` (required); voice, rate and pitch come from ``metadata["speaker"]``,
    ``["rate_wpm"]``, ``["pitch_setting"]`` when present.
    """
    paths = [manifests] if isinstance(manifests, (str, os.PathLike)) else list(manifests)
    if not paths:
        raise ValueError("manifests must name at least one manifest file")
    clips: list[Clip] = []
    seen: set[Path] = set()
    for path in paths:
        for row in read_manifest(path):
            audio = Path(os.path.abspath(row.audio_path))
            if audio in seen:
                continue
            seen.add(audio)
            transcript = row.metadata.get("transcript")
            if not isinstance(transcript, str) or not transcript.strip():
                raise ValueError(f"{path}: row {row.id!r} has no metadata['transcript'] (needed for interleaving)")
            voice, rate, pitch = (row.metadata.get(k) for k in ("speaker", "rate_wpm", "pitch_setting"))
            clips.append(
                Clip(
                    id=row.group or row.id,
                    audio_path=audio,
                    transcript=" ".join(transcript.split()),
                    voice=voice if isinstance(voice, str) else None,
                    rate_wpm=int(rate) if isinstance(rate, int) and not isinstance(rate, bool) else None,
                    pitch=int(pitch) if isinstance(pitch, int) and not isinstance(pitch, bool) else None,
                )
            )
    return clips


def synthesize_spans(
    requests: Sequence[tuple[str, str, int, int]], sampling_rate: int = 16000, workers: int | None = None
) -> list[np.ndarray]:
    """Render ``(text, voice, rate_wpm, pitch)`` requests like the built-in corpus renders its clips:
    espeak-ng (:func:`caad.data.espeak.synthesize_many`), resampled to ``sampling_rate`` and quantised
    to 16 bits (as written to and read back from its WAV files). Returns float32 ``[samples]`` each."""
    from caad.data.espeak import synthesize_many

    workers = max(1, min(2, os.cpu_count() or 1)) if workers is None else workers
    out = []
    for pcm, rate in synthesize_many(list(requests), workers=workers):
        waveform = resample(pcm, rate, sampling_rate)
        quantised = np.round(np.clip(waveform.astype(np.float64), -1.0, 1.0) * 32767.0)
        out.append((quantised / 32768.0).astype(np.float32))
    return out


@dataclass(frozen=True)
class InterleavedExample:
    """One training sequence: ``segments`` of ``kind`` (a key of the kinds table) built from the clip
    ``source``; ``speech_seconds`` is the audio duration behind its speech segments."""

    id: str
    kind: str
    source: str
    segments: tuple[Segment, ...]
    speech_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "speech_seconds": float(self.speech_seconds),
            "segments": [segment.to_json() for segment in self.segments],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> InterleavedExample:
        segments = []
        for item in obj["segments"]:
            if "speech" in item:
                segments.append(Segment.speech(item["speech"]))
            else:
                segments.append(Segment.of_text(item["text"]))
        return cls(
            id=str(obj["id"]),
            kind=str(obj["kind"]),
            source=str(obj["source"]),
            segments=tuple(segments),
            speech_seconds=float(obj.get("speech_seconds", 0.0)),
        )


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in EXAMPLE_KINDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names from {EXAMPLE_KINDS}, got {kinds!r}")
    return kinds


def build_examples(
    clips: Sequence[Clip],
    unit_tokenizer: UnitTokenizer,
    kinds: Sequence[str] = ("speech", "text", "mixed"),
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> list[InterleavedExample]:
    """One example per clip and kind (module docstring), clip by clip, kinds in the order given.

    ``"mixed"`` needs clips that can be re-synthesised (:attr:`Clip.can_resynthesise`) and sentences
    of at least two words; a ``ValueError`` names the first clip that cannot. ``workers``: utterances
    rendered at once (the output does not depend on it).
    """
    from tqdm.auto import tqdm

    kinds = _check_kinds(kinds)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if "mixed" in kinds:
        for clip in clips:
            if not clip.can_resynthesise:
                raise ValueError(f"clip {clip.id!r} lacks voice/rate/pitch metadata, needed for 'mixed' examples")
            if len(clip.words) < 2:
                raise ValueError(f"clip {clip.id!r} has fewer than two words; 'mixed' splits at a word boundary")
    needs_audio = any(kind != "text" and kind != "mixed" for kind in kinds)
    rate = unit_tokenizer.config.sampling_rate
    # the mixed examples' plans first, so all their spans are synthesised in one pipelined pass
    plans: dict[str, tuple[int, bool]] = {}
    requests: list[tuple[str, str, int, int]] = []
    if "mixed" in kinds:
        for clip in clips:
            rng = random.Random(f"caad-interleaved-{seed}-{clip.id}-mixed")
            k = rng.randint(1, len(clip.words) - 1)
            speech_first = rng.random() < 0.5
            plans[clip.id] = (k, speech_first)
            spoken = clip.words[:k] if speech_first else clip.words[k:]
            requests.append((" ".join(spoken), clip.voice, clip.rate_wpm, clip.pitch))
    spans = iter(synthesize_spans(requests, rate, workers)) if requests else iter(())
    examples: list[InterleavedExample] = []
    for clip in tqdm(clips, desc="interleaved examples", unit="clip", disable=not progress):
        clip_units: tuple[int, ...] = ()
        clip_seconds = 0.0
        if needs_audio:
            waveform = load_audio(clip.audio_path, rate)
            clip_units = tuple(unit_tokenizer.encode(waveform).tolist())
            clip_seconds = waveform.size / rate
            if not clip_units:
                raise ValueError(f"clip {clip.id!r} ({clip.audio_path}) is too short to give any unit")
        for kind in kinds:
            if kind == "speech":
                segments: tuple[Segment, ...] = (Segment.speech(clip_units),)
                seconds = clip_seconds
            elif kind == "text":
                segments, seconds = (Segment.of_text(clip.transcript),), 0.0
            elif kind == "speech_text":
                segments, seconds = (Segment.speech(clip_units), Segment.of_text(clip.transcript)), clip_seconds
            elif kind == "text_speech":
                segments, seconds = (Segment.of_text(clip.transcript), Segment.speech(clip_units)), clip_seconds
            else:
                k, speech_first = plans[clip.id]
                span = next(spans)
                units = tuple(unit_tokenizer.encode(span).tolist())
                if not units:
                    raise ValueError(f"clip {clip.id!r}: its synthesised span gave no unit")
                seconds = span.size / rate
                if speech_first:
                    segments = (Segment.speech(units), Segment.of_text(" ".join(clip.words[k:])))
                else:
                    segments = (Segment.of_text(" ".join(clip.words[:k])), Segment.speech(units))
            examples.append(InterleavedExample(f"{clip.id}-{kind}", kind, clip.id, segments, seconds))
    return examples


def encode_examples(
    tokenizer: Any, vocab: UnitVocab, examples: Iterable[InterleavedExample], max_length: int | None = None
) -> list[list[int]]:
    """Token ids of each example (:func:`encode_segments`); with ``max_length``, sequences longer than
    it are cut to their first ``max_length`` tokens."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    out = []
    for example in examples:
        ids = encode_segments(tokenizer, vocab, example.segments)
        out.append(ids if max_length is None else ids[:max_length])
    return out


def collate(
    sequences: Sequence[Sequence[int]], vocab: UnitVocab, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """A right-padded batch for a causal LM.

    Returns int64 ``input_ids`` ``[B, T]`` (``vocab.pad_id`` on padding), ``attention_mask`` ``[B, T]``
    (1 on real tokens), ``labels`` ``[B, T]`` (= ``input_ids`` on real tokens, ``-100`` on padding;
    unshifted: the model predicts ``labels[:, t + 1]`` from position ``t``) and bool ``unit_mask``
    ``[B, T]`` (labels that are unit tokens). ``T`` is the longest sequence rounded up to
    ``pad_to_multiple_of``.
    """
    import torch

    if not sequences:
        raise ValueError("collate needs at least one sequence")
    lengths = [len(sequence) for sequence in sequences]
    if min(lengths) < 1:
        raise ValueError("collate got an empty sequence")
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), vocab.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    unit_mask = vocab.is_unit(labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "unit_mask": unit_mask}


def write_examples(
    path: str | os.PathLike[str], examples: Iterable[InterleavedExample], overwrite: bool = False
) -> Path:
    """Write examples as JSONL (module docstring), atomically; refuses to replace a file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    write_text_atomic(path, (json.dumps(example.to_json(), ensure_ascii=False) + "\n" for example in examples))
    return path


def read_examples(path: str | os.PathLike[str]) -> list[InterleavedExample]:
    """Read a file of :func:`write_examples`; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interleaved examples file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                examples.append(InterleavedExample.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}, line {number}: not an interleaved example ({error})") from error
    return examples
