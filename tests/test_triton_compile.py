"""The Triton row kernels compile for a CUDA target (sm_90), checked without a GPU.

Every other Triton test runs the kernels under the interpreter, which never compiles them; this one lowers
each specialisation of ``tests/triton_compile_check.py`` (every constexpr flag on and off, every divergence,
both kernels, the production tile sizes) to a cubin in a subprocess with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("triton_compile_check.py")


def test_triton_row_kernels_compile_for_sm90(tmp_path: Path) -> None:
    # an empty cache: every specialisation is really compiled, not read back from an earlier run
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path),
        "PYTHONPATH": str(SCRIPT.parents[1]),
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert done.returncode == 0, f"compilation failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    compiled = [json.loads(line)["name"] for line in done.stdout.splitlines() if line.startswith("{")]
    before = os.environ.get("TRITON_INTERPRET")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from triton_compile_check import SPECIALISATIONS
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert compiled == [spec[0] for spec in SPECIALISATIONS]
    # importing the plan must leave this process's Triton mode alone (the other Triton tests run after this one)
    assert os.environ.get("TRITON_INTERPRET") == before
