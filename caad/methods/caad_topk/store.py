"""The on-disk format of a stored top-k teacher, its reader and its atomic writer.

A store is a folder::

    index.json          format, the teacher's settings, tokenizer hash, k, vocab_size, dtype, example -> shard
    shard-00000.pt      torch.save({example_id: {"indices": int32 [n, k],
    shard-00001.pt ...                           "logprobs": float16/float32 [n, k],
                                                 "labels": int32 [n]}})

Row ``j`` of an example is the teacher's distribution for target token ``j`` (the ``j``-th label of its
``prompt + pseudo-GT + end-of-turn`` sequence), after the prefix ``labels[:j]``. Convention of the
log-probabilities (that of the loss op, :mod:`caad_kernels.topk`): ``log_softmax(z_hat / temperature)``
of the contrastive teacher ``z_hat = (1 + alpha) z_pos - alpha z_neg`` (plausibility cutoff and the
teacher's logit scale/softcap applied, columns past ``vocab_size`` dropped), at the ``temperature``
recorded in the index, sorted by decreasing log-probability; ``-inf`` slots are empty. They are NOT
temperature-independent: the mass outside the top k at another temperature cannot be recovered from k
values, so training must use the store's temperature (checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "INDEX", "StoreError", "TopKStore", "StoreWriter", "tokenizer_hash"]

FORMAT = "caad-topk/1"
INDEX = "index.json"


class StoreError(ValueError):
    """A store that is missing, malformed, or does not match what asks for it."""


def tokenizer_hash(tokenizer: Any, end_of_turn_id: int | None = None) -> str:
    """A hex digest of what decides the target token ids: the vocabulary (added tokens included), the
    special tokens and the end-of-turn id the targets end with."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "end_of_turn_id": end_of_turn_id,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


class TopKStore:
    """A written store, read-only: :attr:`meta` (the index) and :meth:`get` per example.

    Shards are memory-mapped on first use (``torch.load(mmap=True)``), so random access costs no more
    memory than the rows read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise StoreError(f"{self.path} is not a top-k store (no {INDEX}; write one with caad topk write)")
        try:
            self.meta: dict[str, Any] = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StoreError(f"{index}: not a readable index ({error})") from None
        if self.meta.get("format") != FORMAT:
            raise StoreError(f"{index}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.examples: dict[str, list[Any]] = self.meta["examples"]  # id -> [shard file, rows]
        self._shards: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.examples

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, example_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indices int32 [n, k], logprobs [n, k], labels int32 [n])`` of one example."""
        if example_id not in self.examples:
            raise StoreError(f"{self.path}: example {example_id!r} is not in the store")
        shard = self.examples[example_id][0]
        if shard not in self._shards:
            self._shards[shard] = torch.load(self.path / shard, map_location="cpu", mmap=True, weights_only=True)
        entry = self._shards[shard][example_id]
        return entry["indices"], entry["logprobs"], entry["labels"]


class StoreWriter:
    """Writes a store into a temporary sibling folder and moves it into place only when complete.

    ``overwrite``: replace an existing store (only a folder holding a store index, or an empty one);
    without it an existing ``path`` is refused. :meth:`check` runs before any work; :meth:`add` buffers
    examples and flushes a shard every ``shard_examples``; :meth:`finish` writes the index and renames;
    :meth:`abort` removes the temporary folder.
    """

    def __init__(self, path: str | os.PathLike[str], *, shard_examples: int, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.shard_examples = shard_examples
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self.examples: dict[str, list[Any]] = {}
        self._buffer: dict[str, dict[str, torch.Tensor]] = {}
        self._shard = 0

    def check(self, key: str) -> None:
        """Refuse an existing ``path`` unless ``overwrite`` (and never a folder that is not a store)."""
        if not self.path.exists():
            return
        if not self.overwrite:
            raise StoreError(f"{key}: {self.path} already exists; pass --overwrite to replace it")
        if not self.path.is_dir() or (any(self.path.iterdir()) and not (self.path / INDEX).is_file()):
            raise StoreError(f"{key}: {self.path} exists and is not a top-k store; refusing to replace it")

    def start(self) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def add(self, example_id: str, indices: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor) -> None:
        """One example's rows (``indices`` and ``labels`` stored as int32, ``logprobs`` as given)."""
        if example_id in self.examples or example_id in self._buffer:
            raise StoreError(f"example id {example_id!r} appears twice")
        self._buffer[example_id] = {
            "indices": indices.to(torch.int32).contiguous().cpu(),
            "logprobs": logprobs.contiguous().cpu(),
            "labels": labels.to(torch.int32).contiguous().cpu(),
        }
        if len(self._buffer) >= self.shard_examples:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"shard-{self._shard:05d}.pt"
        torch.save(self._buffer, self.tmp / name)
        for example_id, entry in self._buffer.items():
            self.examples[example_id] = [name, int(entry["labels"].shape[0])]
        self._buffer = {}
        self._shard += 1

    def finish(self, meta: dict[str, Any]) -> Path:
        """Write the last shard and the index, then move the store into place (replacing the old one)."""
        self._flush()
        index = {"format": FORMAT, **meta, "num_examples": len(self.examples), "examples": self.examples}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
