"""Gradient-check the kernels on a GPU: ``pytest tests -m gpu`` (skipped without CUDA).

bfloat16 and float16 forward and backward against the float64 reference at 10k-20k tokens, from the shell shapes
and from random multi-batch coordinates. The reference runs on the rounded inputs (so only the kernels' own
arithmetic is measured) and with the kernels' own top-k choice (low-precision scores may order near-tied blocks
differently; the choice itself is compared separately wherever the reference's k-th and (k+1)-th scores are
clearly apart). Every output and gradient buffer the kernels allocate is poisoned with NaN first, so an element
a kernel forgot to write fails the test.

Tolerances (relative norm): bf16 has a unit roundoff of 2^-8 = 3.9e-3 and the kernels round the probabilities to
bf16 before the P.V and dS.K products, so errors land between 1e-3 and 1e-2: we allow 2e-2. float16 (2^-11) gets
4e-3.
"""
import contextlib

import pytest
import torch

import reference
import ssa_kernels
from ssa_kernels.shapes import shape_coords
from tests.helpers import compressed_kv, random_coords, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


class _PoisonedTorch:
    """Stands in for ``torch`` inside the kernel modules: fresh buffers come filled with NaN (or -7 for ints)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-7)

    def empty(self, *a, **kw):
        return self._poison(torch.empty(*a, **kw))

    def empty_like(self, *a, **kw):
        return self._poison(torch.empty_like(*a, **kw))


@contextlib.contextmanager
def poisoned_allocations():
    import ssa_kernels.compression as c
    import ssa_kernels.scoring as sc
    import ssa_kernels.selection as se
    import ssa_kernels.ssa as ss
    import ssa_kernels.window as w

    mods = (c, sc, se, ss, w)
    saved = [m.torch for m in mods]
    try:
        for m in mods:
            m.torch = _PoisonedTorch()
        yield
    finally:
        for m, t in zip(mods, saved):
            m.torch = t


def _inputs(coords, hq, hkv, d, mc, ms, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = coords.shape[0]
    q = torch.randn(n, hq, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(n, hkv, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, device="cuda", generator=gen).to(dtype)
    kc, vc = compressed_kv(k.double(), v.double(), coords, compression_block=mc, selection_block=ms)
    gate = torch.rand(n, 3, device="cuda", generator=gen).to(dtype)
    return [q, k, v, kc.to(dtype), vc.to(dtype), gate]


CASES = [
    pytest.param("shell-512", 32, 2, 32, 8, 8, id="shell-512-v1.1"),
    pytest.param("shell-512", 32, 2, 32, 4, 8, id="shell-512-v1.0"),
    pytest.param("random-multibatch", 16, 2, 64, 4, 8, id="multibatch-d64"),
    pytest.param("random-multibatch", 8, 8, 128, 4, 4, id="multibatch-G1-d128"),
    pytest.param("random-multibatch", 16, 1, 32, 8, 8, id="multibatch-G16"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,hq,hkv,d,mc,topk", CASES)
def test_gpu_whole_op_against_float64_reference(shape, hq, hkv, d, mc, topk, dtype):
    ms, window, shift = 8, 8, 4
    if shape == "random-multibatch":
        coords = random_coords((7000, 2500, 0, 900), 40, compression_block=mc, selection_block=ms,
                               generator=torch.Generator().manual_seed(d)).cuda()
    else:
        coords = shape_coords(shape, compression_block=mc, selection_block=ms).cuda()
    inp = _inputs(coords, hq, hkv, d, mc, ms, dtype, seed=hq * d + mc)
    layout = ssa_kernels.build_layout(coords, compression_block=mc, selection_block=ms, window=window)
    x = [t.clone().requires_grad_() for t in inp]
    do = torch.randn_like(inp[0])
    with poisoned_allocations():
        o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=topk, shift=shift)
        grads = torch.autograd.grad(o, x, do)
        _, lse = ssa_kernels.compression_attention(*[t.detach() for t in (x[0], x[3], x[4])], layout)
        idx = ssa_kernels.select_blocks(x[0].detach(), x[3].detach(), lse, layout, topk=topk)
    for name, t in zip(("o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgate"), (o, *grads)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    assert (idx >= -1).all()

    ref_in = [t.double().requires_grad_() for t in inp]
    kw = dict(compression_block=mc, selection_block=ms, topk=topk, window=window, shift=shift)
    o_ref = reference.spatial_sparse_attention(*ref_in, coords, block_idx=idx, **kw)
    g_ref = torch.autograd.grad(o_ref, ref_in, do.double())
    tol = TOL[dtype]
    assert rel_err(o, o_ref) < tol
    for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gate"), grads, g_ref):
        assert rel_err(a, b) < tol, f"d{name}: {rel_err(a, b):.2e}"

    # the choice: equal to the reference's wherever its k-th and (k+1)-th scores are clearly apart
    with torch.no_grad():
        _, lse_ref = reference.compression_attention(*[t.detach() for t in (ref_in[0], ref_in[3], ref_in[4])], coords,
                                                     compression_block=mc)
        scores = reference.block_scores(ref_in[0].detach(), ref_in[3].detach(), lse_ref, coords, compression_block=mc,
                                        selection_block=ms)
        ref_idx = reference.select_blocks(scores, topk)
        srt = scores.sort(-1, descending=True).values
        k_eff = min(topk, srt.shape[-1] - 1)
        gap = (srt[..., k_eff - 1] - srt[..., k_eff]) / srt[..., 0]
        clear = (gap > 1e-3) | torch.isinf(srt[..., k_eff])
        same = (idx.long().sort(-1).values == ref_idx.sort(-1).values).all(-1)
    assert clear.float().mean() > 0.5
    assert bool(same[clear].all()), f"{int((~same & clear).sum())} clear choices differ"


def test_gpu_deterministic():
    coords = shape_coords("shell-512").cuda()
    inp = _inputs(coords, 32, 2, 32, 8, 8, torch.bfloat16, seed=0)
    layout = ssa_kernels.build_layout(coords, compression_block=8, selection_block=8, window=8)
    do = torch.randn_like(inp[0])
    runs = []
    # either kernel chain of the backward on a side stream of either priority, or all on one stream: the same
    # kernels add into the same accumulators in the same order, so the results are bit-identical every time
    for cfg in ({}, {}, dict(side="dq"), dict(side_priority=0), dict(streams=1)):
        x = [t.clone().requires_grad_() for t in inp]
        with _backward_config(**cfg):
            o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=0)
            runs.append([o, *torch.autograd.grad(o, x, do)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _backward_config(**cfg):
    from ssa_kernels.launch import overriding

    return overriding("ssa.BACKWARD", cfg)


def _assert_like_the_reference(outs, inp, coords, idx, do):
    """``outs`` (the op's output and six gradients on shell-512, bf16, m 8, topk 8, window 8, shift 0) against the
    float64 reference on the same top-k choice ``idx``: every value written, each within the bf16 tolerance."""
    ref_in = [t.double().requires_grad_() for t in inp]
    o_ref = reference.spatial_sparse_attention(*ref_in, coords, block_idx=idx, compression_block=8, selection_block=8,
                                               topk=8, window=8, shift=0)
    g_ref = torch.autograd.grad(o_ref, ref_in, do.double())
    for name, a, b in zip(("o", "q", "k", "v", "k_cmp", "v_cmp", "gate"), outs, (o_ref, *g_ref)):
        assert not torch.isnan(a).any(), name
        assert rel_err(a, b) < TOL[torch.bfloat16], f"{name}: {rel_err(a, b):.2e}"


def _replayed(step):
    """``(graph, outputs)``: ``step()`` run once on a side stream (warm-up), captured in a CUDA graph, replayed once;
    the outputs are the graph's (the graph is returned so that its memory pool stays with them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


@pytest.mark.parametrize("cfg", [{}, dict(side="dq")], ids=["dkdv-side", "dq-side"])
def test_gpu_cuda_graph_capture(cfg):
    coords = shape_coords("shell-512").cuda()
    inp = _inputs(coords, 32, 2, 32, 8, 8, torch.bfloat16, seed=1)
    layout = ssa_kernels.build_layout(coords, compression_block=8, selection_block=8, window=8)
    x = [t.clone().requires_grad_() for t in inp]
    do = torch.randn_like(inp[0])

    def step():
        with _backward_config(**cfg):
            o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=4)
            return [o.detach(), *torch.autograd.grad(o, x, do)]

    eager = step()  # also warms up (compiles) every kernel
    _, captured = _replayed(step)
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_gpu_key_outer_selection_forward_and_dq_against_reference_deterministic_and_in_a_graph():
    """The key-outer selection forward and dQ on shell-512 in bf16 (queries in several chunks: scratch_bytes of
    4 MiB holds 256 tokens' forward partials, 128 tokens' dQ partials): the float64 reference's whole-op output and
    gradients, the query-outer kernels' output within bf16 rounding, every partial written (allocations start as
    NaN), the same bits twice, and the same bits replayed from a CUDA graph (the index and the work list are built
    on the device). The persistent partials kernel (``ko_persistent``) computes each work item as one program per
    item does (its compiled products may be laid out differently, so within float32 rounding after bf16's)."""
    from ssa_kernels.launch import overriding

    coords = shape_coords("shell-512").cuda()
    inp = _inputs(coords, 32, 2, 32, 8, 8, torch.bfloat16, seed=5)
    layout = ssa_kernels.build_layout(coords, compression_block=8, selection_block=8, window=8)
    do = torch.randn_like(inp[0])
    x = [t.clone().requires_grad_() for t in inp]
    settings = dict(key_outer=1, scratch_bytes=2**22)

    def step():
        o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=0)
        return [o.detach(), *torch.autograd.grad(o, x, do)]

    with overriding("selection.FWD", settings), overriding("selection.DQ", settings):
        with poisoned_allocations():
            runs = [step(), step()]
        for a, b in zip(*runs):
            assert not torch.isnan(a).any()
            assert torch.equal(a, b)
        _, captured = _replayed(step)
    for a, b in zip(captured, runs[0]):
        assert torch.equal(a, b)
    with overriding("selection.FWD", dict(settings, ko_persistent=2)), overriding("selection.DQ", settings), \
            poisoned_allocations():
        persistent = step()
    for a, b in zip(persistent, runs[0]):
        assert not torch.isnan(a).any() and rel_err(a, b) < 1e-3
    base = step()
    for a, b in zip(runs[0], base):
        assert rel_err(a, b) < 1e-2
    with torch.no_grad():
        _, lse = ssa_kernels.compression_attention(inp[0], inp[3], inp[4], layout)
        idx = ssa_kernels.select_blocks(inp[0], inp[3], lse, layout, topk=8)
    _assert_like_the_reference(runs[0], inp, coords, idx, do)


def test_gpu_merged_selection_stream_against_reference_and_deterministic():
    """The selection forward and dQ walking each token's blocks as one key stream (launch setting ``merged``) on
    shell-512 v1.1 in bf16: the float64 reference's whole-op output and gradients, every element written, the same
    bits twice, and the block-by-block kernels' output within bf16 rounding."""
    from ssa_kernels.launch import overriding

    coords = shape_coords("shell-512").cuda()
    inp = _inputs(coords, 32, 2, 32, 8, 8, torch.bfloat16, seed=9)
    layout = ssa_kernels.build_layout(coords, compression_block=8, selection_block=8, window=8)
    do = torch.randn_like(inp[0])
    x = [t.clone().requires_grad_() for t in inp]

    def step():
        o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=0)
        return [o.detach(), *torch.autograd.grad(o, x, do)]

    with overriding("selection.FWD", dict(merged=1)), overriding("selection.DQ", dict(merged=1)):
        with poisoned_allocations():
            runs = [step(), step()]
    for a, b in zip(*runs):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b)
    for a, b in zip(runs[0], step()):
        assert rel_err(a, b) < 1e-2
    with torch.no_grad():
        _, lse = ssa_kernels.compression_attention(inp[0], inp[3], inp[4], layout)
        idx = ssa_kernels.select_blocks(inp[0], inp[3], lse, layout, topk=8)
    _assert_like_the_reference(runs[0], inp, coords, idx, do)


@pytest.mark.parametrize("every", [1, 2])
def test_gpu_compression_fma_exponentials(every):
    """Launch setting ``fma_exp_every`` of the compression, scoring and query-outer selection kernels (every k-th
    tile's or product's exponentials from the FMA-unit cubic) on shell-512 v1.1 in bf16: the float64 reference's
    whole-op output and gradients, every element written, the same bits twice."""
    from ssa_kernels.launch import overriding

    coords = shape_coords("shell-512").cuda()
    inp = _inputs(coords, 32, 2, 32, 8, 8, torch.bfloat16, seed=6)
    layout = ssa_kernels.build_layout(coords, compression_block=8, selection_block=8, window=8)
    do = torch.randn_like(inp[0])
    fma = dict(fma_exp_every=every)
    runs = []
    with overriding("compression.FWD", fma), overriding("compression.DQ", fma), \
            overriding("compression.DKDV", fma), overriding("scoring.SCORE", fma), overriding("selection.FWD", fma), \
            overriding("selection.DQ", fma), poisoned_allocations():
        for _ in range(2):
            x = [t.clone().requires_grad_() for t in inp]
            o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=0)
            runs.append([o.detach(), *torch.autograd.grad(o, x, do)])
        with torch.no_grad():
            _, lse = ssa_kernels.compression_attention(inp[0], inp[3], inp[4], layout)
            idx = ssa_kernels.select_blocks(inp[0], inp[3], lse, layout, topk=8)
    for a, b in zip(*runs):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b)
    _assert_like_the_reference(runs[0], inp, coords, idx, do)


@pytest.mark.parametrize("max_queries", [0, 64], ids=["whole-buckets", "split-buckets"])
def test_gpu_selection_dkdv_half_tail_tiles(max_queries):
    """Launch setting ``tail`` (a block's last key tile with at most 32 keys left runs as a 32-key half tile) on
    shell-512 v1.1 in bf16, with whole and with split buckets (half tiles fill half a partial-sum slot, the other
    half stays NaN and must not reach a stored key): the float64 reference's gradients, every element written, the
    same bits twice."""
    from ssa_kernels.launch import overriding

    coords = shape_coords("shell-512").cuda()
    inp = _inputs(coords, 32, 2, 32, 8, 8, torch.bfloat16, seed=4)
    layout = ssa_kernels.build_layout(coords, compression_block=8, selection_block=8, window=8)
    do = torch.randn_like(inp[0])
    runs = []
    with overriding("selection.DKDV", dict(tail=1, block_n=64, max_queries=max_queries)), poisoned_allocations():
        for _ in range(2):
            x = [t.clone().requires_grad_() for t in inp]
            o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=0)
            runs.append([o.detach(), *torch.autograd.grad(o, x, do)])
    for a, b in zip(*runs):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b)
    with torch.no_grad():
        _, lse = ssa_kernels.compression_attention(inp[0], inp[3], inp[4], layout)
        idx = ssa_kernels.select_blocks(inp[0], inp[3], lse, layout, topk=8)
    _assert_like_the_reference(runs[0], inp, coords, idx, do)


def test_gpu_split_selection_dkdv_against_reference_and_deterministic():
    """The selection dK/dV work split (max_queries 64; the partial-sum cap makes the chunks a few hundred queries
    here, so every bucket of shell-512 has several), with blocks that most queries choose: the float64 reference's
    gradients, every partial-sum slot read written (the buffers start as NaN), the same bits twice, and the same
    again inside a CUDA graph (the work list is built on the device, no host synchronisation)."""
    from ssa_kernels.launch import overriding

    coords = shape_coords("shell-512").cuda()
    inp = _inputs(coords, 32, 2, 32, 8, 8, torch.bfloat16, seed=3)
    inp[3][:5] *= 4.0  # a few compressed keys that stand out: blocks most queries choose
    layout = ssa_kernels.build_layout(coords, compression_block=8, selection_block=8, window=8)
    do = torch.randn_like(inp[0])
    runs = []
    with overriding("selection.DKDV", dict(max_queries=64)), poisoned_allocations():
        for _ in range(2):
            x = [t.clone().requires_grad_() for t in inp]
            o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=0)
            runs.append([o, *torch.autograd.grad(o, x, do)])
        _, lse = ssa_kernels.compression_attention(*[t.detach() for t in (x[0], x[3], x[4])], layout)
        idx = ssa_kernels.select_blocks(x[0].detach(), x[3].detach(), lse, layout, topk=8)
        offsets, _ = ssa_kernels.selection.block_query_index(idx, layout.num_sel_blocks)
    counts = offsets[1:] - offsets[:-1]
    assert int(counts.max()) > 10 * 64 and int(counts.max()) > 5 * float(counts.float().mean())
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _assert_like_the_reference(runs[0], inp, coords, idx, do)
    x = [t.clone().requires_grad_() for t in inp]

    def step():
        o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=8, shift=0)
        return [o, *torch.autograd.grad(o, x, do)]

    with overriding("selection.DKDV", dict(max_queries=64)):
        _, captured = _replayed(step)
    for a, b in zip(captured, runs[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mc", [8, 4], ids=["v1.1", "v1.0-aggregated"])
def test_gpu_scoring_whole_chunks_choose_as_the_masked_kernel(mc):
    """Launch settings ``whole_tiles`` (chunks of selection blocks wholly inside the tokens' batch element scored
    without the batch mask) and ``key_rows`` (keys x heads products) of the scoring kernel on shell-512 and on two
    batch elements of different sizes in bf16: ``whole_tiles`` makes the very choice of the masked kernel, every
    slot written (NaN-poisoned buffers hold -7 otherwise); ``key_rows`` sums the heads in another order, so its
    choice may differ where two scores tie to float32 rounding: the same blocks for at least 99.9% of the
    (token, kv head) pairs."""
    from ssa_kernels.launch import overriding

    for coords in (shape_coords("shell-512").cuda(), random_coords((3000, 700), 40, compression_block=mc,
                                                                   selection_block=8).cuda()):
        inp = _inputs(coords, 32, 2, 32, mc, 8, torch.bfloat16, seed=mc)
        layout = ssa_kernels.build_layout(coords, compression_block=mc, selection_block=8, window=8)
        with torch.no_grad():
            _, lse = ssa_kernels.compression_attention(inp[0], inp[3], inp[4], layout)
            picks = []
            for rows in (0, 1):
                for whole in (0, 1):
                    with overriding("scoring.SCORE", dict(whole_tiles=whole, key_rows=rows)), \
                            poisoned_allocations():
                        picks.append(ssa_kernels.select_blocks(inp[0], inp[3], lse, layout, topk=8))
        assert (picks[0] >= -1).all() and torch.equal(picks[0], picks[1])
        assert (picks[2] >= -1).all() and torch.equal(picks[2], picks[3])
        agree = (picks[0].sort(-1).values == picks[2].sort(-1).values).all(-1).float().mean().item()
        assert agree >= 0.999, agree
