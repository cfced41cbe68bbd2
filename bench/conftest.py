"""pytest configuration of ``pytest bench/``: the ``--bench-set`` option, case parametrisation,
the shared session and the machine information written into the benchmark JSON."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

from bench.cases import BENCH_SETS, MODES
from bench.harness import Case, Session
from bench.impls import implementations

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("caad bench")
    group.addoption(
        "--bench-set",
        choices=("auto", "cpu", "gpu", "all"),
        default="auto",
        help="shape set to run: 'gpu' (bf16, real-model shapes, CUDA), 'cpu' (small fp32 shapes), 'all', or "
        "'auto' (gpu when CUDA is available, else cpu). Cases of the other set are skipped with a reason.",
    )


def selected_sets(choice: str) -> tuple[set[str], str]:
    """The set names to run and a note saying why."""
    if choice == "all":
        return {"cpu", "gpu"}, "--bench-set=all"
    if choice in ("cpu", "gpu"):
        return {choice}, f"--bench-set={choice}"
    if torch.cuda.is_available():
        return {"gpu"}, "--bench-set=auto chose gpu: CUDA is available"
    return {"cpu"}, "--bench-set=auto chose cpu: no CUDA device; --bench-set=gpu selects it"


def all_cases(op: str) -> list[Case]:
    """Every case of ``op``, grouped so that consecutive cases share inputs and reference."""
    cases = []
    impls = implementations()
    for factory in BENCH_SETS.values():
        bench_set = factory()
        for shape in bench_set.shapes:
            if shape.op != op:
                continue
            for config in shape.configs:
                for impl in impls:
                    if op not in impl.ops or config not in impl.configs:
                        continue
                    cases.extend(Case(bench_set, shape, config, impl, mode) for mode in MODES)
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" in metafunc.fixturenames:
        op = metafunc.module.OP
        cases = all_cases(op)
        metafunc.parametrize("bench_case", cases, ids=[case.id for case in cases])


@pytest.fixture(scope="session")
def bench_session(request: pytest.FixtureRequest) -> Session:
    selected, note = selected_sets(request.config.getoption("--bench-set"))
    return Session(selected=selected, selection_note=note)


def git_commit() -> str:
    """``git rev-parse HEAD`` (``-dirty`` when the tree has changes or untracked files), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def device_description() -> str:
    """The GPU's name, else the CPU model with its core and thread counts."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def invocation() -> str:
    """The command line of this run, as typed (``python -m pytest ...`` or ``pytest ...``)."""
    program = Path(sys.argv[0])
    head = "python -m pytest" if program.name == "__main__.py" else program.name
    return " ".join([head, shlex.join(sys.argv[1:])])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Record what the report header needs: device, commit, command, versions."""
    try:
        liger = version("liger-kernel")
    except PackageNotFoundError:
        liger = None
    machine_info["caad_bench"] = dict(
        device=device_description(),
        commit=git_commit(),
        command=invocation(),
        bench_set=config.getoption("--bench-set"),
        torch=torch.__version__,
        liger_kernel=liger,
        torch_threads=torch.get_num_threads(),
    )
