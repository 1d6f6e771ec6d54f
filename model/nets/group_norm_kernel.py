"""The refiners' group norm over huge volumes as two Triton kernels.

:func:`group_norm` is the refiners' GroupNorm on the GPU, without autograd (4 groups over ``[B, C, D, H, W]`` patches of
192^3 / 256^3 voxels). PyTorch's CUDA group norm reduces each (batch element, group) row in one thread block: 4 blocks
for 33M values each, 17 ms per call and 73-86% of a refiner patch on an H100 (reports/refiner.md). Here each row is cut
into chunks of :data:`GROUP_CHUNK` values; one kernel computes every chunk's mean and centred sum of squares in one read
(float32), the chunks are merged exactly (Chan's parallel formula, float64, on ``[rows, chunks]``), and a second kernel
writes ``(x - mean) * rstd * weight + bias`` rounded once to the input dtype: two reads and one write of the volume.
With ``silu=True`` that kernel also applies the SiLU that follows every group norm of the refiners, in float32 before
the one rounding: the separate in-place SiLU pass (one more read and write of the volume, 0.06 s of refine_512's and
0.14 s of refine_1024's kernels in the profile of reports/generate_history.md) is gone.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.nets.fused import FUSED_DTYPES, _interpreting

__all__ = ["group_norm"]

#: Values per program of the group norm kernels.
GROUP_CHUNK = 4096
#: Warps per program of the group norm kernels.
GROUP_WARPS = 8


@triton.jit
def _group_chunk_stats_kernel(X, MEAN, M2, row_size, num_chunks, CHUNK: tl.constexpr):
    """Program ``(chunk, row)``: mean and centred sum of squares of ``CHUNK`` values of one row, in float32."""
    chunk = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < row_size
    x = tl.load(X + row * row_size + offs, mask=valid, other=0.0).to(tl.float32)
    n = tl.minimum(row_size - chunk * CHUNK, CHUNK).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    centred = tl.where(valid, x - mean, 0.0)
    tl.store(MEAN + row * num_chunks + chunk, mean)
    tl.store(M2 + row * num_chunks + chunk, tl.sum(centred * centred, axis=0))


@triton.jit
def _group_apply_kernel(X, OUT, SCALE, SHIFT, row_size, spatial, channels_per_group, CHUNK: tl.constexpr,
                        SILU: tl.constexpr):
    """Program ``(chunk, row)``: ``y = x * scale[c] + shift[c]``, then ``y * sigmoid(y)`` when ``SILU`` (float32, one
    rounding) with ``c`` the channel of each value: row ``r`` = (batch element, group) holds ``channels_per_group``
    channels of ``spatial`` values each."""
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < row_size
    x = tl.load(X + row * row_size + offs, mask=valid, other=0.0).to(tl.float32)
    c = row * channels_per_group + offs // spatial  # (batch, channel) index into the [B * C] coefficients
    scale = tl.load(SCALE + c, mask=valid, other=0.0)
    shift = tl.load(SHIFT + c, mask=valid, other=0.0)
    y = x * scale + shift
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(OUT + row * row_size + offs, y.to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _group_chunk_stats_cl_kernel(X, MEAN, M2, voxels, num_chunks, C: tl.constexpr, G: tl.constexpr,
                                 PER: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_PER: tl.constexpr):
    """Channels-last twin of :func:`_group_chunk_stats_kernel`: ``X [B, voxels, C]`` (NDHWC); program ``(chunk,
    batch)`` gives each of the ``G`` groups' mean and centred sum of squares over ``BLOCK_V`` voxels x its ``PER``
    channels, in float32, into row ``batch * G + group`` of ``MEAN``/``M2 [B * G, num_chunks]``."""
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    v = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < voxels
    k = tl.arange(0, BLOCK_PER)
    mask = v_ok[:, None] & (k < PER)[None, :]
    n = (tl.minimum(voxels - chunk * BLOCK_V, BLOCK_V) * PER).to(tl.float32)
    base = X + (b * voxels + v)[:, None] * C + k[None, :]
    for g in tl.static_range(G):
        x = tl.load(base + g * PER, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
        centred = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + (b * G + g) * num_chunks + chunk, mean)
        tl.store(M2 + (b * G + g) * num_chunks + chunk, tl.sum(tl.sum(centred * centred, axis=1), axis=0))


@triton.jit
def _group_apply_cl_kernel(X, OUT, SCALE, SHIFT, total, per_batch, C, CHUNK: tl.constexpr, SILU: tl.constexpr):
    """Channels-last twin of :func:`_group_apply_kernel` over the flat ``X`` (``per_batch = voxels * C`` values a
    batch element, the channel fastest)."""
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < total
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    c = (offs // per_batch) * C + offs % C  # (batch, channel) index into the [B * C] coefficients
    y = x * tl.load(SCALE + c, mask=valid, other=0.0) + tl.load(SHIFT + c, mask=valid, other=0.0)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=valid)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, *, silu: bool = False) -> torch.Tensor:
    """``F.group_norm`` for a CUDA tensor ``x [B, C, *spatial]`` (no autograd), statistics in float32 chunks merged
    in float64, output in ``x.dtype`` and ``x``'s layout (module docstring). ``weight``, ``bias``: ``[C]`` or None.
    ``silu``: return ``F.silu`` of the normalised values instead, applied before the one rounding.

    A 5-D channels-last (NDHWC) ``x`` is read and written in place of its layout by the channels-last kernels (each
    chunk covers whole voxels and all their channels; every group's statistics from one read), instead of being
    copied to NCDHW and back: the refiners' wider levels can then run channels-last without two transposes per norm.
    Any other layout is made contiguous first."""
    if x.dim() < 2 or not (x.is_cuda or _interpreting()):
        raise ValueError(f"x must be a [B, C, ...] CUDA tensor, got {tuple(x.shape)} on {x.device}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"x must be one of {FUSED_DTYPES}, got {x.dtype}")
    b, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups")
    channels_last = (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
                     and not x.is_contiguous())
    if not channels_last:
        x = x.contiguous()
    out = torch.empty_like(x)  # keeps x's layout
    spatial = x[0, 0].numel() if x.numel() else 0
    rows, per = b * num_groups, c // num_groups
    row_size = per * spatial
    if x.numel() == 0:
        return out
    if channels_last:
        block_per = triton.next_power_of_2(per)
        block_v = 1 << (max(1, GROUP_CHUNK // (block_per * num_groups)).bit_length() - 1)  # a power of two
        chunks = triton.cdiv(spatial, block_v)
        chunk_values = block_v * per
    else:
        chunks = triton.cdiv(row_size, GROUP_CHUNK)
        chunk_values = GROUP_CHUNK
    mean = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    if channels_last:
        # chunks on the first grid axis: the second and third take at most 65,535 programs, and a 256^3 patch of
        # few channels has more chunks than that
        _group_chunk_stats_cl_kernel[(chunks, b)](x, mean, m2, spatial, chunks, C=c, G=num_groups, PER=per,
                                                  BLOCK_V=block_v, BLOCK_PER=block_per, num_warps=GROUP_WARPS)
    else:
        _group_chunk_stats_kernel[(chunks, rows)](x, mean, m2, row_size, chunks, CHUNK=GROUP_CHUNK,
                                                  num_warps=GROUP_WARPS)
    counts = torch.full((chunks,), float(chunk_values), device=x.device, dtype=torch.float64)
    counts[-1] = row_size - (chunks - 1) * chunk_values
    mean, m2 = mean.double(), m2.double()
    row_mean = (mean * counts).sum(1, keepdim=True) / row_size
    var = (m2.sum(1) + (counts * (mean - row_mean) ** 2).sum(1)) / row_size  # Chan's merge, biased as group norm
    rstd = torch.rsqrt(var + eps).repeat_interleave(per).view(b, c)
    mu = row_mean[:, 0].repeat_interleave(per).view(b, c)
    w = weight.double()[None] if weight is not None else torch.ones(1, c, device=x.device, dtype=torch.float64)
    bb = bias.double()[None] if bias is not None else torch.zeros(1, c, device=x.device, dtype=torch.float64)
    scale = (rstd * w).float().reshape(-1)
    shift = (bb - mu * rstd * w).float().reshape(-1)
    if channels_last:
        _group_apply_cl_kernel[(triton.cdiv(x.numel(), GROUP_CHUNK),)](
            x, out, scale, shift, x.numel(), c * spatial, c, CHUNK=GROUP_CHUNK, SILU=bool(silu),
            num_warps=GROUP_WARPS)
    else:
        _group_apply_kernel[(chunks, rows)](x, out, scale, shift, row_size, spatial, per, CHUNK=GROUP_CHUNK,
                                            SILU=bool(silu), num_warps=GROUP_WARPS)
    return out
