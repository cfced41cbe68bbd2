"""The prepared GPU check (``bench/gpu_check.py``): its dry run end to end on the CPU, and its parts.

The dry run is the same program as the GPU run at tiny float32 shapes, with the CUDA-only tests and
implementations reported as skipped: if it passes here, the first GPU session spends its minutes
measuring. The parts (budgets, interruption, parsing, the plan, the GEMM count of the bound) are
checked on their own, without running the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.bounds import fused_gemms
from bench.cases import CAAD, PLAIN_KD, Shape
from bench.gpu_check_plan import COPY_BOUND, GEMMS_ALONE, check_set, plan
from bench.gpu_check_report import read_records, summarize
from bench.gpu_check_worker import run_section

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check") / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=REPO_ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=1200)
    return proc, out


@pytest.mark.slow
def test_dry_run_passes_end_to_end(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== GPU check (dry run): PASSED ==" in proc.stdout
    for name in ("gpu_check.json", "gpu_check.md", "gpu_check.jsonl", "gpu_check.log", "gpu_check_junit.xml"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "gpu_check.json").read_text())
    meta = summary["meta"]
    assert meta["dry_run"] is True and "--dry-run" in meta["command"] and meta["commit"]
    assert [s["name"] for s in summary["sections"]] == ["tests", "fused", "logits", "compile"]
    statuses = {s["name"]: s["status"] for s in summary["sections"]}
    assert statuses == dict(tests="passed", fused="passed", logits="passed", compile="skipped")
    markdown = (out / "gpu_check.md").read_text()
    assert "**device**" in markdown and meta["commit"] in markdown and "--dry-run" in markdown


@pytest.mark.slow
def test_dry_run_reports_cuda_only_tests_as_skipped(dry_run):
    _, out = dry_run
    tests = json.loads((out / "gpu_check.json").read_text())["tests"]
    assert tests["files"] == ["tests/test_gpu_kernels.py"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] == len(tests["results"]) > 20
    assert all("CUDA" in result["message"] for result in tests["results"])


@pytest.mark.slow
def test_dry_run_measures_ours_and_baselines_after_checking_them(dry_run):
    _, out = dry_run
    cases = json.loads((out / "gpu_check.json").read_text())["cases"]
    by = {(c["op"], c["shape"], c["config"], c["mode"], c["implementation"]): c for c in cases}
    assert len(by) == len(cases) == len(plan("fused", True, False)) + len(plan("logits", True, False))
    ours = [c for c in cases if c["family"] == "ours"]
    assert ours and all(c["status"] == "ok" for c in ours)
    for case in cases:
        if case["status"] == "ok" and case["implementation"] not in (GEMMS_ALONE, COPY_BOUND):
            # checked against the float64 reference before timing (a disagreement would have failed the case)
            assert case["agreement"]["loss_abs_error"] < 1e-3
            assert case["median_s"] > 0 and case["rounds"] >= 1 and case["peak_bytes"] is not None
    for case in cases:
        if case["implementation"] in ("liger-fused-jsd", "liger-jsd", "liger-kldiv"):
            assert case["status"] == "skipped" and ("CUDA" in case["reason"] or "not installed" in case["reason"])
    fused = next(c for c in cases if c["op"] == "fused")["shape"]
    assert by[("fused", fused, "caad", "fwd+bwd", "naive-eager")]["status"] == "ok"
    bound = by[("fused", fused, "caad", "fwd+bwd", GEMMS_ALONE)]
    assert bound["status"] == "ok" and len(bound["bound_detail"]["gemms"]) == 4
    assert by[("fused", fused, "caad", "fwd+bwd", ours[0]["implementation"])]["bound_seconds"] == bound["median_s"]
    targets = json.loads((out / "gpu_check.json").read_text())["targets"]
    assert {t["shape"] for t in targets} == {s.describe() for s in check_set(True).shapes if s.op == "fused"}
    assert all(t["value"] is not None for t in targets if "Liger" not in t["measure"])


# --- the parts -----------------------------------------------------------------------------------------


def test_section_deadlines_share_the_budget_in_order():
    deadlines = gpu_check.section_deadlines(["tests", "fused", "logits", "compile"], 1000.0, 420.0)
    assert list(deadlines) == ["tests", "fused", "logits", "compile"]
    values = list(deadlines.values())
    assert values == sorted(values)
    assert values[-1] == pytest.approx(1000.0 + 420.0 - gpu_check.REPORT_RESERVE)
    assert values[0] - 1000.0 == pytest.approx(170.0)  # absolute deadlines: time left unused moves on
    only = gpu_check.section_deadlines(["fused"], 0.0, 100.0)
    assert only["fused"] == pytest.approx(100.0 - gpu_check.REPORT_RESERVE)


def test_a_child_past_its_deadline_is_interrupted_then_killed(tmp_path):
    log = tmp_path / "log"
    script = textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignores the interruption: must be killed
        print("started", flush=True)
        time.sleep(60)
    """)
    start = time.time()
    result = gpu_check.run_child([sys.executable, "-c", script], dict(os.environ), log, time.time() + 5.0, grace=1.0)
    assert result.timed_out and result.returncode is not None and result.returncode != 0
    assert time.time() - start < 40  # not the child's 60 s
    assert "started" in log.read_text()


def test_a_child_that_finishes_is_not_interrupted(tmp_path):
    result = gpu_check.run_child([sys.executable, "-c", "print('done')"], dict(os.environ), tmp_path / "log",
                                 time.time() + 60, grace=1.0)
    assert not result.timed_out and result.returncode == 0
    assert "done" in (tmp_path / "log").read_text()


def test_a_crashed_section_reports_the_end_of_its_log(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):'\necho 'ImportError: boom'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    outcome = gpu_check.run_worker("fused", tmp_path, dict(os.environ), time.time() + 60, True, "fwd+bwd")
    assert outcome["status"] == "failed" and outcome["returncode"] == 1
    assert "0 measured" in outcome["message"] and "ImportError: boom" in outcome["message"]


def test_verbose_pytest_lines_give_outcomes_and_the_running_test():
    text = textwrap.dedent("""
        tests/test_gpu_kernels.py::test_a[x] PASSED                        [  1%]
        tests/test_gpu_kernels.py::test_b SKIPPED (CUDA only)              [  2%]
        tests/test_gpu_kernels.py::test_c FAILED                           [  3%]
        tests/test_gpu_kernels.py::test_d
    """)
    results, running = gpu_check.parse_verbose_log(text)
    assert [(r["id"].split("::")[1], r["outcome"]) for r in results] == [
        ("test_a[x]", "passed"), ("test_b", "skipped"), ("test_c", "failed")]
    assert results[1]["message"].startswith("(CUDA only)")
    assert running == "tests/test_gpu_kernels.py::test_d"
    xdist = textwrap.dedent("""
        [gw0] [ 50%] PASSED tests/test_gpu_kernels.py::test_a[x]
        [gw1] [100%] FAILED tests/test_triton_rows.py::test_b
        =========================== short test summary info ============================
        FAILED tests/test_triton_rows.py::test_b - AssertionError: 1 != 2
    """)
    results, running = gpu_check.parse_verbose_log(xdist)
    assert [(r["id"], r["outcome"]) for r in results] == [
        ("tests/test_gpu_kernels.py::test_a[x]", "passed"), ("tests/test_triton_rows.py::test_b", "failed")]
    assert running is None


def test_junit_xml_gives_outcomes_and_messages(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest">
          <testcase classname="tests.test_gpu_kernels" name="test_a" time="0.1"/>
          <testcase classname="tests.test_gpu_kernels" name="test_b[x]" time="0.1">
            <failure message="AssertionError: loss 1.0 vs reference 2.0">trace</failure></testcase>
          <testcase classname="tests.test_gpu_kernels" name="test_c" time="0.0">
            <skipped type="pytest.skip" message="CUDA only">skip</skipped></testcase>
        </testsuite></testsuites>
    """))
    results = gpu_check.parse_junit(path)
    assert results == [
        dict(id="tests/test_gpu_kernels.py::test_a", outcome="passed", message=""),
        dict(id="tests/test_gpu_kernels.py::test_b[x]", outcome="failed",
             message="AssertionError: loss 1.0 vs reference 2.0"),
        dict(id="tests/test_gpu_kernels.py::test_c", outcome="skipped", message="CUDA only"),
    ]
    assert gpu_check.parse_junit(tmp_path / "missing.xml") is None


def test_items_past_the_deadline_are_skipped_with_the_reason(tmp_path):
    jsonl = tmp_path / "records.jsonl"
    assert run_section("logits", jsonl, time.time(), dry_run=True, modes=("fwd+bwd",)) == 0
    results = [r for r in read_records(jsonl) if r["kind"] == "result"]
    assert len(results) == len(plan("logits", True, False))
    assert all(r["status"] == "skipped" and r["reason"].startswith("time budget") for r in results)


def test_a_case_started_but_never_finished_fails_the_run():
    base = dict(section="fused", op="fused", shape="N=8 H=4 V=16", config="kd", mode="fwd+bwd", time=0.0)
    records = [
        dict(base, kind="start", id="a", implementation="ours-triton"),
        dict(base, kind="result", id="a", implementation="ours-triton", status="ok", median_s=1.0),
        dict(base, kind="start", id="b", implementation="naive-eager"),
        dict(kind="section", name="fused", status="timeout", seconds=3.0),
    ]
    summary = summarize(records, dict(dry_run=True))
    assert [c["status"] for c in summary["cases"]] == ["ok", "interrupted"]
    assert summary["status"] == "failed" and summary["failed_cases"] == ["b"]


def test_earlier_results_are_not_overwritten(tmp_path, capsys):
    (tmp_path / "gpu_check.json").write_text("{}")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "gpu_check.json").read_text() == "{}"
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--sections", "tests,bogus"], ["--modes", "bwd"], ["--budget", "5"]])
def test_bad_arguments_are_rejected(argv, tmp_path):
    with pytest.raises(SystemExit) as error:
        gpu_check.main(["--dry-run", "--out", str(tmp_path), *argv])
    assert error.value.code == 2
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_only_the_dry_run_runs(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_gpu_plan_holds_the_headline_comparisons():
    fused = plan("fused", dry_run=False, cuda=True)
    shapes = {item.shape.describe() for item in fused}
    assert shapes == {"N=8192 H=4096 V=128256", "N=8192 H=3584 V=152064"}
    assert all(item.bench_set.dtype == torch.bfloat16 and item.mode == "fwd+bwd" for item in fused)
    for shape in shapes:
        names = {(item.config, item.implementation) for item in fused if item.shape.describe() == shape}
        assert {("caad", "ours-triton"), ("kd", "ours-triton"), ("caad", GEMMS_ALONE), ("kd", GEMMS_ALONE),
                ("caad", "naive-eager"), ("kd", "liger-fused-jsd"), ("kd", "liger-chunked-jsd")} <= names
    assert fused[0].implementation == GEMMS_ALONE and fused[1].implementation == "ours-triton"
    logits = plan("logits", dry_run=False, cuda=True)
    assert {(i.mode, i.implementation) for i in logits} >= {("fwd", COPY_BOUND), ("fwd+bwd", "ours-triton")}
    compiled = plan("compile", dry_run=False, cuda=True)
    assert {i.implementation for i in compiled} == {"naive-compile"} and len(compiled) == 4


@pytest.mark.parametrize(
    "config,plausibility,mode,count",
    [(CAAD, 0.0, "fwd+bwd", 4), (CAAD, 0.0, "fwd", 2), (CAAD, 0.1, "fwd+bwd", 5), (CAAD, 0.1, "fwd", 3),
     (PLAIN_KD, 0.0, "fwd+bwd", 4), (PLAIN_KD, 0.1, "fwd+bwd", 4)],
)
def test_the_fused_bound_counts_the_gemms_the_op_needs(config, plausibility, mode, count):
    from dataclasses import replace

    shape = Shape("fused", 64, 128, 32, 48)
    gemms = fused_gemms(shape, replace(config, plausibility=plausibility), mode)
    assert len(gemms) == count
    teacher = [g for g in gemms if g[0].startswith("teacher")]
    assert all(hidden == 48 for _, _, hidden in teacher)  # teacher GEMMs at the teacher's hidden size
    assert len(teacher) == (2 if config.negative and plausibility > 0 else 1)
