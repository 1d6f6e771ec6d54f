"""Shifted-window self-attention on sparse voxels, and the plain (unmodulated) transformer block of the VAE.

Token ``t`` at (b, x, y, z) attends to every token of the same batch element in its window
``((x + shift) // window, (y + shift) // window, (z + shift) // window)`` (DESIGN.md 2, window branch).

:func:`window_attention` is the one entry point: it groups tokens by (batch, window) with a sort, pads every window
to the largest window's size and calls ``torch.nn.functional.scaled_dot_product_attention`` with a key-padding
mask. It is the stand-in until the Triton window kernel lands: callers only see this function. The partition
depends only on the coordinates and is cached (``cache=``, normally ``SparseTensor.cache``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import FeedForward, FP32LayerNorm
from .tensor import SparseTensor, linear_keys

__all__ = [
    "SparseTransformerBlock",
    "SparseWindowSelfAttention",
    "WindowPartition",
    "window_attention",
    "window_partition",
]

#: Epsilon of the pre-attention / pre-MLP layer norms of the released blocks (RELEASED_MODEL.md E.3).
BLOCK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class WindowPartition:
    """Tokens grouped by (batch, window), padded to the largest window.

    ``order [N]``: token indices sorted by window (stable, so in input order inside a window); ``slot [N]``:
    the padded position ``window * max_len + position in window`` of token ``order[i]``; ``inverse [N]``:
    ``inverse[order[i]] = i``; ``valid [num_windows, max_len]`` bool, True on real tokens.
    """

    num_windows: int
    max_len: int
    order: torch.Tensor
    slot: torch.Tensor
    inverse: torch.Tensor
    valid: torch.Tensor


def window_partition(coords: torch.Tensor, window: int, shift: int = 0, *,
                     cache: dict | None = None) -> WindowPartition:
    """The :class:`WindowPartition` of ``coords [N, 4]`` (batch, x, y, z) for ``window`` and ``shift``.

    Cached in ``cache`` (when given) under ``("window", window, shift)``. One host sync when built.
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift < window:
        raise ValueError(f"shift must be an int in [0, window), got {shift!r}")
    key = ("window", window, shift)
    if cache is not None and key in cache:
        return cache[key]
    c = coords.long()
    n, dev = c.shape[0], c.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        part = WindowPartition(0, 0, empty, empty, empty, torch.zeros(0, 0, dtype=torch.bool, device=dev))
    else:
        win = torch.cat([c[:, :1], torch.div(c[:, 1:] + shift, window, rounding_mode="floor")], dim=1)
        radix = int(win[:, 1:].max()) + 1
        wkey = linear_keys(win, radix)
        sorted_key, order = torch.sort(wkey, stable=True)
        new = torch.ones(n, dtype=torch.long, device=dev)
        new[1:] = (sorted_key[1:] != sorted_key[:-1]).long()
        win_id = torch.cumsum(new, 0) - 1  # window of each sorted token
        counts = torch.bincount(win_id)
        num_windows, max_len = counts.shape[0], int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(n, device=dev) - starts[win_id]
        slot = win_id * max_len + position
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=dev)
        valid = torch.arange(max_len, device=dev).unsqueeze(0) < counts.unsqueeze(1)
        part = WindowPartition(num_windows, max_len, order, slot, inverse, valid)
    if cache is not None:
        cache[key] = part
    return part


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor,
    window: int,
    shift: int = 0,
    *,
    scale: float | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """Self-attention inside shifted windows: ``q, k, v [N, H, D]`` -> ``o [N, H, D]``.

    Token ``t`` attends over the tokens of its batch element whose ``(xyz + shift) // window`` equals its own.
    ``scale`` defaults to ``1 / sqrt(D)``. ``cache``: where the partition is cached (``SparseTensor.cache``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [N, H, D], got {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError("coords must be a [N, 4] integer tensor (batch, x, y, z)")
    n, h, d = q.shape
    if coords.shape[0] != n:
        raise ValueError(f"coords has {coords.shape[0]} rows but q has {n} tokens")
    part = window_partition(coords, window, shift, cache=cache)
    if n == 0:
        return q.new_zeros(0, h, d)
    padded_rows = part.num_windows * part.max_len

    def pad(t: torch.Tensor) -> torch.Tensor:  # [N, H, D] -> [W, H, L, D]
        flat = t.new_zeros(padded_rows, h, d).index_copy(0, part.slot, t.index_select(0, part.order))
        return flat.view(part.num_windows, part.max_len, h, d).transpose(1, 2)

    mask = part.valid[:, None, None, :]  # [W, 1, 1, L]: keys present
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)
    o = o.transpose(1, 2).reshape(padded_rows, h, d)
    return o.index_select(0, part.slot).index_select(0, part.inverse)


class SparseWindowSelfAttention(nn.Module):
    """Multi-head shifted-window self-attention: ``to_qkv`` (C -> 3C, outputs q | k | v, each head-major), window
    attention, ``to_out`` (C -> C). ``forward(x: SparseTensor [N, C]) -> SparseTensor [N, C]``."""

    def __init__(self, channels: int, num_heads: int, window: int = 8, shift: int = 0, qkv_bias: bool = True):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads ({num_heads!r}) must be a positive int dividing channels ({channels})")
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, window), got shift={shift!r}, window={window!r}")
        self.channels, self.num_heads, self.window, self.shift = channels, num_heads, window, shift
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        n = x.num_voxels
        qkv = self.to_qkv(x.feats).view(n, 3, self.num_heads, self.channels // self.num_heads)
        q, k, v = qkv.unbind(1)
        o = window_attention(q, k, v, x.coords, self.window, self.shift, cache=x.cache)
        return x.replace(self.to_out(o.reshape(n, self.channels)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_heads={self.num_heads}, window={self.window}, shift={self.shift}"


class SparseTransformerBlock(nn.Module):
    """Pre-LN block of the sparse VAE (RELEASED_MODEL.md E.3): ``x + attn(LN(x))`` then ``x + mlp(LN(x))``.

    LNs without affine parameters (eps 1e-6, float32); attention as :class:`SparseWindowSelfAttention`
    (``attn.to_qkv``, ``attn.to_out``); MLP ``mlp.mlp.{0,2}`` with GELU(tanh). ``use_checkpoint`` recomputes the
    block in the backward pass (activation checkpointing). ``forward(x: SparseTensor [N, C]) -> [N, C]``.
    """

    def __init__(self, channels: int, num_heads: int, window: int = 8, shift: int = 0, mlp_ratio: float = 4.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.norm1 = FP32LayerNorm(channels, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.attn = SparseWindowSelfAttention(channels, num_heads, window, shift)
        self.norm2 = FP32LayerNorm(channels, eps=BLOCK_NORM_EPS, elementwise_affine=False)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.use_checkpoint = use_checkpoint

    def _forward_feats(self, feats: torch.Tensor, x: SparseTensor) -> torch.Tensor:
        feats = feats + self.attn(x.replace(self.norm1(feats))).feats
        return feats + self.mlp(self.norm2(feats))

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return x.replace(checkpoint(self._forward_feats, x.feats, x, use_reentrant=False))
        return x.replace(self._forward_feats(x.feats, x))
