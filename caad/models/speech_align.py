"""Speech alignment of a speech LM's audio side before any task training (its language model frozen).

Real speech LLMs start from an ASR-trained audio encoder and an alignment stage that teaches the
projector to speak the LM's language; a randomly initialised encoder does not learn to recognise words
from a few hundred task examples. :func:`align_speech_student` runs both stages locally, on a training
manifest's audio and transcripts only (never its answers), and trains the audio encoder and the
projector in place; the language model's parameters are not touched (bit-identical afterwards).

Stages (``steps`` optimizer steps in all, ``ctc_fraction`` of them in stage 1; by default stage 1 only):

1. **CTC recognition** (the encoder learns the words). A linear head ``[D_audio] -> [K + 1]`` on the
   encoder's output frames ``[C, S, D_audio]`` (``S`` = 50 per second), trained with CTC against the
   transcript's token ids under the student's own tokenizer, remapped to the ``K`` distinct ids of the
   manifest's transcripts (blank = 0). Only frames of real audio count (``(L - 1) // 2 + 1`` of ``L``
   real mel frames). With ``ctc_space="lm"`` (default) the CTC runs instead on the projector's output
   (the audio tokens), each class scored by the distance to that token's frozen LM input embedding
   (:class:`_CTCHead`): encoder and projector learn together to put the word said at each audio token's
   time onto the LM's embedding of that word. SpecAugment-style masks (``spec_augment``) regularise it.
   The head is discarded afterwards.
2. **Behaviour alignment through the frozen LM** (BLSP-style, arXiv 2309.00916; the projector only, unless
   ``lm_stage_encoder``). The student's own text path is the reference: for each row the frozen LM reads the
   transcript as text (the text-only prompt, ``audio_mode="remove"``) and answers greedily; the speech path
   (the row's audio with the row's instruction) is trained to give the same answer, with
   ``KL(p_text || p_speech)`` over the vocabulary at each answer token. It uses no reference answers.

Measured on the built-in spoken-QA set. With the student's 32-wide encoder, 468 training clips and the
learned blank, the recogniser learns (about 80% of the *test* clips' transcript tokens) but the student does
not answer spoken questions above chance: the tiny LM answers only in its training prompt format, and given
the exact question text inside the spoken prompt it scores at chance. With the settings of
``configs/experiment_crossmodal.yaml`` (an LM that also saw the spoken prompt format in its text pre-training,
:mod:`caad.models.spoken_format`; a 128-wide, 3-layer encoder; 2160 training clips; ``blank="audio_token"``;
2000 steps) CTC goes 3.62 -> 0.74 with 85% of the tokens of 64 training clips right (885 s at one thread,
2 shared cores), and the aligned student answers 35% of the validation split's spoken questions (chance 16%).
Stage 2 fits the training clips (about 80% answered like the text path) but lowered the held-out accuracy in those first
measurements, hence ``ctc_fraction`` 1 by default.
``commitment`` matters: without it the audio tokens drift far from every embedding (the distance softmax is
blind to their norm) and the LM reads nothing (under 1%).

The row's transcript is ``metadata["transcript"]``, else the extra key ``text_query`` (the built-in
spoken-QA set has both); a row with neither is refused before anything is trained.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caad.data.audio import load_audio
from caad.data.manifest import ManifestRow
from caad.models.interface import IGNORE_INDEX, SAMPLING_RATE, SpeechBatch, SpeechLM

__all__ = ["CTC_SPACES", "align_speech_student", "row_transcript"]

CTC_SPACES = ("lm", "encoder")
_BLANK = 0


def row_transcript(row: ManifestRow) -> str:
    """What is said in ``row``'s audio: ``metadata["transcript"]``, else the extra key ``text_query``.

    A ``ValueError`` naming the row if it has neither."""
    transcript = row.metadata.get("transcript") or row.extra.get("text_query")
    if not isinstance(transcript, str) or not transcript.strip():
        raise ValueError(
            f"train_manifest: row {row.id!r} has no transcript (metadata.transcript or text_query): speech "
            "alignment needs what was said"
        )
    return transcript.strip()


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_args(
    student: Any,
    steps: Any,
    batch_size: Any,
    lr: Any,
    seed: Any,
    ctc_fraction: Any,
    ctc_space: Any,
    blank: Any,
    commitment: Any,
    eval_clips: Any,
) -> None:
    if not isinstance(student, SpeechLM) or not all(
        hasattr(student.model, part) for part in ("audio_encoder", "projector", "language_model")
    ):
        raise TypeError(
            "student must be a composite SpeechLM (audio_encoder + projector + language_model, e.g. from "
            f"build_speech_lm / load_speech_lm), got {type(student).__name__}"
        )
    _check_positive_int(steps, "steps")
    _check_positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or math.isinf(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(ctc_fraction, bool) or not isinstance(ctc_fraction, (int, float)) or not 0 <= ctc_fraction <= 1:
        raise ValueError(f"ctc_fraction must be a number in [0, 1], got {ctc_fraction!r}")
    if isinstance(commitment, bool) or not isinstance(commitment, (int, float)) or not 0 <= commitment < math.inf:
        raise ValueError(f"commitment must be a non-negative number, got {commitment!r}")
    if blank not in ("learned", "audio_token"):
        raise ValueError(f"blank must be 'learned' or 'audio_token', got {blank!r}")
    if ctc_space not in CTC_SPACES:
        raise ValueError(f"ctc_space must be one of {CTC_SPACES}, got {ctc_space!r}")
    if isinstance(eval_clips, bool) or not isinstance(eval_clips, int) or eval_clips < 0:
        raise ValueError(f"eval_clips must be a non-negative int, got {eval_clips!r}")


def _load_rows(train_manifest: Any) -> list[ManifestRow]:
    from caad.data.manifest import read_manifest

    if isinstance(train_manifest, (list, tuple)):
        rows = list(train_manifest)
        if not all(isinstance(row, ManifestRow) for row in rows):
            raise TypeError("train_manifest must be a manifest path or a list of ManifestRow")
    else:
        rows = read_manifest(train_manifest)
    if not rows:
        raise ValueError("train_manifest is empty: nothing to align on")
    return rows


class _Schedule:
    """Linear warm-up (5%) then cosine decay to 10% of the peak, over ``steps``."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.warmup = max(1, steps // 20)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(count: int, batch_size: int, rng: random.Random):
    """Endless index batches of size ``min(batch_size, count)`` in epochs of a seeded shuffle."""
    order: list[int] = []
    while True:
        indices = []
        while len(indices) < min(batch_size, count):
            if not order:
                order = rng.sample(range(count), count)
            indices.append(order.pop())
        yield indices


def _encoder_frames(student: SpeechLM, features: torch.Tensor) -> torch.Tensor:
    """``[C, S, D_audio]`` the audio encoder's output for ``[C, n_mels, 2 S]`` features."""
    encoder = student.model.audio_encoder
    weight = encoder.conv1.weight
    return encoder(features.to(weight.device, weight.dtype), use_cache=False).last_hidden_state


def _ctc_targets(student: SpeechLM, transcripts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Per transcript its CTC classes (1..K: the tokenizer ids remapped in sorted order) and ``K``."""
    ids = [student.tokenizer(text, add_special_tokens=False)["input_ids"] for text in transcripts]
    tokens = sorted({t for row in ids for t in row})
    vocabulary = {token: index + 1 for index, token in enumerate(tokens)}
    return [[vocabulary[t] for t in row] for row in ids], len(vocabulary), tokens


class _CTCHead(nn.Module):
    """CTC log-probabilities ``[C, S', K + 1]`` (blank = 0) and valid lengths ``[C]`` of a batch of features.

    ``space="encoder"``: a linear head on the encoder frames (``S' = S``). ``space="lm"``: on the
    projector's output (the LM's input space, ``S'`` = audio tokens): class ``k``'s logit is
    ``-||o - E[token_k]||^2 / tau`` with ``E`` the LM's (frozen) input embeddings, so an audio token is pulled
    onto the embedding of the word said there; the blank class has a learned prototype. ``tau`` is a tenth
    of the mean squared distance between the classes' embeddings.
    """

    def __init__(
        self, student: SpeechLM, tokens: Sequence[int], classes: int, space: str, seed: int, blank: str = "learned"
    ) -> None:
        super().__init__()
        self.student, self.space = [student], space  # a list: not a sub-module (its parameters are not ours)
        generator = torch.Generator().manual_seed(seed)
        if space == "encoder":
            width = student.model.config.audio_config.d_model
            self.linear = nn.Linear(width, classes + 1)
            with torch.no_grad():
                self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator) * 0.02)
                self.linear.bias.zero_()
        else:
            embeddings = student.model.language_model.get_input_embeddings().weight.detach()
            table = embeddings[torch.tensor(list(tokens), device=embeddings.device)].float().clone()
            self.register_buffer("table", table)
            spread = torch.cdist(table, table).pow(2)
            self.tau = float(spread.sum() / max(1, table.shape[0] * (table.shape[0] - 1))) / 10
            if blank == "audio_token":
                audio_row = embeddings[student.audio_token_id].float().clone()
                self.register_buffer("blank", audio_row)
            else:
                self.blank = nn.Parameter(table.mean(0).clone())

    def forward(self, features: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` ``[C, n_mels, 2 S]``, ``mel_lengths`` ``[C]`` real mel frames per clip."""
        student = self.student[0]
        frames = _encoder_frames(student, features)
        if self.space == "encoder":
            self.commitment = frames.new_zeros(())
            return torch.log_softmax(self.linear(frames).float(), dim=-1), (mel_lengths - 1) // 2 + 1
        tokens = student.model.projector(frames).float()
        prototypes = torch.cat([self.blank[None], self.table])
        distances = (tokens[..., None, :] - prototypes).pow(2).sum(-1) / self.tau
        lengths = student.model.num_audio_tokens(mel_lengths)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths.to(tokens.device)[:, None]
        # the softmax sees only o . p_k - |p_k|^2 / 2, not |o|: pull each audio token onto its nearest prototype
        self.commitment = distances.min(-1).values[valid].mean()
        return torch.log_softmax(-distances, dim=-1), lengths


def _spec_augment(features: torch.Tensor, mel_lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SpecAugment-style masks on a copy of ``[C, n_mels, frames]``: per clip two mel bands of up to 8 bins and
    two spans of up to 10% of its real frames, set to the clip's mean (regularises the recogniser)."""
    out = features.clone()
    clips, mels, _ = out.shape
    for c in range(clips):
        fill = out[c, :, : int(mel_lengths[c])].mean()
        for _ in range(2):
            width = int(torch.randint(0, 9, (1,), generator=generator))
            start = int(torch.randint(0, mels - width + 1, (1,), generator=generator))
            out[c, start : start + width] = fill
            span = int(torch.randint(0, max(1, int(mel_lengths[c]) // 10) + 1, (1,), generator=generator))
            at = int(torch.randint(0, max(1, int(mel_lengths[c]) - span) + 1, (1,), generator=generator))
            out[c, :, at : at + span] = fill
    return out


def _greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best-path decoding of ``[C, S, K + 1]`` log-probabilities: repeats merged, blanks dropped."""
    best = log_probs.argmax(-1).tolist()
    out = []
    for row, length in zip(best, lengths.tolist()):
        decoded, previous = [], _BLANK
        for label in row[:length]:
            if label != previous and label != _BLANK:
                decoded.append(label)
            previous = label
        out.append(decoded)
    return out


def _slice_batch(full: SpeechBatch, indices: Sequence[int], device: torch.device) -> SpeechBatch:
    """Rows ``indices`` of a right-padded batch whose every row holds one clip, trimmed to their length."""
    index = torch.tensor(indices)
    mask = full.attention_mask[index]
    length = int(mask.sum(-1).max())
    return SpeechBatch(
        input_ids=full.input_ids[index, :length],
        attention_mask=mask[:, :length],
        labels=full.labels[index, :length] if full.labels is not None else None,
        input_features=full.input_features[index] if full.input_features is not None else None,
        feature_attention_mask=full.feature_attention_mask[index] if full.feature_attention_mask is not None else None,
        audio_mode=full.audio_mode,
    ).to(device)


def _answer_log_probs(student: SpeechLM, batch: SpeechBatch) -> torch.Tensor:
    """``[N, V]`` log-probabilities at the target-predicting positions (packed row-major)."""
    packed = student.target_hidden_states(batch)
    return torch.log_softmax(student.logits_from_hidden(packed.hidden).float(), dim=-1)


def _text_path_answers(student: SpeechLM, transcripts: Sequence[str], batch_size: int) -> list[str]:
    """The frozen LM's greedy answers to the transcripts read as text (the behaviour to align to)."""
    silent = np.zeros(SAMPLING_RATE // 10, dtype=np.float32)
    answers: list[str] = []
    for start in range(0, len(transcripts), batch_size):
        part = list(transcripts[start : start + batch_size])
        answers += student.generate([silent] * len(part), part, max_new_tokens=6, audio_mode="remove")
    return answers


def _optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    parameters: Sequence[torch.nn.Parameter],
    losses: list[float],
    bar: Any,
) -> None:
    """One clipped (norm 1) optimizer and schedule step on ``loss``; its value joins ``losses`` and the bar."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    losses.append(float(loss.detach()))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.update(1)


def _loss_ends(losses: Sequence[float]) -> tuple[float, float]:
    """``(end, start)``: the mean loss over the last tenth of the steps and over as many first steps."""
    tail = losses[-max(1, len(losses) // 10) :]
    return float(np.mean(tail)), float(np.mean(losses[: len(tail)]))


@torch.no_grad()
def _agreement(student: SpeechLM, audio: list[np.ndarray], instructions: list[str], targets: list[str]) -> float:
    """Fraction of clips whose greedy spoken answer equals ``targets`` (case and spaces ignored)."""
    answers = []
    for start in range(0, len(audio), 32):
        answers += student.generate(audio[start : start + 32], instructions[start : start + 32], max_new_tokens=20)
    return float(np.mean([a.strip().lower() == t.strip().lower() for a, t in zip(answers, targets)]))


def align_speech_student(
    student: SpeechLM,
    train_manifest: Any,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    ctc_fraction: float = 1.0,
    ctc_space: str = "lm",
    spec_augment: bool = True,
    blank: str = "learned",
    commitment: float = 0.1,
    lm_stage_encoder: bool = False,
    eval_clips: int = 64,
) -> dict[str, float]:
    """Train ``student``'s audio encoder and projector in place on ``train_manifest``'s audio (module docstring).

    Args:
        student: a composite :class:`SpeechLM` (audio encoder + projector + language model); its language
            model is frozen throughout and its ``requires_grad`` flags are restored afterwards.
        train_manifest: a manifest path or a list of :class:`ManifestRow` (audio + transcript per row).
        steps: optimizer steps in all (>= 1); ``round(ctc_fraction * steps)`` of them CTC (stage 1).
        batch_size: clips per step. ``lr``: peak AdamW learning rate (5% warm-up, cosine to 10%).
        seed: batch order and the CTC head's initialisation (the global RNG is not used).
        ctc_fraction: share of the steps in stage 1 (0: no CTC; 1: no LM stage).
        ctc_space: ``"lm"`` (CTC on the audio tokens against the LM's embeddings) or ``"encoder"`` (a linear
            head on the encoder frames).
        spec_augment: masks on the features during stage 1.
        commitment: weight of the pull of each audio token onto its nearest prototype (``ctc_space="lm"``;
            squared distance over the head's ``tau``), added to the CTC loss.
        blank: the CTC blank's prototype with ``ctc_space="lm"``: ``"learned"`` or ``"audio_token"`` (fixed to
            the LM's embedding of the audio placeholder, for an LM taught to skip it between words).
        lm_stage_encoder: also train the encoder in stage 2 (default: the projector only; training the
            encoder there fitted the training clips worse and the test clips no better).
        eval_clips: how many training clips (the first ones) the held-in measures use (0: none).

    Returns:
        ``ctc_loss`` (mean over stage 1's last 10% of steps; ``nan`` without stage 1) and ``ctc_loss_start``
        (its first 10%), ``ctc_token_accuracy`` (held-in, greedy CTC: position-wise token matches / transcript
        tokens), ``lm_loss`` / ``lm_loss_start`` (the same for stage 2), ``agreement_before`` /
        ``agreement_after`` (held-in, around stage 2: the fraction of clips whose greedy spoken answer equals
        stage 2's target), ``ctc_steps``, ``lm_steps``, ``seconds`` (wall) and ``cpu_seconds``.
    """
    _check_args(student, steps, batch_size, lr, seed, ctc_fraction, ctc_space, blank, commitment, eval_clips)
    rows = _load_rows(train_manifest)
    transcripts = [row_transcript(row) for row in rows]
    for row in rows:
        if not row.instruction:
            raise ValueError(f"train_manifest: row {row.id!r} has no instruction (the spoken prompt)")

    from tqdm.auto import tqdm

    started, cpu_started = time.perf_counter(), time.process_time()
    model = student.model
    device = student.device
    ctc_steps = int(round(ctc_fraction * steps))
    lm_steps = steps - ctc_steps
    audio = [load_audio(row.audio_path, SAMPLING_RATE) for row in rows]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    trained = [*model.audio_encoder.parameters(), *model.projector.parameters()]
    metrics: dict[str, float] = {"ctc_steps": float(ctc_steps), "lm_steps": float(lm_steps)}
    rng = random.Random(f"caad-speech-align-{seed}")
    was_training = student.training
    try:
        model.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        student.eval()

        # ---- stage 1: CTC on the encoder ----
        features, feature_mask = student.extract_features(audio)
        mel_lengths = feature_mask.sum(-1)
        targets, classes, targets_ids = _ctc_targets(student, transcripts)
        metrics["ctc_loss"] = float("nan")
        metrics["ctc_token_accuracy"] = float("nan")
        if ctc_steps:
            head = _CTCHead(student, targets_ids, classes, ctc_space, seed, blank).to(device)
            augment = torch.Generator().manual_seed(seed + 1)
            ctc_parameters = [*(trained if ctc_space == "lm" else model.audio_encoder.parameters()), *head.parameters()]
            optimizer = torch.optim.AdamW(ctc_parameters, lr=lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(ctc_steps))
            model.audio_encoder.train()
            model.projector.train()
            losses: list[float] = []
            batches = _batches(len(rows), batch_size, rng)
            with tqdm(total=ctc_steps, desc="speech alignment: CTC", unit="step", disable=not progress) as bar:
                for _ in range(ctc_steps):
                    index = next(batches)
                    batch_features = features[index]
                    if spec_augment:
                        batch_features = _spec_augment(batch_features, mel_lengths[index], augment)
                    log_probs, lengths = head(batch_features, mel_lengths[index])
                    flat = torch.tensor([t for i in index for t in targets[i]], device=device)
                    loss = F.ctc_loss(
                        log_probs.transpose(0, 1),
                        flat,
                        lengths.to(device),
                        torch.tensor([len(targets[i]) for i in index], device=device),
                        blank=_BLANK,
                        zero_infinity=True,
                    )
                    loss = loss + commitment * head.commitment
                    _optimizer_step(loss, optimizer, schedule, ctc_parameters, losses, bar)
            model.audio_encoder.eval()
            model.projector.eval()
            metrics["ctc_loss"], metrics["ctc_loss_start"] = _loss_ends(losses)
            if eval_clips:
                with torch.no_grad():
                    held = list(range(min(eval_clips, len(rows))))
                    log_probs, lengths = head(features[held], mel_lengths[held])
                    decoded = _greedy_ctc(log_probs.cpu(), lengths)
                hits = sum(sum(a == b for a, b in zip(d, targets[i])) for d, i in zip(decoded, held))
                metrics["ctc_token_accuracy"] = hits / sum(len(targets[i]) for i in held)

        # ---- stage 2: through the frozen LM ----
        metrics["lm_loss"] = float("nan")
        instructions = [row.instruction for row in rows]
        held = list(range(min(eval_clips, len(rows))))
        # the text path's answers: of every clip when the behaviour stage trains on them, else of the held clips
        lm_targets = _text_path_answers(student, transcripts if lm_steps else [transcripts[i] for i in held], 64)
        if held:
            metrics["agreement_before"] = _agreement(
                student, [audio[i] for i in held], [instructions[i] for i in held], [lm_targets[i] for i in held]
            )
        if lm_steps:
            targets_nonempty = [t if t.strip() else "?" for t in lm_targets]
            speech = student.build_inputs(audio, instructions, targets_nonempty)
            text = student.build_inputs(audio, transcripts, targets_nonempty, audio_mode="remove")
            reference: list[torch.Tensor] = []
            with torch.no_grad():
                for start in range(0, len(rows), 64):
                    part = list(range(start, min(start + 64, len(rows))))
                    batch = _slice_batch(text, part, device)
                    log_probs = _answer_log_probs(student, batch)
                    counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()
                    reference += list(torch.split(log_probs, counts))
            stage2 = trained if lm_stage_encoder else list(model.projector.parameters())
            if not lm_stage_encoder:
                model.audio_encoder.requires_grad_(False)
            optimizer = torch.optim.AdamW(stage2, lr=lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(lm_steps))
            model.audio_encoder.train(lm_stage_encoder)
            model.projector.train()
            losses = []
            batches = _batches(len(rows), batch_size, rng)
            with tqdm(total=lm_steps, desc="speech alignment: behaviour", unit="step", disable=not progress) as bar:
                for _ in range(lm_steps):
                    index = next(batches)
                    batch = _slice_batch(speech, index, device)
                    log_probs = _answer_log_probs(student, batch)
                    target = torch.cat([reference[i] for i in index]).to(device)
                    loss = F.kl_div(log_probs, target, log_target=True, reduction="batchmean")
                    _optimizer_step(loss, optimizer, schedule, stage2, losses, bar)
            model.audio_encoder.eval()
            model.projector.eval()
            metrics["lm_loss"], metrics["lm_loss_start"] = _loss_ends(losses)
        if held:
            metrics["agreement_after"] = _agreement(
                student, [audio[i] for i in held], [instructions[i] for i in held], [lm_targets[i] for i in held]
            )
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        student.train(was_training)
    metrics["seconds"] = time.perf_counter() - started
    metrics["cpu_seconds"] = time.process_time() - cpu_started
    return metrics

