"""The GPU check's results: records merged into ``gpu_check.json``, ``gpu_check.md``, ``gpu_check.png``.

Input: the JSON lines of a run (``gpu_check.jsonl``: ``env``, ``start``, ``result`` and ``abort``
records of the workers, ``section`` and ``tests`` records of the driver) and the run's ``meta``
(device, commit, command, versions). :func:`summarize` merges them: per item the last result (an
item started but never finished is "interrupted": its section ran out of time or crashed), the
sections, the tests, and the targets of issue 11 computed from what was measured. The run passed
when every section passed (or was skipped by design) and no row failed or was interrupted; a
baseline that disagrees with the reference is listed but does not fail the run. No torch needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.gpu_check_plan import COPY_BOUND, GEMMS_ALONE
from bench.report import impl_rank

MIB = 1 << 20
OURS = ("ours-triton", "ours-cpp", "ours-torch")
# measured and printed beside their targets (issue 11), never asserted
TARGET_GEMMS = 1.15
TARGET_LIGER = 2.0
TARGET_PEAK = 0.02


def clean(value: object) -> object:
    """JSON-safe: non-finite floats become strings, tuples lists, other objects their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def read_records(path: Path) -> list[dict]:
    """Every complete JSON line of ``path`` (a line cut off by a kill is dropped)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def merge_cases(records: list[dict]) -> list[dict]:
    """One row per item id, in the order the items started or were skipped."""
    rows: dict[str, dict] = {}
    for record in records:
        if record.get("kind") == "start":
            rows.setdefault(record["id"], dict(record, status="interrupted",
                                               reason="started but not finished: its section ran out of time "
                                               "or its process died (see gpu_check.log)"))
        elif record.get("kind") == "result":
            rows[record["id"]] = record
    return list(rows.values())


def find(cases: list[dict], shape: str, config: str, mode: str, names: tuple[str, ...]) -> dict | None:
    for name in names:
        for row in cases:
            if (row.get("shape"), row.get("config"), row.get("mode"), row.get("implementation")) == (
                shape, config, mode, name
            ):
                return row
    return None


def measured(row: dict | None, field: str = "median_s") -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    value = row.get(field)
    return value if isinstance(value, int | float) else None


def ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or not bottom else top / bottom


def targets(cases: list[dict]) -> list[dict]:
    """Issue 11's targets at every fused shape in forward+backward, from the measured rows."""
    out = []
    shapes = list(dict.fromkeys(row["shape"] for row in cases if row.get("op") == "fused"))
    for shape in shapes:
        mode = "fwd+bwd"
        ours = {config: find(cases, shape, config, mode, OURS) for config in ("caad", "kd")}
        gemms = {config: find(cases, shape, config, mode, (GEMMS_ALONE,)) for config in ("caad", "kd")}
        naive = find(cases, shape, "caad", mode, ("naive-eager",))
        liger = find(cases, shape, "kd", mode, ("liger-fused-jsd",))
        items = [
            ("ours CAAD time / its GEMMs alone", ratio(measured(ours["caad"]), measured(gemms["caad"])),
             f"<= {TARGET_GEMMS}", lambda v: v <= TARGET_GEMMS, "x"),
            ("ours KD time / its GEMMs alone", ratio(measured(ours["kd"]), measured(gemms["kd"])),
             f"<= {TARGET_GEMMS}", lambda v: v <= TARGET_GEMMS, "x"),
            ("Liger fused-linear JSD (KD) time / ours CAAD time", ratio(measured(liger), measured(ours["caad"])),
             f">= {TARGET_LIGER}", lambda v: v >= TARGET_LIGER, "x"),
            ("ours CAAD peak memory / naive CAAD peak memory",
             ratio(measured(ours["caad"], "peak_bytes"), measured(naive, "peak_bytes")),
             f"< {TARGET_PEAK:.0%}", lambda v: v < TARGET_PEAK, "%"),
        ]
        for name, value, target, met, unit in items:
            out.append(dict(shape=shape, mode=mode, measure=name, value=value, target=target, unit=unit,
                            met=None if value is None else bool(met(value))))
    return out


def tests_summary(records: list[dict]) -> dict | None:
    tests = [record for record in records if record.get("kind") == "tests"]
    return tests[-1] if tests else None


def environment(records: list[dict]) -> dict:
    envs = [record for record in records if record.get("kind") == "env"]
    with_gpu = [env for env in envs if env.get("gpu_name")]
    return (with_gpu or envs or [{}])[0]


def summarize(records: list[dict], meta: dict) -> dict:
    """Everything of a run in one dict: meta, environment, sections, tests, cases, targets, status."""
    cases = merge_cases(records)
    sections = [record for record in records if record.get("kind") == "section"]
    aborts = [record for record in records if record.get("kind") == "abort"]
    tests = tests_summary(records)
    failed = [row["id"] for row in cases if row.get("status") in ("failed", "interrupted")]
    bad_sections = [s["name"] for s in sections if s.get("status") not in ("passed", "skipped")]
    status = "passed" if not failed and not bad_sections else "failed"
    disagreeing = [row["id"] for row in cases if row.get("status") == "disagrees"]
    return dict(meta=meta, environment=environment(records), status=status, sections=sections, aborts=aborts,
                tests=tests, cases=cases, targets=targets(cases), failed_cases=failed,
                disagreeing_baselines=disagreeing)


# --- markdown ----------------------------------------------------------------------------------------


def fmt(value: float | None, pattern: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, pattern) + suffix


def speedups(cases: list[dict]) -> dict[str, float | None]:
    """``id -> naive-eager median / median`` within the same op, shape, config and mode."""
    naive = {(r["op"], r["shape"], r["config"], r["mode"]): measured(r) for r in cases
             if r.get("implementation") == "naive-eager"}
    return {r["id"]: ratio(naive.get((r.get("op"), r.get("shape"), r.get("config"), r.get("mode"))), measured(r))
            for r in cases if "id" in r and r.get("implementation") not in (GEMMS_ALONE, COPY_BOUND)}


def sorted_cases(rows: list[dict]) -> list[dict]:
    """Shapes in the order they were measured (the plan's), then mode, config and implementation."""
    shapes = list(dict.fromkeys(row.get("shape", "") for row in rows))
    return sorted(rows, key=lambda row: (shapes.index(row.get("shape", "")), row.get("mode", ""), row.get("config", ""),
                                         impl_rank(row.get("implementation", "")), row.get("implementation", "")))


def status_cell(row: dict) -> str:
    if row.get("status") == "ok":
        return "ok"
    text = row.get("reason") or row.get("error") or ""
    return f"{row.get('status')}: {text[:160]}".replace("|", "/").replace("\n", " ")


def fused_table(cases: list[dict]) -> list[str]:
    rows = sorted_cases([r for r in cases if r.get("op") == "fused"])
    if not rows:
        return []
    naive_peak = {(r["shape"], r["config"], r["mode"]): measured(r, "peak_bytes") for r in rows
                  if r.get("implementation") == "naive-eager"}
    speed = speedups(cases)
    lines = ["| shape | config | mode | implementation | median ms | vs GEMMs alone | peak MiB | peak vs naive "
             "| speed-up vs naive | status |", "|---|---|---|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        median = measured(r)
        bound = r.get("bound_seconds") if r.get("implementation") != GEMMS_ALONE else None
        peak = measured(r, "peak_bytes")
        lines.append(
            f"| {r['shape']} ({r.get('label', '')}) | {r['config']} | {r['mode']} | {r['implementation']} "
            f"| {fmt(None if median is None else median * 1e3, '.2f')} | {fmt(ratio(median, bound), '.3f', 'x')} "
            f"| {fmt(None if peak is None else peak / MIB, '.1f')} "
            f"| {fmt(ratio(peak, naive_peak.get((r['shape'], r['config'], r['mode']))), '.2%')} "
            f"| {fmt(speed.get(r['id']), '.2f', 'x')} | {status_cell(r)} |"
        )
    return lines


def logits_table(cases: list[dict]) -> list[str]:
    rows = sorted_cases([r for r in cases if r.get("op") == "logits"])
    if not rows:
        return []
    speed = speedups(cases)
    lines = ["| shape | config | mode | implementation | median ms | fraction of copy bound | peak MiB "
             "| speed-up vs naive | status |", "|---|---|---|---|--:|--:|--:|--:|---|"]
    for r in rows:
        median = measured(r)
        peak = measured(r, "peak_bytes")
        fraction = None if r.get("implementation") == COPY_BOUND else measured(r, "fraction_of_bound")
        detail = r.get("bound_detail") or {}
        name = r["implementation"]
        if name == COPY_BOUND and detail.get("copy_bandwidth_GBps") is not None:
            name += f" ({detail['copy_bandwidth_GBps']} GB/s)"
        lines.append(
            f"| {r['shape']} ({r.get('label', '')}) | {r['config']} | {r['mode']} | {name} "
            f"| {fmt(None if median is None else median * 1e3, '.3f')} | {fmt(fraction, '.1%')} "
            f"| {fmt(None if peak is None else peak / MIB, '.2f')} | {fmt(speed.get(r['id']), '.2f', 'x')} "
            f"| {status_cell(r)} |"
        )
    return lines


def target_value(target: dict) -> str:
    value = target["value"]
    if value is None:
        return "not measured"
    return f"{value:.2%}" if target["unit"] == "%" else f"{value:.3f}x"


def software(env: dict, meta: dict) -> str:
    """Python, torch (CUDA), triton, liger-kernel and deepspeed versions, worker's first, else the driver's."""
    def get(key: str) -> object:
        return env.get(key) or meta.get(key)

    return (
        f"Python {get('python')}, torch {get('torch')} (CUDA {get('cuda')}), triton {get('triton')}, "
        f"liger-kernel {get('liger_kernel') or 'not installed'}, deepspeed {get('deepspeed') or 'not installed'}"
    )


def markdown(summary: dict) -> str:
    meta, env = summary["meta"], summary["environment"]
    title = "GPU check dry run (CPU stand-ins, no GPU figures)" if meta.get("dry_run") else "GPU check"
    lines = [
        f"# {title}: {summary['status']}",
        "",
        f"- **device**: {env.get('device') or meta.get('device', '?')}",
        f"- **commit**: `{meta.get('commit', 'unknown')}`",
        f"- **command**: `{meta.get('command', '?')}`",
        f"- **date (UTC)**: {meta.get('date', '?')}",
        f"- **software**: {software(env, meta)}",
        f"- **time budget**: {meta.get('budget_s')} s; whole run {fmt(meta.get('elapsed_s'), '.0f', ' s')}",
        "",
        "Every benchmarked implementation was first checked against a chunked reference (float32 on CUDA, "
        "float64 on the CPU) on the same inputs; a disagreement fails a row of ours and marks a baseline's "
        "row 'disagrees' (not timed). Times are medians of "
        "device-synchronised calls; peak memory is what one call allocated above what was held before it. "
        "GEMMs alone: the GEMMs the fused op needs, timed alone with torch.matmul; copy bound: the bytes the "
        "logits op must move at the measured copy bandwidth. See bench/README.md.",
        "",
        "## Sections",
        "",
        "| section | status | seconds | budget s | note |",
        "|---|---|--:|--:|---|",
    ]
    for section in summary["sections"]:
        note = str(section.get("message", "")).replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {section['name']} | {section['status']} | {fmt(section.get('seconds'), '.1f')} "
                     f"| {fmt(section.get('budget_s'), '.0f')} | {note} |")
    for section in summary["sections"]:
        message = str(section.get("message", ""))
        if section.get("status") not in ("passed", "skipped") and "\n" in message:
            lines += ["", f"**{section['name']}: {section['status']}**", "", "```", message, "```"]
    tests = summary.get("tests")
    if tests:
        counts = ", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
        lines += ["", "## Kernel tests", "", f"`{tests.get('command', '')}`: {counts}"
                  + (" (cut off by the time budget)" if tests.get("timed_out") else ""), ""]
        for result in tests.get("results", []):
            if result.get("outcome") in ("failed", "error"):
                lines.append(f"- **{result['outcome']}** `{result['id']}`: {result.get('message', '')[:400]}")
        skipped = [r for r in tests.get("results", []) if r.get("outcome") == "skipped"]
        if skipped:
            reasons = sorted({r.get("message", "") for r in skipped})
            lines.append(f"- skipped ({len(skipped)}): " + "; ".join(reasons)[:600])
        if tests.get("running_at_timeout"):
            lines.append(f"- running when the budget ran out: `{tests['running_at_timeout']}`")
    if summary["targets"]:
        lines += ["", "## Targets of issue 11 (measured here, never asserted)", "",
                  "| shape | mode | measure | value | target | met |", "|---|---|---|--:|---|---|"]
        for target in summary["targets"]:
            met = "—" if target["met"] is None else ("yes" if target["met"] else "no")
            lines.append(f"| {target['shape']} | {target['mode']} | {target['measure']} | {target_value(target)} "
                         f"| {target['target']} | {met} |")
    fused, logits = fused_table(summary["cases"]), logits_table(summary["cases"])
    if fused:
        lines += ["", "## Fused-linear op", "", *fused]
    if logits:
        lines += ["", "## Logits op", "", *logits]
    for abort in summary["aborts"]:
        lines += ["", f"**{abort.get('section')} aborted**: {abort.get('reason')}"]
    if meta.get("plot"):
        lines += ["", f"![times and peak memory]({meta['plot']})"]
    return "\n".join(lines) + "\n"


# --- plot ----------------------------------------------------------------------------------------------


def plot(summary: dict, path: Path) -> bool:
    """Bars of median time and peak memory per implementation, one column per shape (fwd+bwd)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summary["cases"] if r.get("mode") == "fwd+bwd" and measured(r) is not None]
    panels = list(dict.fromkeys((r["op"], r["shape"]) for r in rows))
    if not panels:
        return False
    fig, grid = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 7.5), squeeze=False)
    for col, (op, shape) in enumerate(panels):
        subset = [r for r in rows if (r["op"], r["shape"]) == (op, shape)]
        names = sorted({r["implementation"] for r in subset}, key=lambda n: (impl_rank(n), n))
        for line, (field, label, scale) in enumerate((("median_s", "median time (ms)", 1e3),
                                                      ("peak_bytes", "peak memory (MiB)", 1 / MIB))):
            ax = grid[line][col]
            for offset, config in ((-0.2, "caad"), (0.2, "kd")):
                xs, ys = [], []
                for index, name in enumerate(names):
                    value = measured(next((r for r in subset if (r["implementation"], r["config"]) == (name, config)),
                                          None), field)
                    if value:
                        xs.append(index + offset)
                        ys.append(value * scale)
                if xs:
                    ax.bar(xs, ys, width=0.4, label=config)
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"{'fused-linear' if op == 'fused' else 'logits'} {shape}", fontsize=9)
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8)
    meta = summary["meta"]
    fig.suptitle(f"caad_kernels GPU check, fwd+bwd — {summary['environment'].get('device', '?')} @ "
                 f"{str(meta.get('commit', '?'))[:12]}" + (" (dry run)" if meta.get("dry_run") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- console -------------------------------------------------------------------------------------------


def console(summary: dict, out: Path) -> str:
    """A short plain-text summary for the end of the run's output."""
    meta, env = summary["meta"], summary["environment"]
    lines = [
        f"== GPU check{' (dry run)' if meta.get('dry_run') else ''}: {summary['status'].upper()} ==",
        f"device {env.get('device') or '?'}; commit {meta.get('commit')}; {fmt(meta.get('elapsed_s'), '.0f')} s "
        f"of {meta.get('budget_s')} s",
        "sections: " + ", ".join(f"{s['name']} {s['status']} ({fmt(s.get('seconds'), '.0f')} s)"
                                 for s in summary["sections"]),
    ]
    for section in summary["sections"]:
        if section.get("status") not in ("passed", "skipped") and "\n" in str(section.get("message", "")):
            lines.append(f"{section['name']}: {section['message']}")  # with the log's last lines
    tests = summary.get("tests")
    if tests:
        lines.append("tests: " + ", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
                     + (" (cut off)" if tests.get("timed_out") else ""))
        for result in tests.get("results", []):
            if result.get("outcome") in ("failed", "error"):
                lines.append(f"  {result['outcome'].upper()} {result['id']}: {result.get('message', '')[:160]}")
    for target in summary["targets"]:
        lines.append(f"target {target['shape']} {target['measure']}: {target_value(target)} (target "
                     f"{target['target']})")
    ok = [r for r in summary["cases"] if r.get("status") == "ok" and r.get("mode") == "fwd+bwd"]
    for r in sorted_cases(ok):
        peak = measured(r, "peak_bytes")
        lines.append(f"  {r['op']:6} {r['shape']:22} {r['config']:4} {r['implementation']:18} "
                     f"{r['median_s'] * 1e3:10.2f} ms" + ("" if peak is None else f" {peak / MIB:10.1f} MiB"))
    for r in summary["cases"]:
        if r.get("status") in ("failed", "interrupted", "disagrees"):
            lines.append(f"  {r['status'].upper()} {r['id']}: {(r.get('error') or r.get('reason') or '')[:200]}")
    skipped = [r for r in summary["cases"] if r.get("status") == "skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)} rows (reasons in gpu_check.md)")
    lines.append(f"results in {out}: gpu_check.json, gpu_check.md, gpu_check.png, gpu_check.jsonl, gpu_check.log")
    return "\n".join(lines)


def write_outputs(out: Path, records: list[dict], meta: dict) -> dict:
    """Write ``gpu_check.json``, ``gpu_check.png`` and ``gpu_check.md`` in ``out``; return the summary."""
    summary = summarize(records, meta)
    if plot(summary, out / "gpu_check.png"):
        summary["meta"] = dict(meta, plot="gpu_check.png")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(summary))
    return summary
