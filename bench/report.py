"""Turn a pytest-benchmark JSON of ``pytest bench/`` into a markdown report and PNG plots.

    python -m bench.report RESULTS.json [--out bench/results]

Writes ``<out>/<stem>.md`` (header with device, commit, date and commands; a headline table; the
full table) and ``<out>/<stem>_<op>_<config>_<mode>.png`` (time and peak memory against N and
against V, one line per implementation) for every op/config/mode with a sweep of two or more
points. ``<stem>`` is the JSON file's name without its extension.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IMPL_ORDER = [
    "ours-triton",
    "ours-cpp",
    "ours-torch",
    "naive-eager",
    "naive-compile",
    "liger-fused-jsd",
    "liger-chunked-jsd",
    "liger-jsd",
    "liger-kldiv",
]
BASELINE = "naive-eager"
MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    """One benchmark of the JSON, flattened."""

    implementation: str
    op: str
    mode: str
    config: str
    shape: str
    n: int
    v: int
    h_s: int
    h_t: int
    sweeps: tuple[str, ...]
    headline: bool
    label: str
    dtype: str
    median_s: float
    peak_bytes: int | None
    bound_s: float | None
    fraction: float | None
    rounds: int

    @property
    def group(self) -> tuple:
        return (self.op, self.config, self.mode, self.shape, self.dtype)

    @property
    def sort_key(self) -> tuple:
        order = impl_rank(self.implementation)
        return (
            self.op,
            self.config,
            self.mode,
            self.n,
            self.v,
            self.h_s,
            self.h_t,
            order,
            self.implementation,
        )


def load_rows(data: dict) -> list[Row]:
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "implementation" not in info:
            continue
        dims = info.get("dims", {})
        median = bench["stats"]["median"]
        rows.append(
            Row(
                implementation=info["implementation"],
                op=info["op"],
                mode=info["mode"],
                config=info["config"],
                shape=info["shape"],
                n=dims.get("N", 0),
                v=dims.get("V", 0),
                h_s=dims.get("H_s", 0),
                h_t=dims.get("H_t", 0),
                sweeps=tuple(dims.get("sweeps", ())),
                headline=bool(dims.get("headline")),
                label=dims.get("label", ""),
                dtype=info.get("dtype", ""),
                median_s=median,
                peak_bytes=info.get("peak_bytes"),
                bound_s=info.get("bound_seconds"),
                fraction=(info["bound_seconds"] / median) if info.get("bound_seconds") and median else None,
                rounds=bench["stats"].get("rounds", 0),
            )
        )
    return sorted(rows, key=lambda row: row.sort_key)


def speedups(rows: list[Row]) -> dict[int, float | None]:
    """``id(row) -> naive-eager median / row median`` within the row's group (``None`` without a baseline)."""
    baseline = {row.group: row.median_s for row in rows if row.implementation == BASELINE}
    return {id(row): (baseline[row.group] / row.median_s if row.group in baseline else None) for row in rows}


def _fmt(value: float | None, pattern: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, pattern) + suffix


def markdown_table(rows: list[Row], speedup: dict[int, float | None]) -> list[str]:
    lines = [
        "| implementation | op | mode | config | shape | dtype | median ms | peak MiB | bound ms "
        "| fraction of bound | speed-up vs naive |",
        "|---|---|---|---|---|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        shape = f"{row.shape} ({row.label})" if row.label else row.shape
        peak = None if row.peak_bytes is None else row.peak_bytes / MIB
        bound = None if row.bound_s is None else row.bound_s * 1e3
        lines.append(
            f"| {row.implementation} | {row.op} | {row.mode} | {row.config} | {shape} | {row.dtype} "
            f"| {row.median_s * 1e3:.1f} | {_fmt(peak, '.2f')} | {_fmt(bound, '.1f')} "
            f"| {_fmt(row.fraction, '.1%')} | {_fmt(speedup[id(row)], '.2f', 'x')} |"
        )
    return lines


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(data: dict, source: Path, argv: list[str]) -> list[str]:
    info = data.get("machine_info", {}).get("caad_bench", {})
    commit = info.get("commit") or data.get("commit_info", {}).get("id", "unknown")
    report_commit = git_commit()
    device = info.get("device", data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?"))
    liger = info.get("liger_kernel") or "not installed"
    lines = [
        f"# caad_kernels benchmarks: `{source.name}`",
        "",
        f"- **device**: {device}",
        f"- **commit** (benchmarked): `{commit}`"
        + ("" if report_commit in commit else f"; report written at `{report_commit}`"),
        f"- **date**: {data.get('datetime', '?')}",
        f"- **benchmark command**: `{info.get('command', 'pytest bench/')}`",
        f"- **report command**: `{' '.join(['python -m bench.report', shlex.join(argv)])}`",
        f"- **software**: torch {info.get('torch', '?')}, liger-kernel {liger}, "
        f"{info.get('torch_threads', '?')} torch threads",
        "",
        "Every implementation's loss and gradients were checked against a chunked float64 (CPU) / "
        "float32 (CUDA) reference on the benchmark's own inputs before timing. `fwd`: the loss with "
        "nothing requiring a gradient; `fwd+bwd`: loss and `backward()`. Our ops ran with "
        "`check_finite=False`. Peak memory is what one call allocated above what was already held "
        "(CUDA: `max_memory_allocated`; CPU: the process's `VmHWM`). Bound: copy bandwidth (logits op) "
        "or the GEMMs alone (fused op), measured in "
        "the same run; fraction of bound = bound / median. See bench/README.md.",
        "",
    ]
    return lines


def impl_rank(name: str) -> int:
    """Position of an implementation in tables and legends: ours, then the baselines, then Liger."""
    return IMPL_ORDER.index(name) if name in IMPL_ORDER else len(IMPL_ORDER)


def write_report(source: Path, out: Path, argv: list[str]) -> Path:
    data = json.loads(source.read_text())
    rows = load_rows(data)
    out.mkdir(parents=True, exist_ok=True)
    stem = source.stem
    speedup = speedups(rows)
    from bench.plots import plot_sweeps

    plots = plot_sweeps(rows, out, stem)
    lines = header(data, source, argv)
    headline = [row for row in rows if row.headline]
    if headline:
        lines += ["## Headline", "", *markdown_table(headline, speedup), ""]
    lines += ["## All cases", "", *markdown_table(rows, speedup), ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{path.stem}]({path.name})" for path in plots]
        lines.append("")
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json=...)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    args = parser.parse_args(argv)
    path = write_report(args.results, args.out, argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
