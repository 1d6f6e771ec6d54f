"""The gate mix ``o = gate0 * o_cmp + gate1 * o_sel + gate2 * o_win`` and its backward preprocessing.

The forward mix is fused into the window kernel (the last branch to run: it reads ``o_cmp`` and ``o_sel`` for its
rows and writes ``o``). The backward needs, per token and head, the three sums ``s_i = sum_d dO * o_i``: the gate
gradients are ``dgate[t, i] = sum_h s_i[t, h]`` and each branch's softmax backward needs its
``delta_i = gate_i * s_i``. One pass over dO and the three branch outputs computes all of them in float32.

``do, o_cmp, o_sel, o_win [N, Hq, D]``, ``gate [N, 3]`` -> ``dgate [N, 3]``, ``delta [3, N, Hq]`` float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_d

#: Tokens per program of the preprocessing kernel.
GATE_BLOCK_T = 4


@triton.jit
def _gate_bwd_kernel(
    DO, OC, OS, OW, GATE, DGATE, DELTA,
    N, H,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < N
    mask = t_ok[:, None, None] & (h < H)[None, :, None] & (d < D)[None, None, :]
    off = (t.to(tl.int64)[:, None, None] * H + h[None, :, None]) * D + d[None, None, :]
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    th_mask = t_ok[:, None] & (h < H)[None, :]
    th_off = t.to(tl.int64)[:, None] * H + h[None, :]
    for i in tl.static_range(3):
        if i == 0:
            o = tl.load(OC + off, mask=mask, other=0.0)
        elif i == 1:
            o = tl.load(OS + off, mask=mask, other=0.0)
        else:
            o = tl.load(OW + off, mask=mask, other=0.0)
        s = tl.sum(do * o.to(tl.float32), 2)  # [BLOCK_T, BLOCK_H]
        gv = tl.load(GATE + t.to(tl.int64) * 3 + i, mask=t_ok, other=0.0).to(tl.float32)
        tl.store(DELTA + i * N * H + th_off, s * gv[:, None], mask=th_mask)
        tl.store(DGATE + t.to(tl.int64) * 3 + i, tl.sum(s, 1).to(DGATE.dtype.element_ty), mask=t_ok)


@triton.jit
def _row_dot_kernel(A, B, OUT, N, H, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (t < N)[:, None, None] & (h < H)[None, :, None] & (d < D)[None, None, :]
    off = (t.to(tl.int64)[:, None, None] * H + h[None, :, None]) * D + d[None, None, :]
    a = tl.load(A + off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + t.to(tl.int64)[:, None] * H + h[None, :], tl.sum(a * b, 2), mask=(t < N)[:, None] & (h < H)[None, :])


def row_dot(a, b):
    """``sum_d a[t, h, d] * b[t, h, d]`` -> ``[N, Hq]`` float32 (the softmax ``delta`` of one branch), in one pass
    and without float32 copies of the inputs. ``a, b [N, Hq, D]`` contiguous."""
    n, hq, dim = a.shape
    out = torch.empty(n, hq, device=a.device, dtype=torch.float32)
    if n:
        _row_dot_kernel[(triton.cdiv(n, GATE_BLOCK_T),)](
            a, b, out, n, hq, D=dim, BLOCK_T=GATE_BLOCK_T, BLOCK_H=triton.next_power_of_2(hq), BLOCK_D=block_d(dim),
        )
    return out


def gate_backward(do, o_cmp, o_sel, o_win, gate):
    """``(dgate [N, 3] in gate's dtype, delta [3, N, Hq] float32)``; all inputs contiguous."""
    n, hq, dim = do.shape
    dgate = torch.empty_like(gate)
    delta = torch.empty(3, n, hq, device=do.device, dtype=torch.float32)
    if n:
        _gate_bwd_kernel[(triton.cdiv(n, GATE_BLOCK_T),)](
            do, o_cmp, o_sel, o_win, gate, dgate, delta, n, hq,
            D=dim, BLOCK_T=GATE_BLOCK_T, BLOCK_H=triton.next_power_of_2(hq), BLOCK_D=block_d(dim),
        )
    return dgate, delta
