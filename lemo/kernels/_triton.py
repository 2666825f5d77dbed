"""Triton, when installed: the one import guard of the kernels (`import lemo` never needs Triton).

`triton` and `tl` are None without it (the kernels' callers fall back to torch or raise); the interpreter
(TRITON_INTERPRET=1, set before the kernels are imported) runs them on CPU tensors.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpreter_on", "tl", "triton"]


def interpreter_on() -> bool:
    """TRITON_INTERPRET is set (to anything but 0): the kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
