"""Dense PyTorch reference of Spatial Sparse Attention (float64-capable): the oracle of the kernel tests.

Self-contained: its own layout order (:mod:`reference.layout`) and input checks (:mod:`reference.checks`); it
imports neither :mod:`ssa_kernels` nor Triton.
"""
from .layout import check_layout_order, layout_order
from .ssa import (
    block_ids,
    block_scores,
    compression_attention,
    select_blocks,
    selection_attention,
    spatial_sparse_attention,
    window_attention,
)

__all__ = [
    "block_ids",
    "block_scores",
    "check_layout_order",
    "compression_attention",
    "layout_order",
    "select_blocks",
    "selection_attention",
    "spatial_sparse_attention",
    "window_attention",
]
