"""What the GPU check measures, in the order it measures it (most important first).

A section's plan is a list of :class:`Item`: one benchmark case (an implementation of an op at a
shape, config and mode) or one hardware-bound row (``gemms-alone`` for the fused op: the GEMMs the op
needs, timed alone; ``copy-bound`` for the logits op: the bytes it must move at the copy bandwidth).
Each item carries the least time it needs (``min_seconds``); the worker skips an item when less
than that is left of its section's budget, so the items at the end of a plan are the first to go.

On a GPU (``bench_set`` "gpu-check", bfloat16): the fused op forward+backward at N=8192, H=4096,
V=128256 (Llama-3-8B) and H=3584, V=152064 (Qwen2-7B / Qwen2-Audio-7B), configs ``caad`` and ``kd``,
ours (Triton) against Liger-Kernel's fused-linear JSD (Triton) and chunked JSD, the naive eager
loss and the GEMMs alone; the logits op at N=8192, V=128256 (then V=152064) against the copy
bandwidth; and, last, the ``torch.compile`` baseline of the fused op. With ``dry_run`` (the
"dry-run" set, float32 on the CPU): the same plan at tiny shapes, our C++ backend standing in for
Triton; CUDA-only implementations are skipped by their own skip reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.cases import BenchSet, Shape
from bench.impls import Impl, backend_error, implementations

SECTIONS = ("tests", "fused", "logits", "compile")
BOTH = ("caad", "kd")
GEMMS_ALONE = "gemms-alone"
COPY_BOUND = "copy-bound"


@dataclass(frozen=True)
class Item:
    """One row of a section: ``impl`` ``None`` means the bound row (:data:`GEMMS_ALONE`/:data:`COPY_BOUND`)."""

    section: str
    bench_set: BenchSet
    shape: Shape
    config: str
    mode: str
    impl: Impl | None
    min_seconds: float

    @property
    def implementation(self) -> str:
        if self.impl is not None:
            return self.impl.name
        return GEMMS_ALONE if self.shape.op == "fused" else COPY_BOUND

    @property
    def id(self) -> str:
        return f"{self.bench_set.name}-{self.shape.slug()}-{self.config}-{self.implementation}-{self.mode}"


def check_set(dry_run: bool) -> BenchSet:
    """The shapes of the check: real models in bf16 on CUDA, or tiny fp32 stand-ins on the CPU."""
    if dry_run:
        shapes = (
            Shape("fused", 64, 500, 32, 32, label="stands in for Llama-3-8B", configs=BOTH, compile=True,
                  headline=True),
            Shape("fused", 64, 600, 24, 24, label="stands in for Qwen2-7B", configs=BOTH, compile=True,
                  headline=True),
            Shape("logits", 64, 500, label="stands in for Llama-3-8B", configs=BOTH, headline=True),
            Shape("logits", 64, 600, label="stands in for Qwen2-7B", configs=BOTH, headline=True),
        )
        return BenchSet("dry-run", "cpu", torch.float32, shapes)
    llama, qwen = 128256, 152064
    shapes = (
        Shape("fused", 8192, llama, 4096, 4096, label="Llama-3-8B", configs=BOTH, compile=True, headline=True),
        Shape("fused", 8192, qwen, 3584, 3584, label="Qwen2-7B / Qwen2-Audio-7B", configs=BOTH, compile=True,
              headline=True),
        Shape("logits", 8192, llama, label="Llama-3-8B", configs=BOTH, headline=True),
        Shape("logits", 8192, qwen, label="Qwen2-7B / Qwen2-Audio-7B", configs=BOTH, headline=True),
    )
    return BenchSet("gpu-check", "cuda", torch.bfloat16, shapes)


def ours_name(cuda: bool) -> str:
    """Our implementation in the check: Triton on CUDA; on the CPU the C++ kernels (PyTorch without them)."""
    if cuda:
        return "ours-triton"
    return "ours-cpp" if backend_error("cpp") is None else "ours-torch"


def plan(section: str, dry_run: bool, cuda: bool, modes: tuple[str, ...] = ("fwd+bwd",)) -> list[Item]:
    """The items of ``section`` ("fused", "logits" or "compile"), most important first.

    ``modes`` are the fused op's modes (the issue asks for forward+backward); the logits op runs
    both modes for ours and its bound, ``fwd+bwd`` for the baselines.
    """
    impls = {impl.name: impl for impl in implementations()}
    bench_set = check_set(dry_run)
    ours = impls[ours_name(cuda)]
    slow = 1.0 if dry_run else 8.0  # seconds an ordinary item needs at least (inputs, reference, timing)
    compile_time = 1.0 if dry_run else 60.0
    fused = [shape for shape in bench_set.shapes if shape.op == "fused"]
    logits = [shape for shape in bench_set.shapes if shape.op == "logits"]

    def item(shape: Shape, config: str, mode: str, impl: Impl | None, seconds: float = slow) -> Item:
        return Item(section, bench_set, shape, config, mode, impl, seconds)

    items: list[Item] = []
    if section == "fused":
        for shape in fused:
            for mode in modes:
                items += [item(shape, "caad", mode, None), item(shape, "caad", mode, ours),
                          item(shape, "caad", mode, impls["naive-eager"])]
                items += [item(shape, "kd", mode, None), item(shape, "kd", mode, ours),
                          item(shape, "kd", mode, impls["liger-fused-jsd"], 2 * slow),
                          item(shape, "kd", mode, impls["naive-eager"]),
                          item(shape, "kd", mode, impls["liger-chunked-jsd"])]
    elif section == "logits":
        for index, shape in enumerate(logits):
            for config in BOTH:
                for mode in ("fwd", "fwd+bwd"):
                    items += [item(shape, config, mode, None), item(shape, config, mode, ours)]
                if index == 0:  # the baselines on the first shape only
                    items.append(item(shape, config, "fwd+bwd", impls["naive-eager"]))
                    if config == "kd":
                        items += [item(shape, config, "fwd+bwd", impls["liger-jsd"], 2 * slow),
                                  item(shape, config, "fwd+bwd", impls["liger-kldiv"], 2 * slow)]
    elif section == "compile":
        for shape in fused:
            for config in BOTH:
                items.append(item(shape, config, modes[-1], impls["naive-compile"], compile_time))
    else:
        raise ValueError(f"section must be 'fused', 'logits' or 'compile', got {section!r}")
    return items
