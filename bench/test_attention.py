"""Benchmarks of the attention-map divergence ``caad_kernels.attention_kd.attention_kd_loss`` against T.

Implementations: ``ours-cpp``/``ours-torch`` (CPU) and ``ours-triton``/``ours-torch`` (CUDA), i.e. our
op with that ``backend``, against ``naive-eager``, the materialising reference of
``caad_kernels/attention_reference.py`` (every ``[B, H, T, T]`` map formed, plain autograd). One
loss configuration, ``attention``: causal forward KL (teacher || student), tau = 1, a teacher with
twice the student's heads averaged in pairs (probabilities averaged), GQA on the GPU shapes. Modes
``fwd`` (no gradient anywhere) and ``fwd+bwd`` (gradients of the student's queries and keys).

Per case, as in ``bench/harness.py``: skip with a reason (set not selected, no CUDA, backend
unavailable, the naive maps would not fit in memory), one checked run against a reference (the
materialising float64 reference on the CPU / float32 on CUDA while it fits in a budget, else our op
in float64 on the torch backend, which the unit tests check against the materialising one), its
peak memory, then pytest-benchmark's timed rounds. ``extra_info`` has the fields of the other
benchmarks (``op="attention"``, ``dims.N = T``), so ``python -m bench.report`` tabulates them.

    .venv/bin/python -m pytest bench/test_attention.py --benchmark-json=bench/results/attention_cpu.json
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from bench.agreement import Outcome, check_agreement
from bench.bounds import synchronize
from bench.harness import Session, available_bytes, rounds_for
from bench.impls import backend_error
from caad_kernels.attention_kd import attention_kd_loss
from caad_kernels.attention_reference import attention_kd_loss_reference
from caad_kernels.profiling import cpu_peak_measurable, measure_peak_memory

MODES = ("fwd", "fwd+bwd")
CONFIG = "attention"
NAIVE_MAPS = 10  # float32 [B, H_s + H_t, T, T] tensors the naive version holds at its peak (forward + backward)
REFERENCE_BUDGET = {"cpu": 2 << 30, "cuda": 16 << 30}  # bytes the materialising reference may use for the check


@dataclass(frozen=True)
class AttentionShape:
    """``B`` sequences of ``T`` tokens; student ``H_s`` query / ``kv_s`` key heads of size ``d_s``, teacher likewise."""

    seq: int
    batch: int
    heads_s: int
    kv_s: int
    dim_s: int
    heads_t: int
    kv_t: int
    dim_t: int
    headline: bool = False

    def describe(self) -> str:
        return (f"T={self.seq} B={self.batch} H={self.heads_s}/{self.heads_t} kv={self.kv_s}/{self.kv_t} "
                f"d={self.dim_s}/{self.dim_t}")

    def slug(self) -> str:
        return f"T{self.seq}_B{self.batch}_H{self.heads_s}x{self.heads_t}"

    def maps_bytes(self, element: int) -> int:
        return self.batch * (self.heads_s + self.heads_t) * self.seq * self.seq * element


@dataclass(frozen=True)
class AttentionSet:
    name: str
    device_type: str
    dtype: torch.dtype
    shapes: tuple[AttentionShape, ...]
    backends: tuple[str, ...]


def _sweep(seqs, headline, **dims) -> tuple[AttentionShape, ...]:
    return tuple(AttentionShape(seq=t, headline=t == headline, **dims) for t in seqs)


SETS = (
    # small fp32 shapes (one student head under two teacher heads): the T=2048 maps are what make the
    # materialising version slow, so the set stays at about two minutes on a busy 2-core CPU
    AttentionSet("cpu", "cpu", torch.float32,
                 _sweep((256, 512, 1024, 2048), 1024, batch=1, heads_s=1, kv_s=1, dim_s=64, heads_t=2, kv_t=1,
                        dim_t=64),
                 ("cpp", "torch")),
    # bf16, a 1B-class student (16 heads, 4 KV heads, d=64) under a Llama-3-8B-class teacher (32/8, d=128)
    AttentionSet("gpu", "cuda", torch.bfloat16,
                 _sweep((1024, 2048, 4096, 8192, 16384), 4096, batch=1, heads_s=16, kv_s=4, dim_s=64, heads_t=32,
                        kv_t=8, dim_t=128),
                 ("triton", "torch")),
)


@dataclass(frozen=True)
class AttentionCase:
    bench_set: AttentionSet
    shape: AttentionShape
    impl: str
    mode: str

    @property
    def id(self) -> str:
        return f"{self.bench_set.name}-{self.shape.slug()}-{CONFIG}-{self.impl}-{self.mode}"


def all_cases() -> list[AttentionCase]:
    cases = []
    for bench_set in SETS:
        for shape in bench_set.shapes:
            for impl in (*(f"ours-{b}" for b in bench_set.backends), "naive-eager"):
                cases.extend(AttentionCase(bench_set, shape, impl, mode) for mode in MODES)
    return cases


CASES = all_cases()


def make_inputs(shape: AttentionShape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    b, t = shape.batch, shape.seq
    q_s = randn(b, shape.heads_s, t, shape.dim_s).requires_grad_()
    k_s = randn(b, shape.kv_s, t, shape.dim_s).requires_grad_()
    return q_s, k_s, randn(b, shape.heads_t, t, shape.dim_t) * 1.5, randn(b, shape.kv_t, t, shape.dim_t) * 1.5


def loss_fn(impl: str) -> Callable[..., torch.Tensor]:
    if impl == "naive-eager":
        return attention_kd_loss_reference
    backend = impl.removeprefix("ours-")
    return lambda *inputs: attention_kd_loss(*inputs, backend=backend)


def run_once(fn, inputs, mode: str) -> Outcome:
    q_s, k_s, q_t, k_t = inputs
    if mode == "fwd":
        with torch.no_grad():
            loss = fn(q_s, k_s, q_t, k_t)
        synchronize(q_s.device)
        return Outcome(loss, {})
    q_s.grad = k_s.grad = None
    loss = fn(q_s, k_s, q_t, k_t)
    loss.backward()
    synchronize(q_s.device)
    return Outcome(loss, {"student_query": q_s.grad, "student_key": k_s.grad})


_reference_cache: dict[tuple, tuple[Outcome, str]] = {}


def reference(shape: AttentionShape, inputs, device: torch.device) -> tuple[Outcome, str]:
    """The checked outcome of ``shape``: materialising while it fits in the budget, else our op in float64."""
    key = (shape, str(device))
    if key not in _reference_cache:
        _reference_cache.clear()
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        q_s, k_s, q_t, k_t = (x.detach().to(dtype) for x in inputs)
        q_s.requires_grad_()
        k_s.requires_grad_()
        element = torch.finfo(dtype).bits // 8
        if shape.maps_bytes(element) * NAIVE_MAPS <= REFERENCE_BUDGET[device.type]:
            fn, name = attention_kd_loss_reference, f"materialising reference ({dtype})"
        else:
            def fn(*x):
                return attention_kd_loss(*x, backend="torch")
            name = f"ours-torch in {dtype} (the materialising reference would exceed the check's budget)"
        outcome = run_once(fn, (q_s, k_s, q_t, k_t), "fwd+bwd")
        _reference_cache[key] = (outcome, name)
    return _reference_cache[key]


def skip_reason(case: AttentionCase, session: Session) -> str | None:
    bench_set = case.bench_set
    if bench_set.name not in session.selected:
        return f"{bench_set.name} set not selected ({session.selection_note})"
    if bench_set.device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if bench_set.device_type == "cpu" and not cpu_peak_measurable():
        return "CPU peak memory needs Linux /proc/self/clear_refs and VmHWM"
    device = torch.device(bench_set.device_type)
    if case.impl.startswith("ours-"):
        backend = case.impl.removeprefix("ours-")
        if backend in ("cpp", "triton") and backend_error(backend) is not None:
            return f"backend {backend!r} unavailable: {backend_error(backend)}"
        if backend == "torch" and device.type == "cpu" and not case.shape.headline:
            return ("on the CPU the pure-PyTorch row kernels run on the headline shape only (the C++ ones are the "
                    "CPU path)")
        return None
    need = case.shape.maps_bytes(4) * NAIVE_MAPS
    free = available_bytes(device)
    if need > free:
        return f"naive-eager would not fit in memory: about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
    return None


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_attention(case: AttentionCase, benchmark, bench_session: Session) -> None:
    reason = skip_reason(case, bench_session)
    if reason:
        pytest.skip(reason)
    device = torch.device(case.bench_set.device_type)
    gc.collect()
    inputs = make_inputs(case.shape, case.bench_set.dtype, device)
    fn = loss_fn(case.impl)
    outcome, peak_bytes = measure_peak_memory(lambda: run_once(fn, inputs, case.mode), device)
    checked, reference_name = reference(case.shape, inputs, device)
    errors = check_agreement(outcome, checked if case.mode == "fwd+bwd" else Outcome(checked.loss, {}),
                             case.bench_set.dtype)
    del outcome
    start = time.perf_counter()
    run_once(fn, inputs, case.mode)
    single_run = time.perf_counter() - start
    rounds, warmup = rounds_for(single_run, device)
    benchmark.group = f"attention {case.mode} {case.shape.describe()}"
    benchmark.pedantic(run_once, args=(fn, inputs, case.mode), rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    shape = case.shape
    benchmark.extra_info.update(
        implementation=case.impl,
        family="ours" if case.impl.startswith("ours") else "naive",
        op="attention",
        mode=case.mode,
        config=CONFIG,
        shape=shape.describe(),
        dims=dict(N=shape.seq, V=shape.seq, H_s=shape.heads_s, H_t=shape.heads_t, label="", sweeps=["N"],
                  headline=shape.headline, B=shape.batch, kv_s=shape.kv_s, kv_t=shape.kv_t, d_s=shape.dim_s,
                  d_t=shape.dim_t),
        dtype=str(case.bench_set.dtype).removeprefix("torch."),
        device=device.type,
        bench_set=case.bench_set.name,
        peak_bytes=peak_bytes,
        bound_seconds=None,
        bound_kind=None,
        bound_detail=None,
        fraction_of_bound=None,
        median_seconds=median,
        agreement=errors,
        agreement_reference=reference_name,
    )
