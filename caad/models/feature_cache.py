"""A bounded cache of log-mel features by clip content, shared by every model while it is active.

Log-mel features depend only on the clip's samples and the feature extractor's settings, never on a
model's weights, so a clip featurised once can be reused by any model with the same extractor: the
teacher after the student in one training step, the next epoch, every evaluation arm. Inside
``with feature_cache():`` :meth:`caad.models.SpeechLM.extract_features` looks clips up here (key: the
extractor's settings and a BLAKE2b digest of the clip's float32 samples) and stores what it computes;
outside, nothing is cached. Entries are exact copies of what the extractor returned (the constant
padding after a clip's real frames is stored as one number), evicted least recently used beyond
``max_bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["FeatureCache", "active_feature_cache", "clip_digest", "feature_cache"]

#: Default budget of :func:`feature_cache`: about 1,600 clips of the tiny models' 10 s window.
DEFAULT_MAX_BYTES = 512 * 2**20

# one entry: (features [n_mels, kept frames] float32, fill of the frames after them or None, mask [frames])
_Entry = tuple[torch.Tensor, float | None, torch.Tensor]


def clip_digest(clip: np.ndarray) -> bytes:
    """A 16-byte BLAKE2b digest of a clip's float32 samples (with their count)."""
    samples = np.ascontiguousarray(clip, dtype=np.float32)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(samples.size.to_bytes(8, "little"))
    digest.update(samples.tobytes())
    return digest.digest()


class FeatureCache:
    """Features ``[n_mels, frames]`` float32 and mask ``[frames]`` int64 by key, least recently used out."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(entry: _Entry) -> int:
        return entry[0].numel() * entry[0].element_size() + entry[2].numel() * entry[2].element_size()

    def get(self, key: tuple[str, bytes]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(features, mask)`` (new tensors) stored under ``key``, or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        kept, fill, mask = entry
        if fill is None:
            return kept.clone(), mask.clone()
        features = torch.full((kept.shape[0], mask.shape[0]), fill, dtype=kept.dtype)
        features[:, : kept.shape[1]] = kept
        return features, mask.clone()

    def put(self, key: tuple[str, bytes], features: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one clip's ``features`` ``[n_mels, frames]`` and ``mask`` ``[frames]`` (copied)."""
        cut = min(int(features.shape[1]), int(mask.sum()) + 2)
        tail = features[:, cut:]
        fill = None
        if tail.numel() and bool((tail == tail[0, 0]).all()):
            fill = float(tail[0, 0])
            features = features[:, :cut]
        entry = (features.detach().clone(), fill, mask.detach().clone())
        size = self._size(entry)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes -= self._size(self._entries.pop(key))
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= self._size(old)


_ACTIVE: FeatureCache | None = None


def active_feature_cache() -> FeatureCache | None:
    """The cache of the innermost :func:`feature_cache` block, or ``None`` outside one."""
    return _ACTIVE


@contextlib.contextmanager
def feature_cache(max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[FeatureCache]:
    """Cache log-mel features by clip content inside the block (module docstring); inside an active
    block, the active cache is reused (``max_bytes`` ignored). The cache is dropped at the end."""
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    _ACTIVE = FeatureCache(max_bytes)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = None
