"""The CPU-meaningful part of the benchmark: it runs everywhere, and its figures are labelled CPU."""
import pytest
import torch

import reference
from bench.shapes import CONFIGS, shape_coords
from ssa_kernels.layout import layout_order


@pytest.mark.parametrize("shape", ["shell-512", "shell-1024"])
def test_cpu_layout_order(benchmark, shape):
    coords = shape_coords(shape)
    shuffled = coords[torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(0))]
    benchmark.extra_info.update(device="cpu", shape=shape, tokens=coords.shape[0])
    perm = benchmark(layout_order, shuffled, compression_block=8, selection_block=8)
    assert torch.equal(shuffled[perm], coords)


def test_cpu_reference_small(benchmark):
    """The float32 reference on a 1,000-token slice of shell-512 (v1.1 heads): a CPU yardstick, not a kernel figure."""
    from tests.helpers import compressed_kv

    cfg = CONFIGS["v1.1"]
    coords = shape_coords("shell-512")[:1000]
    gen = torch.Generator().manual_seed(0)
    n = coords.shape[0]
    q = torch.randn(n, cfg.num_q_heads, cfg.head_dim, generator=gen)
    k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    k_cmp, v_cmp = compressed_kv(k, v, coords, compression_block=8, selection_block=8)
    gate = torch.rand(n, 3, generator=gen)
    benchmark.extra_info.update(device="cpu", impl="reference", tokens=n)
    o = benchmark.pedantic(
        reference.spatial_sparse_attention,
        args=(q, k, v, k_cmp, v_cmp, gate, coords),
        kwargs=dict(compression_block=8, selection_block=8, topk=cfg.topk, window=cfg.window, shift=0),
        rounds=3,
        iterations=1,
    )
    assert torch.isfinite(o).all()
