"""Per-token weights of the two teachers of source-wise distillation.

Each answer row ``i`` gets ``(w_text_i, w_acoustic_i)``; the KD term is
``w_text_i * D(p_text_i || q_i) + w_acoustic_i * D(p_acoustic_i || q_i)``. Three rules:

- ``fixed``: the configured ``(text_weight, acoustic_weight)`` on every row;
- ``category``: the row's example category (``category``, else its ``task``): ``(lead, 1 - lead)`` in a
  category the textual teacher leads, ``(1 - lead, lead)`` in one the acoustic teacher leads, the fixed
  weights elsewhere;
- ``confidence``: each teacher's probability of the reference token at temperature 1,
  ``c = softmax(z)[y]``; ``w_text = c_text / (c_text + c_acoustic)``, ``w_acoustic = 1 - w_text`` (half
  each when both are below 1e-12): the teacher that knows the answer leads. Computed in row chunks
  under ``no_grad`` (at most ``chunk_rows x V`` logits at once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from caad.methods.crossmodal.teacher import Head

__all__ = ["category_weights", "confidence_weights", "label_probability", "rows_per_example"]

_EPS = 1e-12


def rows_per_example(labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` answer rows of each example of a ``[B, T]`` label batch (``labels[:, 1:] != -100``)."""
    return (labels[:, 1:] != -100).sum(dim=1)


def category_weights(
    categories: Sequence[str],
    rows: torch.Tensor,
    *,
    text_categories: Sequence[str],
    acoustic_categories: Sequence[str],
    lead: float,
    default: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N], [N])`` float32 weights of the textual and acoustic teacher per answer row; ``rows[b]``
    answer rows belong to example ``b`` of category ``categories[b]``."""
    if len(categories) != rows.numel():
        raise ValueError(f"{len(categories)} categories for {rows.numel()} examples")
    per_example = []
    for category in categories:
        if category in text_categories:
            per_example.append((lead, 1.0 - lead))
        elif category in acoustic_categories:
            per_example.append((1.0 - lead, lead))
        else:
            per_example.append(default)
    weights = torch.tensor(per_example, dtype=torch.float32, device=rows.device).reshape(-1, 2)
    expanded = weights.repeat_interleave(rows.to(torch.long), dim=0)
    return expanded[:, 0], expanded[:, 1]


@torch.no_grad()
def label_probability(hidden: torch.Tensor, head: Head, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """``[N]`` float32 ``softmax(logits)[label]`` of ``[N, H]`` hidden states, ``chunk_rows`` rows at a time
    (only the first ``V_student`` columns would matter to the student; the teacher's own distribution
    over its whole vocabulary is used here)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = head.logits(hidden[start : start + chunk_rows])
        picked = logits.gather(1, labels[start : start + chunk_rows, None].to(logits.device)).squeeze(1)
        out[start : start + chunk_rows] = (picked - torch.logsumexp(logits, dim=1)).exp()
    return out


def confidence_weights(
    text_confidence: torch.Tensor, acoustic_confidence: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_text, w_acoustic)`` from the teachers' ``[N]`` confidences (module docstring)."""
    total = text_confidence + acoustic_confidence
    text = torch.where(total > _EPS, text_confidence / total.clamp_min(_EPS), torch.full_like(total, 0.5))
    return text, 1.0 - text
