"""The Spatial Sparse Attention layer of the sparse DiT (RELEASED_MODEL.md D.3), on :class:`SparseTensor`.

Per layer, for tokens ``x [N, C]`` in **layout order** (see below):

- ``q = proj_q(x) [N, Hq, D]``, ``k = proj_k(x)``, ``v = proj_v(x) [N, Hkv, D]``, all without bias; channel ``c`` of
  the ``Hkv * D`` wide k/v is head ``c // D``, dim ``c % D``.
- compressed keys: ``k + intra_block_pe[x % m, y % m, z % m]`` (``m`` = compression block, table
  ``[m, m, m, Hkv * D]``, keys only, float32 parameter) through ``compression_key``; compressed values: ``v`` through
  ``compression_value``. One row per non-empty compression block, in the layout's block order (``k_cmp [Nc, Hkv, D]``).
  Two released compressions:

  * ``"v1"`` (v1.1): ``act_layers.0`` = 1^3 sparse conv (an ``nn.Linear`` stored as ``conv.kernel [Cin, Cout]`` +
    ``conv.bias``), SiLU, mean over the tokens of the block (float32 or wider);
  * ``"v2"`` (v1.0): ``act_layers`` = GroupNorm (per batch element) + SiLU, mean pool to the blocks, ``out_layers`` =
    3^3 sparse conv, GroupNorm, SiLU, 3^3 sparse conv on the block grid, plus the mean-pooled raw input as skip.
- ``gate = sigmoid(gate.0(x)) [N, 3]`` (Linear without bias).
- ``o = gate0 * o_cmp + gate1 * o_sel + gate2 * o_win`` through :func:`ssa_kernels.spatial_sparse_attention`
  (``backend="kernels"``) or the dense float64-capable reference (``backend="reference"``; tests and CPU).
- ``proj_o`` (no bias).

``attention="full"`` replaces the whole SSA operation with ordinary full attention per batch element over the same
q/k/v (``scaled_dot_product_attention``, GQA by repeating the kv heads): a **baseline for benchmarks only**
(``model.reports.dit``); compression, intra-block PE and gate are then unused.

Token order. The layer requires its input in the layout order of :func:`ssa_kernels.layout_order` for its block sizes (a
:class:`ValueError` says so otherwise); :class:`model.nets.dit.SparseDiT` puts its input in that order once and restores
the caller's order on output. The :class:`~ssa_kernels.BlockLayout` is built once per coordinate set, cached in
``x.cache`` under ``("ssa_layout", compression_block, selection_block, window)``, and reused by every layer and every
sampling step (:func:`block_layout`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssa_kernels import build_layout
from ssa_kernels.layout import BlockLayout

from model.sparse.conv import SparseConv3d
from model.sparse.layers import SparseGroupNorm, SparseSiLU, check_pool_mode, pool_features
from model.sparse.tensor import SparseTensor

__all__ = [
    "ATTENTION_MODES",
    "BACKENDS",
    "COMPRESSION_VERSIONS",
    "CompressionV1",
    "CompressionV2",
    "SpatialSparseAttention",
    "block_layout",
    "block_mean",
    "dense_attention",
]

#: ``backend=`` values: the Triton kernels or the dense reference.
BACKENDS = ("kernels", "reference")
#: ``attention=`` values: spatial sparse attention, or full attention (benchmark baseline).
ATTENTION_MODES = ("ssa", "full")
#: Released compression modules: ``"v1"`` (v1.1, linear + SiLU + mean) and ``"v2"`` (v1.0, convolutional).
COMPRESSION_VERSIONS = ("v1", "v2")
#: Rows of the merged q/k/v/gate weight are padded to a multiple of this (aligned rows for the matrix units).
MERGED_ALIGN = 8
#: With :data:`QUERY_VIEW`: a multiple of 64 rows, so that each token's row of the merged product (bf16) starts on
#: a 128-byte line, as the rows of a contiguous q do, and a head's 32 or 64 values never straddle two lines.
QUERY_VIEW_ALIGN = 64
#: The training path hands q to the SSA op as a column view of the merged product instead of a contiguous copy
#: (:class:`_SplitProjection`; the kernels take q's row stride, and dQ is written contiguous either way): one
#: ``[N, C]`` copy fewer per forward, the merged rows padded to :data:`QUERY_VIEW_ALIGN` under autograd (the DiT's
#: training step 2,073 -> 2,053 ms on an H100, reports/dit_history.md). Off: the copy.
QUERY_VIEW = True
#: Switch for the merged projection without autograd (:meth:`SpatialSparseAttention.project`; reports time both).
MERGED_PROJECTION = True


def _check_sparse(x, name: str = "x") -> SparseTensor:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{name} must be a SparseTensor, got {type(x).__name__}")
    return x


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def block_layout(x: SparseTensor, *, compression_block: int, selection_block: int, window: int) -> BlockLayout:
    """The :class:`~ssa_kernels.BlockLayout` of ``x``'s coordinates, built once and cached in ``x.cache``.

    ``x`` must be in layout order for these block sizes (``ssa_kernels.layout_order``); ``build_layout`` raises a
    ``ValueError`` naming the fix otherwise.
    """
    _check_sparse(x)
    key = ("ssa_layout", compression_block, selection_block, window)
    layout = x.cache.get(key)
    if layout is None:
        layout = build_layout(x.coords, compression_block=compression_block, selection_block=selection_block,
                              window=window)
        x.cache[key] = layout
    return layout


#: Switch for :class:`_SplitProjection` under autograd (off: slices of the merged product, as autograd splits them).
SPLIT_FUNCTION = True


class _SplitProjection(torch.autograd.Function):
    """``out [N, rows]`` -> contiguous copies of its column ranges ``[0, a)``, ``[a, a + b)``, ``[a + b, a + b + g)``
    (the merged q/k/v/gate product, :meth:`SpatialSparseAttention.split_projection`; with ``view_first`` the first
    range is a view of ``out``, not a copy); the columns past them (alignment padding) get a zero gradient. Through
    slices of ``out`` autograd would build each part's gradient as a zero-filled ``[N, rows]`` tensor with the part
    copied in and then add the three: three fills, three copies and two additions of the whole product per block.
    The backward here writes the product's gradient in one concatenation."""

    @staticmethod
    def forward(ctx, out, a, b, g, view_first=False):
        ctx.pad, ctx.dtype = out.shape[1] - a - b - g, out.dtype
        first = out[:, :a] if view_first else out[:, :a].clone(memory_format=torch.contiguous_format)
        return (first, *(out[:, lo:hi].clone(memory_format=torch.contiguous_format)
                         for lo, hi in ((a, a + b), (a + b, a + b + g))))

    @staticmethod
    def backward(ctx, dq, dkv, dgate):  # an unused output's gradient arrives as zeros (materialised)
        parts = [x.to(ctx.dtype) for x in (dq, dkv, dgate)]
        if ctx.pad:
            parts.append(dq.new_zeros(dq.shape[0], ctx.pad, dtype=ctx.dtype))
        return torch.cat(parts, dim=1), None, None, None, None


def block_mean(feats: torch.Tensor, layout: BlockLayout, mode: str = "mean") -> torch.Tensor:
    """Pooling of ``feats [N, C]`` over the tokens of each compression block: ``[Nc, C]`` in the input dtype.

    ``mode``: ``"mean"`` or ``"released"`` (``sum / (n + 1)``, :func:`model.sparse.layers.pool_features`).
    Accumulates in at least float32 (the released SparseDownsample uses float64; the difference is rounding).
    """
    counts = layout.cmp_offsets[1:] - layout.cmp_offsets[:-1]
    return pool_features(feats, layout.token_cmp.long(), counts, mode)


class CompressionV1(nn.Module):
    """Released compression ``v1`` (v1.1): ``act_layers.0`` (1^3 sparse conv, ``conv.kernel [C, C]`` + bias), SiLU,
    pooling over each compression block (``pool_mode``: :func:`block_mean`).
    ``forward(x: SparseTensor [N, C], layout) -> [Nc, C]``."""

    def __init__(self, channels: int, pool_mode: str = "mean"):
        super().__init__()
        self.pool_mode = check_pool_mode(pool_mode)
        self.act_layers = nn.Sequential(SparseConv3d(channels, channels, 1), SparseSiLU())

    def forward(self, x: SparseTensor, layout: BlockLayout) -> torch.Tensor:
        return block_mean(self.act_layers(x).feats, layout, self.pool_mode)


class CompressionV2(nn.Module):
    """Released compression ``v2`` (v1.0, ``SparseDownBlock3d_v2``): ``act_layers`` (GroupNorm, SiLU) on the tokens,
    pool to the compression blocks (``pool_mode``: :func:`block_mean`), ``out_layers`` (3^3 conv, GroupNorm, SiLU,
    3^3 conv) on the block grid, plus the pooled raw input (identity skip).
    ``forward(x: SparseTensor [N, C], layout) -> [Nc, C]``.

    The block-level tensor has coordinates ``layout.cmp_coords`` (batch, block x, y, z); its coordinate cache (the
    3^3 neighbour map) lives in ``x.cache`` so it is built once per coordinate set.
    """

    def __init__(self, channels: int, num_groups: int = 32, pool_mode: str = "mean"):
        super().__init__()
        self.pool_mode = check_pool_mode(pool_mode)
        self.act_layers = nn.Sequential(SparseGroupNorm(num_groups, channels), SparseSiLU())
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, channels, 3),
            SparseGroupNorm(num_groups, channels),
            SparseSiLU(),
            SparseConv3d(channels, channels, 3),
        )

    def forward(self, x: SparseTensor, layout: BlockLayout) -> torch.Tensor:
        key = ("ssa_block_grid_cache", layout.compression_block, layout.selection_block, layout.window)
        grid_cache = x.cache.setdefault(key, {})
        pooled_raw = block_mean(x.feats, layout, self.pool_mode)
        h = block_mean(self.act_layers(x).feats, layout, self.pool_mode)
        blocks = SparseTensor(layout.cmp_coords, h, batch_size=x.batch_size, cache=grid_cache, validate=False)
        h = self.out_layers(blocks).feats
        return h + pooled_raw.to(h.dtype)


def _pad_plan(offsets: torch.Tensor, cache: dict | None, key) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(slot [N] int64, valid [B, L] bool, L)`` that pad variable-length rows (CSR ``offsets [B+1]``) to ``[B, L]``.

    Row ``i`` of batch element ``b`` goes to padded position ``b * L + (i - offsets[b])``. Cached under ``key``.
    """
    if cache is not None and key in cache:
        return cache[key]
    offsets = offsets.long()
    counts = offsets[1:] - offsets[:-1]
    b = counts.numel()
    length = int(counts.max()) if b else 0
    n = int(offsets[-1]) if b else 0
    batch = torch.repeat_interleave(torch.arange(b, device=offsets.device), counts)
    slot = batch * length + torch.arange(n, device=offsets.device) - offsets[:-1][batch]
    valid = torch.arange(length, device=offsets.device).unsqueeze(0) < counts.unsqueeze(1)
    plan = (slot, valid, length)
    if cache is not None:
        cache[key] = plan
    return plan


def _pad_rows(t: torch.Tensor, slot: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``t [N, ...] -> [B, L, ...]`` (zeros in the padding)."""
    out = t.new_zeros(batch * length, *t.shape[1:]).index_copy(0, slot, t)
    return out.view(batch, length, *t.shape[1:])


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor | None = None,
    *,
    kv_mask: torch.Tensor | None = None,
    cache: dict | None = None,
    cache_key=None,
) -> torch.Tensor:
    """Attention of packed variable-length queries over keys of the same batch element, through
    ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: ``[N, Hq, D]`` queries of ``B`` batch elements packed one after another (CSR ``q_offsets [B+1]``).
        k, v: either packed ``[M, Hkv, D]`` with ``kv_offsets [B+1]`` (self-attention: ``kv_offsets`` may be None
            to reuse ``q_offsets``), or batched ``[B, L, Hkv, D]`` with an optional key mask ``kv_mask [B, L]`` bool
            (True = real key; cross-attention to image tokens). ``Hq % Hkv == 0`` (kv head g serves query heads
            ``g*G .. g*G+G-1``).
        cache, cache_key: where to keep the padding plans (``SparseTensor.cache``).

    Returns ``o [N, Hq, D]``. One batch element needs no padding; several are padded to the longest with a
    key-padding mask (padded query rows are computed and dropped).
    """
    n, hq, d = q.shape
    batch = q_offsets.numel() - 1
    packed_kv = k.dim() == 3
    group = hq // k.shape[-2]
    if group > 1:  # GQA: repeat the kv heads (SDPA's enable_gqa is not supported by every backend)
        k = k.repeat_interleave(group, dim=-2)
        v = v.repeat_interleave(group, dim=-2)
    if packed_kv and kv_offsets is None:
        kv_offsets = q_offsets
    if batch == 1:
        qb = q.transpose(0, 1).unsqueeze(0)  # [1, H, N, D]
        if packed_kv:
            kb, vb = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            mask = None
        else:
            kb, vb = k.transpose(1, 2), v.transpose(1, 2)
            mask = None if kv_mask is None else kv_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        return o.squeeze(0).transpose(0, 1)
    slot, _, length = _pad_plan(q_offsets, cache, (cache_key, "q") if cache_key is not None else None)
    qb = _pad_rows(q, slot, batch, length).transpose(1, 2)  # [B, H, L, D]
    if packed_kv:
        kslot, kvalid, klen = _pad_plan(kv_offsets, cache, (cache_key, "kv") if cache_key is not None else None)
        kb = _pad_rows(k, kslot, batch, klen).transpose(1, 2)
        vb = _pad_rows(v, kslot, batch, klen).transpose(1, 2)
        mask = kvalid[:, None, None, :]
    else:
        kb, vb = k.transpose(1, 2), v.transpose(1, 2)
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # [B, H, L, D]
    return o.transpose(1, 2).reshape(batch * length, hq, d).index_select(0, slot)


class SpatialSparseAttention(nn.Module):
    """Spatial Sparse Attention with learnable compression (released ``self_attn`` of a sparse DiT block).

    Args:
        channels: model width ``C`` (1024 released).
        num_heads: query heads ``Hq`` (32 released); head dim ``D = C / Hq``.
        num_kv_heads: key/value heads ``Hkv`` (2 released), dividing ``Hq``.
        compression_block, selection_block: block sides ``m_cmp`` (8 in v1.1, 4 in v1.0) and ``m_slc`` (8).
        topk: selection blocks per query and kv head (8; 32 in the v1.0 512 model).
        window, shift: window side (8) and this layer's shift (0 or ``window // 2``).
        compression_version: ``"v1"`` or ``"v2"`` (module docstring).
        compression_groups: GroupNorm groups of compression v2 (32 released).
        pool_mode: the compression's pooling, ``"released"`` (``sum / (n + 1)``, as the released model) or
            ``"mean"`` (module docstring).
        backend: ``"kernels"`` (Triton, :func:`ssa_kernels.spatial_sparse_attention`) or ``"reference"``
            (:func:`reference.spatial_sparse_attention`, dense, any dtype; tests and CPU).
        attention: ``"ssa"``, or ``"full"`` for a full-attention benchmark baseline (module docstring).

    Parameters (released names): ``intra_block_pe [m_cmp, m_cmp, m_cmp, Hkv*D]``, ``proj_q/k/v/o.weight``,
    ``compression_key.*``, ``compression_value.*``, ``gate.0.weight [3, C]``.

    ``forward(x: SparseTensor [N, C]) -> SparseTensor [N, C]``, tokens in layout order (module docstring).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        compression_block: int = 8,
        selection_block: int = 8,
        topk: int = 8,
        window: int = 8,
        shift: int = 0,
        compression_version: str = "v1",
        compression_groups: int = 32,
        pool_mode: str = "mean",
        backend: str = "kernels",
        attention: str = "ssa",
    ):
        super().__init__()
        for name, value in (("channels", channels), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("compression_block", compression_block), ("selection_block", selection_block),
                            ("topk", topk), ("window", window)):
            _positive_int(value, name)
        if channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide channels ({channels})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if selection_block % compression_block:
            raise ValueError(f"compression_block ({compression_block}) must divide selection_block ({selection_block})")
        if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift < window:
            raise ValueError(f"shift must be an int in [0, window={window}), got {shift!r}")
        if compression_version not in COMPRESSION_VERSIONS:
            raise ValueError(f"compression_version must be one of {COMPRESSION_VERSIONS}, got {compression_version!r}")
        self.channels, self.num_heads, self.num_kv_heads = channels, num_heads, num_kv_heads
        self.head_dim = channels // num_heads
        self.compression_block, self.selection_block = compression_block, selection_block
        self.topk, self.window, self.shift = topk, window, shift
        self.compression_version = compression_version
        self.backend = backend
        self.attention = attention
        self._check_modes(backend, attention)
        kv = num_kv_heads * self.head_dim
        m = compression_block
        self.intra_block_pe = nn.Parameter(torch.zeros(m, m, m, kv))
        nn.init.normal_(self.intra_block_pe, std=0.02)
        self.proj_q = nn.Linear(channels, channels, bias=False)
        self.proj_k = nn.Linear(channels, kv, bias=False)
        self.proj_v = nn.Linear(channels, kv, bias=False)
        self.proj_o = nn.Linear(channels, channels, bias=False)
        if compression_version == "v1":
            self.compression_key = CompressionV1(kv, pool_mode)
            self.compression_value = CompressionV1(kv, pool_mode)
        else:
            if kv % compression_groups:
                raise ValueError(f"compression_groups ({compression_groups}) must divide num_kv_heads * head_dim "
                                 f"({kv})")
            self.compression_key = CompressionV2(kv, compression_groups, pool_mode)
            self.compression_value = CompressionV2(kv, compression_groups, pool_mode)
        self.gate = nn.Sequential(nn.Linear(channels, 3, bias=False), nn.Sigmoid())

    @staticmethod
    def _check_modes(backend, attention) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")

    def set_mode(self, *, backend: str | None = None, attention: str | None = None) -> None:
        """Switch the backend and/or the attention mode in place (no parameter changes)."""
        backend = self.backend if backend is None else backend
        attention = self.attention if attention is None else attention
        self._check_modes(backend, attention)
        self.backend, self.attention = backend, attention

    def layout(self, x: SparseTensor) -> BlockLayout:
        """The cached block layout of ``x`` for this layer's block sizes (:func:`block_layout`)."""
        return block_layout(x, compression_block=self.compression_block, selection_block=self.selection_block,
                            window=self.window)

    def compress(self, x: SparseTensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout):
        """``k, v [N, Hkv*D]`` -> ``k_cmp, v_cmp [Nc, Hkv, D]`` (learnable compression, keys with intra-block PE)."""
        m = self.compression_block
        local = (x.coords[:, 1:] % m).long()
        pe = self.intra_block_pe[local[:, 0], local[:, 1], local[:, 2]]  # [N, Hkv*D] float32
        k_in = k + pe  # promotes: the table is a float32 parameter
        k_cmp = self.compression_key(x.replace(k_in), layout)
        v_cmp = self.compression_value(x.replace(v), layout)
        shape = (-1, self.num_kv_heads, self.head_dim)
        return k_cmp.reshape(shape), v_cmp.reshape(shape)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h [N, C]`` -> ``q [N, Hq, D]``, ``k, v [N, Hkv * D]``, ``gate [N, 3]`` (after the sigmoid).

        Without autograd the four projections are one matrix product over the concatenated weights
        (:meth:`merged_weight`): ``h`` is read once instead of four times, and the 3-wide gate no longer runs as its
        own unaligned product (:meth:`split_projection` cuts the output). With autograd: the four modules, as the
        released model (the DiT block's training path merges them itself, with its layer norm:
        :func:`model.nets.fused.norm_modulate` ``project=``)."""
        n = h.shape[0]
        if torch.is_grad_enabled() or not MERGED_PROJECTION:
            return self.proj_q(h).view(n, self.num_heads, self.head_dim), self.proj_k(h), self.proj_v(h), self.gate(h)
        return self.split_projection(F.linear(h, self.merged_weight()))

    def merged_weight(self) -> torch.Tensor:
        """``[rows, C]``: the weights of proj_q, proj_k, proj_v and the gate one below the other, zero rows padding
        them to a multiple of :data:`MERGED_ALIGN` (:data:`QUERY_VIEW_ALIGN` with :data:`QUERY_VIEW` under autograd;
        differentiable: each part's gradient reaches its parameter)."""
        weights = [self.proj_q.weight, self.proj_k.weight, self.proj_v.weight, self.gate[0].weight]
        align = QUERY_VIEW_ALIGN if QUERY_VIEW and torch.is_grad_enabled() else MERGED_ALIGN
        pad = -sum(w.shape[0] for w in weights) % align
        if pad:
            weights.append(self.proj_q.weight.new_zeros(pad, self.channels))
        return torch.cat(weights)

    def split_projection(self, out: torch.Tensor, *, contiguous_q: bool = False):
        """``q [N, Hq, D]``, ``k, v [N, Hkv * D]``, ``gate [N, 3]`` from the merged product ``out [N, rows]``
        (:meth:`merged_weight`). q is a column view of ``out`` (the forward kernels take strided rows; with
        ``contiguous_q`` a copy, unless :data:`QUERY_VIEW` is on under autograd). k and v are copied into one compact
        ``[N, 2 * Hkv * D]`` buffer: the selection and window kernels gather key rows from all over the sequence, and
        as views with the merged row stride
        (2,320 bytes for the released width) they made the SSA op ~40% slower on an H100 (the DiT report of
        dd3f8eb: a guided step of 1,616 ms against 1,054 ms with the four separate products,
        reports/dit_history.md); the copy moves 2 x 128 bytes per token."""
        n = out.shape[0]
        c, kv = self.channels, self.num_kv_heads * self.head_dim
        if SPLIT_FUNCTION and contiguous_q and torch.is_grad_enabled() and out.requires_grad:
            q, kv_rows, gate = _SplitProjection.apply(out, c, 2 * kv, 3, QUERY_VIEW)
            return q.view(n, self.num_heads, self.head_dim), kv_rows[:, :kv], kv_rows[:, kv:], torch.sigmoid(gate)
        q = out[:, :c]
        q = (q.contiguous() if contiguous_q else q).view(n, self.num_heads, self.head_dim)
        kv_rows = out[:, c:c + 2 * kv].contiguous()
        return q, kv_rows[:, :kv], kv_rows[:, kv:], torch.sigmoid(out[:, c + 2 * kv:c + 2 * kv + 3])

    def attend(self, x: SparseTensor, projected: tuple | None = None) -> torch.Tensor:
        """The attention output before ``proj_o``: ``x [N, C]`` (layout order) -> ``[N, C]``. ``projected``: the
        ``(q, k, v, gate)`` of :meth:`project` already computed (then only x's coordinates are read)."""
        _check_sparse(x)
        if projected is None and x.num_channels != self.channels:
            raise ValueError(f"x has {x.num_channels} channels but the attention expects {self.channels}")
        n = x.num_voxels
        q, k, v, gate = self.project(x.feats) if projected is None else projected
        if self.attention == "full":
            o = dense_attention(q, k.view(n, self.num_kv_heads, self.head_dim),
                                v.view(n, self.num_kv_heads, self.head_dim), x.offsets, cache=x.cache,
                                cache_key="ssa_full_attention")
            return o.reshape(n, self.channels)
        layout = self.layout(x)
        k_cmp, v_cmp = self.compress(x, k, v, layout)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        dt = q.dtype
        args = [t.to(dt) for t in (q, k, v, k_cmp, v_cmp, gate)]
        if self.backend == "kernels":
            from ssa_kernels import spatial_sparse_attention

            with torch.autocast(device_type=q.device.type, enabled=False):
                o = spatial_sparse_attention(*args, layout, topk=self.topk, shift=self.shift)
        else:
            import reference

            with torch.autocast(device_type=q.device.type, enabled=False):
                o = reference.spatial_sparse_attention(
                    *args, layout.coords, compression_block=self.compression_block,
                    selection_block=self.selection_block, topk=self.topk, window=self.window, shift=self.shift)
        return o.reshape(n, self.channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        o = self.attend(_check_sparse(x))
        return x.replace(self.proj_o(o))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"blocks=(cmp {self.compression_block}, slc {self.selection_block}, win {self.window}), "
                f"topk={self.topk}, shift={self.shift}, compression={self.compression_version!r}, "
                f"backend={self.backend!r}, attention={self.attention!r}")
