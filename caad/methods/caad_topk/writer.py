"""``caad topk write``: run CAAD's teacher once over the Stage 1 manifests and store its top-k.

Each batch is built by CAAD's own batch builder (:func:`caad.methods.caad.batch.build_batch`: the
teacher's positive path on the real audio and its negative path, ``negative_mode``, teacher-forced on
``prompt + pseudo-GT``), both paths run in one forward (:func:`caad.methods.caad.loss.teacher_forward`)
and :func:`caad_kernels.fused_linear_teacher_topk_logprobs` keeps the ``k`` largest
``log_softmax(z_hat / temperature)`` per target token without materialising the logits. The store's
format and conventions: :mod:`caad.methods.caad_topk.store`.

Differences from the live teacher of ``caad`` training, by design: the clips are cut to the teacher's
audio window (training cuts to the shorter of the student's and the teacher's); the
``noise_keep_length`` negative path is seeded by ``noise_seed`` + the writer's batch number (training
seeds by its micro-batch); ``max_length`` is not applied (training uses a prefix of the stored rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from caad.methods.caad.batch import PseudoGTDataset, build_batch
from caad.methods.caad.loss import teacher_forward
from caad.methods.caad_topk.config import TopKConfig
from caad.methods.caad_topk.store import StoreError, StoreWriter, tokenizer_hash
from caad.models import IGNORE_INDEX, SpeechLM
from caad_kernels.topk_offline import fused_linear_teacher_topk_logprobs

__all__ = ["write_topk_store"]


def _device(config: TopKConfig) -> torch.device:
    if config.write_device is not None:
        return torch.device(config.write_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _datasets(config: TopKConfig, section: str) -> list[tuple[str, PseudoGTDataset]]:
    """The train (and validation) manifests' rows; every id once over all of them."""
    out = [("train_manifest", PseudoGTDataset(config.train_manifest))]
    if config.validation_manifest is not None:
        out.append(("validation_manifest", PseudoGTDataset(config.validation_manifest)))
    seen: dict[str, str] = {}
    for key, dataset in out:
        for row in dataset.rows:
            if row.id in seen:
                raise StoreError(
                    f"{section}.{key}: example id {row.id!r} also appears in {section}.{seen[row.id]}; the store is "
                    "keyed by example id, so ids must be unique over the manifests"
                )
            seen[row.id] = key
    return out


def _load_teacher(config: TopKConfig, section: str, device: torch.device) -> SpeechLM:
    """The teacher as ``caad`` training loads it (:func:`caad.train.engine.load_frozen`, the config's
    dtype and loading options), on ``device``."""
    from caad.cli import UserError
    from caad.train.engine import load_frozen

    if config.teacher_zero3:
        raise UserError(f"{section}.teacher_zero3: caad topk write runs one process; set it to false")
    options = {
        "chat_template": config.chat_template,
        "allow_pickle": config.allow_pickle,
        "trust_remote_code": config.trust_remote_code,
        "low_memory": config.low_memory,
    }
    return load_frozen(str(config.teacher), config, device, **options)


def write_topk_store(
    config: TopKConfig,
    *,
    section: str = "caad_topk",
    overwrite: bool = False,
    progress: bool = True,
    teacher: SpeechLM | None = None,
) -> Path:
    """Write the store of ``config.topk_store`` from ``config.teacher`` over the train (and validation)
    manifest; returns its folder.

    Checks (before the teacher is loaded): the paths, an existing store (refused unless ``overwrite``),
    unique example ids. ``teacher``: an already loaded teacher to use instead of loading
    ``config.teacher`` (its path is still recorded). Nothing is left behind on failure: the store is
    written into a temporary sibling folder and renamed when complete.
    """
    from caad.cli import UserError

    config.check_write_paths(section)
    writer = StoreWriter(config.topk_store, shard_examples=config.shard_examples, overwrite=overwrite)
    try:
        writer.check(f"{section}.topk_store")
        datasets = _datasets(config, section)
    except StoreError as error:
        raise UserError(str(error)) from None
    device = _device(config)
    if teacher is None:
        teacher = _load_teacher(config, section, device)
    device = teacher.device
    vocab = config.topk_vocab_size or min(len(teacher.tokenizer), teacher.vocab_size)
    if vocab > teacher.vocab_size:
        raise UserError(f"{section}.topk_vocab_size: {vocab} is larger than the teacher's vocabulary "
                        f"({teacher.vocab_size})")
    if config.k > vocab:
        raise UserError(f"{section}.k: {config.k} is larger than the vocabulary kept ({vocab})")
    negative_mode = config.negative_mode if config.alpha > 0 else None
    store_dtype = getattr(torch, config.topk_dtype)
    batch_size = config.write_batch_size or config.batch_size
    total = sum(len(d) for _, d in datasets)
    writer.start()
    try:
        bar = _progress(total, progress)
        batch_number = 0
        for _, dataset in datasets:
            for start in range(0, len(dataset), batch_size):
                rows = dataset.rows[start : start + batch_size]
                for example_id, indices, logprobs, labels in _topk_of_rows(
                    rows, teacher, config, negative_mode, batch_number, vocab, device
                ):
                    writer.add(example_id, indices, logprobs.to(store_dtype), labels)
                batch_number += 1
                bar.update(len(rows))
        bar.close()
        meta = _meta(config, teacher, negative_mode, vocab, datasets)
        return writer.finish(meta)
    except BaseException:
        writer.abort()
        raise


def _topk_of_rows(
    rows: Sequence[Any],
    teacher: SpeechLM,
    config: TopKConfig,
    negative_mode: str | None,
    batch_number: int,
    vocab: int,
    device: torch.device,
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(id, indices [n, k], logprobs float32 [n, k], labels [n])`` of each row, in order."""
    # CAAD's batch builder with the teacher in the student's place: the teacher's two paths exactly as
    # training builds them (the duplicate "student" batch is the teacher's positive path, unused)
    batch = build_batch(
        rows,
        teacher,
        teacher,
        negative_mode=negative_mode,
        noise_seed=config.noise_seed + batch_number,
        silence_seconds=config.silence_seconds,
        max_samples=teacher.max_audio_samples,
        device=device,
        student_dtype=teacher.dtype,
    )
    positive, negative = teacher_forward(teacher, batch)
    indices, logprobs = fused_linear_teacher_topk_logprobs(
        positive.hidden,
        teacher.lm_head_weight,
        config.k,
        None if negative is None else negative.hidden,
        teacher_bias=teacher.lm_head_bias,
        alpha=config.alpha if negative is not None else 0.0,
        temperature=config.temperature,
        plausibility=config.plausibility,
        teacher_logit_scale=teacher.logit_scale,
        teacher_softcap=teacher.final_softcap,
        vocab_size=vocab,
    )
    counts = (batch.teacher_positive.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    out, start = [], 0
    for row, count in zip(rows, counts):
        stop = start + int(count)
        out.append((row.id, indices[start:stop], logprobs[start:stop], positive.labels[start:stop]))
        start = stop
    return out


def _meta(
    config: TopKConfig, teacher: SpeechLM, negative_mode: str | None, vocab: int, datasets: list
) -> dict[str, Any]:
    return {
        "teacher": str(Path(config.teacher).resolve()),
        "alpha": float(config.alpha),
        "negative_mode": negative_mode,
        "silence_seconds": float(config.silence_seconds),
        "noise_seed": int(config.noise_seed),
        "temperature": float(config.temperature),
        "plausibility": float(config.plausibility),
        "k": int(config.k),
        "vocab_size": int(vocab),
        "dtype": config.topk_dtype,
        "precision": config.precision,
        "tokenizer_hash": tokenizer_hash(teacher.tokenizer, teacher.end_of_turn_id),
        "uses_chat_template": bool(teacher.uses_chat_template),
        "max_audio_samples": int(teacher.max_audio_samples),
        "logprobs": "log_softmax(z_hat / temperature), top k, decreasing; -inf: empty slot",
        "manifests": {key: str(Path(d.path).resolve()) for key, d in datasets},
    }


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="top-k teacher", unit="ex", disable=not enabled)
