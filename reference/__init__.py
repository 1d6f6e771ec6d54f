"""Dense PyTorch reference of Spatial Sparse Attention (float64-capable): the oracle of the kernel tests."""
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
    "compression_attention",
    "select_blocks",
    "selection_attention",
    "spatial_sparse_attention",
    "window_attention",
]
