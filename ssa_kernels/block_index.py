"""The block -> queries index of a top-k choice: for each (kv head, selection block), the query tokens that chose
it (CSR), and the work items that cut a block's queries into chunks. The selection branch's key-outer kernels
(dK/dV, and the key-outer forward and dQ) loop over it (:mod:`ssa_kernels.selection`).
"""
from __future__ import annotations

import torch

__all__ = ["block_query_index", "split_buckets"]


def block_query_index(idx: torch.Tensor, num_blocks: int, *, positions: bool = False):
    """The block -> queries index (CSR) of a top-k choice ``idx [N, Hkv, topk]`` (-1 = none).

    Returns ``(offsets [Hkv * S + 1] int32, tokens [E] int32)``: the tokens that chose block b for kv head g are
    ``tokens[offsets[g*S+b] : offsets[g*S+b+1]]``, in increasing token order (entries past ``offsets[-1]`` are
    unused). With ``positions``, also ``pos [N, Hkv, topk]`` int32: where each choice sits in ``tokens`` (-1 for
    the empty slots), the map back from the index to the choice. The bucket ids are sorted by a stable radix sort
    (``torch.sort(stable=True)``: linear time, no comparisons) on the narrowest integer type that holds them, so
    16-bit ids take two 8-bit passes; the offsets are a count and a scan. Deterministic, no host synchronisation.
    (A counting sort in two Triton passes was measured 2.1x slower on an H100: 1.15 against 0.54 ms at shell-1024,
    reports/kernels.md run 18.)
    """
    n, hkv, topk = idx.shape
    dev = idx.device
    nbuckets = hkv * num_blocks
    key_dtype = torch.int16 if nbuckets < 2**15 else torch.int32
    g = torch.arange(hkv, device=dev, dtype=torch.int32).view(1, hkv, 1)
    key = torch.where(idx >= 0, g * num_blocks + idx, nbuckets).reshape(-1)
    counts = torch.zeros(nbuckets + 1, device=dev, dtype=torch.int32)
    counts.index_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(nbuckets + 2, device=dev, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.sort(key.to(key_dtype), stable=True).indices
    tokens = torch.div(order, hkv * topk, rounding_mode="floor")
    if not positions:
        return offsets[: nbuckets + 1], tokens.int()
    pos = torch.empty(order.numel(), device=dev, dtype=torch.int32)
    pos[order] = torch.arange(order.numel(), device=dev, dtype=torch.int32)
    pos = torch.where(key < nbuckets, pos, -1).view(n, hkv, topk)
    return offsets[: nbuckets + 1], tokens.int(), pos


def split_buckets(csr_offsets: torch.Tensor, max_queries: int, max_entries: int):
    """The work items of the selection dK/dV kernel when each bucket's queries are cut into chunks of at most
    ``max_queries`` (a block chosen by many queries would otherwise be one long program that the others wait for).

    ``csr_offsets [NB + 1]``: :func:`block_query_index`'s offsets; ``max_entries``: an upper bound on their last
    value known on the host (``N * Hkv * topk``), so that nothing here waits for the device. Returns
    ``(item_bucket [I] int32, item_start [NB + 1] int32, slots)``: bucket b has ``max(1, ceil(count / max_queries))``
    chunks, work items ``item_start[b] .. item_start[b + 1] - 1``; ``item_bucket`` maps an item to its bucket (``NB``
    for the items past the last, which do nothing); ``slots`` bounds the number of chunks other than the first
    (each needs room for its partial sums). ``I = NB + slots`` is enough for any choice, since a bucket of c >= 1
    queries has at most ``1 + (c - 1) / max_queries`` chunks.
    """
    if not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"max_queries must be a positive int, got {max_queries!r}")
    nb = csr_offsets.numel() - 1
    counts = (csr_offsets[1:] - csr_offsets[:-1]).long()
    chunks = torch.clamp(torch.div(counts + max_queries - 1, max_queries, rounding_mode="floor"), min=1)
    item_start = torch.zeros(nb + 1, device=csr_offsets.device, dtype=torch.int64)
    torch.cumsum(chunks, 0, out=item_start[1:])
    slots = -(-max_entries // max_queries)
    items = torch.arange(nb + slots, device=csr_offsets.device, dtype=torch.int64)
    item_bucket = torch.searchsorted(item_start[1:], items, right=True)
    return item_bucket.int(), item_start.int(), slots
