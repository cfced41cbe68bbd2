"""What a resumable checkpoint holds besides DeepSpeed's state, and what a resume must keep.

A checkpoint ``<output_dir>/checkpoints/step_NNNNNNN/`` holds the DeepSpeed engine (student, extra
modules, optimizer, LR schedule), ``rng_state_rank{r}.pt`` per rank, the trainer's step and the
method's state (client state), and the student in ``save_pretrained`` form (``student/``).

``run_info.json`` in the output folder records the world size and a fingerprint of every checkpoint
folder the method reads (its teachers). On ``--resume`` (:func:`resume_conflicts`):

- the data order must be the same: ``train_manifest``, ``batch_size``, ``grad_accum``, ``seed``,
  ``epochs``, ``max_steps`` and the world size (:data:`DATA_ORDER_KEYS`) - refused, always;
- the settings that define what is learned must be the same: ``lr`` and the method's
  ``resume_keys`` (CAAD: ``teacher``, ``alpha``), and the teachers' content - refused unless
  ``--force-resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATA_ORDER_KEYS",
    "SETTING_KEYS",
    "checkpoint_fingerprint",
    "resume_conflicts",
    "rng_state",
    "set_rng_state",
    "tag",
]

#: Fields that fix which examples each step sees: a resumed run must keep them.
DATA_ORDER_KEYS = ("train_manifest", "batch_size", "grad_accum", "seed", "epochs", "max_steps")
#: Trainer fields that change what is learned: a resume refuses a change unless forced.
SETTING_KEYS = ("lr",)


def tag(step: int) -> str:
    """The checkpoint folder name of optimizer step ``step``."""
    return f"step_{step:07d}"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (and CUDA) random states of this process.

    Only plain Python values and tensors, so that the file loads with ``torch.load(weights_only=True)``.
    """
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys], int(position), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap fingerprint of a checkpoint folder: its ``config.json`` and the names and sizes of its files.

    It changes when the folder is replaced by another model (different config or weight sizes); it does
    not read the weights (a fine-tuned copy with the same shapes and config is not told apart).
    """
    folder = Path(path)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if child.is_file():
                digest.update(f"{child.name}:{child.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def resume_conflicts(
    before: dict[str, Any],
    now: dict[str, Any],
    info: dict[str, Any],
    *,
    world_size: int,
    setting_keys: tuple[str, ...],
    checkpoint_keys: tuple[str, ...],
) -> tuple[list[str], list[str]]:
    """``(data-order changes, setting changes)`` between a run's recorded config and the new one.

    ``before``/``now``: the section's fields (the recorded ``config.yaml`` and the new config);
    ``info``: the recorded ``run_info.json``. Each change is described as ``"key (old -> new)"``.
    """
    order = [f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in DATA_ORDER_KEYS if before.get(k) != now.get(k)]
    world = info.get("world_size")
    if world is not None and world != world_size:
        order.append(f"world size ({world} -> {world_size})")
    settings = [f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in setting_keys if before.get(k) != now.get(k)]
    recorded = info.get("checkpoints", {})
    for key in checkpoint_keys:
        path = now.get(key)
        old = recorded.get(key)
        if path is None or old is None or before.get(key) != path:
            continue  # no record, or the path change is reported above
        if old.get("fingerprint") != checkpoint_fingerprint(path):
            settings.append(f"{key} (the checkpoint in {path} changed since the run started)")
    return order, settings


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
