"""Compile the Triton row kernels for a CUDA target without a GPU (run by ``tests/test_triton_compile.py``).

The interpreter (``TRITON_INTERPRET=1``, how every other test runs the kernels on the CPU) executes the
kernels' Python, so it never type-checks them the way the compiler does: a helper whose branches return
different types, a constexpr used as a tensor or a register spill only shows when compiling. This script
imports the kernels in compiled mode and lowers each specialisation below through Triton's whole pipeline
(TTIR, TTGIR, LLVM IR, PTX, and a cubin through the ``ptxas`` Triton ships) for ``sm_90``. Nothing runs.

Usage: ``TRITON_INTERPRET=0 python tests/triton_compile_check.py`` prints one JSON line per
specialisation (name, seconds, shared memory) and exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

#: The compile target: ``GPUTarget("cuda", ARCH, WARP_SIZE)``.
ARCH, WARP_SIZE = 90, 32
_INDEX_POINTERS = {"labels_ptr": "*i64", "limit_ptr": "*i64", "flags_ptr": "*i32"}
_LOGIT_POINTERS = ("s_ptr", "t_ptr", "n_ptr", "grad_ptr")
_INT_ARGS = {"V", "ignore_index", "g_stride"}


def signature(kernel: Any, dtype: str, constexprs: dict[str, object]) -> dict[str, str]:
    """Triton's signature of ``kernel``: logits (and the gradient) in ``dtype``, statistics in fp32."""
    types: dict[str, str] = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in _LOGIT_POINTERS:
            types[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            types[name] = _INDEX_POINTERS.get(name, "*fp32")
        elif name in _INT_ARGS or name.endswith("_T") or "_stride" in name:
            types[name] = "i32"
        else:
            types[name] = "fp32"
    return types


def _flags(on: bool, divergence: int) -> dict[str, object]:
    names = ("HAS_NEGATIVE", "HAS_CUTOFF", "HAS_LABELS", "HAS_CE", "PER_ROW_ALPHA", "HAS_LIMIT", "S_CAP", "T_CAP")
    return {**{name: on for name in names}, "DIVERGENCE": divergence}


#: (name, kernel name in ``triton_rows``, logits dtype, constexprs, num_warps): every flag on and every flag off,
#: each divergence, both kernels, the production tiles of :func:`triton_rows.launch_config` for 2- and 4-byte
#: inputs.
SPECIALISATIONS = [
    ("forward-all-on-mixture-bf16", "_forward_kernel", "bf16",
     {**_flags(True, 2), "TAU_IS_ONE": False, "WRITE_GRAD": True, "BLOCK_V": 4096}, 16),
    ("forward-all-off-forward-fp32", "_forward_kernel", "fp32",
     {**_flags(False, 0), "TAU_IS_ONE": True, "WRITE_GRAD": False, "BLOCK_V": 2048}, 8),
    ("forward-labels-limit-reverse-fp16", "_forward_kernel", "fp16",
     {**_flags(False, 1), "HAS_LABELS": True, "HAS_CE": True, "HAS_LIMIT": True, "TAU_IS_ONE": False,
      "WRITE_GRAD": True, "BLOCK_V": 1024}, 4),
    ("backward-all-on-mixture-bf16", "_backward_kernel", "bf16",
     {**_flags(True, 2), "BLOCK_V": 4096}, 16),
    ("backward-all-off-forward-fp32", "_backward_kernel", "fp32",
     {**_flags(False, 0), "BLOCK_V": 2048}, 8),
]  # fmt: skip


def main() -> int:
    # only here, never at import (a test imports SPECIALISATIONS): the process's Triton must compile, so the
    # kernels' helpers are jit functions, and that is decided when triton_rows is imported
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from caad_kernels.backends import triton_rows

    target = GPUTarget("cuda", ARCH, WARP_SIZE)
    for name, kernel_name, dtype, constexprs, num_warps in SPECIALISATIONS:
        kernel = getattr(triton_rows, kernel_name)
        unknown = set(constexprs) - set(kernel.arg_names)
        if unknown:
            raise SystemExit(f"{name}: {sorted(unknown)} are not parameters of {kernel.fn.__name__}")
        started = time.perf_counter()
        source = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
        compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
        if "cubin" not in compiled.asm:
            raise SystemExit(f"{name}: no cubin was produced")
        seconds = round(time.perf_counter() - started, 2)
        print(json.dumps({"name": name, "seconds": seconds, "shared_bytes": compiled.metadata.shared}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
