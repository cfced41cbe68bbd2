"""C++ (OpenMP) CPU row kernels, built just in time (see ``caad_kernels.backends`` for the contract).

The extension (``csrc/contrastive_kd.cpp`` with ``csrc/contrastive_kd_tiles.h``) is compiled on first
use with ``torch.utils.cpp_extension.load`` (ninja) into a build directory keyed by a hash of the
sources, the torch version, the Python ABI, the compiler and the flags, under
``$CAAD_KERNELS_CACHE`` (default ``$XDG_CACHE_HOME/caad_kernels`` or ``~/.cache/caad_kernels``), so
later processes reuse it without recompiling (ninja finds the outputs up to date; torch's file lock
serialises concurrent builds). The first build prints one line on stderr saying so and naming the
cache (it takes 20-60 s). The binary is portable across x86-64 CPUs: the tile kernels are compiled
for the baseline ISA and for AVX2+FMA+F16C and the best set is chosen at run time, so the cache key
needs no CPU model and no ``-march=native``.

The kernels accumulate in float32 and accept float32, bfloat16 and float16 tensors on the CPU;
float64 raises a TypeError (``backend="auto"`` sends float64 to the torch backend). Rows whose label
is ``ignore_index`` are skipped entirely: their ``kd``, ``ce`` and ``stats`` are 0 and they are never
read. Each entry point returns the contract's int32 row ``flags`` too (non-finite inputs, labels out
of range), found while the rows are read.

``loss_and_grad_rows`` (used by the fused-linear op, which knows the coefficients in advance) runs each
row's gradient sweep right after its forward sweeps, while the row is still in cache, and forms
``log p``/``log q`` from the row's maxima and sums rather than from the rounded ``lse``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

from caad_kernels.options import RowParams
from caad_kernels.rows import RowView

SOURCE_NAME = "contrastive_kd.cpp"
# -fno-trapping-math lets GCC if-convert the selects of the hot loops (`w > 0 ? w * x : 0`), without
# which they do not vectorise; -ffp-contract=fast lets the AVX2+FMA build fuse multiply-adds (ISO C++
# modes default to off). Neither changes IEEE semantics of inf/NaN values (no -ffast-math).
EXTRA_CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast")
EXTRA_LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: RuntimeError | None = None
_announced = False


def source_directory() -> Path:
    """The C++ sources: ``caad_kernels/_csrc`` in an installed package, else the repository's ``csrc``."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / SOURCE_NAME).is_file():
            return candidate
    raise RuntimeError(
        f"caad_kernels: the C++ sources ({SOURCE_NAME}) are missing: looked in {package / '_csrc'} and "
        f"{package.parent / 'csrc'}"
    )


def cache_root() -> Path:
    """Where builds are cached: ``$CAAD_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/caad_kernels``."""
    explicit = os.environ.get("CAAD_KERNELS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "caad_kernels"


def build_key() -> str:
    """Hex digest over everything that changes the binary or its build commands: sources, their directory,
    torch, Python ABI, compiler, flags.

    The directory is part of the build commands (source path, ``-I``): two checkouts with the same sources
    sharing one cache directory would make ninja rebuild, in turn, under each other's feet.
    """
    digest = hashlib.sha256()
    directory = source_directory()
    digest.update(str(directory.resolve()).encode() + b"\0")
    for path in sorted(directory.glob("contrastive_kd*")):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    for part in (
        torch.__version__,
        str(torch.version.git_version),
        sys.version,
        str(sysconfig.get_config_var("EXT_SUFFIX")),
        platform.machine(),
        os.environ.get("CXX", "c++"),
        " ".join(EXTRA_CFLAGS),
        " ".join(EXTRA_LDFLAGS),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def build_directory() -> Path:
    """The cache directory of the current sources and toolchain (it may not exist yet)."""
    return cache_root() / f"contrastive_kd_{build_key()[:16]}"


def load_extension() -> ModuleType:
    """Build (first time) or load (from the cache) the extension module; thread- and process-safe.

    Raises RuntimeError with the reason when it cannot be built (no compiler, no ninja, a compile
    error); the failure is remembered for the rest of the process.
    """
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise _failure
        try:
            _module = _build()
        except Exception as error:
            _failure = RuntimeError(
                "caad_kernels: could not build the C++ CPU kernels (backend='cpp'); they need a C++17 "
                f"compiler with OpenMP and ninja (`pip install ninja`). Cause: {type(error).__name__}: {error}"
            )
            _failure.__cause__ = error
            raise _failure from error
        return _module


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja was not found on PATH")
    directory = source_directory()
    key = build_key()
    build_dir = cache_root() / f"contrastive_kd_{key[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _announce_build(build_dir)
    return cpp_extension.load(
        name=f"caad_contrastive_kd_{key[:12]}",
        sources=[str(directory / SOURCE_NAME)],
        extra_cflags=list(EXTRA_CFLAGS),
        extra_ldflags=list(EXTRA_LDFLAGS),
        extra_include_paths=[str(directory)],
        build_directory=str(build_dir),
        verbose=os.environ.get("CAAD_KERNELS_VERBOSE") == "1",
    )


def _announce_build(build_dir: Path) -> None:
    """Say on stderr, once per process and before the silent ~20 s compile, what happens and where it is cached.

    Nothing is printed when the cache already holds the built library (a later process only loads it).
    """
    global _announced
    if _announced or any(build_dir.glob("*.so")):
        return
    _announced = True
    print(
        f"caad_kernels: compiling the C++ CPU kernels (backend='cpp'; typically 20-60 s, once per source and toolchain "
        f"version) into the cache {build_dir} (set CAAD_KERNELS_CACHE to move it, CAAD_KERNELS_VERBOSE=1 to see "
        "the compiler)",
        file=sys.stderr,
        flush=True,
    )


def _check_inputs(*views: RowView | None) -> None:
    for view in views:
        if view is None:
            continue
        if view.data.device.type != "cpu":
            raise ValueError(f"the cpp backend runs on CPU tensors, got a tensor on {view.data.device}")
        if view.data.dtype == torch.float64:
            raise TypeError(
                "the cpp backend computes in float32 and takes float32/bfloat16/float16 inputs, got float64; "
                "use backend='torch' (which accumulates in float64) or 'auto'"
            )


def _job_args(params: RowParams, alpha_rows: torch.Tensor | None, col_limit: torch.Tensor | None) -> dict[str, object]:
    """Keyword arguments shared by the three entry points (see ``csrc/contrastive_kd.cpp``)."""
    cutoff = params.log_plausibility is not None
    if params.per_row_alpha and alpha_rows is None:
        raise ValueError("params.per_row_alpha is True but no alpha_rows were given")
    scalars = [
        float(params.alpha),
        float(params.inv_temperature),
        float(params.beta),
        float(params.log_plausibility) if cutoff else 0.0,
        float(params.student_scale),
        float(params.teacher_scale),
        float(params.student_softcap or 0.0),
        float(params.teacher_softcap or 0.0),
    ]
    return dict(
        alpha_rows=alpha_rows.float().contiguous() if params.per_row_alpha else None,
        col_limit=None if col_limit is None else col_limit.to(torch.int64).contiguous(),
        scalars=scalars,
        cutoff=cutoff,
        has_ce=bool(params.has_labels),
        ignore_index=int(params.ignore_index),
        vocab=int(params.vocab_size),
    )


def forward_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    params: RowParams,
    *,
    alpha_rows: torch.Tensor | None = None,
    col_limit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kd, ce, stats, flags)``: float32 ``[rows]``, ``[rows]``, ``[rows, 5]``, int32 ``[rows]`` (contract in
    ``backends``). Rows whose label is ``ignore_index`` (or whose ``col_limit`` is <= 0) have ``kd = ce = 0``,
    all-zero ``stats`` and flags 0; with ``col_limit`` (int ``[rows]``) row ``r`` reads only its first
    ``col_limit[r]`` columns.
    """
    ext = load_extension()
    negative = negative if params.has_negative else None
    _check_inputs(student, teacher, negative)
    kd, ce, stats, flags = ext.forward(
        student.data,
        teacher.data,
        None if negative is None else negative.data,
        labels,
        **_job_args(params, alpha_rows, col_limit),
    )
    return kd, ce, stats, flags


def backward_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    coef_kd: torch.Tensor,
    coef_ce: torch.Tensor,
    params: RowParams,
    grad: torch.Tensor,
    *,
    alpha_rows: torch.Tensor | None = None,
    col_limit: torch.Tensor | None = None,
) -> None:
    """Write ``coef_kd * d kd/d x + coef_ce * d ce/d x`` into ``grad`` (``[rows, V]``, unit column stride, the
    student's dtype; it may be the student itself)."""
    ext = load_extension()
    negative = negative if params.has_negative else None
    _check_inputs(student, teacher, negative)
    if grad.device.type != "cpu":
        raise ValueError(f"the cpp backend writes CPU gradients, got grad on {grad.device}")
    ext.backward(
        student.data,
        teacher.data,
        None if negative is None else negative.data,
        labels,
        stats=stats.float().contiguous(),
        coef_kd=coef_kd.float().contiguous(),
        coef_ce=coef_ce.float().contiguous(),
        grad=grad,
        **_job_args(params, alpha_rows, col_limit),
    )


def loss_and_grad_rows(
    student: RowView,
    teacher: RowView,
    negative: RowView | None,
    labels: torch.Tensor | None,
    coef_kd: torch.Tensor,
    coef_ce: torch.Tensor,
    params: RowParams,
    grad: torch.Tensor,
    *,
    alpha_rows: torch.Tensor | None = None,
    col_limit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_rows` and :func:`backward_rows` in one pass, for coefficients known in advance.

    Each row runs its forward sweeps and then, while it is still in cache, its gradient sweep, which
    writes ``coef_kd * d kd/d x + coef_ce * d ce/d x`` into ``grad`` (``[rows, V]``, unit column stride, the
    student's dtype). ``grad`` may be the student itself: a row is read in full before its first
    gradient tile is written (rows split into column segments write only after all their segments
    have been merged). Returns ``(kd, ce, stats, flags)`` exactly as :func:`forward_rows`.
    """
    ext = load_extension()
    negative = negative if params.has_negative else None
    _check_inputs(student, teacher, negative)
    if grad.device.type != "cpu":
        raise ValueError(f"the cpp backend writes CPU gradients, got grad on {grad.device}")
    kd, ce, stats, flags = ext.loss_and_grad(
        student.data,
        teacher.data,
        None if negative is None else negative.data,
        labels,
        coef_kd=coef_kd.float().contiguous(),
        coef_ce=coef_ce.float().contiguous(),
        grad=grad,
        **_job_args(params, alpha_rows, col_limit),
    )
    return kd, ce, stats, flags
