"""Spatial Sparse Attention (Direct3D-S2) as Triton kernels.

On a machine without CUDA the kernels run through Triton's interpreter on CPU tensors; it is switched on
here, before any kernel is defined, unless ``TRITON_INTERPRET`` is already set.
"""
import os as _os

import torch as _torch

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"

from .layout import (  # noqa: E402
    check_layout_order,
    compression_block_index,
    layout_keys,
    layout_order,
    num_compression_blocks,
    selection_block_index,
)

__all__ = [
    "check_layout_order",
    "compression_block_index",
    "layout_keys",
    "layout_order",
    "num_compression_blocks",
    "selection_block_index",
]
