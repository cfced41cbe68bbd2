"""What is benchmarked: loss configurations, shapes and the CPU/GPU shape sets.

A *case* is one (op, shape, config, implementation, mode) combination. The two ops are
``"logits"`` (``contrastive_kd_loss``) and ``"fused"`` (``fused_linear_contrastive_kd_loss``); the
modes are ``"fwd"`` (the loss, nothing requires a gradient) and ``"fwd+bwd"`` (loss and
``backward()``, gradients of every student input).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

OPS = ("logits", "fused")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class LossConfig:
    """The loss options every implementation of one case computes (docs/math.md)."""

    name: str
    alpha: float
    temperature: float
    kd_weight: float
    ce_weight: float
    temperature_scaling: bool
    negative: bool  # a text-only teacher path is passed
    labels: bool  # pseudo-GT labels are passed (a few rows set to ignore_index)
    plausibility: float = 0.0  # the adaptive plausibility cutoff (0: off)

    @property
    def contrastive(self) -> bool:
        """True when the teacher is the contrastive ``z_hat`` (a negative path and ``alpha != 0``)."""
        return self.negative and self.alpha != 0

    def options(self) -> dict[str, object]:
        """Keyword options of ``contrastive_kd_loss`` and of the naive references."""
        return dict(
            alpha=self.alpha,
            temperature=self.temperature,
            beta=0.0,
            plausibility=self.plausibility,
            kd_weight=self.kd_weight,
            ce_weight=self.ce_weight,
            temperature_scaling=self.temperature_scaling,
            ignore_index=IGNORE_INDEX,
            reduction="mean",
        )


IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05

# CAAD's published setting: contrastive teacher, forward KL, tau=2 with tau^2 scaling, 0.7 KD + 0.3 CE.
CAAD = LossConfig(
    "caad",
    alpha=2.0,
    temperature=2.0,
    kd_weight=0.7,
    ce_weight=0.3,
    temperature_scaling=True,
    negative=True,
    labels=True,
)
# Plain forward-KL distillation, where Liger-Kernel computes the same loss: alpha=0, beta=0, no tau^2.
PLAIN_KD = LossConfig(
    "kd",
    alpha=0.0,
    temperature=2.0,
    kd_weight=1.0,
    ce_weight=0.0,
    temperature_scaling=False,
    negative=False,
    labels=False,
)
CONFIGS = {config.name: config for config in (CAAD, PLAIN_KD)}


@dataclass(frozen=True)
class Shape:
    """Problem size. ``n`` rows (tokens), vocabulary ``v``; hidden sizes for the fused op only.

    ``sweeps`` names the plot axes the shape belongs to ("N", "V"); ``configs`` the loss configs
    it is run with; ``compile`` whether the torch.compile baseline runs on it (compiling is slow);
    ``headline`` whether the report's headline table shows it.
    """

    op: str
    n: int
    v: int
    h_s: int = 0
    h_t: int = 0
    label: str = ""
    sweeps: tuple[str, ...] = ()
    configs: tuple[str, ...] = ("caad",)
    compile: bool = False
    headline: bool = False

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        return (self.op, self.n, self.v, self.h_s, self.h_t)

    def describe(self) -> str:
        """``N=8192 V=128256`` or ``N=8192 H=4096 V=128256`` (``H=2048/4096`` when student/teacher differ)."""
        if self.op == "logits":
            return f"N={self.n} V={self.v}"
        hidden = str(self.h_s) if self.h_s == self.h_t else f"{self.h_s}/{self.h_t}"
        return f"N={self.n} H={hidden} V={self.v}"

    def slug(self) -> str:
        """The shape in test ids, usable with ``pytest -k``: ``N8192_V128256``, ``N8192_H2048x4096_V1024``."""
        if self.op == "logits":
            return f"N{self.n}_V{self.v}"
        hidden = str(self.h_s) if self.h_s == self.h_t else f"{self.h_s}x{self.h_t}"
        return f"N{self.n}_H{hidden}_V{self.v}"

    def as_dict(self) -> dict[str, object]:
        return dict(
            N=self.n,
            V=self.v,
            H_s=self.h_s,
            H_t=self.h_t,
            label=self.label,
            sweeps=list(self.sweeps),
            headline=self.headline,
        )


@dataclass(frozen=True)
class BenchSet:
    """A named set of shapes that runs on one device type in one dtype."""

    name: str
    device_type: str
    dtype: torch.dtype
    shapes: tuple[Shape, ...] = field(default_factory=tuple)


def merge_shapes(shapes: list[Shape]) -> tuple[Shape, ...]:
    """Deduplicate shapes with the same dimensions, uniting their sweeps, configs and flags."""
    merged: dict[tuple, Shape] = {}
    for shape in shapes:
        old = merged.get(shape.key)
        if old is None:
            merged[shape.key] = shape
            continue
        merged[shape.key] = replace(
            old,
            label=old.label or shape.label,
            sweeps=tuple(dict.fromkeys(old.sweeps + shape.sweeps)),
            configs=tuple(dict.fromkeys(old.configs + shape.configs)),
            compile=old.compile or shape.compile,
            headline=old.headline or shape.headline,
        )
    return tuple(merged.values())


def _sweep(
    op: str,
    axis: str,
    values: list[int],
    n: int,
    v: int,
    h_s: int = 0,
    h_t: int = 0,
    configs: tuple[str, ...] = ("caad",),
) -> list[Shape]:
    out = []
    for value in values:
        dims = dict(n=value, v=v) if axis == "N" else dict(n=n, v=value)
        out.append(Shape(op, h_s=h_s, h_t=h_t, sweeps=(axis,), configs=configs, **dims))
    return out


def cpu_set() -> BenchSet:
    """Small fp32 shapes that finish in a few minutes on a 2-core CPU.

    Both configs and the compile baseline run on the headline shape of each op only.
    """
    both = ("caad", "kd")
    logits = [
        Shape("logits", 1024, 8192, configs=both, compile=True, headline=True),
        *_sweep("logits", "N", [1024, 2048, 4096], n=0, v=8192),
        *_sweep("logits", "V", [8192, 16384, 32768], n=1024, v=0),
    ]
    fused = [
        Shape("fused", 512, 8192, 256, 256, configs=both, compile=True, headline=True),
        *_sweep("fused", "N", [512, 1024, 2048], n=0, v=8192, h_s=256, h_t=256),
        *_sweep("fused", "V", [8192, 16384, 32768], n=512, v=0, h_s=256, h_t=256),
        Shape("fused", 1024, 8192, 256, 512, label="student H < teacher H"),
    ]
    return BenchSet("cpu", "cpu", torch.float32, merge_shapes(logits + fused))


def gpu_set() -> BenchSet:
    """bf16 shapes of real models, and sweeps of N and V for the plots (CUDA only)."""
    both = ("caad", "kd")
    llama, qwen = 128256, 152064
    n_sweep = [1024, 2048, 4096, 8192, 16384, 32768]
    v_sweep = [32768, 65536, llama, 262144]
    fused = [
        Shape(
            "fused", 8192, llama, 4096, 4096, label="Llama-3-8B", configs=both, compile=True, headline=True
        ),
        Shape("fused", 8192, qwen, 3584, 3584, label="Qwen2-7B / Qwen2-Audio-7B", configs=both, compile=True),
        Shape("fused", 16384, llama, 4096, 4096, label="Llama-3-8B, 16k tokens", configs=both),
        Shape("fused", 8192, llama, 2048, 4096, label="student H=2048, teacher H=4096", configs=both),
        *_sweep("fused", "N", n_sweep, n=0, v=llama, h_s=4096, h_t=4096, configs=both),
        *_sweep("fused", "V", v_sweep, n=8192, v=0, h_s=4096, h_t=4096, configs=both),
    ]
    logits = [
        Shape("logits", 8192, llama, label="Llama-3-8B", configs=both, compile=True, headline=True),
        Shape("logits", 8192, qwen, label="Qwen2-7B / Qwen2-Audio-7B", configs=both, compile=True),
        Shape("logits", 16384, llama, label="Llama-3-8B, 16k tokens", configs=both),
        *_sweep("logits", "N", n_sweep, n=0, v=llama, configs=both),
        *_sweep("logits", "V", v_sweep, n=8192, v=0, configs=both),
    ]
    return BenchSet("gpu", "cuda", torch.bfloat16, merge_shapes(fused + logits))


BENCH_SETS = {"cpu": cpu_set, "gpu": gpu_set}
