"""Test setup. Without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1), which must
be set before any Triton kernel module is imported; on a GPU machine they run compiled."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests of a checkout without an install: the baselines' package lives in baselines/lemo_baselines.
_baselines = Path(__file__).resolve().parent.parent / "baselines"
if str(_baselines) not in sys.path:
    sys.path.append(str(_baselines))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
