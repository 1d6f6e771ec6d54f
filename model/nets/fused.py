"""Fused element-wise work on the GPU: layer norm + adaLN modulation in one pass (the DiT blocks), and group norm
over huge volumes (the refiners).

A DiT block normalises its residual stream three times per layer (RELEASED_MODEL.md D): ``LN(h) * (1 + scale) +
shift`` before the SSA and the MLP, and an affine ``LN(h)`` before the cross-attention. Written as PyTorch ops
(normalise in float32, cast back, scale, shift) each of these reads and writes the ``[N, C]`` stream four to six
times; at 137k tokens x 1024 channels that is ~1.5 ms of memory traffic per norm and about 0.1 s per forward of the
24-block model. :func:`layer_norm_modulate` reads the row once and writes it once, with every intermediate in
float32 (one rounding at the end, where the unfused path rounds after each op).

Only the forward exists (sampling runs without autograd). Under the Triton interpreter (``TRITON_INTERPRET=1``)
:func:`layer_norm_modulate` also takes CPU tensors, for the tests. :func:`norm_modulate` dispatches: the fused kernel
for CUDA tensors when no gradient is recorded, the plain PyTorch ops otherwise (training, CPU, float64), so callers need
not care. ``torch.nn.functional.layer_norm`` alone cannot fold in the per-batch-element modulation, which is why this is
a kernel of ours.

:func:`group_norm` is the refiners' GroupNorm (4 groups over ``[B, C, D, H, W]`` patches of 192^3 / 256^3 voxels).
PyTorch's CUDA group norm reduces each (batch element, group) row in one thread block: 4 blocks for 33M values each,
17 ms per call and 73-86% of a refiner patch on an H100 (reports/refiner.md). Here each row is cut into chunks of
:data:`GROUP_CHUNK` values; one kernel computes every chunk's mean and centred sum of squares in one read (float32),
the chunks are merged exactly (Chan's parallel formula, float64, on ``[rows, chunks]``), and a second kernel writes
``(x - mean) * rstd * weight + bias`` rounded once to the input dtype: two reads and one write of the volume.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["group_norm", "layer_norm_modulate", "norm_modulate", "use_fused"]

#: Warps per program of the row kernel (one row of up to a few thousand channels per program).
NUM_WARPS = 4
#: Dtypes the fused kernel takes (float32 inputs run it too; float64 stays on the PyTorch path).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Values per program of the group norm kernels.
GROUP_CHUNK = 4096
#: Warps per program of the group norm kernels.
GROUP_WARPS = 8


@triton.jit
def _layer_norm_modulate_kernel(
    X, OUT, W, B, SHIFT, SCALE, BIDX, ADD,
    stride_x, stride_out, stride_mod,
    num_channels, eps,
    HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, HAS_BIDX: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One row: with ``HAS_ADD`` first ``x = round(x + add)``, stored back into ``X`` (the row is read whole before
    it is written); then ``y = (x - mean) / sqrt(var + eps)``, ``y * w + b`` (affine),
    ``y * (1 + scale) + shift`` with the modulation row of the token's batch element (row 0 when ``HAS_BIDX`` is
    off)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    valid = cols < num_channels
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_ADD:
        a = tl.load(ADD + cols, mask=valid, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + a).to(X.dtype.element_ty)  # the residual stream as stored
        tl.store(X + row * stride_x + cols, x, mask=valid)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / num_channels
    centred = tl.where(valid, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / num_channels
    y = centred * tl.rsqrt(var + eps)
    if HAS_AFFINE:
        w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=valid, other=0.0).to(tl.float32)
        y = y * w + b
    if HAS_MOD:
        if HAS_BIDX:
            m = tl.load(BIDX + row).to(tl.int64)
        else:
            m = 0
        shift = tl.load(SHIFT + m * stride_mod + cols, mask=valid, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + m * stride_mod + cols, mask=valid, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _group_chunk_stats_kernel(X, MEAN, M2, row_size, num_chunks, CHUNK: tl.constexpr):
    """Program ``(row, chunk)``: mean and centred sum of squares of ``CHUNK`` values of one row, in float32."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < row_size
    x = tl.load(X + row * row_size + offs, mask=valid, other=0.0).to(tl.float32)
    n = tl.minimum(row_size - chunk * CHUNK, CHUNK).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    centred = tl.where(valid, x - mean, 0.0)
    tl.store(MEAN + row * num_chunks + chunk, mean)
    tl.store(M2 + row * num_chunks + chunk, tl.sum(centred * centred, axis=0))


@triton.jit
def _group_apply_kernel(X, OUT, SCALE, SHIFT, row_size, spatial, channels_per_group, CHUNK: tl.constexpr):
    """Program ``(row, chunk)``: ``x * scale[c] + shift[c]`` (float32, one rounding) with ``c`` the channel of each
    value: row ``r`` = (batch element, group) holds ``channels_per_group`` channels of ``spatial`` values each."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < row_size
    x = tl.load(X + row * row_size + offs, mask=valid, other=0.0).to(tl.float32)
    c = row * channels_per_group + offs // spatial  # (batch, channel) index into the [B * C] coefficients
    scale = tl.load(SCALE + c, mask=valid, other=0.0)
    shift = tl.load(SHIFT + c, mask=valid, other=0.0)
    tl.store(OUT + row * row_size + offs, (x * scale + shift).to(OUT.dtype.element_ty), mask=valid)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.group_norm`` for a contiguous CUDA tensor ``x [B, C, *spatial]`` (no autograd), statistics in float32
    chunks merged in float64, output in ``x.dtype`` (module docstring). ``weight``, ``bias``: ``[C]`` or None."""
    if x.dim() < 2 or not (x.is_cuda or _interpreting()):
        raise ValueError(f"x must be a [B, C, ...] CUDA tensor, got {tuple(x.shape)} on {x.device}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"x must be one of {FUSED_DTYPES}, got {x.dtype}")
    b, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups")
    x = x.contiguous()
    out = torch.empty_like(x)
    spatial = x[0, 0].numel() if x.numel() else 0
    rows, per = b * num_groups, c // num_groups
    row_size = per * spatial
    if x.numel() == 0:
        return out
    chunks = triton.cdiv(row_size, GROUP_CHUNK)
    mean = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    _group_chunk_stats_kernel[(rows, chunks)](x, mean, m2, row_size, chunks, CHUNK=GROUP_CHUNK,
                                              num_warps=GROUP_WARPS)
    counts = torch.full((chunks,), float(GROUP_CHUNK), device=x.device, dtype=torch.float64)
    counts[-1] = row_size - (chunks - 1) * GROUP_CHUNK
    mean, m2 = mean.double(), m2.double()
    row_mean = (mean * counts).sum(1, keepdim=True) / row_size
    var = (m2.sum(1) + (counts * (mean - row_mean) ** 2).sum(1)) / row_size  # Chan's merge, biased as group norm
    rstd = torch.rsqrt(var + eps).repeat_interleave(per).view(b, c)
    mu = row_mean[:, 0].repeat_interleave(per).view(b, c)
    w = weight.double()[None] if weight is not None else torch.ones(1, c, device=x.device, dtype=torch.float64)
    bb = bias.double()[None] if bias is not None else torch.zeros(1, c, device=x.device, dtype=torch.float64)
    scale = (rstd * w).float().reshape(-1)
    shift = (bb - mu * rstd * w).float().reshape(-1)
    _group_apply_kernel[(rows, chunks)](x, out, scale, shift, row_size, spatial, per, CHUNK=GROUP_CHUNK,
                                        num_warps=GROUP_WARPS)
    return out


def layer_norm_modulate(x: torch.Tensor, eps: float, *, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                        scale: torch.Tensor | None = None, batch_index: torch.Tensor | None = None,
                        add: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``LN(x) [* weight + bias] [* (1 + scale) + shift]`` on a CUDA tensor (no autograd).

    Args:
        x: ``[N, C]`` float16/bfloat16/float32 (rows contiguous).
        eps: the layer norm's epsilon.
        weight, bias: ``[C]`` affine parameters, both or neither.
        shift, scale: ``[B, C]`` modulation rows, both or neither; row ``batch_index[i]`` modulates token ``i``
            (``batch_index [N]`` int, or None when ``B == 1``).
        add: ``[C]``: first add this vector to every row **of x in place** (``x += add``, rounded to x's dtype:
            a residual stream's pending constant) and normalise the sum.
        out: ``[N, C]`` tensor to write into (rows contiguous; default a new one).

    Returns ``[N, C]`` in ``x.dtype`` (``out`` when given).
    """
    if x.dim() != 2 or not (x.is_cuda or _interpreting()):
        raise ValueError(f"x must be a [N, C] CUDA tensor, got {tuple(x.shape)} on {x.device}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"x must be one of {FUSED_DTYPES}, got {x.dtype}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together")
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    n, c = x.shape
    if add is not None:
        if x.stride(1) != 1:
            raise ValueError("add= updates x in place: x's rows must be contiguous")
        if add.numel() != c:
            raise ValueError(f"add must have {c} values, got shape {tuple(add.shape)}")
        add = add.reshape(c).contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a [N, C] {x.dtype} tensor with contiguous rows, got {tuple(out.shape)} "
                         f"{out.dtype}")
    if n == 0:
        return out
    has_mod = shift is not None
    if has_mod:
        shift, scale = shift.reshape(-1, c).contiguous(), scale.reshape(-1, c).contiguous()
        if shift.shape != scale.shape:
            raise ValueError(f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} differ")
        if batch_index is None and shift.shape[0] != 1:
            raise ValueError(f"{shift.shape[0]} modulation rows need batch_index")
    dummy = x  # never read: the constexpr flags switch the loads off
    _layer_norm_modulate_kernel[(n,)](
        x, out,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if has_mod else dummy, scale if has_mod else dummy,
        batch_index if batch_index is not None else dummy,
        add if add is not None else dummy,
        x.stride(0), out.stride(0), shift.stride(0) if has_mod else 0,
        c, float(eps),
        HAS_AFFINE=weight is not None, HAS_MOD=has_mod, HAS_BIDX=has_mod and batch_index is not None,
        HAS_ADD=add is not None, BLOCK_C=triton.next_power_of_2(c), num_warps=NUM_WARPS,
    )
    return out


#: Switch for the fused path (benchmarks time the unfused ops by turning it off).
ENABLED = True


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def use_fused(x: torch.Tensor) -> bool:
    """Whether :func:`norm_modulate` takes the fused kernel for ``x``: :data:`ENABLED`, a CUDA tensor of a supported
    dtype and no gradient being recorded."""
    return ENABLED and x.is_cuda and x.dtype in FUSED_DTYPES and not torch.is_grad_enabled()


def norm_modulate(norm: torch.nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, batch_index: torch.Tensor | None = None, *,
                  add: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` (or ``norm(x)`` without modulation), ``x [N, C]``.

    ``norm`` is a ``LayerNorm`` over the last dimension (affine or not), computed in at least float32. ``shift`` and
    ``scale`` are ``[1, C]`` (one batch element) or ``[B, C]`` with ``batch_index [N]``. The result has ``x``'s
    dtype. Fused into one kernel where :func:`use_fused` allows; otherwise the PyTorch ops (autograd-capable).

    ``add [C]`` (no autograd): first ``x += add`` in place (rounded to x's dtype), then normalise: a residual
    stream's pending constant folded into the norm that reads it. ``out``: where to write the result.
    """
    if add is not None:
        if torch.is_grad_enabled():
            raise ValueError("add= updates x in place and is for inference (no autograd)")
        if not use_fused(x) or x.dim() != 2:
            cdt = torch.promote_types(x.dtype, torch.float32)
            x.copy_(x.to(cdt) + add.to(cdt))  # one rounding, as the kernel
            add = None
    if use_fused(x) and x.dim() == 2:
        affine = norm.weight is not None
        return layer_norm_modulate(x, norm.eps, weight=norm.weight if affine else None,
                                   bias=norm.bias if affine else None, shift=shift, scale=scale,
                                   batch_index=batch_index, add=add, out=out)
    y = norm(x)
    if shift is not None:
        if batch_index is not None:
            shift, scale = shift.index_select(0, batch_index), scale.index_select(0, batch_index)
        y = y * (1 + scale) + shift
    if out is not None:
        return out.copy_(y)
    return y


def _reference(x, eps, weight=None, bias=None, shift=None, scale=None, batch_index=None) -> torch.Tensor:
    """Float32 PyTorch form of :func:`layer_norm_modulate` (tests)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if shift is not None:
        if batch_index is not None:
            shift, scale = shift[batch_index.long()], scale[batch_index.long()]
        y = y * (1 + scale.float()) + shift.float()
    return y.to(x.dtype)
