"""Benchmark inputs: seeded random logits or hidden states and ``lm_head`` weights.

Logits are scaled to a standard deviation of about 2-3, so the distributions are neither flat nor
one-hot. Only student tensors require gradients; :meth:`BenchInputs.detached` gives the same
tensors with nothing requiring a gradient (the ``fwd`` mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from bench.cases import IGNORE_INDEX, IGNORED_FRACTION, LossConfig, Shape


@dataclass(frozen=True)
class BenchInputs:
    """Everything one case's implementations read. Unused fields are ``None``.

    Logits op: ``student`` ``[N, V]`` (requires grad), ``teacher`` and ``negative`` ``[N, V]``.
    Fused op: ``hidden_s`` ``[N, H_s]`` and ``weight_s`` ``[V, H_s]`` (both require grad),
    ``hidden_t``/``hidden_n`` ``[N, H_t]`` and ``weight_t`` ``[V, H_t]``.
    ``labels`` ``[N]`` int64 with about 5% ``ignore_index`` rows, or ``None``.
    """

    student: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    hidden_s: torch.Tensor | None = None
    weight_s: torch.Tensor | None = None
    hidden_t: torch.Tensor | None = None
    weight_t: torch.Tensor | None = None
    hidden_n: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def grad_leaves(self) -> dict[str, torch.Tensor]:
        """The tensors that receive gradients, by name, in a fixed order."""
        names = ("student",) if self.student is not None else ("hidden_s", "weight_s")
        return {name: getattr(self, name) for name in names}

    def zero_grads(self) -> None:
        for tensor in self.grad_leaves().values():
            tensor.grad = None

    def detached(self) -> BenchInputs:
        """The same storage with nothing requiring a gradient."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.detach() for k, v in values.items() if isinstance(v, torch.Tensor)})

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (getattr(self, f.name) for f in fields(self))
            if isinstance(t, torch.Tensor)
        )


def make_inputs(
    shape: Shape, config: LossConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> BenchInputs:
    """Seeded inputs for one (shape, config); generated on ``device`` in float32, then cast."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        tensor = torch.randn(*size, generator=gen, device=device, dtype=torch.float32)
        tensor = tensor.mul_(scale).to(dtype)
        return tensor.requires_grad_(grad)

    n, v = shape.n, shape.v
    labels = None
    if config.labels:
        labels = torch.randint(0, v, (n,), generator=gen, device=device)
        ignored = torch.rand(n, generator=gen, device=device) < IGNORED_FRACTION
        labels = labels.masked_fill(ignored, IGNORE_INDEX)
    if shape.op == "logits":
        return BenchInputs(
            student=randn(n, v, scale=2.0, grad=True),
            teacher=randn(n, v, scale=3.0),
            negative=randn(n, v, scale=3.0) if config.negative else None,
            labels=labels,
        )
    # logits = hidden @ weight.T with a standard deviation of ~2 (student) and ~3 (teacher)
    return BenchInputs(
        hidden_s=randn(n, shape.h_s, grad=True),
        weight_s=randn(v, shape.h_s, scale=2.0 / math.sqrt(shape.h_s), grad=True),
        hidden_t=randn(n, shape.h_t),
        weight_t=randn(v, shape.h_t, scale=3.0 / math.sqrt(shape.h_t)),
        hidden_n=randn(n, shape.h_t) if config.negative else None,
        labels=labels,
    )
