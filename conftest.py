"""Repository-wide pytest set-up, loaded before any test module (for ``pytest tests`` and ``pytest bench/``).

Triton decides once, when it is first imported, whether ``@triton.jit`` functions are compiled for
a GPU or run by its CPU interpreter. On a machine without CUDA the tests need the interpreter, so
``TRITON_INTERPRET=1`` is set here, before anything can import Triton. A value the user set is
kept: on a GPU machine ``TRITON_INTERPRET=0 pytest tests`` (or simply ``pytest tests``, since CUDA
is found) runs the same tests compiled.
"""

from __future__ import annotations

import os


def _decide_triton_mode() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_decide_triton_mode()
