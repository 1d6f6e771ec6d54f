"""Pieces shared by the SSA kernels: constants, the row tiling of query heads, launcher helpers, and the
``@triton.jit`` building blocks of the branch kernels (tile loads, the online-softmax steps, the backward steps and
the prologues/epilogues the forward, dQ and dK/dV kernels of every branch share)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: log2(e): kernels work with exp2, scores are scaled by ``scale * LOG2E``.
LOG2E = math.log2(math.e)

LOG2E_C = tl.constexpr(LOG2E)

#: Supported input dtypes of the kernels (bfloat16 only on the GPU: the interpreter's bf16 dot is wrong).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Largest top-k the scoring kernel keeps in registers.
MAX_TOPK = 64

#: Coefficients (constant term first) of the cubic that :func:`exp2_fma` evaluates for ``2^f``, ``|f| <= 1/2``:
#: fitted for the least maximum relative error (7.5e-5 in float32, against bfloat16's rounding step of 3.9e-3).
EXP2_CUBIC = (0.9999280571937561, 0.6932610273361206, 0.2426111400127411, 0.05517145246267319)
#: ``1.5 * 2^23``: added to a float32 of magnitude below ``2^22``, it leaves that number rounded to an integer in
#: the low mantissa bits (and subtracted again, the rounded value itself).
ROUND_MAGIC = 12582912.0
#: Arguments of :func:`exp2_fma` are clamped to this (``2^-125``, the least exponent its bit arithmetic keeps
#: normal); scores this far below the row's maximum weigh nothing in a float32 sum.
EXP2_FMA_MIN = -125.0
# the same, as constants a jitted function may read
_EXP2_C0, _EXP2_C1, _EXP2_C2, _EXP2_C3 = (tl.constexpr(c) for c in EXP2_CUBIC)
_ROUND_MAGIC_C = tl.constexpr(ROUND_MAGIC)
_EXP2_FMA_MIN_C = tl.constexpr(EXP2_FMA_MIN)


@triton.jit
def exp2_fma(x):
    """``2^x`` for ``x <= 0`` on the FMA and integer units instead of the special-function unit (``tl.exp2``):
    ``x = j + f`` with ``j`` the nearest integer (magic-number rounding) and ``|f| <= 1/2``; ``2^f`` by the cubic
    :data:`EXP2_CUBIC` (relative error 7.5e-5); ``2^j`` added to the result's exponent bits. At head dim 32 a score
    costs 64 multiply-adds in the matrix units but one exponential, and the special-function unit does 16 of those
    per clock and SM, so the exponentials bound the kernels; computing some tiles' exponentials here moves that work
    to units with 8x the throughput (the launch setting ``fma_exp_every``). Below :data:`EXP2_FMA_MIN` (``-inf``
    included) it gives ``2^-125``, not 0: callers mask where a score may be absent."""
    x = tl.maximum(x, _EXP2_FMA_MIN_C)
    r = x + _ROUND_MAGIC_C
    f = x - (r - _ROUND_MAGIC_C)
    p = _EXP2_C3 * f + _EXP2_C2
    p = p * f + _EXP2_C1
    p = p * f + _EXP2_C0
    bits = p.to(tl.int32, bitcast=True) + (r.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2(x, FMA: tl.constexpr):
    """``2^x``: :func:`exp2_fma` when ``FMA``, else ``tl.exp2`` (the special-function unit)."""
    if FMA:
        return exp2_fma(x)
    return tl.exp2(x)


@triton.jit
def _fma_turn(i, FMA_EVERY: tl.constexpr):
    """Whether step ``i`` of a loop (0, 1, ...) takes its exponentials from :func:`exp2_fma`: the last of every
    ``FMA_EVERY`` steps (``FMA_EVERY >= 1``; callers branch on ``FMA_EVERY > 0`` first, so that the kernel without
    it compiles as before). Tested once per step, the same for every row of the program."""
    return i % FMA_EVERY == FMA_EVERY - 1


def fma_every(cfg: dict, dtype: torch.dtype) -> int:
    """A launch configuration's ``fma_exp_every`` for half-precision inputs; 0 for float32 ones, whose
    probabilities are not rounded to 8 mantissa bits and would see the cubic's 7.5e-5 (:data:`EXP2_CUBIC`)."""
    return 0 if dtype == torch.float32 else cfg.get("fma_exp_every", 0)


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


@triton.jit
def _batch_ranges(token_batch, batch_offsets, tok, row_ok):
    """Per-row range ``[lo_r, hi_r)`` of ``batch_offsets`` (a CSR table over batch elements) of each row's batch
    element, and their union's bounds ``lo, hi`` over the valid rows (a tile may straddle batch elements)."""
    b = tl.load(token_batch + tok, mask=row_ok, other=0)
    lo_r = tl.load(batch_offsets + b, mask=row_ok, other=0)
    hi_r = tl.load(batch_offsets + b + 1, mask=row_ok, other=0)
    lo = tl.min(tl.where(row_ok, lo_r, 2147483647))
    hi = tl.max(hi_r)
    return lo_r, hi_r, lo, hi


@triton.jit
def _full_tiles_end(k_lo, k_hi, lo, hi, row_ok, BLOCK_N: tl.constexpr):
    """Where a program's whole key tiles end: ``lo + whole tiles`` when every valid row's keys are all of ``[lo,
    hi)`` (rows of one batch element), else ``lo`` (every tile masked). ``k_lo, k_hi``: each row's range, as
    :func:`_batch_ranges` gives it with ``lo, hi``."""
    one_batch = (tl.max(tl.where(row_ok, k_lo, -1)) == lo) & (tl.min(tl.where(row_ok, k_hi, 2147483647)) == hi)
    return tl.where(one_batch, lo + (hi - lo) // BLOCK_N * BLOCK_N, lo)


@triton.jit
def _load_rows(P, tok64, head, d, stride_t, stride_h, mask):
    """Rows ``[R, BLOCK_D]`` of a ``[N, H, D]`` tensor (q, dO): token ``tok64``, head ``head``, 0 where masked."""
    return tl.load(P + tok64[:, None] * stride_t + head[:, None] * stride_h + d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_kv(K, V, key64, g, d, stride_kt, stride_kh, mask):
    """The key and value tiles ``[N, BLOCK_D]`` of kv head ``g`` at key tokens ``key64 [N]`` (int64), 0 where masked."""
    kv_off = key64[:, None] * stride_kt + g * stride_kh + d[None, :]
    k = tl.load(K + kv_off, mask=mask, other=0.0)
    v = tl.load(V + kv_off, mask=mask, other=0.0)
    return k, v


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


def group_tiling(group: int, rows: int, max_heads: int = 16) -> tuple[int, int]:
    """``(heads, tokens)`` of a query tile of about ``rows`` rows over a kv group of ``group`` query heads: the
    group's heads per program (:func:`head_split`) and the tokens that fill the tile with them
    (:func:`tokens_per_tile`)."""
    hg = head_split(group, max_heads)
    return hg, tokens_per_tile(hg, rows)


def check_kernel_dtype(t: torch.Tensor, name: str = "q") -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the kernels, got {t.dtype}")
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        raise TypeError("bfloat16 kernels need a GPU (Triton's CPU interpreter computes bf16 products wrongly)")


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse2, delta, sgn, valid_t, qk_scale, PRECISION: tl.constexpr,
               SIGNED: tl.constexpr, FMA_EXP: tl.constexpr = False):
    """One key-outer backward step: add this query tile's contribution to the key tile's dK and dV.

    ``k, v [N, D]`` (the key tile), ``q, do [R, D]``, ``lse2, delta [R]`` from :func:`_grad_rows` (the
    gate's magnitude already in ``lse2``), ``sgn [R]`` the gates' signs, ``valid_t [N, R]``. ``SIGNED``: apply
    the signs to the columns of ``P^T`` (the kernel variant that runs when some gate is negative,
    :func:`ssa_kernels.gate.fold_gate`). Works on transposed scores (``S^T = K Q^T``) so that ``P^T`` and
    ``dS^T`` come out of the matrix unit in the layout the next products need; ``q`` and ``do`` go from memory
    to the matrix unit untouched. ``dk`` is not yet scaled. ``FMA_EXP``: the exponentials from :func:`exp2_fma`.
    """
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.where(valid_t, _exp2(s_t - lse2[None, :], FMA_EXP), 0.0)
    if SIGNED:
        p_t = p_t * sgn[None, :]
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _online_softmax_step(m, l, acc, q, k, v, valid, qk_scale, PRECISION: tl.constexpr,
                         FMA_EXP: tl.constexpr = False, MASKED: tl.constexpr = True):
    """One forward step over a key tile ``k, v [N, D]`` for query rows ``q [R, D]``: the running max ``m [R]``
    (log2 domain), normaliser ``l [R]`` and unnormalised output ``acc [R, D]`` (float32), masked by ``valid [R, N]``;
    without ``MASKED`` every (row, key) pair counts and ``valid`` is not read. ``FMA_EXP``: the scores'
    exponentials from :func:`exp2_fma`.

    The raw scores ``s`` are masked and maximised unscaled (``qk_scale > 0``: the scaled row maximum is the raw one
    times the scale) and scaled inside the exponent, ``exp2(s * qk_scale - m)``: one fused multiply-add per score
    where scaling first and masking the scaled scores cost a multiply, a select and a subtraction (the select keeps
    the compiler from fusing the other two)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    x = s * qk_scale - m_safe[:, None]
    if FMA_EXP:
        p = exp2_fma(x)
        if MASKED:
            p = tl.where(valid, p, 0.0)
    else:
        p = tl.exp2(x)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _online_softmax_turn(m, l, acc, q, k, v, valid, qk_scale, PRECISION: tl.constexpr, i, FMA_EVERY: tl.constexpr,
                         MASKED: tl.constexpr = True):
    """:func:`_online_softmax_step` as step ``i`` (0, 1, ...) of a loop whose every ``FMA_EVERY``-th step takes its
    exponentials from :func:`exp2_fma` (:func:`_fma_turn`; 0: never, and ``i`` is not read)."""
    if FMA_EVERY > 0:
        if _fma_turn(i, FMA_EVERY):
            m, l, acc = _online_softmax_step(m, l, acc, q, k, v, valid, qk_scale, PRECISION, True, MASKED)
        else:
            m, l, acc = _online_softmax_step(m, l, acc, q, k, v, valid, qk_scale, PRECISION, False, MASKED)
    else:
        m, l, acc = _online_softmax_step(m, l, acc, q, k, v, valid, qk_scale, PRECISION, False, MASKED)
    return m, l, acc


@triton.jit
def _softmax_finish(m, l, acc):
    """``(o [R, D], lse [R])`` from the running state; lse in natural log, ``-inf`` for rows that saw no key."""
    l_safe = tl.where(l > 0, l, 1.0)
    lse = tl.where(l > 0, (m + tl.log2(l_safe)) / LOG2E_C, float("-inf"))
    return acc / l_safe[:, None], lse


@triton.jit
def _softmax_start(R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The empty running state of :func:`_online_softmax_step` for ``R`` query rows: ``(m, l, acc)``."""
    m = tl.full([R], float("-inf"), tl.float32)
    l = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BLOCK_D], tl.float32)
    return m, l, acc


@triton.jit
def _softmax_store(O, LSE, m, l, acc, tok64, head, d, H, stride_ot, stride_oh, row_ok, rd_mask):
    """Forward epilogue: :func:`_softmax_finish`, then store ``o`` (in ``O``'s dtype, rows token ``tok64`` x head
    ``head``) and ``lse`` (``LSE [N, H]`` float32); returns the stored ``o``."""
    o, lse = _softmax_finish(m, l, acc)
    o = o.to(O.dtype.element_ty)
    tl.store(O + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :], o, mask=rd_mask)
    tl.store(LSE + tok64 * H + head, lse, mask=row_ok)
    return o


@triton.jit
def _dq_step(dq, q, k, v, do, lse2, delta, valid, qk_scale, PRECISION: tl.constexpr, MASKED: tl.constexpr,
             FMA_EXP: tl.constexpr = False):
    """One query-outer backward step: add a key tile's contribution to ``dq [R, D]`` (not yet scaled); without
    ``MASKED`` every (row, key) pair is valid and ``valid`` is not read. ``FMA_EXP``: the exponentials from
    :func:`exp2_fma`."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        p = tl.where(valid, _exp2(s - lse2[:, None], FMA_EXP), 0.0)
    else:
        p = _exp2(s - lse2[:, None], FMA_EXP)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_turn(dq, q, k, v, do, lse2, delta, valid, qk_scale, PRECISION: tl.constexpr, MASKED: tl.constexpr, i,
             FMA_EVERY: tl.constexpr):
    """:func:`_dq_step` as step ``i`` of a loop whose every ``FMA_EVERY``-th step takes its exponentials from
    :func:`exp2_fma` (as :func:`_online_softmax_turn`)."""
    if FMA_EVERY > 0:
        if _fma_turn(i, FMA_EVERY):
            dq = _dq_step(dq, q, k, v, do, lse2, delta, valid, qk_scale, PRECISION, MASKED, True)
        else:
            dq = _dq_step(dq, q, k, v, do, lse2, delta, valid, qk_scale, PRECISION, MASKED, False)
    else:
        dq = _dq_step(dq, q, k, v, do, lse2, delta, valid, qk_scale, PRECISION, MASKED)
    return dq


@triton.jit
def _grad_rows(LSE2, DELTA, tok64, head, H, row_ok):
    """``(lse2 [R], delta [R])`` of query rows: the log-sum-exp in the log2 domain with the gate folded in
    (:func:`ssa_kernels.gate.fold_gate`) and rowsum(dO * o_branch)."""
    lse2 = tl.load(LSE2 + tok64 * H + head, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + tok64 * H + head, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _gate_sign(GATE, tok64, row_ok, GATE_IDX: tl.constexpr):
    """``[R]`` +-1: the sign of each row's gate ``GATE[token, GATE_IDX]`` (its magnitude is in ``lse2``)."""
    gv = tl.load(GATE + tok64 * 3 + GATE_IDX, mask=row_ok, other=1.0)
    return tl.where(gv < 0, -1.0, 1.0)


@triton.jit
def _grad_query_rows(Q, DO, LSE2, DELTA, tok64, head, d, H, stride_qt, stride_qh, stride_dt, stride_dh, row_ok,
                     rd_mask):
    """``(q, do [R, BLOCK_D], lse2, delta [R])`` of query rows (token ``tok64``, head ``head``) for a backward step."""
    q = _load_rows(Q, tok64, head, d, stride_qt, stride_qh, rd_mask)
    do = _load_rows(DO, tok64, head, d, stride_dt, stride_dh, rd_mask)
    lse2, delta = _grad_rows(LSE2, DELTA, tok64, head, H, row_ok)
    return q, do, lse2, delta


@triton.jit
def _dq_store(DQ, GATE, dq, scale, tok64, head, d, H, row_ok, rd_mask, D: tl.constexpr, HAS_GATE: tl.constexpr,
              GATE_IDX: tl.constexpr, ACCUMULATE: tl.constexpr):
    """dQ epilogue of a query-outer kernel: scale ``dq [R, BLOCK_D]``, apply the gates' signs (their magnitudes are
    in ``lse2``) once per row, and store it into ``DQ [N, H, D]`` float32 (added to when ``ACCUMULATE``)."""
    dq = dq * scale
    if HAS_GATE:
        dq = dq * _gate_sign(GATE, tok64, row_ok, GATE_IDX)[:, None]
    dq_off = tok64[:, None] * (H * D) + head[:, None] * D + d[None, :]
    if ACCUMULATE:
        dq += tl.load(DQ + dq_off, mask=rd_mask, other=0.0)
    tl.store(DQ + dq_off, dq, mask=rd_mask)


@triton.jit
def _dkdv_store(DK, DV, dk, dv, scale, key64, g, hkv, d, kv_mask, D: tl.constexpr, ACCUMULATE: tl.constexpr):
    """dK/dV epilogue of a key-outer kernel: scale ``dk``, and store both tiles of keys ``key64`` (int64), kv head
    ``g`` into ``DK, DV [N, Hkv, D]`` float32 (added to when ``ACCUMULATE``)."""
    dk = dk * scale
    out = (key64[:, None] * hkv + g) * D + d[None, :]
    if ACCUMULATE:
        dk += tl.load(DK + out, mask=kv_mask, other=0.0)
        dv += tl.load(DV + out, mask=kv_mask, other=0.0)
    tl.store(DK + out, dk, mask=kv_mask)
    tl.store(DV + out, dv, mask=kv_mask)


@triton.jit
def _dkdv_rows(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H, qk_scale,
               stride_qt, stride_qh, stride_dt, stride_dh, G: tl.constexpr, HG: tl.constexpr,
               PRECISION: tl.constexpr, GATE_IDX: tl.constexpr, SIGNED: tl.constexpr, FMA_EXP: tl.constexpr = False):
    """:func:`_dkdv_step` for query tokens ``tok64`` (row r = token r // HG) and every head of kv group ``g``,
    ``HG`` heads per matrix product. ``GATE`` is read only by the ``SIGNED`` variant."""
    if SIGNED:
        sgn = _gate_sign(GATE, tok64, row_ok, GATE_IDX)
    else:
        sgn = tl.full(r.shape, 1.0, tl.float32)  # unused
    for hs in tl.static_range(G // HG):
        head = g * G + hs * HG + r % HG
        q, do, lse2, delta = _grad_query_rows(Q, DO, LSE2, DELTA, tok64, head, d, H, stride_qt, stride_qh,
                                              stride_dt, stride_dh, row_ok, rd_mask)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse2, delta, sgn, valid_t, qk_scale, PRECISION, SIGNED, FMA_EXP)
    return dk, dv


@triton.jit
def _dkdv_rows_turn(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H, qk_scale,
                    stride_qt, stride_qh, stride_dt, stride_dh, G: tl.constexpr, HG: tl.constexpr,
                    PRECISION: tl.constexpr, GATE_IDX: tl.constexpr, SIGNED: tl.constexpr, i,
                    FMA_EVERY: tl.constexpr):
    """:func:`_dkdv_rows` as step ``i`` of a loop whose every ``FMA_EVERY``-th step takes its exponentials from
    :func:`exp2_fma` (as :func:`_online_softmax_turn`)."""
    if FMA_EVERY > 0:
        if _fma_turn(i, FMA_EVERY):
            dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H,
                                qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, PRECISION, GATE_IDX,
                                SIGNED, True)
        else:
            dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H,
                                qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, PRECISION, GATE_IDX,
                                SIGNED, False)
    else:
        dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, GATE, LSE2, DELTA, tok64, g, r, d, row_ok, rd_mask, valid_t, H,
                            qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, G, HG, PRECISION, GATE_IDX, SIGNED)
    return dk, dv


@triton.jit
def _signed_variant_runs(NEG, HAS_GATE: tl.constexpr, SIGNED: tl.constexpr):
    """Whether this launch of a key-outer backward kernel does the work: without gates the unsigned variant;
    with gates the signed one exactly when ``NEG [1]`` (some gate is negative) is set, else the unsigned one."""
    if HAS_GATE:
        neg = tl.load(NEG) != 0
    else:
        neg = tl.program_id(0) < 0  # no gate: no sign
    return neg == SIGNED
