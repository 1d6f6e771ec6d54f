"""Useful FLOPs of SSA and of dense attention (BENCHMARK.md, "Useful FLOPs").

Forward, per batch element of ``N_b`` tokens and ``Nc_b`` compression blocks:
- compression ``4 N_b Nc_b Hq D`` (QK^T and PV over the compressed keys),
- scoring ``2 N_b Nc_b Hq D`` (QK^T again, for the block scores),
- selection ``4 Hq D * sum over queries of the tokens in its selected blocks``,
- window ``4 Hq D * sum over queries of its window's tokens``.
Backward: ``BACKWARD_FACTOR`` (2.5) times the forward of the three attention branches (scoring has none).
Dense (non-causal) attention: ``4 N_b^2 Hq D`` forward, the same factor backward.

With GQA, the queries of one kv head share their selected blocks: the selection sum runs over (token, kv head)
pairs and is multiplied by the group size ``G = Hq / Hkv``, which equals ``4 Hq D * N * (mean selected keys per
query)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: FLOPs of one multiply-add.
FLOPS_PER_MAC = 2
#: QK^T and PV: two matrix products per attention.
MATMULS_PER_ATTENTION = 2
#: Backward FLOPs per forward FLOP of an attention (dS, dP, dQ, dK, dV: 2.5x), BENCHMARK.md.
BACKWARD_FACTOR = 2.5
#: One TFLOP.
TERA = 1e12


def attention_flops(num_queries_x_keys: float, num_q_heads: int, head_dim: int) -> float:
    """Forward FLOPs of attention that computes ``num_queries_x_keys`` (query, key) pairs per head."""
    return FLOPS_PER_MAC * MATMULS_PER_ATTENTION * num_queries_x_keys * num_q_heads * head_dim


def _batch_sizes(offsets: torch.Tensor) -> torch.Tensor:
    o = offsets.long().cpu()
    return o[1:] - o[:-1]


def query_key_pairs_dense(layout) -> int:
    """``sum over batch elements of N_b^2``: the pairs of dense non-causal attention on the layout's tokens."""
    n_b = _batch_sizes(layout.batch_offsets)
    return int((n_b * n_b).sum())


def query_key_pairs_compression(layout) -> int:
    """``sum over batch elements of N_b * Nc_b``."""
    return int((_batch_sizes(layout.batch_offsets) * _batch_sizes(layout.batch_cmp_offsets)).sum())


def window_tokens_per_query(layout, shift: int = 0) -> torch.Tensor:
    """``[N]`` int64: the number of tokens in each query's window (window order, i.e. indexed like ``perm``)."""
    part = layout.window_partition(shift)
    sizes = _batch_sizes(part.offsets)
    return torch.repeat_interleave(sizes, sizes)


def selected_keys(idx: torch.Tensor, sel_offsets: torch.Tensor) -> torch.Tensor:
    """Keys each (query, kv head) attends to in the selection branch.

    ``idx [N, Hkv, topk]`` selection-block ids (``-1`` = none), ``sel_offsets [S+1]`` token start of each block
    -> ``[N, Hkv]`` int64: the summed token counts of the chosen blocks.
    """
    sizes = (sel_offsets[1:] - sel_offsets[:-1]).long().to(idx.device)
    chosen = idx.long()
    valid = chosen >= 0
    return torch.where(valid, sizes[chosen.clamp_min(0)], torch.zeros_like(chosen)).sum(-1)


@dataclass(frozen=True)
class SSAWork:
    """Work of one SSA case, from the layout tables and the top-k choice. FLOPs are forward FLOPs."""

    tokens: int
    compression_blocks: int
    selection_blocks: int
    selected_keys_per_query: float | None  # mean over (query, kv head); None if the choice is unknown
    window_keys_per_query: float
    compression: float
    scoring: float
    selection: float | None
    window: float

    def forward(self, component: str) -> float | None:
        """Forward FLOPs of a component (``op`` = the whole op: all three branches and the scoring)."""
        parts = {
            "compression": self.compression,
            "scoring_topk": self.scoring,
            "selection": self.selection,
            "flex_selection": self.selection,
            "window": self.window,
        }
        if component == "op":
            if self.selection is None:
                return None
            return self.compression + self.scoring + self.selection + self.window
        return parts[component]

    def backward(self, component: str) -> float | None:
        """Backward FLOPs: 2.5x the forward of the attention branches; scoring has no backward."""
        if component == "scoring_topk":
            return None
        if component == "op":
            if self.selection is None:
                return None
            return BACKWARD_FACTOR * (self.compression + self.selection + self.window)
        fwd = self.forward(component)
        return None if fwd is None else BACKWARD_FACTOR * fwd


def ssa_work(layout, num_q_heads: int, head_dim: int, *, idx: torch.Tensor | None, shift: int = 0) -> SSAWork:
    """The :class:`SSAWork` of a case; ``idx [N, Hkv, topk]`` is the top-k choice (None: selection unknown)."""
    n = layout.num_tokens
    pairs_cmp = query_key_pairs_compression(layout)
    win = window_tokens_per_query(layout, shift)
    win_total = float(win.sum())
    if idx is not None:
        keys = selected_keys(idx, layout.sel_offsets)
        # sum over (query, kv head) of keys, times the G query heads of each kv head, = N * Hq * mean keys.
        mean_keys = float(keys.double().mean()) if keys.numel() else 0.0
        selection = attention_flops(n * mean_keys, num_q_heads, head_dim)
    else:
        mean_keys, selection = None, None
    return SSAWork(
        tokens=n,
        compression_blocks=layout.num_cmp_blocks,
        selection_blocks=layout.num_sel_blocks,
        selected_keys_per_query=mean_keys,
        window_keys_per_query=win_total / n if n else 0.0,
        compression=attention_flops(pairs_cmp, num_q_heads, head_dim),
        scoring=FLOPS_PER_MAC * pairs_cmp * num_q_heads * head_dim,
        selection=selection,
        window=attention_flops(win_total, num_q_heads, head_dim),
    )


def dense_flops(layout_or_tokens, num_q_heads: int, head_dim: int) -> float:
    """Forward FLOPs of dense non-causal attention over every batch element (an int = one batch element)."""
    pairs = layout_or_tokens**2 if isinstance(layout_or_tokens, int) else query_key_pairs_dense(layout_or_tokens)
    return attention_flops(pairs, num_q_heads, head_dim)


def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of an ``[m, k] x [k, n]`` matrix product."""
    return FLOPS_PER_MAC * m * n * k


def tflops(flops: float | None, ms: float | None) -> float | None:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds (None if either is unknown or the time is not positive)."""
    if flops is None or ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / TERA
