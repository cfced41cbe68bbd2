"""pytest configuration of ``pytest bench/``: the ``--bench-set`` option, case parametrisation,
the shared session and the machine information written into the benchmark JSON."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import torch

from bench.cases import BENCH_SETS, MODES
from bench.harness import Case, Session
from bench.impls import implementations
from bench.machine import device_description, git_commit, package_version


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


def invocation() -> str:
    """The command line of this run, as typed (``python -m pytest ...`` or ``pytest ...``)."""
    program = Path(sys.argv[0])
    head = "python -m pytest" if program.name == "__main__.py" else program.name
    return " ".join([head, shlex.join(sys.argv[1:])])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Record what the report header needs: device, commit, command, versions."""
    liger = package_version("liger-kernel")
    machine_info["caad_bench"] = dict(
        device=device_description(),
        commit=git_commit(),
        command=invocation(),
        bench_set=config.getoption("--bench-set"),
        torch=torch.__version__,
        liger_kernel=liger,
        torch_threads=torch.get_num_threads(),
    )
