"""Layer-wise distillation as a method on the shared trainer.

arXiv 2509.18579 (layer-wise dimension): teacher signals are aligned with chosen student layers, not
only the output. TinyWave (arXiv 2506.23670) does the same with hidden states of mapped layers through
a learned projection where widths differ. Per micro-batch (:meth:`LayerWiseMethod.loss_step`):

1. the teacher (a text LM on the text query, or a speech LM on the spoken query: ``teacher_kind``) runs
   under ``no_grad``; the outputs of its mapped layers are recorded (:func:`caad.methods.layers.capture_layers`);
2. the student (on the spoken query, or the text: ``student_input``) runs through the engine, its mapped
   layers recorded and projected by the learned projections (the method's ``extra_modules``: trained and
   checkpointed with the student, never saved in it);
3. on the answer rows only (they line up across the two sequences whatever the prompts), per mapped pair
   ``(j, l)``: ``hidden_j = sum_rows d(P_jl h_s^j, h_t^l)`` with ``d`` the MSE or cosine distance;
4. ``loss = hidden_weight * sum_pairs w_jl hidden_jl + kd_weight * KD + ce_weight * CE``, summed over
   answer rows and divided by the answer rows of the global batch. Components: ``hidden_loss``, each
   pair's ``hidden_s{j}_t{l}_loss``, ``kd_loss``, ``ce_loss``.

The layer map defaults to uniform (every student layer ``j`` onto teacher layer ``round(j L_t / L_s)``);
an unknown layer, or widths that differ under ``projection: none``, fail before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from caad.cli import UserError
from caad.data.manifest import ManifestRow
from caad.methods import register_method
from caad.methods.crossmodal.batch import PairedBatch, build_paired_batch, speech_teacher_batch
from caad.methods.crossmodal.loss import answer_kd_loss
from caad.methods.crossmodal.method import load_paired_examples
from caad.methods.crossmodal.teacher import head_of, head_parameters, load_text_teacher, shared_vocabulary
from caad.methods.layers import (
    LayerMap,
    LayerProjections,
    answer_rows,
    capture_layers,
    decoder_layers,
    hidden_state_loss,
)
from caad.methods.layerwise.config import LayerWiseConfig
from caad.models import SpeechBatch, SpeechLM, TargetHiddenStates, load_speech_lm
from caad.models.text_lm import text_target_hidden_states
from caad.train.method import BatchInfo, LossOutput, Method, SetupContext, StepContext

__all__ = ["LayerWiseBatch", "LayerWiseMethod"]

#: The key of the projections in the trainer's extra modules.
PROJECTIONS_KEY = "layer_projections"


@dataclass
class LayerWiseBatch:
    """``paired``: the student's sequence (and the text teacher's); ``teacher_speech``: a speech teacher's."""

    paired: PairedBatch
    teacher_speech: SpeechBatch | None


def _width(model: nn.Module) -> int:
    if isinstance(model, SpeechLM):
        return int(model.text_config.hidden_size)
    return int(model.config.get_text_config().hidden_size)


@register_method
class LayerWiseMethod(Method):
    """Hidden states of mapped layers (learned projections) + output KD + CE, on the answer rows."""

    name = "layerwise"
    section = "layerwise"
    config_class = LayerWiseConfig
    resume_keys = ("teacher", "teacher_kind", "layer_map", "hidden_loss", "projection", "hidden_weight", "kd_weight")
    checkpoint_keys = ("teacher",)
    config: LayerWiseConfig

    def describe(self) -> str:
        return f"layer-wise KD ({self.config.hidden_loss}, {self.config.teacher_kind} teacher)"

    def load_examples(self, path: str, key: str) -> list[ManifestRow]:
        return load_paired_examples(path, key)

    def build_teachers(self, ctx: SetupContext) -> None:
        """The frozen teacher, its shared vocabulary and the layer map (checked against both depths)."""
        cfg = self.config
        self.student: SpeechLM = ctx.student
        self.dtype = ctx.dtype
        loader = load_text_teacher if cfg.teacher_kind == "text" else load_speech_lm
        self.teacher: Any = ctx.load_frozen(cfg.teacher, loader=loader)
        if cfg.teacher_kind == "speech" and not isinstance(self.teacher, SpeechLM):
            raise UserError(f"{self.key('teacher')}: teacher_kind is 'speech' but {cfg.teacher} is not a speech LM")
        try:
            tokenizer = shared_vocabulary(self.teacher, cfg.teacher, self.student, self.key("teacher"))
            self.layer_map = LayerMap.from_config(
                cfg.layer_map,
                len(decoder_layers(self.student)),
                len(decoder_layers(self.teacher)),
                self.key("layer_map"),
            )
        except ValueError as error:
            raise UserError(str(error)) from None
        self.teacher_tokenizer = tokenizer if cfg.teacher_kind == "text" else None
        weights = cfg.layer_weights or [1.0 / len(self.layer_map.pairs)] * len(self.layer_map.pairs)
        if len(weights) != len(self.layer_map.pairs):
            raise UserError(
                f"{self.key('layer_weights')} has {len(weights)} entries but the layer map {len(self.layer_map.pairs)}"
            )
        self.layer_weights = dict(zip(self.layer_map.pairs, weights))

    def extra_modules(self, ctx: SetupContext) -> dict[str, nn.Module]:
        """The learned projections (student width -> teacher width), trained with the student."""
        try:
            projections = LayerProjections(
                self.layer_map,
                _width(self.student),
                _width(self.teacher),
                self.config.projection,
                seed=self.config.seed,
                key=self.key("projection"),
            )
        except ValueError as error:
            raise UserError(str(error)) from None
        return {PROJECTIONS_KEY: projections.to(device=ctx.device, dtype=ctx.dtype)}

    def build_batch(self, examples: Sequence[ManifestRow], info: BatchInfo, device: torch.device) -> LayerWiseBatch:
        paired = build_paired_batch(
            examples, self.student, self.teacher_tokenizer, [self.config.student_input], device=device, dtype=self.dtype
        )
        speech = None
        if self.config.teacher_kind == "speech":
            speech = speech_teacher_batch(self.teacher, paired, device=device, dtype=self.dtype)
        return LayerWiseBatch(paired, speech)

    def num_items(self, batch: LayerWiseBatch) -> int:
        return batch.paired.num_items

    def num_tokens(self, batch: LayerWiseBatch) -> int:
        return batch.paired.num_tokens

    def teacher_layers(self, batch: LayerWiseBatch) -> tuple[TargetHiddenStates, dict[int, torch.Tensor]]:
        """The teacher's final answer rows and the answer rows of its mapped layers, under ``no_grad``."""
        layers = self.layer_map.teacher_layers
        with torch.no_grad(), capture_layers(self.teacher, layers) as captured:
            if batch.teacher_speech is not None:
                out = self.teacher.target_hidden_states(batch.teacher_speech)
                labels = batch.teacher_speech.labels
            else:
                out = text_target_hidden_states(self.teacher, batch.paired.teacher)
                labels = batch.paired.teacher.labels
            rows = {layer: answer_rows(captured[layer], labels) for layer in layers}
        return out, rows

    def loss_step(self, batch: LayerWiseBatch, step: StepContext) -> LossOutput:
        cfg, pairs = self.config, self.layer_map.pairs
        teacher_out, teacher_rows = self.teacher_layers(batch)
        student_batch = batch.paired.student[cfg.student_input]

        def forward(student: SpeechLM, extra: Any, inputs: SpeechBatch) -> tuple[TargetHiddenStates, list[Any]]:
            with capture_layers(student, self.layer_map.student_layers) as captured:
                out = student.target_hidden_states(inputs)
            project = extra[PROJECTIONS_KEY]
            projected = [project(s, t, answer_rows(captured[s], inputs.labels)) for s, t in pairs]
            return out, projected

        student_out, projected = step.run(forward, student_batch)
        hidden_terms = {
            (s, t): hidden_state_loss(rows, teacher_rows[t], cfg.hidden_loss) / step.num_items
            for (s, t), rows in zip(pairs, projected)
        }
        hidden = sum(self.layer_weights[pair] * term for pair, term in hidden_terms.items())
        student: Any = step.model
        with step.gathered(*head_parameters(student), *head_parameters(self.teacher)):
            out = answer_kd_loss(
                student_out.hidden,
                head_of(student),
                teacher_out.hidden,
                head_of(self.teacher),
                student_out.labels,
                cfg,
                step.num_items,
            )
            loss = out.loss + cfg.hidden_weight * hidden
            step.backward(loss)
        if not step.with_components:
            return LossOutput(loss)
        components: dict[str, Any] = {
            "hidden_loss": hidden.detach(),
            "kd_loss": out.kd_loss.detach(),
            "ce_loss": out.ce_loss.detach(),
        }
        components.update({f"hidden_s{s}_t{t}_loss": term.detach() for (s, t), term in hidden_terms.items()})
        return LossOutput(loss, components)
