"""Sparse voxel tensors and the layers that take and return them (convolution, norms, resampling, position
embedding, shifted-window attention)."""
from .attention import SparseTransformerBlock, SparseWindowSelfAttention, window_attention, window_partition
from .conv import ConvKernel, SparseConv3d, kernel_offsets, kernel_to_dense_weight, neighbour_map, spconv_available
from .layers import (
    AbsolutePositionEmbedder,
    FeedForward,
    FP32LayerNorm,
    POOL_MODES,
    SparseDownsample,
    SparseGroupNorm,
    SparseLinear,
    SparseSiLU,
    SparseSubdivide,
    group_norm_per_batch,
    pool_coords,
    pool_features,
    pool_map,
    sincos_position_embedding,
    sparse_downsample,
    sparse_subdivide,
)
from .tensor import CoordIndex, SparseTensor

__all__ = [
    "AbsolutePositionEmbedder",
    "ConvKernel",
    "CoordIndex",
    "FP32LayerNorm",
    "FeedForward",
    "POOL_MODES",
    "SparseConv3d",
    "SparseDownsample",
    "SparseGroupNorm",
    "SparseLinear",
    "SparseSiLU",
    "SparseSubdivide",
    "SparseTensor",
    "SparseTransformerBlock",
    "SparseWindowSelfAttention",
    "group_norm_per_batch",
    "kernel_offsets",
    "kernel_to_dense_weight",
    "neighbour_map",
    "pool_coords",
    "pool_features",
    "pool_map",
    "sincos_position_embedding",
    "sparse_downsample",
    "sparse_subdivide",
    "spconv_available",
    "window_attention",
    "window_partition",
]
