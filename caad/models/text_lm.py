"""Text language models as teachers: a tiny HF causal LM on the speech student's tokenizer, its text
prompts, the text-teacher pre-training step, greedy answers and text accuracy.

A text teacher is any Hugging Face causal LM (``AutoModelForCausalLM``) in a local folder. For the
cross-modal methods its vocabulary must line up with the speech student's: the fused KD op takes a
teacher vocabulary at least as large as the student's, with the same ids for the shared part. The
simplest way, used here, is ONE tokenizer for both (:func:`caad.models.train_tokenizer`, which already
holds the audio special tokens): :func:`build_tiny_text_lm` gives the LM the vocabulary of the tiny
teacher (``len(tokenizer) + 64`` rows, a padded ``lm_head`` like Qwen's), and
:func:`check_shared_vocabulary` verifies the condition for any teacher/student tokenizer pair.

Prompt convention (:func:`text_prompt`): exactly the text-only prompt of the speech models
(:meth:`caad.models.SpeechLM.format_prompt` with ``with_audio=False``, i.e. their ``"remove"`` path):
``<|bos|>{query}\\n`` without a chat template, or the template's user turn plus generation prompt with
one. The target is the answer followed by the end-of-turn token (``eos``, or the template's, e.g.
``<|im_end|>``); prompt and target are tokenised separately. So, with a shared tokenizer, the text
teacher's sequence for a query is token for token the student's text-only (``t2t``) sequence, and its
answer tokens are the student's answer tokens on the spoken (``s2t``) sequence: the packed answer rows
(:func:`text_target_hidden_states`, :attr:`caad.models.SpeechLM.target_hidden_states`) line up row by row.

Labels follow :mod:`caad.models.interface`: unshifted, ``-100`` outside the target.

:func:`train_text_lm` is the text teacher's **pre-training step** (teaching a fresh tiny LM the text
version of a task, e.g. :mod:`caad.data.spoken_qa`), a deliberately minimal single-process loop (AdamW,
linear warm-up then linear decay, gradient clipping, cross-entropy on the answer tokens, a progress
bar) for tests and the demo; distillation itself runs on the project's trainer (:mod:`caad.train`).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from caad.models.interface import IGNORE_INDEX, TargetHiddenStates, load_tokenizer, position_ids_from_mask
from caad.models.spoken_format import SpokenPromptFormat
from caad.models.tiny import tiny_composite_config
from caad.models.tokenizer import build_prompt, chat_prompt, end_of_turn_token, has_chat_template

__all__ = [
    "QAExample",
    "TextBatch",
    "TextTrainResult",
    "build_text_batch",
    "build_tiny_text_lm",
    "check_shared_vocabulary",
    "evaluate_text_lm",
    "generate_text_answers",
    "load_text_lm",
    "save_text_lm",
    "text_end_token_id",
    "text_prompt",
    "text_target_hidden_states",
    "train_text_lm",
]


class QAExample(Protocol):
    """What :func:`evaluate_text_lm` reads from an item (e.g. :class:`caad.data.spoken_qa_items.QAItem`)."""

    text_query: str
    answer: str
    choices: Sequence[str]
    task: str
    category: str


# ---- the model ----------------------------------------------------------------------------------


def build_tiny_text_lm(
    tokenizer: PreTrainedTokenizerBase, text_model: Literal["llama", "qwen2"] = "llama", seed: int = 0, **sizes: int
) -> PreTrainedModel:
    """A tiny random causal LM (Llama or Qwen2) with the tiny teacher's LM sizes, in eval mode.

    It is the language model of :func:`caad.models.tiny_composite_config` with ``role="teacher"``:
    hidden 128, 2 layers, 4 heads (2 KV heads), vocabulary ``len(tokenizer) + 64``; ``sizes`` overrides
    them (``hidden``, ``layers``, ``heads``, ``kv_heads``, ``mlp``, ``vocab_padding``). ``tokenizer``
    must hold the audio special tokens (:func:`caad.models.train_tokenizer` does). The global RNG is
    untouched.
    """
    audio_sizes = {"audio", "audio_layers", "audio_heads", "stack"} & set(sizes)
    if audio_sizes:
        raise ValueError(f"a text LM has no audio part; drop the size overrides {sorted(audio_sizes)}")
    config = tiny_composite_config(tokenizer, role="teacher", text_model=text_model, **sizes).text_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def check_shared_vocabulary(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_vocab_size: int | None = None,
) -> int:
    """Check that a teacher can distil into a student over the student's whole vocabulary.

    Every token of the student's tokenizer must have the same id in the teacher's, and the teacher's
    ``lm_head`` (``teacher_vocab_size`` rows; default ``len(teacher_tokenizer)``) must cover the student's
    ids. Returns the size of the shared part (``len(student_tokenizer)``); a ``ValueError`` names the
    first token that differs.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    for token, token_id in sorted(student_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if teacher_vocab.get(token) != token_id:
            raise ValueError(
                f"the teacher's tokenizer maps {token!r} to {teacher_vocab.get(token)!r}, the student's to {token_id}: "
                "the vocabularies do not line up (train one tokenizer for both)"
            )
    shared = len(student_tokenizer)
    rows = len(teacher_tokenizer) if teacher_vocab_size is None else int(teacher_vocab_size)
    if rows < shared:
        raise ValueError(f"the teacher's lm_head has {rows} rows but the student's vocabulary {shared} tokens")
    return shared


# ---- prompts and batches ------------------------------------------------------------------------


def text_prompt(tokenizer: PreTrainedTokenizerBase, query: str) -> str:
    """The prompt text for ``query``: the speech models' text-only prompt (module docstring)."""
    if has_chat_template(tokenizer):
        return chat_prompt(tokenizer, query, with_audio=False)
    return build_prompt(tokenizer, query, with_audio=False)


def text_end_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that ends every target: the chat template's end of turn when there is one, else ``eos``."""
    token = end_of_turn_token(tokenizer) if has_chat_template(tokenizer) else tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no end-of-turn/eos token ({token!r})")
    return int(token_id)


@dataclass
class TextBatch:
    """``prompt (+ target)`` inputs of a text LM.

    ``input_ids``/``attention_mask``/``labels``: ``[B, T]`` int64 (labels unshifted, ``-100`` outside
    targets; ``None`` without targets); ``position_ids`` ``[B, T]`` from the mask (``cumsum - 1``), so
    left and right padding give the same states on real tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    position_ids: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.position_ids = position_ids_from_mask(self.attention_mask)

    def to(self, device: torch.device | str) -> TextBatch:
        labels = None if self.labels is None else self.labels.to(device)
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), labels)


def _check_strings(values: Any, name: str, count: int | None = None) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of strings, got {type(values).__name__}")
    values = list(values)
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name}[{index}] must be a non-empty string, got {value!r}")
    if count is not None and len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but queries has {count}")
    return values


def _encode(tokenizer: PreTrainedTokenizerBase, query: str, answer: str | None, end_id: int) -> tuple[list, list]:
    """``(token ids, labels)`` of one example: prompt (labels ``-100``) + answer + end token."""
    prompt = tokenizer(text_prompt(tokenizer, query), add_special_tokens=False)["input_ids"]
    target = [] if answer is None else tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def _collate(
    encoded: Sequence[tuple[list, list]], pad_id: int, with_labels: bool, padding_side: str
) -> TextBatch:
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, label_row) in enumerate(encoded):
        span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
        labels[row, span] = torch.tensor(label_row)
    return TextBatch(input_ids, attention_mask, labels if with_labels else None)


def _pad_id(tokenizer: PreTrainedTokenizerBase, end_id: int) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else end_id


def build_text_batch(
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    answers: Sequence[str] | None = None,
    padding_side: Literal["left", "right"] = "right",
) -> TextBatch:
    """Tokenise ``text_prompt(query) + answer + end token`` per example (answers ``None``: prompts only)."""
    queries = _check_strings(queries, "queries")
    if not queries:
        raise ValueError("queries is empty")
    if answers is not None:
        answers = _check_strings(answers, "answers", len(queries))
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    end_id = text_end_token_id(tokenizer)
    encoded = [
        _encode(tokenizer, query, None if answers is None else answers[index], end_id)
        for index, query in enumerate(queries)
    ]
    return _collate(encoded, _pad_id(tokenizer, end_id), answers is not None, padding_side)


def text_target_hidden_states(model: PreTrainedModel, batch: TextBatch) -> TargetHiddenStates:
    """Final hidden states (after the final norm, before ``lm_head``) at the positions that predict
    target tokens, packed row-major: ``([N, H]``, ``[N]`` labels) as :class:`caad.models.TargetHiddenStates`,
    the teacher side of the fused-linear loss on the answer rows."""
    if batch.labels is None:
        raise ValueError("batch has no labels: build it with answers to get target hidden states")
    device = next(model.parameters()).device
    batch = batch.to(device)
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    shifted = batch.labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return TargetHiddenStates(hidden[:, :-1][mask], shifted[mask])


# ---- pre-training -------------------------------------------------------------------------------


@dataclass
class TextTrainResult:
    """``losses``: the mean answer-token cross-entropy of each step; ``seconds``: wall time."""

    losses: list[float]
    seconds: float


class _SpokenRenderer:
    """Example ``i`` as encoded, or with probability ``fraction`` in ``spoken_format`` (own seeded RNG)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, queries: list[str], encoded: list[tuple[list, list]],
                 spoken_format: SpokenPromptFormat | None, fraction: float, seed: int) -> None:
        self.encoded, self.format, self.fraction = encoded, spoken_format, fraction
        self.rng = random.Random(f"caad-text-lm-spoken-{seed}")
        self.questions = [tokenizer(query, add_special_tokens=False)["input_ids"] for query in queries] \
            if fraction > 0 else []

    def __call__(self, index: int) -> tuple[list, list]:
        ids, labels = self.encoded[index]
        if self.format is None or self.fraction == 0 or self.rng.random() >= self.fraction:
            return ids, labels
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # the answer's start
        prompt = self.format.render(self.questions[index], self.rng)
        return prompt + ids[first:], [IGNORE_INDEX] * len(prompt) + labels[first:]


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train_text_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    answers: Sequence[str],
    *,
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.01,
    warmup_steps: int | None = None,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    spoken_format: SpokenPromptFormat | None = None,
    spoken_fraction: float = 0.0,
) -> TextTrainResult:
    """Teach ``model`` to answer ``queries`` with ``answers`` (the text teacher's pre-training step).

    Cross-entropy on the answer and end tokens only (the prompt is context), AdamW, ``warmup_steps``
    (default 5% of ``steps``) of linear warm-up then linear decay to 0, gradients clipped to
    ``max_grad_norm``. Batches are drawn in epochs of a seeded shuffle (``seed``; the global RNG is not
    used). Trains in place on the model's device and leaves it in eval mode.

    With ``spoken_format`` (the language model of a speech LM), each drawn example is rendered in that
    spoken prompt format instead of the text prompt with probability ``spoken_fraction`` (fresh fillers each
    time; :class:`caad.models.spoken_format.SpokenPromptFormat`), so the model also answers a question whose
    tokens sit in its audio slot. ``spoken_fraction=0`` draws exactly the batches of a run without it.
    """
    from tqdm.auto import tqdm

    queries = _check_strings(queries, "queries")
    answers = _check_strings(answers, "answers", len(queries))
    if not queries:
        raise ValueError("queries is empty: nothing to train on")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("learning_rate", learning_rate), ("max_grad_norm", max_grad_norm)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if isinstance(spoken_fraction, bool) or not isinstance(spoken_fraction, (int, float)) \
            or not 0 <= spoken_fraction <= 1:
        raise ValueError(f"spoken_fraction must be a number in [0, 1], got {spoken_fraction!r}")
    if spoken_fraction > 0 and spoken_format is None:
        raise ValueError(f"spoken_fraction is {spoken_fraction} but spoken_format is None: pass the speech LM's "
                         "SpokenPromptFormat")
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= steps:
        raise ValueError(f"warmup_steps must be an int in [0, steps], got {warmup_steps!r}")

    end_id = text_end_token_id(tokenizer)
    encoded = [_encode(tokenizer, query, answer, end_id) for query, answer in zip(queries, answers)]
    spoken = _SpokenRenderer(tokenizer, queries, encoded, spoken_format, spoken_fraction, seed)
    pad_id = _pad_id(tokenizer, end_id)
    device = next(model.parameters()).device
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, max(warmup, 1)))
    rng = random.Random(f"caad-text-lm-{seed}")
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    try:
        with tqdm(total=steps, desc="text teacher pre-training", unit="step", disable=not progress) as bar:
            for _ in range(steps):
                indices = []
                while len(indices) < min(batch_size, len(queries)):
                    if not order:
                        order = rng.sample(range(len(queries)), len(queries))
                    indices.append(order.pop())
                batch = _collate([spoken(i) for i in indices], pad_id, True, "right").to(device)
                out = model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    labels=batch.labels,
                )
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(float(out.loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    finally:
        model.eval()
    return TextTrainResult(losses=losses, seconds=time.perf_counter() - start)


# ---- answers and accuracy -----------------------------------------------------------------------


@torch.no_grad()
def generate_text_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers to ``queries`` (decoded, special tokens skipped, stripped), one per query.

    Left-padded batches, positions from the mask; decoding stops at the end token or ``eos`` per row or
    after ``max_new_tokens``; only ids inside the tokenizer are chosen (a padded ``lm_head``'s extra rows
    never are). Each step re-runs the whole (short) sequence: no KV cache, simple and exact.
    """
    queries = _check_strings(queries, "queries")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = next(model.parameters()).device
    stop = {text_end_token_id(tokenizer), int(tokenizer.eos_token_id)}
    usable = len(tokenizer)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(queries), batch_size):
            batch = build_text_batch(tokenizer, queries[start : start + batch_size], padding_side="left").to(device)
            ids, mask = batch.input_ids, batch.attention_mask
            rows = ids.shape[0]
            generated = torch.zeros((rows, 0), dtype=torch.long, device=device)
            finished = torch.zeros(rows, dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
                next_ids = logits[:, -1, :usable].argmax(dim=-1)
                next_ids = torch.where(finished, torch.full_like(next_ids, tokenizer.pad_token_id or 0), next_ids)
                generated = torch.cat([generated, next_ids[:, None]], dim=1)
                finished |= torch.isin(next_ids, torch.tensor(sorted(stop), device=device))
                if bool(finished.all()):
                    break
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            for row in generated.tolist():
                end = next((i for i, token in enumerate(row) if token in stop), len(row))
                answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def evaluate_text_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[QAExample],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Text accuracy of ``model`` on ``items``: greedy answers scored with :func:`caad.eval.scoring.is_correct`
    against each item's ``answer`` and ``choices``.

    Returns :func:`caad.eval.scoring.accuracy_metrics` (``accuracy``, ``accuracy_per_task``,
    ``accuracy_per_category``, counts) plus ``predictions``: ``[{"query", "answer", "prediction",
    "correct", "task"}]`` in item order.
    """
    from caad.eval.scoring import ScoredItem, accuracy_metrics, is_correct

    items = list(items)
    if not items:
        raise ValueError("items is empty: nothing to evaluate")
    predictions = generate_text_answers(
        model, tokenizer, [item.text_query for item in items], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    records, scored = [], []
    for item, prediction in zip(items, predictions):
        correct = is_correct(prediction, item.answer, item.choices)
        scored.append(ScoredItem(task=item.task, correct=correct, category=item.category))
        records.append(
            {"query": item.text_query, "answer": item.answer, "prediction": prediction, "correct": correct,
             "task": item.task}
        )  # fmt: skip
    return {**accuracy_metrics(scored), "predictions": records}


# ---- persistence --------------------------------------------------------------------------------


def save_text_lm(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Write the model (``config.json`` + safetensors) and its tokenizer into the folder ``path``.

    Refuses a non-empty folder unless ``overwrite`` (then files of the same names are replaced).
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not an empty folder (pass overwrite=True to write into it)")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_text_lm(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local folder (nothing downloaded), in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"text LM folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a saved Hugging Face model")
    tokenizer = load_tokenizer(str(path))
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
