"""Benchmarks of the fused-linear op ``fused_linear_contrastive_kd_loss``.

Cases: :func:`bench.conftest.all_cases`.
"""

from __future__ import annotations

from bench.harness import Case, Session, run_case

OP = "fused"


def test_fused(bench_case: Case, benchmark, bench_session: Session) -> None:
    run_case(bench_case, benchmark, bench_session)
