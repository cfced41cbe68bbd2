"""TinyWave's measures for unit language models, on the built-in corpus.

**Normalised perplexity of speech continuations** (:func:`speech_continuations`,
:func:`continuation_perplexity`). Each held-out clip's units (:mod:`caad.data.units`, repeats merged)
are cut in time: the units that start in the first ``prompt_fraction`` of the clip's frames are the
prompt, the rest the continuation. The model reads ``[bos] <speech> prompt`` and is scored on the
continuation's units, teacher-forced. With ``L`` the summed negative log-likelihood (nats) of all
continuation units of the set, ``N`` their number and ``S`` the seconds of audio they cover:

- ``unit_perplexity = exp(L / N)``, the usual per-token perplexity; it depends on the unit rate (how
  many units a second of speech becomes after merging), so it compares only models over the same
  units;
- ``bits_per_second = L / (S ln 2)``, the information rate, independent of the tokenisation;
- ``normalised_perplexity = exp(L / (S * reference_rate_hz))``: the perplexity per ``1 /
  reference_rate_hz`` seconds of audio (20 ms by default, HuBERT's 50 Hz frame), i.e. the per-token
  perplexity a tokenizer emitting exactly ``reference_rate_hz`` units a second would have. Lower is
  better; a model that spreads its mass uniformly over ``K`` units scores ``K ** (N / (S * rate))``.

TinyWave reports "normalised perplexity" on Libri-Light continuations without a definition in the
project's summary of the paper; this per-time normalisation is ours, chosen so that models over units
of different rates (or with and without merging) stay comparable. ``restrict_to_units=True`` scores
each unit with the model's distribution renormalised over the unit tokens only (what the mass on
text tokens and markers does not count against).

**Spoken StoryCloze-style discrimination** (:func:`build_cloze_pairs`, :func:`cloze_accuracy`).
Built from the corpus's sentences: each sentence of ``n >= 4`` words is cut at word ``n // 2`` into a
prompt and its true ending; the distractor is the ending of another sentence whose first word differs
from the true ending's (so the two differ where they join the prompt), chosen with a generator seeded
by ``(seed, clip id)``. The prompt, the true ending and the distractor are each synthesised on their
own in the prompt clip's voice, rate and pitch (:func:`caad.data.interleaved.synthesize_spans`), so
voice gives nothing away and both endings join the prompt the same way, and encoded to units. The
model scores ``[bos] <speech> prompt + ending`` for each ending; it is right when the true ending's
summed log-likelihood is the higher (a tie counts one half). Chance is 50%. The sum favours the
shorter ending whatever the prompt, so two other scorings are offered: ``"mean"`` (per unit) and
``"pmi"`` (the log-likelihood given the prompt minus that without it: what the prompt adds).
Reported as the accuracy and, for a student, its fraction of the teacher's
(:func:`compare_to_teacher`), as TinyWave reports spoken StoryCloze. This is closer to
topic-StoryCloze (a random other ending) than to the semantic sSC, since the corpus's sentences
have no story.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from caad.data.audio import load_audio
from caad.data.interleaved import Clip, UnitVocab, synthesize_spans

if TYPE_CHECKING:  # pragma: no cover
    from caad.data.units import UnitTokenizer

__all__ = [
    "CLOZE_SCORINGS",
    "ClozePair",
    "SpeechContinuation",
    "build_cloze_pairs",
    "cloze_accuracy",
    "compare_to_teacher",
    "continuation_log_probs",
    "continuation_perplexity",
    "evaluate_unit_lm",
    "speech_continuations",
]


def _speech_prompt(vocab: UnitVocab, units: Sequence[int]) -> list[int]:
    head = [] if vocab.bos_id is None else [vocab.bos_id]
    return head + [vocab.speech_id] + [vocab.first_unit_id + int(u) for u in units]


@torch.no_grad()
def continuation_log_probs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    restrict_to: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Log-probabilities of each continuation token given its prompt, teacher-forced.

    Args:
        model: a Hugging Face causal LM (``model(input_ids=, attention_mask=).logits`` ``[B, T, V]``).
        prompts, continuations: token ids, paired; each prompt and continuation non-empty.
        pad_id: the id right padding uses (masked out, never scored).
        batch_size: sequences per forward.
        restrict_to: token ids; when given, each position's distribution is renormalised over these
            ids only (every continuation token must be one of them).

    Returns:
        one float64 array ``[len(continuation)]`` per pair: ``log p(c_j | prompt, c_<j)`` in nats.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"prompts ({len(prompts)}) and continuations ({len(continuations)}) must pair up")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    allowed = None
    if restrict_to is not None:
        allowed = torch.as_tensor(list(restrict_to), dtype=torch.long, device=device)
        position = torch.full((int(allowed.max()) + 1,), -1, dtype=torch.long, device=device)
        position[allowed] = torch.arange(allowed.numel(), device=device)
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(zip(prompts[start : start + batch_size], continuations[start : start + batch_size]))
            for index, (prompt, continuation) in enumerate(batch, start=start):
                if not len(prompt) or not len(continuation):
                    raise ValueError(f"pair {index}: prompt and continuation must be non-empty")
            width = max(len(p) + len(c) for p, c in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (prompt, continuation) in enumerate(batch):
                sequence = list(prompt) + list(continuation)
                input_ids[row, : len(sequence)] = torch.as_tensor(sequence)
                mask[row, : len(sequence)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            for row, (prompt, continuation) in enumerate(batch):
                # positions len(prompt)-1 ... predict the continuation's tokens
                rows = logits[row, len(prompt) - 1 : len(prompt) - 1 + len(continuation)]
                targets = torch.as_tensor(list(continuation), dtype=torch.long, device=device)
                if allowed is not None:
                    if int(targets.max()) >= position.numel() or bool((position[targets] < 0).any()):
                        raise ValueError(f"pair {start + row}: a continuation token is not in restrict_to")
                    rows = rows[:, allowed]
                    targets = position[targets]
                log_probs = torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])[:, 0]
                out.append(log_probs.double().cpu().numpy())
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class SpeechContinuation:
    """A held-out clip cut in two: ``prompt_units`` and ``continuation_units`` (unit ids, merged),
    ``continuation_seconds`` (audio behind the continuation's units)."""

    id: str
    prompt_units: tuple[int, ...]
    continuation_units: tuple[int, ...]
    continuation_seconds: float


def speech_continuations(
    clips: Sequence[Clip], unit_tokenizer: UnitTokenizer, prompt_fraction: float = 0.5
) -> list[SpeechContinuation]:
    """Cut each clip's units at ``prompt_fraction`` of its frames (module docstring); at least one unit
    on each side (clips with fewer than two units are left out)."""
    if (
        isinstance(prompt_fraction, bool)
        or not isinstance(prompt_fraction, (int, float))
        or not 0 < prompt_fraction < 1
    ):
        raise ValueError(f"prompt_fraction must be a number in (0, 1), got {prompt_fraction!r}")
    out = []
    rate = unit_tokenizer.config.sampling_rate
    for clip in clips:
        units, durations = unit_tokenizer.encode_with_durations(load_audio(clip.audio_path, rate))
        if units.size < 2:
            continue
        starts = np.cumsum(durations) - durations
        cut = int(np.searchsorted(starts, prompt_fraction * durations.sum(), side="left"))
        cut = min(max(cut, 1), units.size - 1)
        out.append(
            SpeechContinuation(
                id=clip.id,
                prompt_units=tuple(units[:cut].tolist()),
                continuation_units=tuple(units[cut:].tolist()),
                continuation_seconds=float(durations[cut:].sum() / unit_tokenizer.frame_rate),
            )
        )
    return out


def continuation_perplexity(
    model: torch.nn.Module,
    vocab: UnitVocab,
    items: Sequence[SpeechContinuation],
    batch_size: int = 16,
    reference_rate_hz: float = 50.0,
    restrict_to_units: bool = False,
) -> dict[str, float]:
    """``normalised_perplexity``, ``unit_perplexity``, ``bits_per_second`` (module docstring), with
    ``nll`` (nats, summed), ``units`` and ``seconds`` over ``items``."""
    if not items:
        raise ValueError("continuation_perplexity needs at least one item")
    if not isinstance(reference_rate_hz, (int, float)) or reference_rate_hz <= 0:
        raise ValueError(f"reference_rate_hz must be a positive number, got {reference_rate_hz!r}")
    prompts = [_speech_prompt(vocab, item.prompt_units) for item in items]
    continuations = [[vocab.first_unit_id + u for u in item.continuation_units] for item in items]
    log_probs = continuation_log_probs(
        model, prompts, continuations, vocab.pad_id, batch_size, list(vocab.unit_ids) if restrict_to_units else None
    )
    nll = -float(sum(lp.sum() for lp in log_probs))
    units = sum(lp.size for lp in log_probs)
    seconds = float(sum(item.continuation_seconds for item in items))
    return {
        "normalised_perplexity": math.exp(nll / (seconds * reference_rate_hz)),
        "unit_perplexity": math.exp(nll / units),
        "bits_per_second": nll / (seconds * math.log(2)),
        "nll": nll,
        "units": float(units),
        "seconds": seconds,
    }


@dataclass(frozen=True)
class ClozePair:
    """One discrimination item: the prompt, its true ending and a distractor ending (texts, and unit
    ids of each part synthesised on its own in the prompt's voice)."""

    id: str
    prompt_text: str
    ending_text: str
    distractor_text: str
    distractor_source: str
    prompt_units: tuple[int, ...]
    ending_units: tuple[int, ...]
    distractor_units: tuple[int, ...]


def _first_word(words: Sequence[str]) -> str:
    return re.sub(r"[^\w']", "", words[0]).lower()


def build_cloze_pairs(
    clips: Sequence[Clip],
    unit_tokenizer: UnitTokenizer,
    seed: int = 0,
    max_pairs: int | None = None,
    workers: int | None = None,
) -> list[ClozePair]:
    """The StoryCloze-style pairs of ``clips`` (module docstring), in clip order.

    Clips that cannot be re-synthesised or have fewer than four words are left out; ``max_pairs``
    keeps a seeded sample of that many. A clip whose ending's first word every other ending shares
    gets no pair. Deterministic for a seed. Raises ``ValueError`` when no pair can be built.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs must be a positive int or None, got {max_pairs!r}")
    eligible = [clip for clip in clips if clip.can_resynthesise and len(clip.words) >= 4]
    halves = {clip.id: (clip.words[: len(clip.words) // 2], clip.words[len(clip.words) // 2 :]) for clip in eligible}
    chosen: list[tuple[Clip, Clip]] = []
    for clip in eligible:
        first = _first_word(halves[clip.id][1])
        candidates = [other for other in eligible if other.id != clip.id and _first_word(halves[other.id][1]) != first]
        if candidates:
            chosen.append((clip, random.Random(f"caad-cloze-{seed}-{clip.id}").choice(candidates)))
    if max_pairs is not None and len(chosen) > max_pairs:
        keep = sorted(random.Random(f"caad-cloze-sample-{seed}").sample(range(len(chosen)), max_pairs))
        chosen = [chosen[i] for i in keep]
    if not chosen:
        raise ValueError("no StoryCloze pair can be built: need >= 2 re-synthesisable clips of >= 4 words")
    requests = []
    for clip, other in chosen:
        settings = (clip.voice, clip.rate_wpm, clip.pitch)
        prompt, ending = halves[clip.id]
        for words in (prompt, ending, halves[other.id][1]):
            requests.append((" ".join(words), *settings))
    waveforms = synthesize_spans(requests, unit_tokenizer.config.sampling_rate, workers)
    pairs = []
    for index, (clip, other) in enumerate(chosen):
        units = [tuple(unit_tokenizer.encode(w).tolist()) for w in waveforms[3 * index : 3 * index + 3]]
        if not all(units):
            raise ValueError(f"clip {clip.id!r}: a synthesised part gave no unit")
        prompt, ending = halves[clip.id]
        pairs.append(
            ClozePair(
                id=clip.id,
                prompt_text=" ".join(prompt),
                ending_text=" ".join(ending),
                distractor_text=" ".join(halves[other.id][1]),
                distractor_source=other.id,
                prompt_units=units[0],
                ending_units=units[1],
                distractor_units=units[2],
            )
        )
    return pairs


CLOZE_SCORINGS: tuple[str, ...] = ("sum", "mean", "pmi")


def cloze_accuracy(
    model: torch.nn.Module,
    vocab: UnitVocab,
    pairs: Sequence[ClozePair],
    batch_size: int = 16,
    restrict_to_units: bool = False,
    scoring: str = "sum",
) -> dict[str, Any]:
    """``accuracy`` (the true ending scores higher; ties one half), ``n``, and per pair the ``margins``
    (true ending's score minus the distractor's).

    ``scoring``: ``"sum"`` (default, as the module docstring says) the summed log-likelihood of the
    ending's units given the prompt, in nats; ``"mean"`` the same divided by the ending's length;
    ``"pmi"`` the summed log-likelihood given the prompt minus that given no prompt (the ending read
    right after ``[bos] <speech>``): what the prompt adds, independent of how likely or how long the
    ending is on its own.
    """
    if not pairs:
        raise ValueError("cloze_accuracy needs at least one pair")
    if scoring not in CLOZE_SCORINGS:
        raise ValueError(f"scoring must be one of {CLOZE_SCORINGS}, got {scoring!r}")
    restrict = list(vocab.unit_ids) if restrict_to_units else None
    prompts, continuations = [], []
    for pair in pairs:
        prompt = _speech_prompt(vocab, pair.prompt_units)
        for ending in (pair.ending_units, pair.distractor_units):
            prompts.append(prompt)
            continuations.append([vocab.first_unit_id + u for u in ending])
    log_probs = continuation_log_probs(model, prompts, continuations, vocab.pad_id, batch_size, restrict)
    scores = np.array([lp.sum() for lp in log_probs])
    if scoring == "mean":
        scores = scores / np.array([lp.size for lp in log_probs])
    elif scoring == "pmi":
        empty = _speech_prompt(vocab, ())
        alone = continuation_log_probs(
            model, [empty] * len(continuations), continuations, vocab.pad_id, batch_size, restrict
        )
        scores = scores - np.array([lp.sum() for lp in alone])
    scores = scores.reshape(-1, 2)
    margins = scores[:, 0] - scores[:, 1]
    score = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))
    return {"accuracy": float(score.mean()), "n": len(pairs), "margins": margins.tolist(), "scoring": scoring}


def evaluate_unit_lm(
    model: torch.nn.Module,
    vocab: UnitVocab,
    continuations: Sequence[SpeechContinuation],
    pairs: Sequence[ClozePair],
    batch_size: int = 16,
    reference_rate_hz: float = 50.0,
    cloze_scoring: str = "sum",
) -> dict[str, float]:
    """Both measures in one flat dict: ``normalised_perplexity``, ``unit_perplexity``,
    ``bits_per_second`` and ``cloze_accuracy`` (with ``cloze_n``; ``cloze_scoring`` as in
    :func:`cloze_accuracy`)."""
    perplexity = continuation_perplexity(model, vocab, continuations, batch_size, reference_rate_hz)
    cloze = cloze_accuracy(model, vocab, pairs, batch_size, scoring=cloze_scoring)
    return {
        "normalised_perplexity": perplexity["normalised_perplexity"],
        "unit_perplexity": perplexity["unit_perplexity"],
        "bits_per_second": perplexity["bits_per_second"],
        "cloze_accuracy": cloze["accuracy"],
        "cloze_n": float(cloze["n"]),
    }


def compare_to_teacher(student: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float]:
    """The student against the teacher, as TinyWave reports it (from :func:`evaluate_unit_lm` dicts).

    ``cloze_accuracy_fraction`` = student accuracy / teacher accuracy; ``cloze_above_chance_fraction``
    = (student - 0.5) / (teacher - 0.5) (``nan`` when the teacher is at chance);
    ``normalised_perplexity_gap`` = student - teacher (points; TinyWave's "within 1.4 points").
    """
    t_acc, s_acc = float(teacher["cloze_accuracy"]), float(student["cloze_accuracy"])
    return {
        "cloze_accuracy_fraction": s_acc / t_acc if t_acc > 0 else math.nan,
        "cloze_above_chance_fraction": (s_acc - 0.5) / (t_acc - 0.5) if t_acc != 0.5 else math.nan,
        "normalised_perplexity_gap": float(student["normalised_perplexity"]) - float(teacher["normalised_perplexity"]),
    }
