"""CAAD from a stored top-k teacher (method ``caad_topk``): no teacher in memory.

The student's batch is CAAD's (:func:`caad.methods.caad.batch.build_batch` without a teacher); the
teacher is the store written by ``caad topk write`` (:mod:`caad.methods.caad_topk.writer`): per target
token the ``k`` largest ``log_softmax(z_hat / temperature)`` of the contrastive teacher. The loss is the
fused-linear op with that sparse teacher (:mod:`caad_kernels.topk`: the mass outside the top k is one
tail bucket), ``kd_weight * D + ce_weight * CE`` summed over the target tokens and divided by the target
tokens of the global batch, as in ``caad``. With ``k`` = the vocabulary it is ``caad``'s loss.

Before anything is written the store is checked against the config and the student: ``k``,
``temperature``, ``alpha``, ``plausibility``, the negative path, the tokenizer (hash of the vocabulary
and special tokens), the vocabulary size, the prompt convention and every example's target tokens; a
mismatch is a :class:`~caad.cli.UserError` naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caad.cli import UserError
from caad.data.checks import fit_max_length
from caad.data.manifest import ManifestRow
from caad.methods import register_method
from caad.methods.caad.batch import PseudoGTDataset, build_batch, prompt_length
from caad.methods.caad_topk.config import TopKConfig
from caad.methods.caad_topk.store import StoreError, TopKStore, tokenizer_hash
from caad.models import SpeechBatch, SpeechLM
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext
from caad_kernels import fused_linear_contrastive_kd_loss

__all__ = ["CAADTopKMethod", "TopKBatch"]


@dataclass
class TopKBatch:
    """One micro-batch: the student's ``prompt + pseudo-GT`` and the stored teacher rows.

    ``indices`` int64 / ``logprobs`` (the store's dtype) ``[N, k]``, aligned with the student's packed
    target rows (``N`` = ``num_targets``); ``None`` without a store (``kd_weight: 0``).
    """

    student: SpeechBatch
    indices: torch.Tensor | None
    logprobs: torch.Tensor | None
    num_targets: int
    num_tokens: int


@register_method
class CAADTopKMethod(Method):
    """CAAD distilled from a stored top-k contrastive teacher (``caad topk write``)."""

    name = "caad_topk"
    section = "caad_topk"
    config_class = TopKConfig
    resume_keys = ("topk_store", "alpha", "temperature", "k")
    required_fields = ("pseudo_gt",)
    config: TopKConfig

    def __init__(self, config: TopKConfig, section: str | None = None) -> None:
        super().__init__(config, section)
        self.store: TopKStore | None = None

    def describe(self) -> str:
        cfg = self.config
        if not cfg.needs_teacher:
            return "CE fine-tuning"
        return f"CAAD top-{cfg.k} (alpha={cfg.alpha:g}, stored)"

    # ---- inputs -----------------------------------------------------------------------------------

    def open_store(self) -> TopKStore | None:
        """The store, checked against the config's teacher settings (once); ``None`` at ``kd_weight: 0``."""
        cfg = self.config
        if not cfg.needs_teacher:
            return None
        if self.store is None:
            try:
                store = TopKStore(cfg.topk_store)
            except StoreError as error:
                raise UserError(f"{self.key('topk_store')}: {error}") from None
            self._check_settings(store.meta)
            self.store = store
        return self.store

    def _check_settings(self, meta: dict[str, Any]) -> None:
        cfg = self.config
        negative_mode = cfg.negative_mode if cfg.alpha > 0 else None
        wanted: dict[str, Any] = {
            "k": cfg.k,
            "temperature": float(cfg.temperature),
            "alpha": float(cfg.alpha),
            "plausibility": float(cfg.plausibility),
            "negative_mode": negative_mode,
        }
        if negative_mode == "silence_fixed_length":
            wanted["silence_seconds"] = float(cfg.silence_seconds)
        if negative_mode == "noise_keep_length":
            wanted["noise_seed"] = int(cfg.noise_seed)
        for key, value in wanted.items():
            if meta.get(key) != value:
                raise UserError(
                    f"{self.key(key)}: the top-k store {cfg.topk_store} was written with {key}={meta.get(key)!r}, "
                    f"the config has {value!r}; rewrite the store (caad topk write --overwrite) or set {key} to match"
                )
        if cfg.teacher is not None and str(Path(cfg.teacher).resolve()) != meta.get("teacher"):
            raise UserError(
                f"{self.key('teacher')}: the top-k store {cfg.topk_store} was written from the teacher "
                f"{meta.get('teacher')}, the config names {cfg.teacher}; set teacher to null (training does not "
                "load it) or rewrite the store"
            )

    def load_examples(self, path: str, key: str) -> PseudoGTDataset:
        """The Stage 1 manifest's rows; every row must hold a ``pseudo_gt`` and be in the store."""
        dataset = PseudoGTDataset(path)
        store = self.open_store()
        if store is not None:
            missing = [row.id for row in dataset.rows if row.id not in store]
            if missing:
                shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
                raise UserError(
                    f"{self.key('topk_store')}: {len(missing)} examples of {key} ({path}) are not in the store "
                    f"{self.config.topk_store}: {shown}; write the store for this manifest (caad topk write)"
                )
        return dataset

    # ---- models -----------------------------------------------------------------------------------

    def build_teachers(self, ctx: SetupContext) -> None:
        """No teacher: the store's tokenizer, vocabulary and prompt convention checked against the student."""
        self.student: SpeechLM = ctx.student
        self.device, self.dtype = ctx.device, ctx.dtype
        self.max_samples = self.student.max_audio_samples
        store = self.open_store()
        if store is None:
            return
        meta, where = store.meta, f"the top-k store {self.config.topk_store}"
        student_hash = tokenizer_hash(self.student.tokenizer, self.student.end_of_turn_id)
        if meta.get("tokenizer_hash") != student_hash:
            raise UserError(
                f"{self.key('topk_store')}: {where} has tokenizer_hash {meta.get('tokenizer_hash')!r} but the "
                f"student's tokenizer ({self.key('student')}) hashes to {student_hash!r}; the store's token ids "
                "are not the student's"
            )
        if int(meta["vocab_size"]) > self.student.vocab_size:
            raise UserError(
                f"{self.key('topk_store')}: {where} has vocab_size {meta['vocab_size']}, larger than the student's "
                f"vocabulary ({self.student.vocab_size})"
            )
        if bool(meta.get("uses_chat_template")) != self.student.uses_chat_template:
            raise UserError(
                f"{self.key('chat_template')}: the store's teacher "
                f"{'used' if meta.get('uses_chat_template') else 'did not use'} a chat template and the student "
                "does not match; both must build the same prompt convention"
            )
        self.max_samples = min(self.max_samples, int(meta["max_audio_samples"]))

    def fit_examples(self, examples: Sequence[ManifestRow], split: str, ctx: SetupContext) -> Sequence[ManifestRow]:
        """``max_length`` as in ``caad`` (the student's prompt), then every example's target tokens checked
        against the store's (a truncated pseudo-GT uses the first rows of its example)."""
        cfg = self.config
        kept = list(examples)
        if cfg.max_length is not None:
            try:
                kept, report = fit_max_length(
                    kept,
                    self.student.tokenizer,
                    cfg.max_length,
                    policy=cfg.max_length_policy,
                    prompt_tokens=lambda row: prompt_length(self.student, row, self.max_samples),
                )
            except ValueError as error:
                raise UserError(f"{self.key('max_length')}: {error}") from error
            if ctx.rank == 0:
                print(f"{self.describe()} [{split}]: {report.summary()}", flush=True)
            if not kept:
                raise UserError(f"{self.key('max_length')}: no {split} example fits in {cfg.max_length} tokens")
        if self.store is not None:
            tokenizer, end = self.student.tokenizer, self.student.end_of_turn_id
            for row in kept:
                target = tokenizer(str(row.pseudo_gt), add_special_tokens=False)["input_ids"] + [end]
                self._stored_rows(row.id, torch.tensor(target))
        return kept

    def _stored_rows(self, example_id: str, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``(indices, logprobs)`` for an example whose target tokens are ``labels`` ``[n]``: its
        first ``n`` rows, valid when ``labels[:n-1]`` equals the stored labels (row ``j`` depends on
        ``labels[:j]`` only)."""
        assert self.store is not None
        indices, logprobs, stored = self.store.get(example_id)
        n = int(labels.shape[0])
        if n > stored.shape[0] or not torch.equal(labels[: n - 1].to(torch.int64), stored[: n - 1].to(torch.int64)):
            raise UserError(
                f"{self.key('topk_store')}: example {example_id!r}: the student's target tokens ({n}) are not "
                f"those the store was written for ({int(stored.shape[0])}); the pseudo-GT changed since caad topk "
                "write: rewrite the store"
            )
        return indices[:n], logprobs[:n]

    # ---- one micro-batch --------------------------------------------------------------------------

    def build_batch(self, examples: Sequence[ManifestRow], info: BatchInfo, device: torch.device) -> TopKBatch:
        """CAAD's student batch and the examples' stored rows, concatenated in the packed-target order."""
        batch = build_batch(
            examples,
            self.student,
            None,
            negative_mode=None,
            noise_seed=0,
            max_samples=self.max_samples,
            device=device,
            student_dtype=self.dtype,
        )
        indices = logprobs = None
        if self.store is not None:
            labels = batch.student.labels.cpu()
            parts = [
                self._stored_rows(row.id, labels[b, 1:][labels[b, 1:] != -100]) for b, row in enumerate(examples)
            ]
            indices = torch.cat([p[0] for p in parts]).to(device=device, dtype=torch.int64)
            logprobs = torch.cat([p[1] for p in parts]).to(device)
        return TopKBatch(batch.student, indices, logprobs, batch.num_targets, batch.num_tokens)

    def num_items(self, batch: TopKBatch) -> int:
        """Target (pseudo-GT) tokens: the loss is a mean over them."""
        return batch.num_targets

    def num_tokens(self, batch: TopKBatch) -> int:
        return batch.num_tokens

    def loss_step(self, batch: TopKBatch, step: StepContext) -> LossOutput:
        """The student forward and the fused-linear loss against the stored teacher, its backward."""
        cfg = self.config
        out = step.student(batch.student)
        student: Any = step.model
        hidden, labels = out.hidden, out.labels.to(out.hidden.device)
        indices, logprobs = batch.indices, batch.logprobs
        if indices is None:  # kd_weight 0: a placeholder teacher (all mass on the label), weighted 0
            indices, logprobs = labels.unsqueeze(1), torch.zeros(labels.shape[0], 1, device=hidden.device)
        params = list(student.lm_head_parameters()) if hasattr(student, "lm_head_parameters") else [
            student.lm_head_weight, student.lm_head_bias]
        with step.gathered(*params):
            result = fused_linear_contrastive_kd_loss(
                hidden,
                student.lm_head_weight,
                None,
                None,
                None,
                labels,
                student_bias=student.lm_head_bias,
                temperature=cfg.temperature,
                beta=cfg.beta,
                kd_weight=cfg.kd_weight,
                ce_weight=cfg.ce_weight,
                temperature_scaling=cfg.temperature_scaling,
                num_items_in_batch=step.num_items,
                chunk_size=cfg.loss_chunk_size,
                accum_dtype=torch.float32 if hidden.dtype != torch.float32 else None,
                backend=cfg.loss_backend,
                student_logit_scale=student.logit_scale,
                student_softcap=student.final_softcap,
                teacher_topk_indices=indices,
                teacher_topk_logprobs=logprobs,
                return_components=step.with_components,
                check_finite=False,
            )
            loss = result.loss if step.with_components else result
            step.backward(loss)  # inside the gather: the lm_head gradient reaches its ZeRO-3 partition
        if not step.with_components:
            return LossOutput(loss)
        return LossOutput(loss, {"kd_loss": result.kd_loss, "ce_loss": result.ce_loss})
