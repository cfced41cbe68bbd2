"""Row views: how every backend reads ``[..., V]`` logits without copying them.

Any leading dimensions are collapsed into at most two strided row dimensions ``[B, T]`` (row
``r = b * T + t`` lives at ``b * stride_b + t * stride_t``), so ``logits[:, :-1]`` and other slices
are read in place. Only a tensor whose last dimension is not unit-stride, or whose leading
dimensions cannot be folded into two, is copied.
"""

from __future__ import annotations

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
        return torch.cat([self.data[b, (t0 if b == b0 else 0) : (t1 + 1 if b == b1 else self.seq)] for b in range(b0, b1 + 1)])

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
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        tensor = tensor.contiguous()
    lead_sizes = list(tensor.shape[:-1])
    lead_strides = list(tensor.stride()[:-1])
    # fold neighbouring leading dims whose strides nest (outer stride == inner stride * inner size)
    sizes: list[int] = []
    strides: list[int] = []
    for size, stride in zip(lead_sizes, lead_strides):
        if size == 1:
            continue
        if sizes and strides[-1] == stride * size:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    width = tensor.shape[-1]
    if 0 in lead_sizes:
        return RowView(tensor.reshape(1, 0, width))
    if not sizes:
        sizes, strides = [1], [width]
    if len(sizes) == 1:
        sizes, strides = [1] + sizes, [sizes[0] * strides[0]] + strides
    if len(sizes) > 2:
        tensor = tensor.reshape(-1, width).contiguous()
        return RowView(tensor.unsqueeze(0))
    view = tensor.as_strided((sizes[0], sizes[1], width), (strides[0], strides[1], 1), tensor.storage_offset())
    return RowView(view)
