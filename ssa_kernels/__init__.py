"""Spatial Sparse Attention (Direct3D-S2) as Triton kernels.

Public API::

    layout = build_layout(coords, compression_block=8, selection_block=8, window=8)   # once per coordinate set
    o = spatial_sparse_attention(q, k, v, k_cmp, v_cmp, gate, layout, topk=8, shift=0)

and each branch on its own: :func:`compression_attention`, :func:`select_blocks` (scoring + top-k),
:func:`selection_attention`, :func:`window_attention`.

On a machine without CUDA the kernels run through Triton's interpreter on CPU tensors; it is switched on here,
before any kernel is defined, unless ``TRITON_INTERPRET`` is already set.
"""
import os as _os

import torch as _torch

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"

from .layout import (  # noqa: E402
    BlockLayout,
    WindowPartition,
    build_layout,
    check_layout_order,
    compression_block_index,
    layout_keys,
    layout_order,
    num_compression_blocks,
    selection_block_index,
)
from .ssa import (  # noqa: E402
    SelectionRecord,
    compression_attention,
    reusing_selection,
    select_blocks,
    selection_attention,
    spatial_sparse_attention,
    window_attention,
)

__all__ = [
    "BlockLayout",
    "SelectionRecord",
    "WindowPartition",
    "build_layout",
    "check_layout_order",
    "compression_attention",
    "compression_block_index",
    "layout_keys",
    "layout_order",
    "num_compression_blocks",
    "reusing_selection",
    "select_blocks",
    "selection_attention",
    "selection_block_index",
    "spatial_sparse_attention",
    "window_attention",
]
