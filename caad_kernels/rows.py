"""Row views: how every backend reads ``[..., V]`` logits without copying them.

Any leading dimensions are collapsed into at most two strided row dimensions ``[B, T]`` (row
``r = b * T + t`` lives at ``b * stride_b + t * stride_t``), so ``logits[:, :-1]`` and other slices
are read in place. Only a tensor whose last dimension is not unit-stride, or whose leading
dimensions cannot be folded into two, is copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowView:
    """A ``[B, T, V]`` view with ``stride(-1) == 1`` of a logits tensor.

    Attributes: ``data`` the 3-D view; ``rows = B * T``; ``width`` its last dimension (the
    tensor's own vocabulary, which a teacher may have larger than the student's).
    """

    data: torch.Tensor

    @property
    def batch(self) -> int:
        return self.data.shape[0]

    @property
    def seq(self) -> int:
        return self.data.shape[1]

    @property
    def rows(self) -> int:
        return self.data.shape[0] * self.data.shape[1]

    @property
    def width(self) -> int:
        return self.data.shape[2]

    @property
    def stride_b(self) -> int:
        return self.data.stride(0)

    @property
    def stride_t(self) -> int:
        return self.data.stride(1)

    def row_slice(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a 2-D tensor; a view when they share one ``b`` (else a copy)."""
        b0, t0 = divmod(start, self.seq)
        b1, t1 = divmod(stop - 1, self.seq)
        if b0 == b1:
            return self.data[b0, t0 : t1 + 1]
        parts = [self.data[b, (t0 if b == b0 else 0) : (t1 + 1 if b == b1 else self.seq)] for b in range(b0, b1 + 1)]
        return torch.cat(parts)

    def chunks(self, max_rows: int) -> list[tuple[int, int]]:
        """Row ranges of at most ``max_rows`` that never straddle two ``b`` (so slices stay views)."""
        ranges = []
        for b in range(self.batch):
            base = b * self.seq
            for t in range(0, self.seq, max_rows):
                ranges.append((base + t, base + min(t + max_rows, self.seq)))
        return ranges


def as_rows(tensor: torch.Tensor) -> RowView:
    """Fold ``[..., V]`` into a ``[B, T, V]`` view without copying when strides allow."""
    return as_row_views(tensor)[0]


def as_row_views(*tensors: torch.Tensor | None) -> list[RowView | None]:
    """Fold tensors sharing their leading shape into ``[B, T, width]`` views with one common ``B, T``.

    Neighbouring leading dims are merged only where the merge is valid for every tensor, so row
    ``r`` means the same position in all of them. ``None`` entries stay ``None``.
    """
    present = [t for t in tensors if t is not None]
    present = [t.unsqueeze(0) if t.dim() == 1 else t for t in present]
    present = [t.contiguous() if t.stride(-1) != 1 and t.shape[-1] > 1 else t for t in present]
    lead = list(present[0].shape[:-1])
    if any(list(t.shape[:-1]) != lead for t in present):
        raise ValueError(f"tensors must share their leading shape, got {[tuple(t.shape[:-1]) for t in present]}")
    keep = [i for i, size in enumerate(lead) if size != 1]
    groups: list[list[int]] = []
    for dim in keep:
        if groups and all(t.stride(groups[-1][-1]) == t.stride(dim) * lead[dim] for t in present):
            groups[-1].append(dim)
        else:
            groups.append([dim])
    if 0 in lead:
        views = [RowView(t.reshape(1, 0, t.shape[-1])) for t in present]
    elif len(groups) > 2:
        views = [RowView(t.reshape(-1, t.shape[-1]).contiguous().unsqueeze(0)) for t in present]
    else:
        sizes = [math.prod(lead[d] for d in g) for g in groups]
        views = []
        for t in present:
            strides = [t.stride(g[-1]) for g in groups]
            if not sizes:
                shape, stride = (1, 1), (t.shape[-1], t.shape[-1])
            elif len(sizes) == 1:
                shape, stride = (1, sizes[0]), (sizes[0] * strides[0], strides[0])
            else:
                shape, stride = tuple(sizes), tuple(strides)
            views.append(RowView(t.as_strided((*shape, t.shape[-1]), (*stride, 1), t.storage_offset())))
    out: list[RowView | None] = []
    it = iter(views)
    for t in tensors:
        out.append(None if t is None else next(it))
    return out
