"""Benchmark inputs, exactly as BENCHMARK.md specifies them; the one place that builds the compressed k/v.

- ``q [N, Hq, D]``, ``k, v [N, Hkv, D]``: standard normal, drawn in float32 from one seeded generator on the
  target device and rounded to the benchmark dtype (bfloat16 on the GPU).
- ``gate [N, 3]``: uniform in (0, 1) (kept strictly inside after rounding).
- ``v_cmp [Nc, Hkv, D]``: the mean of v over each compression block.
- ``k_cmp [Nc, Hkv, D]``: the mean of k over the block times ``sqrt(tokens in the block)`` (``"scaled"``, the
  default and headline), or the plain mean (``"plain-mean"``, only to compare with figures published on it).
- ``dout``: a fixed standard-normal output gradient for the backward.

The block means are accumulated in float32 (float64 for float64 inputs) from the rounded k and v, then rounded
once to the input dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.cases import INPUT_SETS, INPUTS_PLAIN, INPUTS_SCALED

#: Default seed of every benchmark input.
SEED = 0
#: Number of SSA branches, hence gate columns.
NUM_BRANCHES = 3


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def compressed_kv_from_blocks(k: torch.Tensor, v: torch.Tensor, token_block: torch.Tensor, num_blocks: int, *,
                              mode: str = INPUTS_SCALED):
    """Stand-in for the learned compression, given each token's compression block.

    ``k, v [N, Hkv, D]``, ``token_block [N]`` integer in ``[0, num_blocks)`` (every block non-empty) ->
    ``(k_cmp, v_cmp)``, each ``[num_blocks, Hkv, D]`` in the dtype of ``k``. ``mode`` is ``"scaled"``
    (``k_cmp = mean(k) * sqrt(count)``) or ``"plain-mean"`` (``k_cmp = mean(k)``); ``v_cmp = mean(v)`` always.
    """
    if mode not in INPUT_SETS:
        raise ValueError(f"mode must be one of {INPUT_SETS}, got {mode!r}")
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [N, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if token_block.shape != (k.shape[0],):
        raise ValueError(f"token_block must be [N] = [{k.shape[0]}], got {tuple(token_block.shape)}")
    acc = _accumulation_dtype(k.dtype)
    idx = token_block.long()
    count = torch.zeros(num_blocks, dtype=acc, device=k.device).index_add_(
        0, idx, torch.ones(idx.shape[0], dtype=acc, device=k.device)
    )
    if num_blocks and bool((count == 0).any()):
        raise ValueError("every compression block must hold at least one token")
    k_sum = torch.zeros(num_blocks, *k.shape[1:], dtype=acc, device=k.device).index_add_(0, idx, k.to(acc))
    v_sum = torch.zeros(num_blocks, *v.shape[1:], dtype=acc, device=v.device).index_add_(0, idx, v.to(acc))
    c = count.view(-1, 1, 1)
    k_mean, v_mean = k_sum / c, v_sum / c
    k_cmp = k_mean * c.sqrt() if mode == INPUTS_SCALED else k_mean
    return k_cmp.to(k.dtype), v_mean.to(v.dtype)


def compressed_kv(k, v, coords, *, compression_block: int, selection_block: int, mode: str = INPUTS_SCALED):
    """``compressed_kv_from_blocks`` with the blocks read from ``coords [N, 4]`` in layout order."""
    from ssa_kernels.layout import compression_block_index

    cid = compression_block_index(coords, compression_block=compression_block, selection_block=selection_block)
    num_blocks = int(cid[-1]) + 1 if cid.numel() else 0
    return compressed_kv_from_blocks(k, v, cid.to(k.device), num_blocks, mode=mode)


def compressed_kv_for_layout(k, v, layout, *, mode: str = INPUTS_SCALED):
    """``compressed_kv_from_blocks`` with the blocks of a :class:`ssa_kernels.layout.BlockLayout`."""
    return compressed_kv_from_blocks(k, v, layout.token_cmp, layout.num_cmp_blocks, mode=mode)


@dataclass
class SSAInputs:
    """Leaf tensors of one SSA call. ``q [N, Hq, D]``, ``k, v [N, Hkv, D]``, ``k_cmp, v_cmp [Nc, Hkv, D]``,
    ``gate [N, 3]``, ``dout [N, Hq, D]`` (the output gradient of every backward)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    gate: torch.Tensor
    dout: torch.Tensor
    mode: str

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.k_cmp, self.v_cmp,
                                                           self.gate, self.dout))


def _normal(gen, shape, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float32, device=device).to(dtype)


def _open_unit_uniform(gen, shape, dtype, device):
    """Uniform in (0, 1), still strictly inside after rounding to ``dtype`` (bf16 rounds 0.998 up to 1.0)."""
    info = torch.finfo(dtype)
    below_one = 1.0 - info.eps / 2  # the largest value under 1 in a binary float format
    u = torch.rand(*shape, generator=gen, dtype=torch.float32, device=device).to(dtype)
    return u.clamp_(min=info.tiny, max=below_one)


def make_ssa_inputs(layout, num_q_heads: int, num_kv_heads: int, head_dim: int, *, mode: str = INPUTS_SCALED,
                    dtype: torch.dtype = torch.bfloat16, seed: int = SEED, requires_grad: bool = True) -> SSAInputs:
    """BENCHMARK.md's inputs on ``layout.device`` for a layout of ``N`` tokens and ``Nc`` compression blocks."""
    dev = layout.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    n = layout.num_tokens
    q = _normal(gen, (n, num_q_heads, head_dim), dtype, dev)
    k = _normal(gen, (n, num_kv_heads, head_dim), dtype, dev)
    v = _normal(gen, (n, num_kv_heads, head_dim), dtype, dev)
    gate = _open_unit_uniform(gen, (n, NUM_BRANCHES), dtype, dev)
    dout = _normal(gen, (n, num_q_heads, head_dim), dtype, dev)
    k_cmp, v_cmp = compressed_kv_for_layout(k, v, layout, mode=mode)
    leaves = [q, k, v, k_cmp, v_cmp, gate]
    if requires_grad:
        leaves = [t.requires_grad_() for t in leaves]
    return SSAInputs(*leaves, dout=dout, mode=mode)


@dataclass
class DenseInputs:
    """Inputs of a dense baseline: ``q, dout [N, Hq, D]`` and ``k, v [N, Hkv, D]`` (leaves with gradients)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor


def make_dense_inputs(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, *, device,
                      dtype: torch.dtype = torch.bfloat16, seed: int = SEED) -> DenseInputs:
    """Standard-normal q, k, v (and dout) for the dense baselines, drawn like :func:`make_ssa_inputs`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = _normal(gen, (num_tokens, num_q_heads, head_dim), dtype, device).requires_grad_()
    k = _normal(gen, (num_tokens, num_kv_heads, head_dim), dtype, device).requires_grad_()
    v = _normal(gen, (num_tokens, num_kv_heads, head_dim), dtype, device).requires_grad_()
    dout = _normal(gen, (num_tokens, num_q_heads, head_dim), dtype, device)
    return DenseInputs(q, k, v, dout)


__all__ = [
    "INPUTS_PLAIN",
    "INPUTS_SCALED",
    "SEED",
    "SSAInputs",
    "DenseInputs",
    "compressed_kv",
    "compressed_kv_for_layout",
    "compressed_kv_from_blocks",
    "make_dense_inputs",
    "make_ssa_inputs",
]
