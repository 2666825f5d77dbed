"""Run liger-kernel's Triton kernels on CPU under TRITON_INTERPRET=1 (set by conftest without a GPU).

Two gaps of Triton's interpreter that compiled Triton does not have, patched for the tests only:
float kernel arguments stay Python floats (compiled Triton passes fp32 scalars; Liger calls
`eps.to(tl.float32)`), and a `rsqrt` imported by name from libdevice is not remapped to the
interpreter's math. Skips the calling test when liger-kernel is not installed.
"""

import os

import pytest


def liger_on_this_machine():
    pytest.importorskip("liger_kernel")
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    if getattr(interp._implicit_cvt, "_floats_fp32", False):
        return
    plain = interp._implicit_cvt

    def cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return plain(arg)

    cvt._floats_fp32 = True
    interp._implicit_cvt = cvt
    import liger_kernel.ops.rms_norm as rms_norm

    rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)
