"""Dense attention baselines on the same tokens, non-causal, same heads (BENCHMARK.md, DESIGN.md 5).

- ``fa2``: the ``flash_attn`` package when importable, otherwise PyTorch's ``scaled_dot_product_attention``
  restricted to ``SDPBackend.FLASH_ATTENTION`` (PyTorch's copy of the FlashAttention-2 kernels).
- ``cudnn``: ``scaled_dot_product_attention`` restricted to ``SDPBackend.CUDNN_ATTENTION``.
- ``fa3``: ``flash_attn_interface.flash_attn_func`` (FlashAttention-3, Hopper build) when importable.
- ``fa4``: ``flash_attn.cute.flash_attn_func`` (FlashAttention-4, CuTe DSL) when importable.
- ``flex``: ``torch.compile(flex_attention)`` with no block mask (full attention).

Kernels with GQA (flash_attn's, FlexAttention) get ``k, v [N, Hkv, D]`` as they are; SDPA's fused backends get
k and v repeated to ``Hq`` heads beforehand (the repeated tensors are the inputs, made before timing).
:func:`flex_selection_block_mask` builds SSA's selection as a FlexAttention block mask.

Each ``prepare_*`` returns a :class:`DenseOp` or raises :class:`Unavailable` with the reason.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

#: FlexAttention's tile (queries and keys) for the selection block mask.
FLEX_BLOCK_SIZE = 128
#: torch.compile recompiles flex_attention for every new token count; allow that many before falling back to eager.
FLEX_RECOMPILE_LIMIT = 64


class Unavailable(Exception):
    """The baseline cannot run here; the message says why (becomes the skip reason)."""


@dataclass
class DenseOp:
    """``out()`` computes the attention output from leaf tensors ``grad_inputs``; ``dout`` matches its shape."""

    name: str
    impl: str
    gqa: str  # "native" or "repeated to Hq"
    out: Callable[[], torch.Tensor]
    grad_inputs: list[torch.Tensor]
    dout: torch.Tensor


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken CUDA extension
        return None, f"{type(exc).__name__}: {exc}"


def fa2_implementation() -> str:
    """Which FlashAttention-2 runs: ``flash_attn <version>`` or the SDPA FLASH_ATTENTION backend."""
    mod, _ = _try_import("flash_attn")
    if mod is not None and hasattr(mod, "flash_attn_func"):
        return f"flash_attn {getattr(mod, '__version__', '?')}"
    return f"torch {torch.__version__} SDPA FLASH_ATTENTION backend"


def _sdpa_op(name, dense, backend_name: str, *, dry_run: bool) -> DenseOp:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    impl = f"torch {torch.__version__} SDPA {backend_name} backend"
    q = dense.q
    if dry_run and q.device.type == "cpu" and backend_name == "CUDNN_ATTENTION":
        backend = SDPBackend.MATH  # no cuDNN on CPU: the dry run exercises the code path with the math backend
        impl = "dry run on CPU: SDPA MATH backend standing in for CUDNN_ATTENTION"
    group = q.shape[1] // dense.k.shape[1]
    k_rep = dense.k.detach().repeat_interleave(group, dim=1).requires_grad_()
    v_rep = dense.v.detach().repeat_interleave(group, dim=1).requires_grad_()
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k_rep, v_rep))  # [1, H, N, D] views
    dout4 = dense.dout.unsqueeze(0).transpose(1, 2)

    def out():
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4)

    return DenseOp(name, impl, "repeated to Hq", out, [q, k_rep, v_rep], dout4)


def _flash_attn_op(name, dense, func, impl) -> DenseOp:
    q, k, v = (t.unsqueeze(0) for t in (dense.q, dense.k, dense.v))  # [1, N, H, D]

    def out():
        r = func(q, k, v, causal=False)
        return r[0] if isinstance(r, tuple) else r

    return DenseOp(name, impl, "native", out, [dense.q, dense.k, dense.v], dense.dout.unsqueeze(0))


def prepare_fa2(dense, *, dry_run=False) -> DenseOp:
    mod, _ = _try_import("flash_attn")
    if mod is not None and hasattr(mod, "flash_attn_func") and dense.q.is_cuda:
        return _flash_attn_op("fa2", dense, mod.flash_attn_func, fa2_implementation())
    return _sdpa_op("fa2", dense, "FLASH_ATTENTION", dry_run=dry_run)


def prepare_cudnn(dense, *, dry_run=False) -> DenseOp:
    return _sdpa_op("cudnn", dense, "CUDNN_ATTENTION", dry_run=dry_run)


def prepare_fa3(dense, *, dry_run=False) -> DenseOp:
    mod, err = _try_import("flash_attn_interface")
    if mod is None or not hasattr(mod, "flash_attn_func"):
        raise Unavailable(f"FlashAttention-3 not importable (flash_attn_interface: {err or 'no flash_attn_func'})")
    if not dense.q.is_cuda:
        raise Unavailable("FlashAttention-3 needs a CUDA GPU")
    return _flash_attn_op("fa3", dense, mod.flash_attn_func, f"flash_attn_interface (FA3) "
                                                               f"{getattr(mod, '__version__', '')}".strip())


def prepare_fa4(dense, *, dry_run=False) -> DenseOp:
    mod, err = _try_import("flash_attn.cute")
    if mod is None or not hasattr(mod, "flash_attn_func"):
        raise Unavailable(f"FlashAttention-4 not importable (flash_attn.cute: {err or 'no flash_attn_func'})")
    if not dense.q.is_cuda:
        raise Unavailable("FlashAttention-4 needs a CUDA GPU")
    return _flash_attn_op("fa4", dense, mod.flash_attn_func, "flash_attn.cute (FA4)")


_COMPILED_FLEX = None


def flex_function(device):
    """``flex_attention``, compiled on CUDA (eager on CPU, where the dry run only checks the code path)."""
    global _COMPILED_FLEX
    mod, err = _try_import("torch.nn.attention.flex_attention")
    if mod is None:
        raise Unavailable(f"FlexAttention not importable: {err}")
    if torch.device(device).type != "cuda":
        return mod.flex_attention, "flex_attention eager (dry run on CPU)"
    if _COMPILED_FLEX is None:
        import torch._dynamo as dynamo

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), FLEX_RECOMPILE_LIMIT))
        _COMPILED_FLEX = torch.compile(mod.flex_attention, dynamic=False)
    return _COMPILED_FLEX, f"torch {torch.__version__} flex_attention (torch.compile)"


def prepare_flex(dense, *, dry_run=False, block_mask=None) -> DenseOp:
    flex, impl = flex_function(dense.q.device)
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (dense.q, dense.k, dense.v))  # [1, H, N, D]

    def out():
        return flex(q4, k4, v4, block_mask=block_mask, enable_gqa=True)

    return DenseOp("flex", impl, "native", out, [dense.q, dense.k, dense.v], dense.dout.unsqueeze(0).transpose(1, 2))


PREPARE = {"fa2": prepare_fa2, "cudnn": prepare_cudnn, "fa3": prepare_fa3, "fa4": prepare_fa4, "flex": prepare_flex}


def prepare(name: str, dense, *, dry_run: bool = False) -> DenseOp:
    if name not in PREPARE:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(PREPARE)}")
    return PREPARE[name](dense, dry_run=dry_run)


def selection_tile_mask(idx: torch.Tensor, sel_offsets: torch.Tensor, num_tokens: int,
                        block_size: int = FLEX_BLOCK_SIZE) -> torch.Tensor:
    """Which key tiles each query tile needs for the selection branch.

    ``idx [N, Hkv, topk]`` chosen selection blocks (-1 = none), ``sel_offsets [S+1]`` -> ``[Tq, Hkv, Tk]`` bool,
    ``Tq = Tk = ceil(N / block_size)``: tile (i, g, j) is set if a query of tile i chose, for kv head g, a block
    with a token in key tile j. Tiles, not tokens: the exact choice is the mask_mod's job.
    """
    n_tiles = -(-num_tokens // block_size)
    n, hkv, _ = idx.shape
    dev = idx.device
    offsets = sel_offsets.long().to(dev)
    chosen = idx.long()
    valid = chosen >= 0
    b = chosen.clamp_min(0)
    first_tile = torch.div(offsets[b], block_size, rounding_mode="floor")
    last_tile = torch.div(offsets[b + 1] - 1, block_size, rounding_mode="floor")
    max_span = int((last_tile - first_tile).max()) + 1 if chosen.numel() else 0
    q_tile = torch.div(torch.arange(n, device=dev), block_size, rounding_mode="floor").view(n, 1, 1)
    g = torch.arange(hkv, device=dev).view(1, hkv, 1)
    mask = torch.zeros(n_tiles * hkv * n_tiles, dtype=torch.bool, device=dev)
    for step in range(max_span):
        tile = first_tile + step
        ok = valid & (tile <= last_tile)
        flat = ((q_tile * hkv + g) * n_tiles + tile.clamp_max(n_tiles - 1))[ok]
        mask[flat] = True
    return mask.view(n_tiles, hkv, n_tiles)


def flex_selection_block_mask(idx: torch.Tensor, token_sel: torch.Tensor, sel_offsets: torch.Tensor,
                              num_q_heads: int, block_size: int = FLEX_BLOCK_SIZE):
    """SSA's selection as a FlexAttention ``BlockMask`` over ``[1, Hq, N, N]``.

    ``idx [N, Hkv, topk]`` (the top-k choice), ``token_sel [N]`` each token's selection block, ``sel_offsets``.
    Key tiles come from :func:`selection_tile_mask`; the mask_mod keeps exactly the keys whose selection block
    is among the query's choices for the query head's kv head. Index tensors are padded to whole tiles so that
    the mask_mod never reads out of bounds. Returns ``(block_mask, tile_density)``: the fraction of
    (query tile, key tile) pairs FlexAttention visits (1.0 = as many tiles as full attention).
    """
    from torch.nn.attention.flex_attention import BlockMask

    n, hkv, topk = idx.shape
    group = num_q_heads // hkv
    tiles = selection_tile_mask(idx, sel_offsets, n, block_size)  # [Tq, Hkv, Tk]
    n_tiles = tiles.shape[0]
    padded = n_tiles * block_size
    kv_num = tiles.sum(-1, dtype=torch.int32)  # [Tq, Hkv]
    kv_idx = torch.sort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    kv_num = kv_num.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0).contiguous()  # [1, Hq, Tq]
    kv_idx = kv_idx.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0).contiguous()  # [1, Hq, Tq, Tk]
    no_block_query, no_block_key = -1, -2  # padding ids that never match each other or a real block
    idx_pad = torch.full((padded, hkv, topk), no_block_query, dtype=torch.int32, device=idx.device)
    idx_pad[:n] = idx.to(torch.int32)
    sel_pad = torch.full((padded,), no_block_key, dtype=torch.int32, device=idx.device)
    sel_pad[:n] = token_sel.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx_):
        blk = sel_pad[kv_idx_]
        g = h // group
        hit = idx_pad[q_idx, g, 0] == blk
        for j in range(1, topk):
            hit = hit | (idx_pad[q_idx, g, j] == blk)
        return hit

    density = float(tiles.float().mean()) if tiles.numel() else 0.0
    kwargs = {"BLOCK_SIZE": block_size, "mask_mod": mask_mod}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:  # older torch: whole tiles only
        kwargs["seq_lengths"] = (n, n)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, **kwargs)
    return mask, density
