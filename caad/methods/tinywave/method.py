"""TinyWave (arXiv 2506.23670): layer-aligned distillation of a unit LM, as a method on the shared trainer.

A teacher unit LM (speech units, text and modality markers over one tokenizer,
:mod:`caad.models.unit_lm`), trained first (this method with no teacher: next-token CE only), is
distilled into a smaller student on interleaved speech-text sequences (:mod:`caad.data.interleaved`).
Per micro-batch (:meth:`TinyWaveMethod.loss_step`), with ``N`` the positions that predict a real next
token in the global batch and a layer map of pairs ``(j, l)`` (student layer ``j`` <- teacher layer
``l``; uniform by default, :class:`caad.methods.layers.LayerMap`):

1. the teacher reads the sequences under ``no_grad``: final hidden states, block outputs of its
   mapped layers, post-RoPE queries and keys of their attention (:func:`~caad.methods.tinywave.loss.unit_lm_states`);
2. the student reads the same sequences through the engine; its mapped block outputs are projected
   to the teacher's width by learned projections where widths differ (the method's extra modules:
   trained and checkpointed with the student, never saved in it);
3. ``H = mean_pairs sum_rows d(P_jl h_s^j, h_t^l) / N`` (MSE or cosine per row);
   ``A = mean_pairs sum_rows mean_heads KL(attn_t^l || attn_s^j) / N`` over the causal attention
   rows of every real position, heads mapped or averaged when the counts differ, never forming
   ``[B, H, T, T]`` (:func:`caad_kernels.attention_kd_loss`);
   ``KD = sum_rows KL(softmax(z_t / tau) || softmax(z_s / tau)) tau^2 / N`` and ``CE`` from final
   hidden states and ``lm_head`` weights (:func:`caad_kernels.fused_linear_contrastive_kd_loss`, alpha 0);
4. ``loss = hidden_weight H + attention_weight A + logit_weight KD + ce_weight CE``. Components:
   ``hidden_loss``, ``attention_loss``, ``kd_loss``, ``ce_loss`` (unweighted) and per pair
   ``hidden_s{j}_t{l}_loss`` / ``attention_s{j}_t{l}_loss``; a term with weight 0 is not computed.

The student is loaded by :func:`~caad.methods.tinywave.student.load_unit_lm_module`
(:meth:`TinyWaveMethod.student_loader`), and saved as a unit-LM folder. Bad layer maps, head maps,
projections or a teacher over another vocabulary fail before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from caad.cli import UserError
from caad.data.interleaved import InterleavedExample, UnitVocab, collate, encode_segments, read_examples
from caad.methods import register_method
from caad.methods.layers import LayerMap, LayerProjections, decoder_layers, hidden_state_loss
from caad.methods.tinywave.config import TinyWaveConfig
from caad.methods.tinywave.loss import UnitLMStates, attention_term, logit_term, predicting_rows, unit_lm_states
from caad.methods.tinywave.student import UnitLMModule, load_unit_lm_module
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext

__all__ = ["PROJECTIONS_KEY", "TinyWaveMethod", "UnitBatch"]

#: The key of the projections in the trainer's extra modules.
PROJECTIONS_KEY = "layer_projections"


@dataclass
class UnitBatch:
    """``input_ids``, ``attention_mask``, ``labels`` int64 ``[B, T]`` (:func:`caad.data.interleaved.collate`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_items(self) -> int:
        return int(predicting_rows(self.labels).sum())


@register_method
class TinyWaveMethod(Method):
    """Hidden states, attention maps and softened logits of mapped layers (module docstring)."""

    name = "tinywave"
    section = "tinywave"
    config_class = TinyWaveConfig
    resume_keys = (
        "teacher",
        "layer_map",
        "projection",
        "hidden_loss",
        "hidden_weight",
        "attention_weight",
        "logit_weight",
        "ce_weight",
        "temperature",
        "attention_temperature",
        "max_length",
    )
    checkpoint_keys = ("teacher",)
    config: TinyWaveConfig

    def describe(self) -> str:
        cfg = self.config
        if not cfg.distills:
            return "unit LM (next-token CE, no teacher)"
        return (
            f"TinyWave KD (hidden {cfg.hidden_weight:g}, attention {cfg.attention_weight:g}, "
            f"logits {cfg.logit_weight:g}, CE {cfg.ce_weight:g})"
        )

    def student_loader(self) -> Callable[..., nn.Module]:
        """How the trainer loads the student checkpoint: a unit-LM folder as a :class:`UnitLMModule`."""
        return load_unit_lm_module

    # ---- inputs ---------------------------------------------------------------------------------------

    def load_examples(self, path: str, key: str) -> list[InterleavedExample]:
        try:
            examples = read_examples(path)
        except (FileNotFoundError, ValueError) as error:
            raise UserError(f"{key}: {error}") from None
        if not examples:
            raise UserError(f"{key}: {path} holds no interleaved example")
        return examples

    def fit_examples(self, examples: Sequence[Any], split: str, ctx: SetupContext) -> list[list[int]]:
        """The examples as token ids (the student's tokenizer), cut at ``max_length``."""
        key = self.key("train_manifest" if split == "train" else "validation_manifest")
        out = []
        for example in examples:
            try:
                ids = encode_segments(self.student.tokenizer, self.vocab, example.segments)
            except ValueError as error:
                raise UserError(f"{key}: example {example.id!r}: {error}") from None
            out.append(ids[: self.config.max_length])
        return out

    # ---- models ---------------------------------------------------------------------------------------

    def build_teachers(self, ctx: SetupContext) -> None:
        """The frozen teacher (when a term distils), its vocabulary check and the layer map."""
        cfg = self.config
        if not isinstance(ctx.student, UnitLMModule):
            raise UserError(
                f"{self.key('student')}: the student must be a unit LM loaded by TinyWaveMethod.student_loader, "
                f"got {type(ctx.student).__name__}"
            )
        self.student: UnitLMModule = ctx.student
        self.vocab = UnitVocab.from_tokenizer(self.student.tokenizer)
        self.teacher: UnitLMModule | None = None
        self.layer_map: LayerMap | None = None
        if not cfg.distills:
            return
        self.teacher = ctx.load_frozen(cfg.teacher, loader=load_unit_lm_module)
        if self.teacher.tokenizer.get_vocab() != self.student.tokenizer.get_vocab():
            raise UserError(
                f"{self.key('teacher')}: {cfg.teacher} has another vocabulary than the student "
                f"({len(self.teacher.tokenizer)} vs {len(self.student.tokenizer)} tokens); TinyWave needs one tokenizer"
            )
        s_config, t_config = self.student.model.config, self.teacher.model.config
        try:
            self.layer_map = LayerMap.from_config(
                cfg.layer_map,
                len(decoder_layers(self.student.model)),
                len(decoder_layers(self.teacher.model)),
                self.key("layer_map"),
            )
            if cfg.attention_weight > 0 and cfg.teacher_heads is not None:
                heads = cfg.teacher_heads
                key = "attention_head_map" if cfg.attention_head_map else "attention_head_groups"
                if len(heads) != s_config.num_attention_heads:
                    raise ValueError(
                        f"{self.key(key)} has {len(heads)} entries, the student has "
                        f"{s_config.num_attention_heads} attention heads"
                    )
                flat = [h for entry in heads for h in (entry if isinstance(entry, list) else [entry])]
                if max(flat) >= t_config.num_attention_heads:
                    raise ValueError(
                        f"{self.key(key)} names teacher head {max(flat)}, the teacher has heads "
                        f"0..{t_config.num_attention_heads - 1}"
                    )
            elif cfg.attention_weight > 0 and t_config.num_attention_heads % s_config.num_attention_heads:
                raise ValueError(
                    f"{self.key('attention_head_map')} is required: the teacher's {t_config.num_attention_heads} heads "
                    f"are not a multiple of the student's {s_config.num_attention_heads} (map or average them)"
                )
        except ValueError as error:
            raise UserError(str(error)) from None

    def extra_modules(self, ctx: SetupContext) -> dict[str, nn.Module]:
        """The learned projections (student width -> teacher width) when the hidden-state term is on."""
        if self.teacher is None or self.config.hidden_weight == 0:
            return {}
        assert self.layer_map is not None
        try:
            projections = LayerProjections(
                self.layer_map,
                int(self.student.model.config.hidden_size),
                int(self.teacher.model.config.hidden_size),
                self.config.projection,
                seed=self.config.seed,
                key=self.key("projection"),
            )
        except ValueError as error:
            raise UserError(str(error)) from None
        return {PROJECTIONS_KEY: projections.to(device=ctx.device, dtype=ctx.dtype)}

    # ---- one micro-batch ------------------------------------------------------------------------------

    def build_batch(self, examples: Sequence[Sequence[int]], info: BatchInfo, device: torch.device) -> UnitBatch:
        batch = collate(examples, self.vocab)
        return UnitBatch(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))

    def num_items(self, batch: UnitBatch) -> int:
        return batch.num_items

    def teacher_states(self, batch: UnitBatch) -> UnitLMStates | None:
        """The teacher's rows, mapped block outputs and attention inputs, under ``no_grad``."""
        if self.teacher is None:
            return None
        assert self.layer_map is not None
        cfg = self.config
        with torch.no_grad():
            return unit_lm_states(
                self.teacher.model,
                batch.input_ids,
                batch.attention_mask,
                batch.labels,
                self.layer_map.teacher_layers if cfg.hidden_weight > 0 else (),
                self.layer_map.teacher_layers if cfg.attention_weight > 0 else (),
            )

    def loss_step(self, batch: UnitBatch, step: StepContext) -> LossOutput:
        cfg = self.config
        teacher = self.teacher_states(batch)
        pairs = self.layer_map.pairs if self.layer_map is not None else ()
        student_layers = [s for s, _ in pairs]
        use_hidden = teacher is not None and cfg.hidden_weight > 0
        use_attention = teacher is not None and cfg.attention_weight > 0

        def forward(student: UnitLMModule, extra: Any, inputs: UnitBatch) -> tuple[UnitLMStates, list[torch.Tensor]]:
            states = unit_lm_states(
                student.model,
                inputs.input_ids,
                inputs.attention_mask,
                inputs.labels,
                student_layers if use_hidden else (),
                student_layers if use_attention else (),
            )
            projected = [extra[PROJECTIONS_KEY](s, t, states.hidden[s]) for s, t in pairs] if use_hidden else []
            return states, projected

        states, projected = step.run(forward, batch)
        n = step.num_items
        hidden_terms: dict[tuple[int, int], torch.Tensor] = {}
        attention_terms: dict[tuple[int, int], torch.Tensor] = {}
        if use_hidden:
            assert teacher is not None
            for (s, t), rows in zip(pairs, projected):
                hidden_terms[(s, t)] = hidden_state_loss(rows, teacher.hidden[t], cfg.hidden_loss) / n
        if use_attention:
            assert teacher is not None
            for s, t in pairs:
                attention_terms[(s, t)] = (
                    attention_term(
                        states.attention[s],
                        teacher.attention[t],
                        batch.attention_mask,
                        teacher_heads=cfg.teacher_heads,
                        temperature=cfg.attention_temperature,
                        beta=cfg.beta,
                        temperature_scaling=cfg.temperature_scaling,
                        backend=cfg.loss_backend,
                        chunk_size=cfg.loss_chunk_size,
                    )
                    / n
                )
        zero = states.final.new_zeros((), dtype=torch.float32)
        hidden = torch.stack(list(hidden_terms.values())).mean() if hidden_terms else zero
        attention = torch.stack(list(attention_terms.values())).mean() if attention_terms else zero
        labels = batch.labels[:, 1:][predicting_rows(batch.labels)]
        student: Any = step.model
        heads = [student.lm_head_weight, student.lm_head_bias]
        if teacher is not None:
            heads += [self.teacher.lm_head_weight, self.teacher.lm_head_bias]
        with step.gathered(*heads):
            out = logit_term(
                states.final,
                student.lm_head_weight,
                None if teacher is None else teacher.final,
                None if teacher is None else self.teacher.lm_head_weight,
                labels,
                n,
                logit_weight=cfg.logit_weight if teacher is not None else 0.0,
                ce_weight=cfg.ce_weight,
                temperature=cfg.temperature,
                beta=cfg.beta,
                temperature_scaling=cfg.temperature_scaling,
                student_bias=student.lm_head_bias,
                teacher_bias=None if teacher is None else self.teacher.lm_head_bias,
                backend=cfg.loss_backend,
                chunk_size=cfg.loss_chunk_size,
            )
            loss = out.loss + cfg.hidden_weight * hidden + cfg.attention_weight * attention
            step.backward(loss)
        if not step.with_components:
            return LossOutput(loss)
        components: dict[str, Any] = {"ce_loss": out.ce_loss.detach()}
        if teacher is not None and cfg.logit_weight > 0:
            components["kd_loss"] = out.kd_loss.detach()
        if use_hidden:
            components["hidden_loss"] = hidden.detach()
            components.update({f"hidden_s{s}_t{t}_loss": v.detach() for (s, t), v in hidden_terms.items()})
        if use_attention:
            components["attention_loss"] = attention.detach()
            components.update({f"attention_s{s}_t{t}_loss": v.detach() for (s, t), v in attention_terms.items()})
        return LossOutput(loss, components)
