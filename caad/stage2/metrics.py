"""Training metrics: a JSONL file (one object per logged step), TensorBoard when installed, a loss plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "plot_losses", "read_metrics", "truncate_metrics"]


class MetricsLogger:
    """Append step metrics to ``metrics.jsonl`` (flushed per line) and to TensorBoard if available.

    Only the main rank should create one. ``tensorboard=False`` or a missing ``tensorboard`` package
    skips TensorBoard (the event files go to ``<output_dir>/tensorboard``).
    """

    def __init__(self, path: str | os.PathLike[str], *, tensorboard: bool = True, tag: str = "train") -> None:
        self.path = Path(path)
        self.tag = tag
        self._handle = open(self.path, "a", encoding="utf-8")
        self._writer: Any = None
        self.tensorboard_dir: Path | None = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tensorboard_dir = self.path.parent / "tensorboard"
                self._writer = SummaryWriter(str(self.tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``); numbers also go to TensorBoard as ``<tag>/<key>``."""
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{self.tag}/{key}", value, record["step"])

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | os.PathLike[str], last_step: int) -> None:
    """Drop records after ``last_step`` (written after the checkpoint a run resumes from)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_losses(
    metrics: str | os.PathLike[str], out: str | os.PathLike[str], title: str = "Stage 2"
) -> Path | None:
    """Plot total, KD and CE loss (and the learning rate) against the step; ``None`` with no records."""
    records = [r for r in read_metrics(metrics) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for key, label in (("loss", "total"), ("kd_loss", "KD"), ("ce_loss", "CE")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 50 else None)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
