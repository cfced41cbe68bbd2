"""One benchmark section of the GPU check, run in its own process by :mod:`bench.gpu_check`.

    python -m bench.gpu_check_worker --section fused --jsonl OUT/gpu_check.jsonl --deadline EPOCH [--dry-run]

Appends one JSON line per event to ``--jsonl`` as it goes (flushed and synced, so whatever was
measured survives a kill): an ``env`` record (device and versions), then per item of the plan
(:mod:`bench.gpu_check_plan`) a ``start`` record and its result: ``status`` "ok" with the timings,
"skipped" with the reason, "failed" with the error, or "disagrees" for a baseline (not ours) whose
loss or gradients differ from the reference beyond the dtype's tolerance (reported, not timed).
Per case, as in ``pytest bench/`` (:mod:`bench.harness`): skip reasons, the inputs and the chunked
reference, one run checked against the reference (a disagreement of ours fails the case), its peak
memory, then timed rounds. The bound of a case is the ``gemms-alone``/``copy-bound`` row of the same
shape, config and mode.

An item is skipped when less than its ``min_seconds`` is left before ``--deadline``; the timed
rounds stop early at the deadline too. After an error that leaves the CUDA context unusable (an
illegal address, a device-side assert) the worker writes an ``abort`` record and exits with 3; the
next section starts a fresh process. Exit 0 otherwise, also when cases failed (the records say so).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from bench.agreement import DisagreementError, Outcome, check_agreement
from bench.bounds import Bound, HardwareBounds
from bench.cases import CONFIGS
from bench.gpu_check_plan import Item, plan
from bench.gpu_check_report import clean
from bench.harness import Case, Session, cannot_run_skips, first_run, run_once, skip_reason
from bench.machine import device_description, package_version
from caad_kernels.profiling import measure_peak_memory

FATAL_CUDA_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "AcceleratorError",
)


class RecordWriter:
    """Appends JSON lines to a file, each flushed and synced at once."""

    def __init__(self, path: Path, section: str) -> None:
        self.path, self.section = path, section

    def write(self, kind: str, **fields: object) -> None:
        record = clean(dict(kind=kind, section=self.section, time=time.time(), **fields))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def environment(cuda: bool) -> dict[str, object]:
    """Device and software of this process."""
    info: dict[str, object] = dict(
        device=device_description(),
        python=sys.version.split()[0],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=package_version("triton"),
        liger_kernel=package_version("liger-kernel"),
        torch_threads=torch.get_num_threads(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
        )
    return info


def is_fatal(error: BaseException) -> bool:
    """True for errors after which the CUDA context cannot be trusted."""
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in FATAL_CUDA_MARKERS)


def describe(item: Item) -> dict[str, object]:
    shape = item.shape
    return dict(
        id=item.id,
        op=shape.op,
        implementation=item.implementation,
        family=None if item.impl is None else item.impl.family,
        config=item.config,
        mode=item.mode,
        shape=shape.describe(),
        label=shape.label,
        dims=shape.as_dict(),
        dtype=str(item.bench_set.dtype).removeprefix("torch."),
        device=item.bench_set.device_type,
        bench_set=item.bench_set.name,
    )


def time_rounds(fn, inputs, mode: str, device: torch.device, single: float, deadline: float,
                dry_run: bool) -> list[float]:
    """Wall times of a few device-synchronised calls: about 1.5 s of them (0.2 s in a dry run), 3 to 20
    rounds (2 to 5 in a dry run), never past the deadline (at least one)."""
    low, high, target = (2, 5, 0.2) if dry_run else (3, 20, 1.5)
    rounds = min(high, max(low, math.ceil(target / max(single, 1e-6))))
    times: list[float] = []
    for _ in range(rounds):
        if times and time.time() + single > deadline:
            break
        start = time.perf_counter()
        run_once(fn, inputs, mode)
        times.append(time.perf_counter() - start)
    inputs.zero_grads()
    return times


def timing_fields(times: list[float]) -> dict[str, object]:
    return dict(median_s=statistics.median(times), min_s=min(times), rounds=len(times), times_s=times)


def run_item(item: Item, session: Session, bounds: dict[tuple, Bound], deadline: float,
             dry_run: bool) -> dict[str, object]:
    """Measure one item; returns the result fields (``status`` and what was measured)."""
    device = torch.device(item.bench_set.device_type)
    config = CONFIGS[item.config]
    key = (item.shape.key, item.config, item.mode)
    if item.impl is None:
        bound = session.device_bounds(device).bound(item.shape, config, item.bench_set.dtype, item.mode)
        bounds[key] = bound
        return dict(status="ok", median_s=bound.seconds, min_s=bound.seconds, rounds=None,
                    bound_seconds=bound.seconds, bound_kind=bound.kind, bound_detail=bound.detail)
    case = Case(item.bench_set, item.shape, item.config, item.impl, item.mode)
    reason = skip_reason(case, session)
    if reason:
        return dict(status="skipped", reason=reason)
    inputs, reference = session.inputs_and_reference(case, device)
    start = time.perf_counter()
    try:
        with cannot_run_skips(case):
            fn = session.loss_fn(case)
            outcome, peak = first_run(case, fn, inputs)
    except pytest.skip.Exception as skipped:
        return dict(status="skipped", reason=str(skipped.msg))
    first_call = time.perf_counter() - start
    reference_part = reference if item.mode == "fwd+bwd" else Outcome(reference.loss, {})
    errors = check_agreement(outcome, reference_part, item.bench_set.dtype)
    del outcome
    inputs.zero_grads()
    if peak is None:  # the first call compiled: memory from a second call
        gc.collect()
        _, peak = measure_peak_memory(lambda: run_once(fn, inputs, item.mode), device)
        inputs.zero_grads()
    # a warm call sets the number of rounds (the first one may have compiled kernels)
    start = time.perf_counter()
    run_once(fn, inputs, item.mode)
    single = time.perf_counter() - start
    inputs.zero_grads()
    times = time_rounds(fn, inputs, item.mode, device, single, deadline, dry_run)
    bound = bounds.get(key)
    median = statistics.median(times)
    return dict(
        status="ok",
        **timing_fields(times),
        first_call_s=first_call,
        peak_bytes=peak,
        bound_seconds=None if bound is None else bound.seconds,
        bound_kind=None if bound is None else bound.kind,
        fraction_of_bound=None if bound is None else bound.seconds / median,
        agreement=errors,
    )


def run_section(section: str, jsonl: Path, deadline: float, dry_run: bool, modes: tuple[str, ...]) -> int:
    writer = RecordWriter(jsonl, section)
    cuda = torch.cuda.is_available() and not dry_run  # a dry run is the CPU path, GPU or not
    writer.write("env", **environment(cuda))
    items = plan(section, dry_run, cuda, modes)
    session = Session(selected={items[0].bench_set.name} if items else set(), selection_note="the GPU check's plan")
    if dry_run:  # small buffers and few repetitions for the bounds of tiny shapes
        session.bounds["cpu"] = HardwareBounds(torch.device("cpu"), reps=2, buffer_budget=8 << 20)
    bounds: dict[tuple, Bound] = {}
    for number, item in enumerate(items, 1):
        left = deadline - time.time()
        fields = describe(item)
        if left < item.min_seconds:
            writer.write("result", **fields, status="skipped",
                         reason=f"time budget: {left:.0f} s left of the section, the item needs about "
                                f"{item.min_seconds:.0f} s")
            continue
        writer.write("start", **fields, number=number, of=len(items))
        print(f"[{section} {number}/{len(items)}] {item.id}", flush=True)
        started = time.perf_counter()
        try:
            result = run_item(item, session, bounds, deadline, dry_run)
        except DisagreementError as error:
            if item.impl is not None and item.impl.family != "ours":
                # a baseline that computes something else (e.g. in bf16 throughout): reported, not timed
                writer.write("result", **fields, status="disagrees", reason=str(error)[:2000],
                             seconds=time.perf_counter() - started)
                continue
            writer.write("result", **fields, status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                         seconds=time.perf_counter() - started)
            continue
        except Exception as error:  # our kernels failing, a crash
            writer.write("result", **fields, status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                         traceback=traceback.format_exc()[-4000:], seconds=time.perf_counter() - started)
            traceback.print_exc()
            if is_fatal(error):
                writer.write("abort", reason=f"CUDA context unusable after {type(error).__name__}; the rest of "
                             "this section is not run")
                return 3
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            continue
        writer.write("result", **fields, **result, seconds=time.perf_counter() - started)
        print(f"    {result['status']}: {result.get('median_s', result.get('reason'))}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--section", required=True, choices=("fused", "logits", "compile"))
    parser.add_argument("--jsonl", required=True, type=Path, help="JSON-lines file the records are appended to")
    parser.add_argument("--deadline", required=True, type=float, help="wall-clock time (epoch seconds) to stop by")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--modes", default="fwd+bwd", help="modes of the fused op, comma-separated")
    args = parser.parse_args(argv)
    modes = tuple(mode for mode in args.modes.split(",") if mode)
    if args.dry_run:
        # one thread: on a CPU shared with other jobs, threads waiting on each other make tiny calls take
        # hundreds of milliseconds; a dry run's times mean nothing anyway
        torch.set_num_threads(1)
    return run_section(args.section, args.jsonl, args.deadline, args.dry_run, modes)


if __name__ == "__main__":
    raise SystemExit(main())
