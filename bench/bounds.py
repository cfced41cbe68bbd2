"""The hardware bound of each case, measured on this device in this run.

* Logits-level op (memory-bound): the bytes that must move, reading the student, teacher and (when
  present) negative logits and the labels once, plus writing the student gradient in
  ``fwd+bwd``, divided by the copy bandwidth measured here: a large ``dst.copy_(src)`` whose
  read + write bytes over its median time give bytes per second.
* Fused-linear op (GEMM-bound): the time of the GEMMs the op needs at the least (:func:`fused_gemms`),
  timed alone with ``torch.matmul`` in the layouts the op uses: one teacher forward GEMM (without
  the plausibility cutoff the contrastive teacher is linear in the hidden states,
  ``z_hat = W_t h_hat`` with ``h_hat = h_pos + alpha (h_pos - h_neg)``, so one GEMM serves both
  paths; with the cutoff ``z_pos`` is needed on its own and the negative path costs a second), the
  student forward GEMM, and in ``fwd+bwd`` the two student backward GEMMs (``dL/dh = G @ W`` and
  ``dL/dW = G.T @ h``): four in ``fwd+bwd`` and two in ``fwd`` without the cutoff, five and three
  with it. A GEMM whose ``[rows x V]`` operand would be larger than a buffer budget is timed on a
  row slice and scaled by ``N / rows`` (GEMM time is linear in the row count there).

Both are measured afresh right before each case's timed rounds (so that a machine shared with
other work loads the bound and the case alike) and take the *best* (minimum) of their repetitions:
a bound is the fastest the hardware was seen to go. ``fraction_of_bound = bound_seconds /
median_seconds``: 1.0 would be running at the bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.cases import LossConfig, Shape


@dataclass(frozen=True)
class Bound:
    """A lower bound on a case's time and how it was obtained."""

    seconds: float
    kind: str  # "copy-bandwidth" or "gemm"
    detail: dict[str, object] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``reps`` runs, synchronising the device around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def fused_gemms(shape: Shape, config: LossConfig, mode: str) -> list[tuple[str, str, int]]:
    """The GEMMs the fused-linear op needs at the least, as ``(name, kind, hidden size)``.

    ``kind`` is a :meth:`HardwareBounds.gemm_seconds` kind. One teacher GEMM, unless the
    contrastive teacher meets the plausibility cutoff (which needs ``z_pos`` itself, so the
    negative path takes a second GEMM); the student forward GEMM; and in ``fwd+bwd`` the two
    student backward GEMMs. So 4 GEMMs in ``fwd+bwd`` and 2 in ``fwd`` without the cutoff, 5 and 3
    with it.
    """
    if config.contrastive and config.plausibility > 0:
        gemms = [
            ("teacher forward, positive path", "forward", shape.h_t),
            ("teacher forward, negative path", "forward", shape.h_t),
        ]
    elif config.contrastive:
        gemms = [("teacher forward on h_hat", "forward", shape.h_t)]
    else:
        gemms = [("teacher forward", "forward", shape.h_t)]
    gemms.append(("student forward", "forward", shape.h_s))
    if mode == "fwd+bwd":
        gemms += [
            ("student grad hidden", "grad_hidden", shape.h_s),
            ("student grad weight", "grad_weight", shape.h_s),
        ]
    return gemms


class HardwareBounds:
    """Copy bandwidth and GEMM times of one device, measured on every call (nothing is cached)."""

    def __init__(self, device: torch.device, reps: int | None = None, buffer_budget: int | None = None) -> None:
        """``reps`` timed repetitions (default 10 on CUDA, 3 on the CPU); ``buffer_budget`` bytes for the
        copy's two buffers and a GEMM's ``[rows x V]`` operand (default 2 GiB on CUDA, 256 MiB on the CPU)."""
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.reps = reps if reps is not None else (10 if self.is_cuda else 3)
        default_budget = (2 << 30) if self.is_cuda else (256 << 20)
        self.buffer_budget = buffer_budget if buffer_budget is not None else default_budget

    def copy_bandwidth(self) -> float:
        """Bytes per second of a large device-to-device copy (read + write bytes counted)."""
        size = self.buffer_budget // 2
        if self.is_cuda:
            size = min(size, torch.cuda.mem_get_info(self.device)[0] // 8)
        src = torch.empty(size // 4, dtype=torch.float32, device=self.device).fill_(1.0)
        dst = torch.empty_like(src)
        seconds = best_seconds(lambda: dst.copy_(src), self.device, reps=max(self.reps, 5))
        return 2 * src.numel() * src.element_size() / seconds

    def gemm_seconds(self, kind: str, n: int, k: int, v: int, dtype: torch.dtype) -> float:
        """Time of one GEMM of the op at ``n`` rows, hidden ``k``, vocabulary ``v``.

        ``kind``: ``"forward"`` ``[n, k] @ [v, k].T``; ``"grad_hidden"`` ``[n, v] @ [v, k]``;
        ``"grad_weight"`` ``[n, v].T @ [n, k]``.
        """
        element = torch.finfo(dtype).bits // 8
        rows = max(1, min(n, self.buffer_budget // (v * element)))
        return self._time_gemm(kind, rows, k, v, dtype) * n / rows

    def _time_gemm(self, kind: str, rows: int, k: int, v: int, dtype: torch.dtype) -> float:
        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, device=self.device, dtype=torch.float32).to(dtype)

        weight = rand(v, k)
        if kind == "forward":
            hidden, out = rand(rows, k), torch.empty(rows, v, device=self.device, dtype=dtype)
            fn = lambda: torch.matmul(hidden, weight.T, out=out)
        elif kind == "grad_hidden":
            grad, out = rand(rows, v), torch.empty(rows, k, device=self.device, dtype=dtype)
            fn = lambda: torch.matmul(grad, weight, out=out)
        else:
            grad, hidden = rand(rows, v), rand(rows, k)
            out = torch.empty(v, k, device=self.device, dtype=dtype)
            fn = lambda: torch.matmul(grad.T, hidden, out=out)
        return best_seconds(fn, self.device, reps=self.reps)

    def logits_bound(self, shape: Shape, config: LossConfig, dtype: torch.dtype, mode: str) -> Bound:
        element = torch.finfo(dtype).bits // 8
        matrix = shape.n * shape.v * element
        moved = matrix * (2 + int(config.negative)) + (8 * shape.n if config.labels else 0)
        if mode == "fwd+bwd":
            moved += matrix
        bandwidth = self.copy_bandwidth()
        return Bound(
            moved / bandwidth,
            "copy-bandwidth",
            dict(bytes_moved=moved, copy_bandwidth_GBps=round(bandwidth / 1e9, 2)),
        )

    def fused_bound(self, shape: Shape, config: LossConfig, dtype: torch.dtype, mode: str) -> Bound:
        n, v = shape.n, shape.v
        gemms = fused_gemms(shape, config, mode)
        seconds = 0.0
        flops = 0
        for _, kind, k in gemms:
            seconds += self.gemm_seconds(kind, n, k, v, dtype)
            flops += 2 * n * k * v
        return Bound(
            seconds,
            "gemm",
            dict(
                gemms=[name for name, _, _ in gemms],
                gemm_flops=flops,
                gemm_TFLOPs=round(flops / seconds / 1e12, 3),
            ),
        )

    def bound(self, shape: Shape, config: LossConfig, dtype: torch.dtype, mode: str) -> Bound:
        if shape.op == "logits":
            return self.logits_bound(shape, config, dtype, mode)
        return self.fused_bound(shape, config, dtype, mode)
