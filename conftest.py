"""Repository-wide pytest setup: without CUDA, Triton kernels run through the interpreter on CPU tensors.

The switch must be set before any module defines a ``@triton.jit`` function, hence here, at the root.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
