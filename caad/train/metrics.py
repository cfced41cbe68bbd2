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


def plot_losses(metrics: str | os.PathLike[str], out: str | os.PathLike[str], title: str = "training") -> Path | None:
    """Plot the training loss, its ``*_loss`` components, the validation loss and the LR against the step.

    Validation points (``val_loss``, from records that hold it) are drawn as markers on the same
    axes. Returns ``None`` when there are no records.
    """
    records = read_metrics(metrics)
    train = [r for r in records if r.get("loss") is not None]
    validation = [r for r in records if r.get("val_loss") is not None]
    if not train and not validation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    components = sorted(
        {k for r in train for k in r if k.endswith("_loss") and k != "loss" and not k.startswith("val_")}
    )
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key in ("loss", *components):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            label = "train" if key == "loss" else key.removesuffix("_loss").upper()
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 50 else None)
    if validation:
        points = [(r["step"], r["val_loss"]) for r in validation]
        ax.plot(*zip(*points), label="validation", marker="o", linestyle="--", color="black")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    lr_points = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
    if lr_points:
        ax_lr.plot(*zip(*lr_points), color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
