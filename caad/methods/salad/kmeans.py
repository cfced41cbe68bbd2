"""k-means in torch: deterministic k-means++ seeding from a seeded generator, then Lloyd iterations.

scikit-learn is not a dependency of the project; this is the small part of it SALAD needs. Given the
same points, ``k`` and ``seed``, the result is the same on every run (float64 on the CPU, ties broken
by the lowest index). Several restarts (``n_init``) keep the one with the lowest inertia. With fewer
distinct points than ``k`` some clusters end up empty (scikit-learn warns about the same case); callers
treat a cluster without points as absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KMeansResult", "kmeans"]


@dataclass(frozen=True)
class KMeansResult:
    """``labels`` ``[N]`` int64 cluster of each point; ``centers`` ``[k, D]`` float64; ``inertia``: the sum of
    squared distances of the points to their centers; ``iterations``: Lloyd steps of the kept restart."""

    labels: torch.Tensor
    centers: torch.Tensor
    inertia: float
    iterations: int


def _sq_dist(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` squared Euclidean distances (clamped at 0 against rounding)."""
    d = (points * points).sum(1, keepdim=True) - 2 * points @ centers.T + (centers * centers).sum(1)[None]
    return d.clamp_min(0.0)


def _plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first center uniformly, each next one with probability ~ D(x)^2."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [points[first]]
    closest = _sq_dist(points, points[first : first + 1])[:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than k: take any point not yet a center
            index = int(torch.randint(n, (1,), generator=generator))
        else:
            index = int(torch.multinomial(closest / total, 1, generator=generator))
        centers.append(points[index])
        closest = torch.minimum(closest, _sq_dist(points, points[index : index + 1])[:, 0])
    return torch.stack(centers)


def _lloyd(points: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float) -> KMeansResult:
    labels = torch.zeros(points.shape[0], dtype=torch.long)
    iterations = 0
    for step in range(1, max_iter + 1):
        iterations = step
        distances = _sq_dist(points, centers)
        labels = distances.argmin(1)
        new = torch.zeros_like(centers).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(points.dtype)
        empty = counts == 0
        new = new / counts.clamp_min(1)[:, None]
        if bool(empty.any()):
            # an empty cluster takes the point farthest from its own center (deterministic)
            far = distances.gather(1, labels[:, None])[:, 0].clone()
            for cluster in torch.nonzero(empty)[:, 0].tolist():
                index = int(far.argmax())
                new[cluster] = points[index]
                far[index] = -1.0
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    distances = _sq_dist(points, centers)
    labels = distances.argmin(1)
    inertia = float(distances.gather(1, labels[:, None]).sum())
    return KMeansResult(labels, centers, inertia, iterations)


def kmeans(
    points: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100, tol: float = 1e-10
) -> KMeansResult:
    """Cluster ``points`` ``[N, D]`` (any float dtype; computed in float64 on the CPU) into ``k`` clusters.

    Raises ``ValueError`` for ``k`` outside ``[1, N]``, non-finite points, or bad ``n_init``/``max_iter``.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [N, D] tensor, got shape {tuple(points.shape)}")
    n = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of points), got {k!r}")
    for name, value in (("n_init", n_init), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    data = points.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(data).all()):
        raise ValueError("points holds NaN or infinite values")
    generator = torch.Generator().manual_seed(int(seed))
    best: KMeansResult | None = None
    for _ in range(n_init):
        result = _lloyd(data, _plus_plus(data, k, generator), max_iter, tol)
        if best is None or result.inertia < best.inertia - 1e-12:
            best = result
    assert best is not None
    return best
