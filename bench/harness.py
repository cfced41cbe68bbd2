"""Running one benchmark case: skip with a reason, check, measure memory and the bound, time.

Order per case: (1) skips (set not selected, no CUDA, implementation unavailable, shape too large
for the memory), (2) inputs and the chunked reference (cached while consecutive cases share the
op, shape and config), (3) one run checked against the reference, which fails the case on a
disagreement, (4) the peak memory of that run (of a second run when the first call compiles),
(5) the hardware bound, (6) pytest-benchmark's timed rounds, (7) ``benchmark.extra_info``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from bench.agreement import Outcome, check_agreement, reference_outcome
from bench.bounds import HardwareBounds, synchronize
from bench.cases import CONFIGS, BenchSet, Shape
from bench.impls import CHECK_FINITE, Impl, LossFn
from bench.inputs import BenchInputs, make_inputs
from caad_kernels.profiling import cpu_peak_measurable, measure_peak_memory


@dataclass(frozen=True)
class Case:
    """One benchmark: a shape of a set, a loss config, an implementation and a mode."""

    bench_set: BenchSet
    shape: Shape
    config: str
    impl: Impl
    mode: str

    @property
    def id(self) -> str:
        return f"{self.bench_set.name}-{self.shape.slug()}-{self.config}-{self.impl.name}-{self.mode}"


@dataclass
class Session:
    """State shared by the cases of one pytest run."""

    selected: set[str]
    selection_note: str
    bounds: dict[str, HardwareBounds] = field(default_factory=dict)
    _inputs_key: tuple | None = None
    _inputs: BenchInputs | None = None
    _reference: Outcome | None = None
    _built: dict[tuple, LossFn] = field(default_factory=dict)

    def device_bounds(self, device: torch.device) -> HardwareBounds:
        if str(device) not in self.bounds:
            self.bounds[str(device)] = HardwareBounds(device)
        return self.bounds[str(device)]

    def inputs_and_reference(self, case: Case, device: torch.device) -> tuple[BenchInputs, Outcome]:
        key = (case.shape.key, case.config, case.bench_set.dtype, str(device))
        if key != self._inputs_key:
            self._inputs_key = self._inputs = self._reference = None
            self._built.clear()  # compiled baselines hold on to graphs specialised on the old shape
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            config = CONFIGS[case.config]
            self._inputs = make_inputs(case.shape, config, case.bench_set.dtype, device)
            self._reference = reference_outcome(case.shape.op, config, self._inputs)
            self._inputs_key = key
        return self._inputs, self._reference

    def loss_fn(self, case: Case) -> LossFn:
        key = (case.impl.name, case.shape.op, case.config)
        if key not in self._built:
            self._built[key] = case.impl.build(case.shape.op, CONFIGS[case.config])
        return self._built[key]


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def skip_reason(case: Case, session: Session) -> str | None:
    """Why ``case`` cannot run here, or ``None``."""
    bench_set, shape, impl = case.bench_set, case.shape, case.impl
    if bench_set.name not in session.selected:
        return f"{bench_set.name} set not selected ({session.selection_note})"
    if bench_set.device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if shape.op not in impl.ops or case.config not in impl.configs:
        return f"{impl.name} does not compute config {case.config!r} of the {shape.op} op"
    device = torch.device(bench_set.device_type)
    reason = impl.skip_reason(shape.op, shape, device)
    if reason:
        return reason
    if bench_set.device_type == "cpu" and not cpu_peak_measurable():
        return "CPU peak memory needs Linux /proc/self/clear_refs and VmHWM"
    element = torch.finfo(bench_set.dtype).bits // 8
    matrix = shape.n * shape.v
    # the three logits inputs, our gradient and the reference's gradient (float64 on the CPU, float32 on CUDA)
    reference_element = 8 if device.type == "cpu" else 4
    inputs = (4 * element + reference_element) * matrix if shape.op == "logits" else 0
    estimate = inputs + impl.naive_memory_factor * matrix * 4
    free = available_bytes(device)
    if estimate > free:
        what = "the inputs" if impl.naive_memory_factor == 0 else f"{impl.name} (a materialising baseline)"
        need, have = estimate / 2**30, free / 2**30
        return f"{what} would not fit in memory: about {need:.1f} GiB needed, {have:.1f} GiB free"
    return None


def run_once(fn: LossFn, inputs: BenchInputs, mode: str) -> Outcome:
    """One forward (no gradients anywhere) or forward + backward; synchronised."""
    device = next(iter(inputs.grad_leaves().values())).device
    if mode == "fwd":
        with torch.no_grad():
            loss = fn(inputs.detached())
        synchronize(device)
        return Outcome(loss, {})
    inputs.zero_grads()
    loss = fn(inputs)
    loss.backward()
    synchronize(device)
    return Outcome(loss, {name: tensor.grad for name, tensor in inputs.grad_leaves().items()})


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@contextmanager
def cannot_run_skips(case: Case) -> Iterator[None]:
    """Turn "cannot run here" into a skip: a baseline out of memory, or any error of an implementation
    with ``failure_skips`` (no compiler, another Liger API). Errors of our kernels propagate."""
    try:
        yield
    except OUT_OF_MEMORY as error:
        if case.impl.family == "ours":
            raise
        pytest.skip(f"{case.impl.name} ran out of memory: {str(error).splitlines()[0]}")
    except Exception as error:
        if not case.impl.failure_skips:
            raise
        message = str(error).splitlines()[0][:300] if str(error) else ""
        pytest.skip(f"{case.impl.name} cannot run here: {type(error).__name__}: {message}")


def first_run(case: Case, fn: LossFn, inputs: BenchInputs) -> tuple[Outcome, int | None]:
    """The checked run, with its peak memory unless the first call compiles."""
    device = next(iter(inputs.grad_leaves().values())).device
    if case.impl.first_call_compiles:
        return run_once(fn, inputs, case.mode), None
    inputs.zero_grads()
    return measure_peak_memory(lambda: run_once(fn, inputs, case.mode), device)


def rounds_for(seconds: float, device: torch.device) -> tuple[int, int]:
    """(rounds, warmup rounds) for about 2 s of timing: CPU 3-10 rounds, CUDA 5-50."""
    low, high = (5, 50) if device.type == "cuda" else (3, 10)
    rounds = min(high, max(low, math.ceil(2.0 / max(seconds, 1e-6))))
    return rounds, (1 if seconds < 0.5 else 0)


def run_case(case: Case, benchmark, session: Session) -> None:
    """The whole protocol of one case (see the module docstring)."""
    reason = skip_reason(case, session)
    if reason:
        pytest.skip(reason)
    device = torch.device(case.bench_set.device_type)
    inputs, reference = session.inputs_and_reference(case, device)
    start = time.perf_counter()
    with cannot_run_skips(case):
        fn = session.loss_fn(case)
        outcome, peak_bytes = first_run(case, fn, inputs)
    single = time.perf_counter() - start
    reference_part = reference if case.mode == "fwd+bwd" else Outcome(reference.loss, {})
    errors = check_agreement(outcome, reference_part, case.bench_set.dtype)
    del outcome
    inputs.zero_grads()
    if peak_bytes is None:
        gc.collect()
        start = time.perf_counter()
        _, peak_bytes = measure_peak_memory(lambda: run_once(fn, inputs, case.mode), device)
        single = time.perf_counter() - start
    bound = session.device_bounds(device).bound(
        case.shape, CONFIGS[case.config], case.bench_set.dtype, case.mode
    )

    rounds, warmup = rounds_for(single, device)
    benchmark.group = f"{case.shape.op} {case.mode} {case.config} {case.shape.describe()}"
    benchmark.pedantic(
        run_once, args=(fn, inputs, case.mode), setup=None, rounds=rounds, warmup_rounds=warmup, iterations=1
    )
    inputs.zero_grads()

    median = None
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        implementation=case.impl.name,
        family=case.impl.family,
        op=case.shape.op,
        mode=case.mode,
        config=case.config,
        shape=case.shape.describe(),
        dims=case.shape.as_dict(),
        dtype=str(case.bench_set.dtype).removeprefix("torch."),
        device=device.type,
        bench_set=case.bench_set.name,
        peak_bytes=peak_bytes,
        bound_seconds=bound.seconds,
        bound_kind=bound.kind,
        bound_detail=bound.detail,
        fraction_of_bound=None if not median else bound.seconds / median,
        check_finite=CHECK_FINITE if case.impl.family == "ours" else None,
        agreement=errors,
    )
