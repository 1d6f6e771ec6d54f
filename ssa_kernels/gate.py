"""The gate mix ``o = gate0 * o_cmp + gate1 * o_sel + gate2 * o_win`` and its backward preprocessing.

The forward mix is fused into the window kernel (the last branch to run: it reads ``o_cmp`` and ``o_sel`` for its
rows and writes ``o``). The backward needs, per token and head, the three sums ``s_i = sum_d dO * o_i``: the gate
gradients are ``dgate[t, i] = sum_h s_i[t, h]``, and ``s_i`` is also the ``delta`` of branch i's softmax backward
(whose kernels fold ``gate_i`` into the log-sum-exp, ``_common._grad_rows``). One pass over dO and the three
branch outputs computes all of them in float32.

``do, o_cmp, o_sel, o_win [N, Hq, D]``, ``gate [N, 3]`` -> ``dgate [N, 3]``, ``delta [3, N, Hq]`` float32.

How the gate enters the branches' backward kernels (:func:`fold_gate`): the gradient of a gated branch is that
of its softmax with ``g P`` in place of ``P``, and ``|g| P = exp2(S - (lse2 - log2|g|))``. So the log-sum-exp is
handed to the kernels in the log2 domain with ``log2|g|`` subtracted, and no product and no ``dO`` row is
scaled by the gate: a gated branch costs what an ungated one does (scaling inside the key-outer kernels pushed
them past the register file and made them spill: reports/kernels.md run 20). ``g = 0`` gives ``+inf``, so
``P = 0`` exactly. The signs are applied apart: to dQ rows at the end of the query-outer kernels, and to the
columns of ``P^T`` in a ``SIGNED`` variant of the key-outer kernels, which does the work only when some gate
is negative (sigmoid gates never are).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E_C, block_d

#: Tokens per program of the preprocessing kernel.
GATE_BLOCK_T = 4


@triton.jit
def _gate_bwd_kernel(
    DO, OC, OS, OW, DGATE, DELTA,
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
        tl.store(DELTA + i * N * H + th_off, s, mask=th_mask)
        tl.store(DGATE + t.to(tl.int64) * 3 + i, tl.sum(s, 1).to(DGATE.dtype.element_ty), mask=t_ok)


@triton.jit
def _fold_gate_kernel(LSE, GATE, LSE2, NEG, N, H, HAS_GATE: tl.constexpr, GATE_IDX: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    t_ok = t < N
    mask = t_ok[:, None] & (h < H)[None, :]
    off = t.to(tl.int64)[:, None] * H + h[None, :]
    lse2 = tl.load(LSE + off, mask=mask, other=0.0) * LOG2E_C
    if HAS_GATE:
        gv = tl.load(GATE + t.to(tl.int64) * 3 + GATE_IDX, mask=t_ok, other=1.0).to(tl.float32)
        g_abs = tl.abs(gv)
        lse2 = tl.where(g_abs[:, None] > 0, lse2 - tl.log2(g_abs)[:, None], float("inf"))
        tl.atomic_max(NEG, tl.max((gv < 0).to(tl.int32)))  # the flag only ever goes up: deterministic
    tl.store(LSE2 + off, lse2, mask=mask)


def fold_gate(lse, gate, gate_idx):
    """``(lse2 [N, H] float32, neg, variants)`` for a branch's backward kernels.

    ``lse2`` = ``lse * log2(e) - log2|gate[:, gate_idx]|`` (``+inf`` where the gate is 0; without a gate just
    ``lse * log2(e)``); ``neg`` ``[1]`` int32, 1 when some gate is negative (found on the device: no host
    synchronisation; 0 without a gate); ``variants``: the ``SIGNED`` values to launch the key-outer
    kernels with. Both variants are launched when there are gates, and the one that does not apply exits at
    once (``_common._signed_variant_runs``). One pass over ``lse`` and the gate column.
    """
    n, hq = lse.shape
    lse2 = torch.empty(n, hq, device=lse.device, dtype=torch.float32)
    neg = torch.zeros(1, device=lse.device, dtype=torch.int32)
    if n:
        _fold_gate_kernel[(triton.cdiv(n, GATE_BLOCK_T * 4),)](
            lse, gate if gate is not None else lse, lse2, neg, n, hq,
            HAS_GATE=gate is not None, GATE_IDX=gate_idx, BLOCK_T=GATE_BLOCK_T * 4,
            BLOCK_H=triton.next_power_of_2(hq),
        )
    return lse2, neg, ((False,) if gate is None else (False, True))


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
            do, o_cmp, o_sel, o_win, dgate, delta, n, hq,
            D=dim, BLOCK_T=GATE_BLOCK_T, BLOCK_H=triton.next_power_of_2(hq), BLOCK_D=block_d(dim),
        )
    return dgate, delta
