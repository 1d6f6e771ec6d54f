"""One block of the sparse DiT (:mod:`model.nets.dit`) and its cross-attention, in the released parameter layout.

:class:`SparseDiTBlock` (``blocks.{i}``): ``x += gate_a * self_attn(norm1(x) * (1 + scale_a) + shift_a)``;
``x += cross_attn(norm2(x), context)``; ``x += gate_m * mlp(norm3(x) * (1 + scale_m) + shift_m)`` (RELEASED_MODEL.md
D). :meth:`SparseDiTBlock.forward` is the autograd path (training, and any call under autocast or with several
timesteps); :meth:`SparseDiTBlock.forward_inference` is the sampling path, the same function with the residual adds
in the matrix products' epilogues (:meth:`model.nets.dit.SparseDiT._inference_path` picks it).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.profiler import record_function

from model.nets import cross_attention_kernel
from model.nets.fused import norm_modulate
from model.nets.ssa_layer import SpatialSparseAttention, dense_attention
from model.sparse.layers import FeedForward, FP32LayerNorm, gated_linear_add, gelu_linear
from model.sparse.tensor import SparseTensor

if TYPE_CHECKING:
    from model.nets.dit import DiTConfig

__all__ = ["BLOCK_NORM_EPS", "GATED_RESIDUAL", "MLP_CHUNK_ROWS", "NORM_PROJECTION", "CrossAttention", "CrossPlan",
           "SparseDiTBlock", "recomputing"]

#: Epsilon of the block layer norms (RELEASED_MODEL.md D).
BLOCK_NORM_EPS = 1e-6


def _kernel_fits(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the cross-attention goes through :func:`model.nets.cross_attention_kernel.cross_attention`: switched
    on (its ``ENABLED``), on CUDA, no key mask, a dtype and head dim it takes, and under autograd its backward
    switched on (``TRAINABLE``); any number of batch elements. Otherwise SDPA
    (:func:`model.nets.ssa_layer.dense_attention`, which pads several elements to the longest)."""
    if not (cross_attention_kernel.ENABLED and q.is_cuda and mask is None):
        return False
    return cross_attention_kernel.supports(q, kv[:, :, 0], kv[:, :, 1])


#: Key of the host copy of a SparseTensor's row offsets in its ``cache`` (the kernel's tile tables are built on the
#: host; one copy per coordinate set instead of a device sync per block).
_HOST_OFFSETS = "cross_attention_host_offsets"


def _host_offsets(offsets: torch.Tensor, cache: dict | None) -> list[int] | None:
    """CSR row offsets on the host for the kernel (None for one batch element), kept in ``cache``."""
    if offsets.numel() == 2:
        return None
    if cache is None:
        return offsets.tolist()
    if _HOST_OFFSETS not in cache:
        cache[_HOST_OFFSETS] = offsets.tolist()
    return cache[_HOST_OFFSETS]


class CrossAttention(nn.Module):
    """Multi-head cross-attention of sparse tokens to image tokens: ``to_q`` (C -> C), ``to_kv`` (Cc -> 2C: keys,
    then values, each head-major), ``to_out`` (C -> C), all with bias; no q/k normalisation.

    ``forward(h [N, C], offsets [B+1], context [B, L, Cc], mask [B, L] | None) -> [N, C]``.
    """

    def __init__(self, channels: int, cond_channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide channels ({channels})")
        self.channels, self.num_heads = channels, num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(cond_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """Keys and values of the condition tokens: ``context [B, L, Cc] -> [B, L, 2, H, D]``."""
        b, length = context.shape[:2]
        return self.to_kv(context).view(b, length, 2, self.num_heads, self.channels // self.num_heads)

    def null_output(self) -> torch.Tensor:
        """``[C]``: the output for an all-zero condition (every key equals the key bias, so the attention weights
        are uniform and the attended value is the value bias): ``to_out(value bias)``."""
        return self.to_out(self.to_kv.bias[self.channels:])

    def attend(self, h: torch.Tensor | None, offsets: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
               cache: dict | None = None, kv: torch.Tensor | None = None,
               q: torch.Tensor | None = None) -> torch.Tensor:
        """The attended values before ``to_out``: ``[N, C]``. ``kv``: :meth:`project_context` of ``context`` when
        already computed; ``q``: ``to_q(h)`` when already computed (``[N, C]``; h is then not read)."""
        d = self.channels // self.num_heads
        q = self.to_q(h) if q is None else q
        n = q.shape[0]
        q = q.view(n, self.num_heads, d)
        kv = self.project_context(context) if kv is None else kv
        if _kernel_fits(q, kv, mask):
            return cross_attention_kernel.cross_attention(q, kv[:, :, 0], kv[:, :, 1],
                                                          _host_offsets(offsets, cache)).view(n, self.channels)
        o = dense_attention(q, kv[:, :, 0], kv[:, :, 1], offsets, kv_mask=mask, cache=cache,
                            cache_key="dit_cross_attention")
        return o.reshape(n, self.channels)

    def forward(self, h: torch.Tensor, offsets: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                cache: dict | None = None, kv: torch.Tensor | None = None) -> torch.Tensor:
        return self.to_out(self.attend(h, offsets, context, mask, cache=cache, kv=kv))


class SparseDiTBlock(nn.Module):
    """One block (module docstring); parameters ``norm2``, ``self_attn``, ``cross_attn``, ``mlp.mlp.{0,2}``,
    ``adaLN_modulation.1``.

    ``forward(x, h, t_emb, context, mask) -> h``: ``x`` the layout-ordered SparseTensor (coordinates and cache),
    ``h [N, C]`` the residual stream, ``t_emb [B, C]``, ``context [B, L, C]``, ``mask [B, L]`` or None.
    """

    def __init__(self, config: DiTConfig, index: int):
        super().__init__()
        c = config.model_channels
        self.norm1 = FP32LayerNorm(c, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.self_attn = SpatialSparseAttention(
            c, config.num_heads, config.num_kv_heads, compression_block=config.compression_block,
            selection_block=config.selection_block, topk=config.topk, window=config.window,
            shift=config.shift(index), compression_version=config.compression_version,
            compression_groups=config.compression_groups, pool_mode=config.pool_mode, backend=config.backend,
            attention=config.attention)
        self.norm2 = FP32LayerNorm(c, eps=BLOCK_NORM_EPS, elementwise_affine=True)
        self.cross_attn = CrossAttention(c, config.cond_channels, config.num_heads)
        self.norm3 = FP32LayerNorm(c, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.mlp = FeedForward(c, config.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, x: SparseTensor, h: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None, cross: "CrossPlan | None" = None) -> torch.Tensor:
        """``cross``: which rows attend to the condition (:class:`CrossPlan`; None: all of them)."""
        bidx = x.batch_index if t_emb.shape[0] > 1 else None
        # under autocast the norms hand the products their operand dtype directly (one rounding, nothing in float32
        # kept for the backward pass: model.nets.fused)
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        gated = GATED_RESIDUAL and bidx is None and torch.is_grad_enabled()
        attn = self.self_attn
        if torch.is_grad_enabled() and NORM_PROJECTION:
            # the norm and the four projections in one function that keeps no normalised rows
            with record_function("dit.self_attn"):
                merged, h = _norm_passing_stream(self.norm1, h, shift_a, scale_a, bidx, dtype=dt,
                                                 project=(attn.merged_weight(), None))
                o = attn.attend(x, projected=attn.split_projection(merged, contiguous_q=True))
                if not gated:
                    o = attn.proj_o(o)
        else:
            with record_function("dit.norm"):
                u = norm_modulate(self.norm1, h, shift_a, scale_a, bidx, dtype=dt)
            with record_function("dit.self_attn"):
                o = attn.attend(x.replace(u)) if gated else attn(x.replace(u)).feats
        with record_function("dit.residual"):
            h = (gated_linear_add(h, o, attn.proj_o.weight, gate_a) if gated
                 else _gated_add(h, gate_a, o, bidx))
        with record_function("dit.cross_attn"):
            h = self._cross_attention(x, h, context, mask, cross, dt)
        with record_function("dit.norm"):
            u, h = _norm_passing_stream(self.norm3, h, shift_m, scale_m, bidx, dtype=dt)
        with record_function("dit.mlp"):
            if gated:
                # recomputed for the backward pass, the block's output is read by nothing: the MLP branch is
                # recorded (what its backward keeps) but not computed
                return self.mlp.gated_residual(u, h, gate_m, compute_output=not _is_recomputing())
            o = _token_chunks(self.mlp, u)
        with record_function("dit.residual"):
            return _gated_add(h, gate_m, o, bidx)

    def forward_inference(self, x: SparseTensor, h: torch.Tensor, pending: torch.Tensor | None, t_emb: torch.Tensor,
                          context: torch.Tensor, mask: torch.Tensor | None, cross: "CrossPlan | None" = None,
                          shared: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` without autograd, for one modulation row (``t_emb [1, C]``), updating ``h`` in place.

        The residual stream is carried as ``h + pending`` (``pending [C]`` or None): every residual branch ends in
        a matrix product that adds into ``h`` itself (``addmm_``: the product's epilogue reads the stream, no
        separate ``h + gate * o`` pass), with the adaLN gate folded into the rows of that product's weight
        (``gate * (u @ W^T) = u @ (gate[:, None] * W)^T``); what a bias leaves over is a constant row, added by the
        next layer norm as it reads the stream (:func:`model.nets.fused.norm_modulate` ``add=``). Equal to
        :meth:`forward` up to float rounding (fewer roundings: each product accumulates onto the stream in
        float32). ``shared``: the self-attention output is taken from it when there, else stored in it (the two
        passes of a guided step, :meth:`SparseDiT.forward`). Returns ``(h, pending)``."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        o = None if shared is None else shared.get("self_attention")
        if o is None:
            with record_function("dit.norm"):
                u = norm_modulate(self.norm1, h, shift_a, scale_a, add=pending)
            with record_function("dit.self_attn"):
                o = self.self_attn.attend(x.replace(u))
            if shared is not None:
                shared["self_attention"] = o
        elif pending is not None:
            h.add_(pending)
        with record_function("dit.residual"):
            h.addmm_(o, (self.self_attn.proj_o.weight * gate_a.reshape(-1, 1)).t())
        n = h.shape[0]
        rows = n if cross is None else cross.rows
        ca = self.cross_attn
        with record_function("dit.cross_attn"):
            if rows:
                offsets, ctx, msk, cache = ((x.offsets, context, mask, x.cache) if rows == n else
                                            (cross.offsets, context[:cross.batch],
                                             None if mask is None else mask[:cross.batch], cross.cache))
                head = h[:rows]
                o = ca.attend(norm_modulate(self.norm2, head), offsets, ctx, msk, cache=cache,
                              kv=self._kept_kv(context, cross))
                head.addmm_(o, ca.to_out.weight.t())
        with record_function("dit.norm"):
            u = torch.empty_like(h)
            if rows:
                norm_modulate(self.norm3, h[:rows], shift_m, scale_m, add=ca.to_out.bias, out=u[:rows])
            if rows < n:
                norm_modulate(self.norm3, h[rows:], shift_m, scale_m, add=ca.null_output(), out=u[rows:])
        with record_function("dit.mlp"):
            first, second = self.mlp.mlp[0], self.mlp.mlp[2]
            w2 = (second.weight * gate_m.reshape(-1, 1)).t()
            for start in range(0, n, MLP_CHUNK_ROWS):
                stop = min(n, start + MLP_CHUNK_ROWS)
                h[start:stop].addmm_(gelu_linear(u[start:stop], first.weight, first.bias), w2)
        return h, gate_m.reshape(-1) * second.bias

    def _kept_kv(self, context: torch.Tensor, cross: "CrossPlan | None") -> torch.Tensor | None:
        """The condition's key/value projection of this block, kept on the :class:`CrossPlan` (None: none kept)."""
        if cross is None or cross.kv is None or not cross.rows:
            return None
        w, b = self.cross_attn.to_kv.weight, self.cross_attn.to_kv.bias
        key = (id(self), w._version, b._version)  # stale after any in-place weight update
        kv = cross.kv.get(key)
        if kv is None:
            kv = cross.kv[key] = self.cross_attn.project_context(context[:cross.batch])
        return kv

    def _cross_attention(self, x: SparseTensor, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                         cross: "CrossPlan | None", dtype: torch.dtype | None = None) -> torch.Tensor:
        """``h + CrossAttn(LN2(h))``; rows past ``cross.rows`` (an all-zero condition) add the constant
        :meth:`CrossAttention.null_output` instead. ``dtype``: the norm's output dtype (None: h's)."""
        rows = h.shape[0] if cross is None else cross.rows
        kv = self._kept_kv(context, cross)
        ca = self.cross_attn
        if rows == h.shape[0] and torch.is_grad_enabled() and NORM_PROJECTION:
            q, h = _norm_passing_stream(self.norm2, h, dtype=dtype, project=(ca.to_q.weight, ca.to_q.bias))
            return h + ca.to_out(ca.attend(None, x.offsets, context, mask, cache=x.cache, kv=kv, q=q))
        if rows == h.shape[0]:
            return h + ca(norm_modulate(self.norm2, h, dtype=dtype), x.offsets, context, mask, cache=x.cache, kv=kv)
        null = h[rows:] + self.cross_attn.null_output().to(h.dtype)
        if not rows:
            return null
        head = h[:rows]
        attended = self.cross_attn(norm_modulate(self.norm2, head, dtype=dtype), cross.offsets, context[:cross.batch],
                                   None if mask is None else mask[:cross.batch], cache=cross.cache, kv=kv)
        return torch.cat([head + attended, null])


#: Switch for the gated residual branches under autograd when every token shares one modulation row
#: (:func:`model.sparse.layers.gated_linear_add`, :meth:`model.sparse.layers.FeedForward.gated_residual`): the
#: output projection and the MLP add into the stream without keeping their ``[N, C]`` outputs for the backward pass
#: (2 x 281 MB per block at 137k tokens in bf16). Off, or with one row per batch element: ``addcmul``.
GATED_RESIDUAL = True

#: Switch for the training path's norms folded into the projections that follow them
#: (:func:`model.nets.fused.norm_modulate` ``project=``): norm1 with the merged q/k/v/gate projection, norm2 with the
#: cross-attention's query projection; the normalised rows (281 MB each at 137k tokens in bf16) are recomputed in
#: the backward pass instead of kept. Off: the norms and the modules one after the other.
NORM_PROJECTION = True

#: Switch for the residual stream's gradient added inside the norms' backward kernel under autograd
#: (:func:`model.nets.fused.norm_modulate` ``pass_input``): each of a block's three norms reads the stream that the
#: residual add after it reads too, and autograd would add the two ``[N, C]`` gradients of the stream in a pass of
#: its own (three per block, 281 MB each at 137k tokens in bf16); the norm's backward kernel adds the residual's part
#: to its ``dx`` before the one rounding instead (the training step 2,053 -> 2,042 ms on an H100,
#: reports/dit_history.md). Off: autograd adds them.
RESIDUAL_GRAD_IN_NORMS = True

#: Rows per chunk of the MLP when no gradient is recorded: the 4x-wide hidden layer of 137k tokens alone is 1.1 GB in
#: bfloat16; chunks keep the sampling peak at a few hundred MB for it (the MLP is per token, so chunking is exact).
MLP_CHUNK_ROWS = 65536


def _norm_passing_stream(norm, h: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm_modulate(norm, h, ...), h)``, h passed through the norm's autograd function when
    :data:`RESIDUAL_GRAD_IN_NORMS` is on and a gradient is recorded (use the returned h afterwards)."""
    if RESIDUAL_GRAD_IN_NORMS and torch.is_grad_enabled():
        return norm_modulate(norm, h, *args, pass_input=True, **kwargs)
    return norm_modulate(norm, h, *args, **kwargs), h


_RECOMPUTATION = threading.local()


@contextlib.contextmanager
def recomputing():
    """Marks the blocks called inside as recomputed for the backward pass (activation checkpointing: the recompute
    context of ``torch.utils.checkpoint.checkpoint(context_fn=...)``, non-reentrant). Such a forward is run for what
    its operations save for the backward pass; its result is discarded, so a block records its last branch (the
    MLP) without computing it (:meth:`model.sparse.layers.FeedForward.gated_residual` ``compute_output``): two
    ``[N, C] x [C, 4C]``-sized products less per block and training step. Thread-local: the recomputation runs on
    the thread of the backward pass."""
    before = getattr(_RECOMPUTATION, "active", False)
    _RECOMPUTATION.active = True
    try:
        yield
    finally:
        _RECOMPUTATION.active = before


def _is_recomputing() -> bool:
    return getattr(_RECOMPUTATION, "active", False)


def _token_chunks(fn, u: torch.Tensor) -> torch.Tensor:
    """``fn(u)`` for a per-token ``fn``, in chunks of :data:`MLP_CHUNK_ROWS` rows when no gradient is recorded."""
    if torch.is_grad_enabled() or u.shape[0] <= MLP_CHUNK_ROWS:
        return fn(u)
    return torch.cat([fn(part) for part in u.split(MLP_CHUNK_ROWS)])


def _gated_add(h: torch.Tensor, gate: torch.Tensor, o: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
    """``h + gate * o`` in one kernel (``torch.addcmul``); ``gate [B, C]`` per batch element (``batch_index``)."""
    if batch_index is not None:
        gate = gate.index_select(0, batch_index)
    return torch.addcmul(h, gate, o)


@dataclass
class CrossPlan:
    """Cross-attention of one forward when some batch elements carry an all-zero (``null``) condition.

    The conditioned elements come first: rows ``[0, rows)`` (elements ``[0, batch)``, CSR ``offsets``) attend to
    the condition; the remaining rows get :meth:`CrossAttention.null_output`. ``kv``: the condition's key/value
    projections per cross-attention module (``id(module)``), or empty; ``cache``: padding plans of the head rows.
    """

    rows: int
    batch: int
    offsets: torch.Tensor
    kv: dict
    cache: dict
