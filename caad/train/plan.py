"""The deterministic data order: which examples each optimizer step, micro-step and rank uses.

The order is a pure function of ``(seed, epoch)``, and an optimizer step's examples a pure function
of ``(seed, step, world size, batch size, grad_accum)``: resuming at step ``k`` sees exactly the
examples an uninterrupted run would. A step takes the next ``batch_size x world_size x grad_accum``
examples of the epoch's permutation (the last incomplete window of an epoch is dropped); micro-step
``m`` of rank ``r`` takes ``batch_size`` consecutive examples at offset
``(m x world_size + r) x batch_size`` of that window. So one process with ``batch_size=4`` and two
with ``batch_size=2`` see the same examples in the same optimizer step.

Validation (:func:`validation_shards`) visits every example once, in order, spread over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StepPlan", "validation_shards"]


@dataclass(frozen=True)
class StepPlan:
    """Which examples each optimizer step, micro-step and rank uses (module docstring)."""

    num_examples: int
    batch_size: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    epochs: int
    max_steps: int | None = None

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all ranks and micro-steps."""
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: ``max_steps`` when set, else ``epochs x steps_per_epoch``."""
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        """The permutation of the examples for ``epoch`` (same on every rank)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's example indices for each micro-step of optimizer step ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        window = self.order(epoch)[position * self.global_batch : (position + 1) * self.global_batch]
        out = []
        for micro in range(self.grad_accum):
            start = (micro * self.world_size + self.rank) * self.batch_size
            out.append(window[start : start + self.batch_size])
        return out


def validation_shards(num_examples: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's validation micro-batches: every example exactly once over all ranks, in order.

    Window ``w`` holds examples ``[w * B * W, (w + 1) * B * W)``; rank ``r`` takes its ``r``-th slice
    of ``B``. Every rank gets the same number of micro-batches (ZeRO-3 needs the same number of
    forwards on every rank); a rank whose slice of the last window is empty gets ``[]`` there and
    must still run a forward that counts for nothing (the trainer does).
    """
    window = batch_size * world_size
    count = -(-num_examples // window)
    out = []
    for w in range(count):
        start = w * window + rank * batch_size
        out.append(list(range(start, min(start + batch_size, num_examples))))
    return out
