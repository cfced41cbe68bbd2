"""The pool's embeddings: the text teacher's own mean-pooled final hidden states of each text query.

Each query is tokenised as the teacher's text prompt (:func:`caad.models.text_lm.text_prompt`), run through
the teacher's decoder (after its final norm), averaged over the real tokens and scaled to unit length, so
k-means on them clusters by direction (cosine similarity). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from caad.models.text_lm import build_text_batch

__all__ = ["embed_texts"]


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """``[N, H]`` float32 unit-length embeddings of ``texts`` (CPU), in order."""
    if not texts:
        raise ValueError("texts is empty: nothing to embed")
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = build_text_batch(tokenizer, list(texts[start : start + batch_size])).to(device)
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state.float()
        mask = batch.attention_mask[..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)
