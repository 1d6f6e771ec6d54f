"""The GELU step of an MLP's backward pass in one pass over the hidden layer.

``gelu_grad_(pre [R, H], dact [R, H]) -> [H]``: in place, ``pre`` becomes ``act = GELU_tanh(pre)`` and ``dact``
becomes ``dpre = dact * GELU_tanh'(pre)``; returned are the column sums of ``dpre`` in float32 (the gradient of the
first linear layer's bias). Computed in float32 with one rounding to the tensors' dtype per value.

Why a kernel: the recomputed MLP's backward (:class:`model.sparse.layers._RecomputedMLP`) needs both the activation
(for the second layer's weight gradient) and the pre-activation's gradient. Through PyTorch that is ``gelu(pre)``,
``gelu_backward(dact, pre)`` and ``dpre.sum(0)``: three kernels, six passes over a ``rows x 4C`` hidden layer (read
pre, write act; read dact and pre, write dpre; read dpre). Here: one kernel, four passes, and no new buffers (the
outputs overwrite the inputs). In the DiT training profile the three took about 64 ms of a 2.5 s step
(reports/dit.md, 216 calls each at 137k tokens).

No autograd. float16 / bfloat16 / float32, contiguous ``[R, H]``, on CUDA; CPU tensors too with
:data:`INTERPRET_ON_CPU` under the Triton interpreter (``TRITON_INTERPRET=1``), for the tests
(tests/test_training_memory.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["KERNEL_DTYPES", "gelu_grad_", "supports"]

#: dtypes the kernel takes.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Rows and columns per program, and warps.
BLOCK_R = 64
BLOCK_H = 128
NUM_WARPS = 4
#: Whether :func:`supports` takes CPU tensors under the Triton interpreter (tests; off: the callers' PyTorch path).
INTERPRET_ON_CPU = False
#: ``sqrt(2 / pi)`` and the cubic coefficient of the tanh approximation of GELU.
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


@triton.jit
def _gelu_grad_kernel(PRE, DACT, PART, R, H, K: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    """Tile ``(program_id(0), program_id(1))`` of ``BLOCK_R x BLOCK_H`` values: ``PRE <- GELU(PRE)``,
    ``DACT <- DACT * GELU'(PRE)``, and ``PART[program_id(0), cols]`` the tile's column sums of the latter (float32)."""
    pid_r, pid_h = tl.program_id(0), tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (r < R)[:, None] & (c < H)[None, :]
    offs = r.to(tl.int64)[:, None] * H + c[None, :]
    x = tl.load(PRE + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(DACT + offs, mask=ok, other=0.0).to(tl.float32)
    z = K * (x + C * x * x * x)
    e = tl.exp(-2.0 * tl.abs(z))  # in (0, 1]: no overflow
    t = tl.where(z >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)  # tanh(z)
    act = 0.5 * x * (1.0 + t)
    d = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * C * x * x))
    tl.store(PRE + offs, act.to(PRE.dtype.element_ty), mask=ok)
    tl.store(DACT + offs, d.to(DACT.dtype.element_ty), mask=ok)
    tl.store(PART + pid_r.to(tl.int64) * H + c, tl.sum(tl.where(ok, d, 0.0), axis=0), mask=c < H)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def supports(pre: torch.Tensor, dact: torch.Tensor) -> bool:
    """Whether :func:`gelu_grad_` takes ``pre`` and ``dact``: contiguous 2-D tensors of one shape, dtype (a
    kernel dtype) and device, on CUDA (or the CPU: :data:`INTERPRET_ON_CPU`)."""
    return (pre.dim() == 2 and pre.shape == dact.shape and pre.dtype == dact.dtype and pre.dtype in KERNEL_DTYPES
            and pre.device == dact.device and pre.is_contiguous() and dact.is_contiguous()
            and (pre.is_cuda or (INTERPRET_ON_CPU and _interpreting())))


def gelu_grad_(pre: torch.Tensor, dact: torch.Tensor) -> torch.Tensor:
    """``pre <- GELU_tanh(pre)``, ``dact <- dact * GELU_tanh'(pre)`` in place; returns the column sums of the new
    ``dact`` (``[H]`` float32). The tensors as :func:`supports` says, else a ``ValueError``."""
    if not (isinstance(pre, torch.Tensor) and isinstance(dact, torch.Tensor)) or not supports(pre, dact):
        raise ValueError("pre and dact must be contiguous 2-D float16/bfloat16/float32 CUDA tensors of one shape, "
                         f"dtype and device, got {_describe(pre)} and {_describe(dact)}")
    rows, cols = pre.shape
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_H))
    part = torch.empty(grid[0], cols, device=pre.device, dtype=torch.float32)
    if rows == 0:
        return part.new_zeros(cols)
    _gelu_grad_kernel[grid](pre, dact, part, rows, cols, K=GELU_K, C=GELU_C, BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H,
                            num_warps=NUM_WARPS)
    return part.sum(0)
