"""Submanifold 3^3 convolution as one Triton kernel (inference): the GPU path of :mod:`model.sparse.conv`.

The torch backend gathers, multiplies and scatter-adds once per tap: 26 ``index_select`` + GEMM + ``index_add_``
rounds over the whole ``[N, C]`` features, each round reading and writing them again. Decoding a 1024 latent (57M
output voxels) spent 2 of its 3 GPU seconds in those gathers and scatters on an H100 (reports/generate.md,
``--profile decode_1024``). Here each program owns ``BLOCK_M`` output rows and ``BLOCK_N`` output channels and
accumulates ``sum_k x[table[row, k]] @ kernel[k]`` over the 27 taps in registers (float32), reading each neighbour
row from the cache once per tap and writing the output once: an implicit GEMM over a neighbour table.

``table [N, 27]`` int32 holds the input row of each tap's neighbour (-1 where absent; the centre tap is the row
itself), cached per coordinate set (:func:`model.sparse.conv.neighbour_rows`). No autograd: training keeps the
torch backend. spconv does the same on its own tables, but is not installed on our machines (module docstring of
:mod:`model.sparse.conv`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["KERNEL_DTYPES", "conv3_kernel"]

#: Feature dtypes the kernel takes (float32 runs with IEEE products, as PyTorch's default matmul).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Output rows per program.
BLOCK_M = 64
#: Largest channel tiles (output columns, input depth per product).
MAX_BLOCK_N = 64
MAX_BLOCK_K = 64
#: Smallest tile of a ``tl.dot`` operand dimension.
MIN_DOT = 16
#: Warps and software pipelining stages per program.
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _subm_conv3_kernel(
    X, W, BIAS, TABLE, OUT,
    num_rows, cin, cout,
    TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``OUT[rows, cols] = BIAS[cols] + sum_tap X[TABLE[rows, tap]] @ W[tap]`` for one tile of rows x columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < cout
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(TAPS):
        src = tl.load(TABLE + rows.to(tl.int64) * TAPS + tap, mask=row_ok, other=-1)
        present = src >= 0
        src = tl.where(present, src, 0).to(tl.int64)
        for k0 in range(0, cin, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < cin
            a = tl.load(X + src[:, None] * cin + ks[None, :], mask=present[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + (tap * cin + ks[:, None]) * cout + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptr = OUT + rows.to(tl.int64)[:, None] * cout + cols[None, :]
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _tile(n: int, largest: int) -> int:
    return max(MIN_DOT, min(largest, triton.next_power_of_2(n)))


def conv3_kernel(feats: torch.Tensor, table: torch.Tensor, kernel: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``feats [N, Cin]``, ``table [N, 27]`` int32, ``kernel [27, Cin, Cout]``, ``bias [Cout]`` or None ->
    ``[N, Cout]`` in ``feats.dtype`` (float32 accumulation). CUDA tensors (or CPU ones under the Triton
    interpreter); no autograd."""
    if feats.dtype not in KERNEL_DTYPES:
        raise TypeError(f"feats must be one of {KERNEL_DTYPES}, got {feats.dtype}")
    n, cin = feats.shape
    taps, kin, cout = kernel.shape
    if kin != cin or table.shape != (n, taps) or table.dtype != torch.int32:
        raise ValueError(f"shapes do not match: feats {tuple(feats.shape)}, table {tuple(table.shape)} "
                         f"{table.dtype}, kernel {tuple(kernel.shape)}")
    feats = feats.contiguous()
    kernel = kernel.to(feats.dtype).contiguous()
    out = torch.empty(n, cout, dtype=feats.dtype, device=feats.device)
    if n == 0:
        return out
    block_n, block_k = _tile(cout, MAX_BLOCK_N), _tile(cin, MAX_BLOCK_K)
    grid = (triton.cdiv(n, BLOCK_M), triton.cdiv(cout, block_n))
    _subm_conv3_kernel[grid](
        feats, kernel, bias.to(feats.dtype).contiguous() if bias is not None else feats, table.contiguous(), out,
        n, cin, cout,
        TAPS=taps, HAS_BIAS=bias is not None, IEEE=feats.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
