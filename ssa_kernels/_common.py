"""Pieces shared by the SSA kernels: constants, the row tiling of query heads, launcher helpers."""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

#: log2(e): kernels work with exp2, scores are scaled by ``scale * LOG2E``.
LOG2E = math.log2(math.e)

#: Is Triton running through its CPU interpreter?
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Supported input dtypes of the kernels (bfloat16 only on the GPU: the interpreter's bf16 dot is wrong).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Largest top-k the scoring kernel keeps in registers.
MAX_TOPK = 64


@triton.jit
def _row_tokens_heads(pid_t, pid_h, N, G: tl.constexpr, HG: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows of a query tile: ``BLOCK_T`` tokens x ``HG`` heads of one kv group, row r = token r // HG, head r % HG.

    Returns (token [R] int32, head [R] int32, row_ok [R], kv head g).
    """
    n_sub = G // HG
    g = pid_h // n_sub
    h0 = g * G + (pid_h % n_sub) * HG
    r = tl.arange(0, BLOCK_T * HG)
    tok = pid_t * BLOCK_T + r // HG
    head = h0 + r % HG
    return tok, head, tok < N, g


def dot_precision(dtype: torch.dtype) -> str:
    """Matrix-product precision: exact fp32 products for fp32 inputs (tf32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def head_split(group: int, max_heads: int) -> int:
    """Heads of one kv group handled by one program: the largest power-of-two divisor of ``group`` <= max_heads."""
    hg = 1
    while hg * 2 <= max_heads and group % (hg * 2) == 0:
        hg *= 2
    return hg


def tokens_per_tile(heads: int, rows: int) -> int:
    """Tokens per tile so that tokens x heads is ``rows`` (at least 16 rows for the matrix units)."""
    return max(1, max(rows, 16) // heads)


def check_kernel_dtype(t: torch.Tensor, name: str = "q") -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the kernels, got {t.dtype}")
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        raise TypeError("bfloat16 kernels need a GPU (Triton's CPU interpreter computes bf16 products wrongly)")


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse2, delta, valid_t, qk_scale, PRECISION: tl.constexpr):
    """One key-outer backward step: add this query tile's contribution to the key tile's dK and dV.

    ``k, v [N, D]`` (the key tile), ``q, do [R, D]``, ``lse2, delta [R]`` (log2-domain log-sum-exp and
    rowsum(dO * O)), ``valid_t [N, R]``. Works on transposed scores (``S^T = K Q^T``) so that ``P^T`` and
    ``dS^T`` come out of the matrix unit in the layout the next products need. ``dk`` is not yet scaled.
    """
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.where(valid_t, tl.exp2(s_t - lse2[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv
