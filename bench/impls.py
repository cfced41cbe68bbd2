"""The implementations compared: our backends and the naive PyTorch baselines (eager and compiled).

Each :class:`Impl` says why it cannot run a case (``skip_reason``), or builds a loss function
``fn(inputs) -> scalar loss`` that the harness times. Liger-Kernel's adapters live in
:mod:`bench.liger` and are registered in :data:`IMPLEMENTATIONS` below.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.cases import LossConfig, Shape
from bench.inputs import BenchInputs
from caad_kernels import contrastive_kd_loss, fused_linear_contrastive_kd_loss
from caad_kernels.backends import load_backend
from caad_kernels.reference import contrastive_kd_loss_reference, fused_linear_contrastive_kd_loss_reference

LossFn = Callable[[BenchInputs], torch.Tensor]

# Our ops are called with check_finite=False: the NaN scan costs a host synchronisation and a pass
# over the inputs that a training loop does not pay for (the fused op defaults to False anyway).
CHECK_FINITE = False


@functools.cache
def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def our_options(fn: Callable, config: LossConfig, backend: str) -> dict[str, object]:
    """Keyword arguments of our op ``fn`` for ``config``: the loss options, ``backend`` and
    ``check_finite=False`` where the op still has that switch (the kernels may detect bad inputs
    themselves, without an extra pass)."""
    options = dict(config.options(), backend=backend)
    if _accepts(fn, "check_finite"):
        options["check_finite"] = CHECK_FINITE
    return options


@dataclass(frozen=True)
class Impl:
    """One implementation.

    ``family``: "ours", "naive" or "liger". ``naive_memory_factor``: an upper estimate of its peak
    memory in float32 ``[N x V]`` tensors (0 for implementations that do not materialise them),
    used to skip shapes that would not fit (and running out of memory skips, rather than fails, a
    baseline). ``failure_skips``: any exception on the first call means "cannot run here" (no
    working compiler, an incompatible Liger version) and skips the case with its message; for our
    kernels every exception fails the case. ``first_call_compiles``: peak memory is measured on a
    second call, not on the checked first one.
    """

    name: str
    family: str
    ops: tuple[str, ...]
    configs: tuple[str, ...]
    skip_reason: Callable[[str, Shape, torch.device], str | None]
    build: Callable[[str, LossConfig], LossFn]
    naive_memory_factor: float = 0.0
    failure_skips: bool = False
    first_call_compiles: bool = False


# --- our backends ------------------------------------------------------------------------------


@functools.cache
def backend_error(name: str) -> str | None:
    """``None`` when ``load_backend(name)`` works here, else its error message."""
    try:
        load_backend(name)
    except Exception as error:  # a missing compiler, a failed build, no triton
        return f"{type(error).__name__}: {error}"
    return None


def _ours_skip(backend: str) -> Callable[[str, Shape, torch.device], str | None]:
    def reason(op: str, shape: Shape, device: torch.device) -> str | None:
        if backend == "cpp":
            if device.type != "cpu":
                return "backend 'cpp' runs on CPU tensors only"
            error = backend_error("cpp")
            return None if error is None else f"backend 'cpp' unavailable (C++ kernels not built): {error}"
        if backend == "triton":
            if device.type != "cuda":
                return (
                    "backend 'triton' needs CUDA; on the CPU it runs only under TRITON_INTERPRET=1, far too "
                    "slow to benchmark"
                )
            error = backend_error("triton")
            return None if error is None else f"backend 'triton' unavailable: {error}"
        if device.type == "cpu" and backend_error("cpp") is None:
            if op == "fused":
                return (
                    "on the CPU the fused op's backend='torch' runs the C++ row kernels when they build: "
                    "identical to 'cpp'"
                )
            if not shape.headline:
                return (
                    "on the CPU the pure-PyTorch fallback runs on the headline shape only (it is slow, and "
                    "the C++ kernels are the CPU path)"
                )
        return None

    return reason


def _ours_build(backend: str) -> Callable[[str, LossConfig], LossFn]:
    def build(op: str, config: LossConfig) -> LossFn:
        if op == "logits":
            options = our_options(contrastive_kd_loss, config, backend)
            return lambda x: contrastive_kd_loss(x.student, x.teacher, x.negative, x.labels, **options)
        options = our_options(fused_linear_contrastive_kd_loss, config, backend)
        return lambda x: fused_linear_contrastive_kd_loss(
            x.hidden_s, x.weight_s, x.hidden_t, x.weight_t, x.hidden_n, x.labels, **options
        )

    return build


# --- naive PyTorch -------------------------------------------------------------------------------


def naive_loss(op: str, config: LossConfig) -> LossFn:
    """The materialising reference of :mod:`caad_kernels.reference` (float32 compute), eager."""
    options = config.options()
    if op == "logits":
        return lambda x: contrastive_kd_loss_reference(x.student, x.teacher, x.negative, x.labels, **options)[
            0
        ]
    return lambda x: fused_linear_contrastive_kd_loss_reference(
        x.hidden_s, x.weight_s, x.hidden_t, x.weight_t, x.hidden_n, x.labels, **options
    )[0]


def _compiled_build(op: str, config: LossConfig) -> LossFn:
    """The naive reference under ``torch.compile`` (static shapes); compiled on the first call."""
    options = config.options()
    if op == "logits":

        def loss(student, teacher, negative, labels):
            return contrastive_kd_loss_reference(student, teacher, negative, labels, **options)[0]

        compiled = torch.compile(loss, dynamic=False)
        return lambda x: compiled(x.student, x.teacher, x.negative, x.labels)

    def fused(hidden_s, weight_s, hidden_t, weight_t, hidden_n, labels):
        return fused_linear_contrastive_kd_loss_reference(
            hidden_s, weight_s, hidden_t, weight_t, hidden_n, labels, **options
        )[0]

    compiled = torch.compile(fused, dynamic=False)
    return lambda x: compiled(x.hidden_s, x.weight_s, x.hidden_t, x.weight_t, x.hidden_n, x.labels)


def _naive_skip(op: str, shape: Shape, device: torch.device) -> str | None:
    return None


def _compile_skip(op: str, shape: Shape, device: torch.device) -> str | None:
    if os.environ.get("CAAD_BENCH_NO_COMPILE") == "1":
        return "torch.compile baseline disabled by CAAD_BENCH_NO_COMPILE=1"
    if not shape.compile:
        return "the torch.compile baseline runs on the headline shapes only (compiling each shape is slow)"
    try:
        import torch._dynamo  # noqa: F401
    except Exception as error:
        return f"torch.compile unavailable: {error}"
    return None


def ours(backend: str) -> Impl:
    return Impl(
        f"ours-{backend}",
        "ours",
        ("logits", "fused"),
        ("caad", "kd"),
        _ours_skip(backend),
        _ours_build(backend),
    )


NAIVE_EAGER = Impl(
    "naive-eager",
    "naive",
    ("logits", "fused"),
    ("caad", "kd"),
    _naive_skip,
    naive_loss,
    naive_memory_factor=12.0,
)
NAIVE_COMPILE = Impl(
    "naive-compile",
    "naive",
    ("logits", "fused"),
    ("caad", "kd"),
    _compile_skip,
    _compiled_build,
    naive_memory_factor=12.0,
    failure_skips=True,
    first_call_compiles=True,
)
BASELINE = NAIVE_EAGER.name  # the "speed-up vs naive" reference


def implementations() -> list[Impl]:
    """Every implementation, ours first, then the naive baselines, then Liger-Kernel."""
    from bench.liger import LIGER_IMPLS

    return [ours("cpp"), ours("torch"), ours("triton"), NAIVE_EAGER, NAIVE_COMPILE, *LIGER_IMPLS]
