"""Test setup. Without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1), which must
be set before any Triton kernel module is imported; on a GPU machine they run compiled."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
