"""The metrics MCR-BENCH and Dynamic-SUPERB report, with bootstrap confidence intervals.

Input: scored records, one per (item, text condition) and per seed, as
:func:`caad.eval.runner.evaluate_rows` writes them. A record is a mapping with ``task``,
``correct`` (bool) and optionally ``group`` (the item; default: ``id``), ``condition`` (one of
:data:`CONDITIONS`; default ``"neutral"``), ``category`` and ``follows_context`` (bool or ``None``).
Records of one item under different conditions share the ``group`` (paired comparisons).

Metrics (all fractions in ``[0, 1]``; ``None`` where a denominator is 0):

- ``accuracy_per_condition[c]``: correct / records under condition ``c``;
- ``accuracy``: the ``neutral`` accuracy (the question alone: Dynamic-SUPERB's setting);
  ``accuracy_all``: over every record whatever its condition;
- ``accuracy_per_task[t]``: neutral accuracy of task ``t``; ``accuracy_per_condition_task[c][t]``
  the same under each condition; ``accuracy_per_category[k]``: the mean of the neutral accuracies of
  the tasks of category ``k`` (Dynamic-SUPERB's category means: macro over tasks);
- ``normalized_accuracy[c]`` (MCR-BENCH's normalised accuracy): ``accuracy[c] / accuracy[neutral]``
  for the three text conditions (above 1: the text helped);
- ``text_influence_rate``: among adversarial records whose context's answer is known
  (``follows_context`` not ``None``), the fraction answered as the text says (the context's
  label named, the true one not): how often the text wins over the audio;
- ``shift``: among items answered correctly under ``neutral`` that also have an adversarial record,
  the fraction answered wrongly under ``adversarial`` (the linguistic-bias shift of the README;
  CAAD reports this falls to 79% of KD's);
- ``flip_rate[c]``: MCR-BENCH-style per-condition text influence over items with both a neutral and
  a ``c`` record: ``faithful``: wrong under neutral, right under faithful; ``adversarial``: right
  under neutral, wrong under adversarial; ``irrelevant``: the answer's correctness changed at all;
- ``modal_robustness``: ``w * normalized_accuracy[adversarial] + (1 - w) *
  normalized_accuracy[irrelevant]``, ``w = 0.8`` by default (``mrs_weight``). MCR-BENCH reports a
  Modal Robustness Score built from the normalised adversarial and irrelevant accuracies; this
  weighting follows a public re-implementation of its evaluation (we could not check the paper's
  exact weights), so treat it as a documented equivalent: 1 means the text changes nothing, lower
  means the text misleads or distracts.

Confidence intervals (:func:`summarize`): a two-level percentile bootstrap. Each replicate draws
the seeds with replacement and, independently, the items (groups) with replacement; an item keeps
all its conditions (so paired metrics stay paired) and the same item draw applies to every seed
(items and seeds are crossed: every seed answered the same test set). The replicate's value is the
mean over its drawn seeds of the metric on its drawn items; the point value is the mean over seeds
of the metric on all items. With one seed this is the plain item bootstrap. An interval that is
``[1, 1]`` means every replicate gave 1 (e.g. all answers right), not certainty.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CONDITIONS",
    "MIN_MEANINGFUL_ITEMS",
    "TEXT_CONDITIONS",
    "accuracy_half_width",
    "size_warnings",
    "summarize",
]

CONDITIONS: tuple[str, ...] = ("neutral", "faithful", "adversarial", "irrelevant")
TEXT_CONDITIONS: tuple[str, ...] = ("faithful", "adversarial", "irrelevant")
#: Fewer scored items than this under a condition (or in a task) gives a warning: the 95% interval
#: of an accuracy near 50% is then wider than about +-10 points.
MIN_MEANINGFUL_ITEMS = 100


def accuracy_half_width(num_items: int, level: float = 0.95, p: float = 0.5) -> float:
    """Half-width of the normal-approximation interval of an accuracy ``p`` on ``num_items`` items."""
    from statistics import NormalDist

    if num_items <= 0:
        return math.inf
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return z * math.sqrt(p * (1 - p) / num_items)


class _Counters:
    """Names of the additive per-item counters, and their index in the counter axis."""

    def __init__(self) -> None:
        self.index: dict[tuple, int] = {}

    def __call__(self, *key: Any) -> int:
        if key not in self.index:
            self.index[key] = len(self.index)
        return self.index[key]


def _group_key(record: Mapping[str, Any], position: int) -> Hashable:
    group = record.get("group")
    if group is None:
        group = record.get("id")
    return ("#", position) if group is None else group


def _check_record(record: Any, seed: Hashable, position: int) -> tuple[str, str, str | None, bool, bool | None]:
    if not isinstance(record, Mapping):
        raise TypeError(f"records[{seed!r}][{position}] must be a mapping, got {type(record).__name__}")
    for key in ("task", "correct"):
        if key not in record:
            raise ValueError(f"records[{seed!r}][{position}] has no {key!r}")
    condition = record.get("condition") or "neutral"
    if condition not in CONDITIONS:
        raise ValueError(f"records[{seed!r}][{position}]: condition must be one of {CONDITIONS}, got {condition!r}")
    follows = record.get("follows_context")
    return str(record["task"]), condition, record.get("category"), bool(record["correct"]), (
        None if follows is None else bool(follows)
    )


def _count(per_seed: Mapping[Hashable, Sequence[Mapping[str, Any]]]) -> tuple[np.ndarray, _Counters, dict]:
    """``stats[seed, group, counter]`` (float64) and the counter names; ``info``: tasks, categories."""
    counters = _Counters()
    groups: dict[Hashable, int] = {}
    tasks: dict[str, str | None] = {}
    entries = []  # (seed position, group position, counter, amount)
    paired: list[dict[tuple[int, int], dict[str, list[bool]]]] = []
    for s, (seed, records) in enumerate(per_seed.items()):
        by_group: dict[tuple[int, int], dict[str, list[bool]]] = {}
        for position, record in enumerate(records):
            task, condition, category, correct, follows = _check_record(record, seed, position)
            g = groups.setdefault(_group_key(record, position), len(groups))
            if category is not None or task not in tasks:
                tasks[task] = category if category is not None else tasks.get(task)
            entries += [
                (s, g, counters("n", condition), 1.0),
                (s, g, counters("correct", condition), float(correct)),
                (s, g, counters("n", condition, task), 1.0),
                (s, g, counters("correct", condition, task), float(correct)),
                (s, g, counters("n", "*"), 1.0),
                (s, g, counters("correct", "*"), float(correct)),
            ]
            if condition == "adversarial" and follows is not None:
                entries += [(s, g, counters("follow_n"), 1.0), (s, g, counters("follows"), float(follows))]
            by_group.setdefault((s, g), {}).setdefault(condition, []).append(correct)
        paired.append(by_group)
    for by_group in paired:
        for (s, g), conditions in by_group.items():
            if "neutral" not in conditions:
                continue
            neutral = conditions["neutral"][0]
            for condition in TEXT_CONDITIONS:
                if condition not in conditions:
                    continue
                other = conditions[condition][0]
                entries += [
                    (s, g, counters("pair_n", condition), 1.0),
                    (s, g, counters("pair_neutral_right", condition), float(neutral)),
                    (s, g, counters("right_to_wrong", condition), float(neutral and not other)),
                    (s, g, counters("wrong_to_right", condition), float(not neutral and other)),
                ]
    stats = np.zeros((len(per_seed), max(1, len(groups)), max(1, len(counters.index))), dtype=np.float64)
    for s, g, k, amount in entries:
        stats[s, g, k] += amount
    return stats, counters, {"tasks": tasks, "num_groups": len(groups)}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _metric_functions(
    counters: _Counters, tasks: Mapping[str, str | None], mrs_weight: float
) -> dict[tuple, Callable[[np.ndarray], np.ndarray]]:
    """Metric key -> function of the counter sums ``[..., K]`` giving values ``[...]`` (nan: undefined)."""

    def column(*key: Any) -> Callable[[np.ndarray], np.ndarray]:
        index = counters.index.get(key)
        return (lambda sums: sums[..., index]) if index is not None else (lambda sums: np.zeros(sums.shape[:-1]))

    def ratio(numerator: tuple, denominator: tuple) -> Callable[[np.ndarray], np.ndarray]:
        top, bottom = column(*numerator), column(*denominator)
        return lambda sums: _ratio(top(sums), bottom(sums))

    metrics: dict[tuple, Callable[[np.ndarray], np.ndarray]] = {}
    for condition in CONDITIONS:
        metrics["accuracy_per_condition", condition] = ratio(("correct", condition), ("n", condition))
        for task in tasks:
            metrics["accuracy_per_condition_task", condition, task] = ratio(
                ("correct", condition, task), ("n", condition, task)
            )
    metrics["accuracy",] = metrics["accuracy_per_condition", "neutral"]
    metrics["accuracy_all",] = ratio(("correct", "*"), ("n", "*"))
    for task in tasks:
        metrics["accuracy_per_task", task] = metrics["accuracy_per_condition_task", "neutral", task]
    for category in sorted({c for c in tasks.values() if c is not None}):
        members = [metrics["accuracy_per_task", t] for t, c in tasks.items() if c == category]

        def category_mean(sums: np.ndarray, members: list = members) -> np.ndarray:
            values = np.stack([member(sums) for member in members])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-nan slices: undefined, stays nan
                return np.nanmean(values, axis=0)

        metrics["accuracy_per_category", category] = category_mean
    neutral = metrics["accuracy_per_condition", "neutral"]
    for condition in TEXT_CONDITIONS:
        accuracy = metrics["accuracy_per_condition", condition]
        metrics["normalized_accuracy", condition] = (
            lambda sums, accuracy=accuracy: _ratio(accuracy(sums), neutral(sums))
        )
    metrics["text_influence_rate",] = ratio(("follows",), ("follow_n",))
    metrics["shift",] = ratio(("right_to_wrong", "adversarial"), ("pair_neutral_right", "adversarial"))
    metrics["flip_rate", "faithful"] = ratio(("wrong_to_right", "faithful"), ("pair_n", "faithful"))
    metrics["flip_rate", "adversarial"] = ratio(("right_to_wrong", "adversarial"), ("pair_n", "adversarial"))
    irrelevant_right_to_wrong = column("right_to_wrong", "irrelevant")
    irrelevant_wrong_to_right = column("wrong_to_right", "irrelevant")
    irrelevant_pairs = column("pair_n", "irrelevant")
    metrics["flip_rate", "irrelevant"] = lambda sums: _ratio(
        irrelevant_right_to_wrong(sums) + irrelevant_wrong_to_right(sums), irrelevant_pairs(sums)
    )
    adversarial_na = metrics["normalized_accuracy", "adversarial"]
    irrelevant_na = metrics["normalized_accuracy", "irrelevant"]
    metrics["modal_robustness",] = lambda sums: mrs_weight * adversarial_na(sums) + (1 - mrs_weight) * irrelevant_na(
        sums
    )
    return metrics


def _denominators(counters: _Counters, tasks: Mapping[str, str | None]) -> dict[tuple, Callable]:
    """Metric key -> the counter that says how many items its value rests on (reported as ``n``)."""

    def column(*key: Any) -> Callable[[np.ndarray], np.ndarray]:
        index = counters.index.get(key)
        return (lambda sums: sums[..., index]) if index is not None else (lambda sums: np.zeros(sums.shape[:-1]))

    out: dict[tuple, Callable] = {("accuracy",): column("n", "neutral"), ("accuracy_all",): column("n", "*")}
    for condition in CONDITIONS:
        out["accuracy_per_condition", condition] = column("n", condition)
        for task in tasks:
            out["accuracy_per_condition_task", condition, task] = column("n", condition, task)
    for task in tasks:
        out["accuracy_per_task", task] = column("n", "neutral", task)
    for category in {c for c in tasks.values() if c is not None}:
        members = [column("n", "neutral", t) for t, c in tasks.items() if c == category]
        out["accuracy_per_category", category] = lambda sums, members=members: sum(m(sums) for m in members)
    for condition in TEXT_CONDITIONS:
        out["normalized_accuracy", condition] = column("n", condition)
        out["flip_rate", condition] = column("pair_n", condition)
    out["text_influence_rate",] = column("follow_n")
    out["shift",] = column("pair_neutral_right", "adversarial")
    out["modal_robustness",] = column("n", "adversarial")
    return out


def _as_per_seed(records: Any) -> dict[Hashable, Sequence[Mapping[str, Any]]]:
    if isinstance(records, Mapping):
        if not records:
            raise ValueError("records has no seed")
        return {seed: list(values) for seed, values in records.items()}
    return {0: list(records)}


def summarize(
    records: Mapping[Hashable, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
    *,
    num_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    mrs_weight: float = 0.8,
    min_items: int = MIN_MEANINGFUL_ITEMS,
) -> dict[str, Any]:
    """Every metric of the module docstring with its bootstrap confidence interval.

    Args:
        records: per-seed scored records, ``{seed: [record, ...]}`` (one run: a plain list, taken as
            one seed). Every seed should hold the same items (a missing one just contributes nothing).
        num_bootstrap: bootstrap replicates (0: point values only, intervals ``None``).
        level: the interval's coverage (two-sided percentile interval).
        seed: seed of the bootstrap's generator (results are reproducible for a seed).
        mrs_weight: weight of the adversarial term of ``modal_robustness``.
        min_items: below this many scored neutral items (or items in a task), a warning is added.

    Returns:
        ``{"num_seeds", "num_items" (distinct groups), "num_records", "level", "num_bootstrap",
        "accuracy", "accuracy_all", "accuracy_per_condition", "accuracy_per_task",
        "accuracy_per_condition_task", "accuracy_per_category", "normalized_accuracy",
        "text_influence_rate", "shift", "flip_rate", "modal_robustness", "warnings"}``; every
        estimate is ``{"value", "low", "high", "n"}`` (``n``: items it rests on, the mean over
        seeds; ``value``/``low``/``high`` ``None`` when undefined). Keyed metrics are dicts
        (tasks and categories sorted).
    """
    if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be a non-negative int, got {num_bootstrap!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not 0.0 <= mrs_weight <= 1.0:
        raise ValueError(f"mrs_weight must be in [0, 1], got {mrs_weight!r}")
    per_seed = _as_per_seed(records)
    stats, counters, info = _count(per_seed)
    tasks = dict(sorted(info["tasks"].items()))
    functions = _metric_functions(counters, tasks, mrs_weight)
    denominators = _denominators(counters, tasks)
    num_seeds, num_groups = stats.shape[0], info["num_groups"]

    per_seed_sums = stats.sum(axis=1)  # [S, K]
    replicate_sums = None
    if num_bootstrap and num_groups:
        rng = np.random.default_rng(seed)
        seed_draws = rng.integers(0, num_seeds, size=(num_bootstrap, num_seeds))
        replicate_sums = np.empty((num_bootstrap, num_seeds, stats.shape[2]))
        chunk = max(1, 2_000_000 // max(1, num_groups))
        for start in range(0, num_bootstrap, chunk):
            stop = min(num_bootstrap, start + chunk)
            weights = rng.multinomial(num_groups, np.full(num_groups, 1.0 / num_groups), size=stop - start)
            totals = np.einsum("bg,sgk->sbk", weights.astype(np.float64), stats[:, :num_groups])
            replicate_sums[start:stop] = totals[seed_draws[start:stop], np.arange(stop - start)[:, None]]

    def estimate(key: tuple) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values = functions[key](per_seed_sums)
            value = float(np.nanmean(values)) if np.isfinite(values).any() else None
            n = float(np.mean(denominators[key](per_seed_sums)))
            low = high = None
            if value is not None and replicate_sums is not None:
                replicates = np.nanmean(functions[key](replicate_sums), axis=1)
                replicates = replicates[np.isfinite(replicates)]
                if replicates.size:
                    tail = (1.0 - level) / 2 * 100
                    low, high = (float(v) for v in np.percentile(replicates, [tail, 100 - tail]))
        return {"value": value, "low": low, "high": high, "n": int(n) if n.is_integer() else round(n, 3)}

    summary: dict[str, Any] = {
        "num_seeds": num_seeds,
        "num_items": num_groups,
        "num_records": int(sum(len(values) for values in per_seed.values())),
        "level": level,
        "num_bootstrap": num_bootstrap,
    }
    for key in functions:
        name, *rest = key
        if not rest:
            summary[name] = estimate(key)
            continue
        target = summary.setdefault(name, {})
        for part in rest[:-1]:
            target = target.setdefault(part, {})
        target[rest[-1]] = estimate(key)
    summary["warnings"] = size_warnings(summary, min_items)
    return summary


def size_warnings(summary: Mapping[str, Any], min_items: int = MIN_MEANINGFUL_ITEMS) -> list[str]:
    """Plain-language warnings for a summary whose samples are too small to mean much."""
    out = []
    neutral = summary["accuracy_per_condition"]["neutral"]["n"] or summary["accuracy_all"]["n"]
    if neutral < min_items:
        out.append(
            f"only {neutral:g} scored item{'' if neutral == 1 else 's'}"
            + (" per seed" if summary["num_seeds"] > 1 else "")
            + f": the 95% interval of an accuracy near 50% is about "
            f"+-{100 * accuracy_half_width(max(1, int(neutral))):.0f} points, too wide to compare models "
            f"(use at least {min_items}; about 400 per condition to resolve a 5-point difference)"
        )
    small = [task for task, est in summary["accuracy_per_task"].items() if 0 < est["n"] < min_items]
    if small and neutral >= min_items:
        out.append(f"tasks with fewer than {min_items} items, read their accuracies with care: {', '.join(small)}")
    return out
