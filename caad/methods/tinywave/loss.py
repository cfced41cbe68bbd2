"""TinyWave's terms on one micro-batch: what a unit LM's forward exposes, and the three divergences.

Positions: a batch of :func:`caad.data.interleaved.collate` (right-padded ``input_ids``,
``attention_mask``, unshifted ``labels`` with ``-100`` on padding). The *rows* are the positions that
predict a real next token (``labels[:, 1:] != -100``), packed row-major (:func:`caad.methods.layers.answer_rows`);
``N`` is their number in the global batch.

- :func:`unit_lm_states` runs a Hugging Face causal LM's decoder once and returns the final hidden
  states on the rows (the ``lm_head`` input), the block outputs of chosen layers on the rows, and the
  post-RoPE queries and keys of chosen layers (:func:`caad_kernels.attention_capture.capture_attention`).
- :func:`attention_term`: per student head and valid query position, the divergence of its causal
  attention distribution from the teacher's (mapped or averaged heads), never forming ``[B, H, T, T]``
  (:func:`caad_kernels.attention_kd_loss`); summed over positions, averaged over the student's heads.
- :func:`logit_term`: ``logit_weight * KD(softmax(z_t / tau) || softmax(z_s / tau)) [* tau^2] +
  ce_weight * CE`` summed over the rows and divided by ``N``, from final hidden states and ``lm_head``
  weights (:func:`caad_kernels.fused_linear_contrastive_kd_loss` with ``alpha = 0``): no
  ``[rows x vocab]`` logits.
- The hidden-state term is :func:`caad.methods.layers.hidden_state_loss` on projected student rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from caad.methods.layers import answer_rows, capture_layers
from caad_kernels import attention_kd_loss, fused_linear_contrastive_kd_loss
from caad_kernels.attention_capture import CapturedAttention, capture_attention
from caad_kernels.contrastive_kd import KDLossOutput

__all__ = ["UnitLMStates", "attention_term", "logit_term", "predicting_rows", "unit_lm_states"]


@dataclass
class UnitLMStates:
    """One forward of a unit LM: ``final`` ``[N, H]`` (rows of the final hidden states), ``hidden``
    ``{layer: [N, H]}`` (rows of block outputs, 1-based layers), ``attention`` ``{layer:
    CapturedAttention}`` (1-based layers; queries ``[B, H, T, d]``, keys ``[B, H_kv, T, d]``)."""

    final: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, CapturedAttention] = field(default_factory=dict)


def predicting_rows(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` bool: positions whose next token is a real label (the loss rows)."""
    return labels[:, 1:] != -100


def unit_lm_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    hidden_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
) -> UnitLMStates:
    """Run ``model``'s decoder (a Hugging Face causal LM, no KV cache) and collect :class:`UnitLMStates`.

    Layers are 1-based (layer ``l`` is block ``l``, attention ``layer_idx l - 1``). Gradients flow
    through everything returned when grad mode is on.
    """
    decoder = model.get_decoder()
    attention_indices = [layer - 1 for layer in attention_layers]
    with capture_layers(model, list(hidden_layers)) as blocks:
        if attention_indices:
            with capture_attention(model, attention_indices) as captured:
                out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            attention = {index + 1: captured[index] for index in attention_indices}
        else:
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            attention = {}
    for layer, capture in attention.items():
        if capture.sliding_window is not None:
            raise ValueError(
                f"layer {layer} uses sliding-window attention ({capture.sliding_window}); the attention-map "
                "term covers full causal attention only: map another layer or set attention_weight 0"
            )
    return UnitLMStates(
        final=answer_rows(out.last_hidden_state, labels),
        hidden={layer: answer_rows(blocks[layer], labels) for layer in hidden_layers},
        attention=attention,
    )


def attention_term(
    student: CapturedAttention,
    teacher: CapturedAttention,
    attention_mask: torch.Tensor,
    *,
    teacher_heads: Sequence[int] | Sequence[Sequence[int]] | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    temperature_scaling: bool = True,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over valid query positions of the mean over student heads of ``D(p_t || q_s)`` (causal).

    Float32 scalar; the caller divides by its item count. Heads: ``teacher_heads`` as in
    :func:`caad_kernels.attention_kd_loss` (``None``: identity, or averaged consecutive groups).
    """
    total = attention_kd_loss(
        student.query,
        student.key,
        teacher.query,
        teacher.key,
        attention_mask,
        teacher_heads=teacher_heads,
        causal=True,
        student_scale=student.scaling,
        teacher_scale=teacher.scaling,
        student_softcap=student.softcap,
        teacher_softcap=teacher.softcap,
        temperature=temperature,
        beta=beta,
        temperature_scaling=temperature_scaling,
        reduction="sum",
        chunk_size=chunk_size,
        backend=backend,
    )
    return total / student.query.shape[1]


def logit_term(
    student_final: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_final: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    num_items: int,
    *,
    logit_weight: float,
    ce_weight: float,
    temperature: float = 2.0,
    beta: float = 0.0,
    temperature_scaling: bool = True,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> KDLossOutput:
    """Softened-logit KD and CE on ``[N, H_s]`` / ``[N, H_t]`` rows with ``[N]`` next-token ``labels``.

    ``loss = logit_weight * kd_loss + ce_weight * ce_loss``, each a sum over the rows divided by
    ``num_items``. ``teacher_final`` ``None`` (no teacher): CE only, the KD weight forced to 0.
    """
    if teacher_final is None or teacher_weight is None or logit_weight == 0:
        logit_weight = 0.0
        teacher_final = student_final.detach()
        teacher_weight = student_weight.detach()
        teacher_bias = None if student_bias is None else student_bias.detach()
    return fused_linear_contrastive_kd_loss(
        student_final,
        student_weight,
        teacher_final,
        teacher_weight,
        None,
        labels.to(student_final.device),
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        alpha=0.0,
        temperature=temperature,
        beta=beta,
        kd_weight=logit_weight,
        ce_weight=ce_weight,
        temperature_scaling=temperature_scaling,
        reduction="mean",
        num_items_in_batch=num_items,
        chunk_size=chunk_size,
        accum_dtype=torch.float32 if student_final.dtype != torch.float32 else None,
        backend=backend,
        return_components=True,
    )
