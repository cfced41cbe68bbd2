"""Offline CAAD: the contrastive teacher's top-k log-probabilities written once, the student trained
from them without the teacher in memory.

- :func:`write_topk_store` (``caad topk write``): CAAD's teacher, both paths, over the Stage 1
  manifests; the store's format and conventions in :mod:`~caad.methods.caad_topk.store`.
- :class:`CAADTopKMethod` (``caad train --method caad_topk``): CAAD's student batch and the fused-linear
  loss with the stored sparse teacher. Config: the ``caad_topk`` section (:class:`TopKConfig`).
"""

from __future__ import annotations

from caad.methods.caad_topk.config import TopKConfig
from caad.methods.caad_topk.store import TopKStore, tokenizer_hash
from caad.methods.caad_topk.writer import write_topk_store

__all__ = ["CAADTopKMethod", "TopKConfig", "TopKStore", "tokenizer_hash", "write_topk_store"]


def __getattr__(name: str):  # the method imports the trainer: only on demand
    if name == "CAADTopKMethod":
        from caad.methods.caad_topk.method import CAADTopKMethod

        return CAADTopKMethod
    raise AttributeError(name)
