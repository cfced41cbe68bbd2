"""The prepared GPU check (issue 11): ``make gpu-check``, or ``python -m bench.gpu_check``.

One H100/H200 is lent to some sessions only, for 15 minutes of device time in all (start-up
included), so this script does everything the first GPU session must measure in one call of
under 8 minutes, and returns what it measured even when a part fails or runs out of time.

How to run it on the device (the device tool's ``run``; see /work/.library/device/README.md)
---------------------------------------------------------------------------------------------
1. Here, once, from the project root: ``../shared/tools/device-wheels.sh`` (fills ``.whl/`` with
   liger-kernel, deepspeed and the other wheels the GPU image lacks; Python 3.12).
2. ``git rev-parse HEAD`` here (add ``-dirty`` if ``git status --porcelain`` prints anything): the
   copy of the tree on the device has no ``.git``, so the commit is passed in ``CAAD_COMMIT``.
3. Call ``run`` with ``carry: [".whl"]``, ``timeout_s: 600`` and this command (three lines, or
   one with ``;`` between them; about 250 characters)::

     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || echo NO WHEELS
     export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CAAD_COMMIT=<commit>
     python3 -m bench.gpu_check

   (``make gpu-check`` runs the same script; the plain ``python3 -m`` form does not need ``make``
   on the image.) The results go to ``$OUT`` (the tool brings its files back), else to
   ``--out``; the last lines printed are the summary. Without the wheels the check still runs:
   Liger-Kernel's rows are reported as skipped.
4. Copy ``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.png`` to ``bench/results/gpu/`` and
   commit them (with ``gpu_check.log`` if something failed).

What it does (sections, in this order, each in its own process with its own time budget)
----------------------------------------------------------------------------------------
- ``tests``: ``pytest tests/test_gpu_kernels.py tests/test_triton_rows.py`` and the attention-KD CUDA test,
  compiled on CUDA
  (``TRITON_INTERPRET=0``): bf16/fp16/fp32, production vocabularies and tile sizes, a case with
  ``rows x V > 2**31``, bad labels, gradient scaling, the memory contract.
- ``fused``: the fused-linear op forward+backward at N=8192, H=4096, V=128256 and H=3584,
  V=152064 in bf16, configs ``caad`` and ``kd``: ours (Triton), the GEMMs alone, the naive eager
  loss, Liger-Kernel's fused-linear JSD and its chunked JSD (config ``kd``), each checked against
  a reference first, with time and peak memory.
- ``logits``: the logits op at N=8192, V=128256 (then 152064) against the copy bandwidth.
- ``compile``: the naive loss under ``torch.compile`` at the fused shapes (last: compiling is slow).

Budgets: ``--budget`` seconds in all (default 420), shared as tests 170 : fused 110 : logits 45 :
compile 75, less 20 s for the report; time a section leaves unused goes to the next. A section
past its deadline is interrupted (SIGINT, then SIGKILL) and reported as "timeout" with what it
measured so far. Every measurement is appended to ``gpu_check.jsonl`` the moment it is made, and
``gpu_check.json``/``.md``/``.png`` are rewritten after every section. Exit status 0 when every
section passed, 1 otherwise, 2 for bad arguments.

``--dry-run`` runs the same sections on the CPU at tiny shapes (float32, our C++ kernels standing
in for Triton, the CUDA-only tests and implementations reported as skipped, ``torch.compile``
skipped): ``tests/test_gpu_check.py`` runs it in ``make test``. It writes no GPU figure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.gpu_check_plan import SECTIONS
from bench.gpu_check_report import clean, console, read_records, write_outputs
from bench.machine import REPO_ROOT, cpu_model, git_commit, package_version

DEFAULT_BUDGET = 420.0
SHARES = dict(tests=170.0, fused=110.0, logits=45.0, compile=75.0)
REPORT_RESERVE = 20.0  # seconds kept for the report and the interruption grace periods
TEST_FILES = (
    "tests/test_gpu_kernels.py",
    "tests/test_triton_rows.py",
    "tests/test_attention_kd.py::test_cuda_triton_against_the_reference_and_memory",
)
DRY_RUN_TEST_FILES = ("tests/test_gpu_kernels.py",)  # the interpreter would take minutes on the others
OUTPUT_NAMES = ("gpu_check.jsonl", "gpu_check.log", "gpu_check.json", "gpu_check.md", "gpu_check.png",
                "gpu_check_junit.xml")
GRACE = dict(tests=10.0, worker=5.0)  # seconds between SIGINT and SIGKILL
JSONL_NAME, LOG_NAME, JUNIT_NAME = "gpu_check.jsonl", "gpu_check.log", "gpu_check_junit.xml"


@dataclass
class ChildResult:
    """How a section's process ended."""

    returncode: int | None
    timed_out: bool
    seconds: float


def section_deadlines(sections: list[str], start: float, budget: float) -> dict[str, float]:
    """Absolute deadlines: each section's share of ``budget - REPORT_RESERVE``, cumulative, so time a
    section leaves unused goes to the next one."""
    usable = max(budget - REPORT_RESERVE, 1.0)
    total = sum(SHARES[name] for name in sections) or 1.0
    deadlines, elapsed = {}, 0.0
    for name in sections:
        elapsed += SHARES[name] / total * usable
        deadlines[name] = start + elapsed
    return deadlines


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, deadline: float, grace: float,
              poll: Callable[[], None] = lambda: None) -> ChildResult:
    """Run ``cmd`` in its own process group, output appended to ``log_path``; past ``deadline``
    interrupt the group (SIGINT), then kill it (SIGKILL) after ``grace`` seconds. ``poll`` runs
    about once a second while it is running."""
    start = time.time()
    with open(log_path, "ab") as log:
        log.write(f"\n===== {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            while True:
                try:
                    proc.wait(timeout=max(0.05, min(1.0, deadline - time.time())))
                    break
                except subprocess.TimeoutExpired:
                    poll()
                    if time.time() >= deadline:
                        timed_out = True
                        _stop(proc, grace)
                        break
        except BaseException:  # this process interrupted: leave nothing of the child's group running
            _stop(proc, 0.0)
            raise
    poll()
    return ChildResult(proc.returncode, timed_out, time.time() - start)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT to the child's process group (pytest then writes its report); SIGKILL to the group after
    ``grace`` seconds or once the child has exited, so none of its own children outlive it."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def log_tail(log_path: Path, offset: int, lines: int = 15) -> str:
    """The last ``lines`` lines a section wrote to the log after ``offset``."""
    text = log_path.read_bytes()[offset:].decode(errors="replace") if log_path.exists() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


# --- the tests section ---------------------------------------------------------------------------------

# `pytest -v` prints "tests/x.py::test_a PASSED [ 10%]"; under pytest-xdist the status comes first
OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
NODE_ID = re.compile(r"(tests/\S+\.py::\S+)")
STARTED_LINE = re.compile(r"^(tests/\S+::\S+)\s*$")


def parse_junit(path: Path) -> list[dict] | None:
    """Per test ``{"id", "outcome", "message"}`` from pytest's JUnit XML, or ``None`` when there is none."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    results = []
    for case in root.iter("testcase"):
        if not case.get("name"):  # the entry of a test cut off by an interruption
            continue
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}.py::{case.get('name')}" if module else case.get("name", "?")
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, (element.get("message") or element.text or "").strip()
                break
        results.append(dict(id=test_id, outcome=outcome, message=message[:1000]))
    return results


def parse_verbose_log(text: str) -> tuple[list[dict], str | None]:
    """Outcomes from ``pytest -v`` lines (for a run cut off before its XML), and the test that was running."""
    results, running = [], None
    outcomes = dict(PASSED="passed", FAILED="failed", SKIPPED="skipped", ERROR="error", XFAIL="skipped",
                    XPASS="passed")
    for line in text.splitlines():
        line = line.strip()
        node, outcome = NODE_ID.search(line), OUTCOME.search(line)
        if node and outcome and not line.startswith(("FAILED ", "ERROR ", "SKIPPED ")):  # not the -r summary
            message = line[max(node.end(), outcome.end()):].strip()
            results.append(dict(id=node.group(1), outcome=outcomes[outcome.group(1)], message=message))
            running = None
        elif match := STARTED_LINE.match(line):
            running = match.group(1)
    return results, running


def run_tests(out: Path, env: dict[str, str], deadline: float, dry_run: bool, write) -> dict:
    files = [f for f in (DRY_RUN_TEST_FILES if dry_run else TEST_FILES) if (REPO_ROOT / f.split("::")[0]).exists()]
    junit = out / JUNIT_NAME
    cmd = [sys.executable, "-m", "pytest", *files, "-v", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={60 if dry_run else 180}")
    if len(files) > 1 and importlib.util.find_spec("xdist") is not None:
        # one process per file: the files' Triton compilations overlap (the small tests of the second file
        # need little GPU memory beside the first file's large ones)
        cmd += ["-n", str(len(files)), "--dist", "loadfile"]
    log_path = out / LOG_NAME
    offset = log_path.stat().st_size if log_path.exists() else 0
    print(f"[tests] {shlex.join(cmd[1:])}", flush=True)
    result = run_child(cmd, env, log_path, deadline, GRACE["tests"])
    text = log_path.read_bytes()[offset:].decode(errors="replace")
    verbose, running = parse_verbose_log(text)
    results = parse_junit(junit) if not result.timed_out else None
    results = results if results is not None else verbose
    counts = {key: sum(r["outcome"] == key for r in results) for key in ("passed", "failed", "error", "skipped")}
    record = dict(command="python -m pytest " + " ".join(files), files=files, returncode=result.returncode,
                  timed_out=result.timed_out, seconds=result.seconds, passed=counts["passed"],
                  failed=counts["failed"], errors=counts["error"], skipped=counts["skipped"], results=results,
                  running_at_timeout=running if result.timed_out else None)
    write(kind="tests", section="tests", **record)
    if result.timed_out:
        status = "timeout"
    elif counts["failed"] or counts["error"] or result.returncode not in (0, 5):
        status = "failed"
    else:
        status = "passed"
    message = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
               f"{counts['skipped']} skipped")
    if result.timed_out:
        message += f"; cut off at the budget while running {running or '?'}"
    elif result.returncode not in (0, 1, 5):
        message += f"; pytest exited with {result.returncode}; its last lines:\n{log_tail(log_path, offset)}"
    return dict(status=status, seconds=result.seconds, returncode=result.returncode, message=message)


# --- the benchmark sections ----------------------------------------------------------------------------


class Progress:
    """Prints the worker's results as they land in the JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def __call__(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            self.show(line)

    @staticmethod
    def show(line: str) -> None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return
        if record.get("kind") == "abort":
            print(f"  ABORT {record.get('section')}: {record.get('reason')}", flush=True)
        if record.get("kind") != "result":
            return
        head = (f"  [{record['section']}] {record['implementation']} {record['config']} {record['mode']} "
                f"{record['shape']}")
        if record["status"] == "ok":
            peak = record.get("peak_bytes")
            extra = "" if peak is None else f", peak {peak / 2**20:.1f} MiB"
            print(f"{head}: {record['median_s'] * 1e3:.3f} ms{extra}", flush=True)
        else:
            text = record.get("reason") or record.get("error") or ""
            print(f"{head}: {record['status'].upper()} {text[:200]}", flush=True)


def run_worker(section: str, out: Path, env: dict[str, str], deadline: float, dry_run: bool, modes: str) -> dict:
    jsonl, log_path = out / JSONL_NAME, out / LOG_NAME
    offset = log_path.stat().st_size if log_path.exists() else 0
    cmd = [sys.executable, "-m", "bench.gpu_check_worker", "--section", section, "--jsonl", str(jsonl),
           "--deadline", f"{deadline:.3f}", "--modes", modes] + (["--dry-run"] if dry_run else [])
    print(f"[{section}] up to {max(deadline - time.time(), 0):.0f} s", flush=True)
    result = run_child(cmd, env, log_path, deadline + 2.0, GRACE["worker"], Progress(jsonl))
    records = [r for r in read_records(jsonl) if r.get("section") == section]
    results = [r for r in records if r.get("kind") == "result"]
    started = {r["id"] for r in records if r.get("kind") == "start"}
    finished = {r["id"] for r in results}
    failed = [r["id"] for r in results if r.get("status") == "failed"]
    counts = {key: sum(r.get("status") == key for r in results) for key in ("ok", "skipped", "failed")}
    message = f"{counts['ok']} measured, {counts['skipped']} skipped, {counts['failed']} failed"
    if result.timed_out:
        status = "timeout"
        cut = sorted(started - finished)
        message += f"; cut off at the budget while running {', '.join(cut) or 'its set-up'}"
    elif result.returncode != 0:
        status = "failed"
        message += f"; the worker exited with {result.returncode}; its last lines:\n{log_tail(log_path, offset)}"
    else:
        status = "failed" if failed else "passed"
    return dict(status=status, seconds=result.seconds, returncode=result.returncode, message=message)


# --- the driver ----------------------------------------------------------------------------------------


def invocation() -> str:
    program = Path(sys.argv[0])
    head = "python -m bench.gpu_check" if program.name in ("gpu_check.py", "__main__.py") else program.name
    return " ".join([head, shlex.join(sys.argv[1:])]).strip()


def nvidia_smi_name() -> str | None:
    """The GPU's name from ``nvidia-smi`` (no CUDA context in this process), or ``None``."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def resolve_commit(given: str | None) -> str:
    commit = git_commit()
    if commit != "unknown":
        return commit
    given = given or os.environ.get("CAAD_COMMIT")
    return given or "unknown (no git checkout here: pass --commit or CAAD_COMMIT)"


def resolve_out(given: Path | None, dry_run: bool) -> Path:
    if given is not None:
        return given
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if dry_run:  # a dry run's CPU numbers never land among the results
        return Path(tempfile.mkdtemp(prefix="caad-gpu-check-dry-run-"))
    return REPO_ROOT / "bench" / "results" / "gpu_check"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description="The prepared GPU check of issue 11 (see the module docstring).")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every section on the CPU at tiny shapes (CUDA-only parts skipped); no GPU figures")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: $OUT when set; else a new temporary folder for --dry-run, "
                        "bench/results/gpu_check otherwise)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET:.0f})")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all, in that order)")
    parser.add_argument("--modes", default="fwd+bwd",
                        help="modes of the fused op, comma-separated: fwd+bwd (default) and/or fwd")
    parser.add_argument("--commit", default=None,
                        help="the commit to record when this tree has no .git (default: $CAAD_COMMIT)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    args = parser.parse_args(argv)
    sections = [name for name in args.sections.split(",") if name]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--sections takes names from {', '.join(SECTIONS)}, got {args.sections!r}")
    modes = [mode for mode in args.modes.split(",") if mode]
    if not modes or any(mode not in ("fwd", "fwd+bwd") for mode in modes):
        parser.error(f"--modes takes fwd and/or fwd+bwd, got {args.modes!r}")
    if not args.budget >= 30:
        parser.error(f"--budget must be at least 30 seconds, got {args.budget}")
    args.sections = [name for name in SECTIONS if name in sections]
    args.modes = ",".join(mode for mode in ("fwd", "fwd+bwd") if mode in modes)
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    args = parse_args(argv)
    out = resolve_out(args.out, args.dry_run)
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not args.overwrite:
        print(f"error: {out} already holds results of a run ({', '.join(existing)}); pass --overwrite to replace "
              "them, or choose another --out", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    cuda, cuda_version = False, None
    if not args.dry_run:  # a dry run does not import torch here (it takes seconds)
        import torch

        cuda, cuda_version = torch.cuda.is_available(), torch.version.cuda  # no CUDA context is created here
        if not cuda:
            print("error: no CUDA device here; on a CPU run `python -m bench.gpu_check --dry-run`", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out / name).unlink()

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with a GPU
    else:
        env["TRITON_INTERPRET"] = "0"  # the point is the compiled kernels
    meta = dict(
        dry_run=args.dry_run,
        command=invocation(),
        commit=resolve_commit(args.commit),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        budget_s=args.budget,
        sections=args.sections,
        device=(nvidia_smi_name() if cuda else None) or f"{cpu_model()}, {os.cpu_count()} cores",
        python=sys.version.split()[0],
        torch=package_version("torch"),
        cuda=cuda_version,
        triton=package_version("triton"),
        liger_kernel=package_version("liger-kernel"),
        deepspeed=package_version("deepspeed"),
        out=str(out),
        files=[name for name in OUTPUT_NAMES],
    )
    jsonl = out / JSONL_NAME
    jsonl.touch()

    def write(**record: object) -> None:
        with open(jsonl, "a") as handle:
            handle.write(json.dumps(clean(dict(record, time=time.time()))) + "\n")

    print(f"GPU check{' (dry run)' if args.dry_run else ''}: {meta['device']}; commit {meta['commit']}; "
          f"budget {args.budget:.0f} s; results in {out}", flush=True)
    deadlines = section_deadlines(args.sections, start, args.budget)
    summary = write_outputs(out, read_records(jsonl), meta)
    for name in args.sections:
        budget = deadlines[name] - time.time()
        if budget < 5:
            outcome = dict(status="not run", seconds=0.0, message="no time left in the budget")
        elif name == "tests":
            outcome = run_tests(out, env, deadlines[name], args.dry_run, write)
        elif name == "compile" and args.dry_run:
            outcome = dict(status="skipped", seconds=0.0, message="--dry-run skips torch.compile (it compiles for "
                           "tens of seconds on a CPU; `pytest bench/` runs it on the CPU headline shapes)")
        else:
            outcome = run_worker(name, out, env, deadlines[name], args.dry_run, args.modes)
        write(kind="section", name=name, budget_s=round(budget, 1), **outcome)
        print(f"[{name}] {outcome['status']} in {outcome['seconds']:.1f} s: {outcome.get('message', '')}", flush=True)
        meta["elapsed_s"] = time.time() - start
        summary = write_outputs(out, read_records(jsonl), meta)
    print(console(summary, out), flush=True)
    return 0 if summary["status"] == "passed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
