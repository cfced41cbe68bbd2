"""Benchmarks of the logits-level op ``contrastive_kd_loss`` (cases: :func:`bench.conftest.all_cases`)."""

from __future__ import annotations

from bench.harness import Case, Session, run_case

OP = "logits"


def test_logits(bench_case: Case, benchmark, bench_session: Session) -> None:
    run_case(bench_case, benchmark, bench_session)
