"""Which text items a round speaks: active selection of the most misaligned clusters, or random selection,
both within the same synthesis budget.

A round's budget is ``budget_per_round`` in ``utterances`` or ``seconds`` of audio. A plan is an ordered
list of items; synthesis (:func:`caad.data.spoken_qa.synthesize_items`) speaks them in order and stops at
the budget: exactly ``budget`` utterances, or the longest prefix whose audio fits in ``budget`` seconds.
So both arms of a comparison spend the same budget, measured the same way.

- **Active** (:func:`plan_active`): rank the clusters by the metric (highest = most misaligned; clusters
  without a score last; ties by index), keep the ``top`` worst, and interleave their items round-robin so
  that the budget is split evenly among them whenever synthesis stops. Within a cluster, items spoken
  fewer times so far come first, ties in a seeded random order; a cluster that runs out starts again (the
  voice x rate x pitch cycle gives the new renderings other settings).
- **Random** (:func:`plan_random`): items drawn uniformly from the whole pool, with the same "fewest
  renderings first" rule, in a seeded order: the baseline the paper beats.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Budget", "plan_active", "plan_length", "plan_random", "rank_clusters"]

#: For a budget in seconds: the shortest utterance assumed when sizing a plan (synthesis stops at the budget).
MIN_UTTERANCE_SECONDS = 0.3


@dataclass(frozen=True)
class Budget:
    """A round's synthesis budget: ``amount`` of ``unit`` (``"utterances"`` or ``"seconds"``)."""

    unit: str
    amount: float

    def __post_init__(self) -> None:
        if self.unit not in ("utterances", "seconds"):
            raise ValueError(f"budget unit must be 'utterances' or 'seconds', got {self.unit!r}")
        if not self.amount > 0 or (self.unit == "utterances" and not float(self.amount).is_integer()):
            raise ValueError(f"budget amount must be > 0 (whole for utterances), got {self.amount!r}")

    def synthesis_limits(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~caad.data.spoken_qa.synthesize_items` that enforce it."""
        if self.unit == "utterances":
            return {"max_utterances": int(self.amount)}
        return {"max_seconds": float(self.amount)}

    def spent(self, utterances: int, seconds: float) -> float:
        """What ``utterances`` of ``seconds`` in total cost in this budget's unit."""
        return float(utterances) if self.unit == "utterances" else float(seconds)


def plan_length(budget: Budget) -> int:
    """How many items a plan needs so that synthesis, not the plan, ends at the budget."""
    if budget.unit == "utterances":
        return int(budget.amount)
    return max(1, math.ceil(budget.amount / MIN_UTTERANCE_SECONDS))


def rank_clusters(scores: Sequence[float | None]) -> list[int]:
    """Cluster indices from the most to the least misaligned (``None`` last; ties by index)."""
    return sorted(range(len(scores)), key=lambda c: (scores[c] is None, -(scores[c] or 0.0), c))


def _queue(members: Sequence[int], used: Mapping[int, int], rng: random.Random) -> list[int]:
    keys = {m: rng.random() for m in members}
    return sorted(members, key=lambda m: (used.get(m, 0), keys[m]))


def _draw(queue: list[int], members: Sequence[int], used: dict[int, int], rng: random.Random) -> int:
    if not queue:
        queue.extend(_queue(members, used, rng))
    item = queue.pop(0)
    used[item] = used.get(item, 0) + 1
    return item


def plan_active(
    scores: Sequence[float | None],
    labels: Sequence[int],
    budget: Budget,
    *,
    top: int,
    seed: int,
    used: Mapping[int, int] | None = None,
) -> tuple[list[int], list[int]]:
    """``(item indices in speaking order, chosen clusters)`` for an active round.

    ``scores[c]``: cluster ``c``'s misalignment; ``labels[i]``: item ``i``'s cluster; ``used[i]``: how often
    item ``i`` was spoken already (earlier rounds). Clusters without items are skipped.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    members: dict[int, list[int]] = {}
    for index, cluster in enumerate(labels):
        members.setdefault(int(cluster), []).append(index)
    if any(c < 0 or c >= len(scores) for c in members):
        raise ValueError(f"labels name clusters outside [0, {len(scores)})")
    chosen = [c for c in rank_clusters(scores) if c in members][:top]
    if not chosen:
        raise ValueError("no cluster has items to select from")
    rng = random.Random(f"salad-active-{seed}")
    counts = dict(used or {})
    queues: dict[int, list[int]] = {c: [] for c in chosen}
    plan = []
    for k in range(plan_length(budget)):
        cluster = chosen[k % len(chosen)]
        plan.append(_draw(queues[cluster], members[cluster], counts, rng))
    return plan, chosen


def plan_random(num_items: int, budget: Budget, *, seed: int, used: Mapping[int, int] | None = None) -> list[int]:
    """Item indices in speaking order for a random round: uniform over the pool, fewest renderings first."""
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be a positive int, got {num_items!r}")
    rng = random.Random(f"salad-random-{seed}")
    counts = dict(used or {})
    queue: list[int] = []
    members = list(range(num_items))
    return [_draw(queue, members, counts, rng) for _ in range(plan_length(budget))]
