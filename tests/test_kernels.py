"""The Triton kernels against the float64 reference (CPU: Triton interpreter, float32 and float16).

Errors are relative norms ``||x - ref|| / ||ref||``; float32 must land under 1e-5. Every case draws fresh random
inputs. Cases cover several batch elements of different sizes (one of them empty), GQA ratios 1..16, head dims
16..128, compression blocks 1/2/4/8, one-token blocks, fewer blocks than topk, both window shifts.

The interpreter runs every program of a kernel in Python, so its time grows with tokens x topk x heads: each case
uses as few tokens as still give what it is about (several blocks per batch element, a real top-k choice, ...).
"""

import pytest
import torch

import reference
import ssa_kernels
from ssa_kernels.selection import block_query_index, split_buckets
from tests.helpers import random_coords, random_inputs, rel_err, spy_launches

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

F32_TOL = 1e-5
F16_TOL = 5e-3

# (sizes, extent, m_cmp, m_slc, Hq, Hkv, D, topk, shift)
CASES = [
    pytest.param((45, 0, 30), 16, 4, 8, 8, 2, 32, 3, 4, id="multibatch-empty-G4-d32-v1.0"),
    pytest.param((48,), 12, 8, 8, 32, 2, 32, 4, 0, id="G16-d32-v1.1"),
    pytest.param((40, 30), 16, 4, 8, 2, 2, 16, 2, 0, id="G1-d16"),
    # at most 8 selection blocks per batch element (extent 10 < 2 * 8): never more than topk, the 5-token one fewer
    pytest.param((24, 5), 10, 2, 8, 6, 2, 64, 8, 4, id="G3-d64-fewer-blocks-than-topk"),
    pytest.param((25,), 8, 4, 8, 2, 1, 128, 2, 4, id="G2-d128"),
    pytest.param((30, 12), 5, 1, 1, 2, 2, 16, 6, 0, id="one-token-blocks"),
]


def _make(sizes, extent, mc, ms, hq, hkv, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    coords = random_coords(sizes, extent, compression_block=mc, selection_block=ms, generator=gen)
    inp = random_inputs(coords, hq, hkv, d, compression_block=mc, selection_block=ms, generator=gen, dtype=dtype)
    return coords, inp


def _assert_like_reference(o, grads, o_ref, grads_ref, tol):
    """The output and the six gradients (q, k, v, k_cmp, v_cmp, gate) within ``tol`` (relative norm) of the
    reference's."""
    assert len(grads) == len(grads_ref) == 6
    assert rel_err(o, o_ref) < tol
    for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gate"), grads, grads_ref):
        assert rel_err(a, b) < tol, f"d{name}: {rel_err(a, b):.2e}"


def _against_reference(coords, inp, dtype, *, mc, ms, topk, window, shift):
    """``(o, grads, o_ref, grads_ref)``: the kernels' whole op in ``dtype`` and the float64 reference, both
    differentiated against the same random output gradient."""
    ref_in = [t.clone().requires_grad_() for t in inp]
    o_ref = reference.spatial_sparse_attention(*ref_in, coords, compression_block=mc, selection_block=ms, topk=topk,
                                               window=window, shift=shift)
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, ref_in, do)
    layout = ssa_kernels.build_layout(coords, compression_block=mc, selection_block=ms, window=window)
    x = [t.to(dtype).requires_grad_() for t in inp]
    o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=topk, shift=shift)
    return o, torch.autograd.grad(o, x, do.to(dtype)), o_ref, g_ref


@pytest.mark.parametrize("sizes,extent,mc,ms,hq,hkv,d,topk,shift", CASES)
def test_whole_op_forward_and_six_gradients_float32(sizes, extent, mc, ms, hq, hkv, d, topk, shift):
    seed = torch.randint(0, 2**31, ()).item()
    coords, inp = _make(sizes, extent, mc, ms, hq, hkv, d, seed)
    o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float32, mc=mc, ms=ms, topk=topk, window=max(ms, 2),
                                            shift=shift)
    assert o.dtype == torch.float32
    assert rel_err(o, o_ref) < F32_TOL, f"seed {seed}"
    for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gate"), g, g_ref):
        assert rel_err(a, b) < F32_TOL, f"d{name}: {rel_err(a, b):.2e} (seed {seed})"


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")
@pytest.mark.parametrize("max_queries", [0, 2], ids=["whole-buckets", "split-buckets"])
def test_whole_op_gates_of_any_sign_and_zero(max_queries):
    """The backward kernels fold |gate| into the log-sum-exp and apply its sign apart (dQ rows, the SIGNED dK/dV
    variant): negative gates, exact zeros (log -> -inf) and gates above 1 must still give the reference's
    gradients; also with the selection dK/dV work split into chunks of 2 queries (both variants launched, the
    partial sums added after them)."""
    ctx = ssa_kernels.launch.overriding("selection.DKDV", dict(max_queries=max_queries))
    with ctx:
        _gates_of_any_sign_and_zero()


def _gates_of_any_sign_and_zero():
    coords, inp = _make((40, 20), 12, 4, 8, 8, 2, 32, seed=5)
    gate = torch.randn(coords.shape[0], 3, dtype=torch.float64) * 2
    gate[::7, 0] = 0.0
    gate[::5, 1] = 0.0
    gate[::3, 2] = -0.0
    gate[1::11] = 0.0  # every branch of some tokens
    inp = inp[:5] + [gate]
    assert (gate < 0).any() and (gate > 1).any()
    o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float32, mc=4, ms=8, topk=3, window=8, shift=4)
    assert rel_err(o, o_ref) < F32_TOL
    for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gate"), g, g_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < F32_TOL, f"d{name}: {rel_err(a, b):.2e}"


def test_whole_op_on_views_of_one_merged_projection():
    """q, k, v and the gate as column slices of one ``[N, Hq*D + 2*Hkv*D + 3]`` float32 matrix (what a merged
    projection gives: unit last stride, the row stride of the whole matrix), and v_cmp with other strides than
    k_cmp: the kernels address k and v (k_cmp and v_cmp) with one set of strides and the gate as rows of 3, so the
    op must hand them over in matching layouts. Output and gradients as the reference's."""
    coords, inp = _make((40, 21), 12, 4, 8, 8, 2, 32, seed=13)
    q, k, v, k_cmp, v_cmp, gate = inp
    n = q.shape[0]
    ref_in = [t.clone().requires_grad_() for t in inp]
    o_ref = reference.spatial_sparse_attention(*ref_in, coords, compression_block=4, selection_block=8, topk=3,
                                               window=8, shift=4)
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, ref_in, do)
    merged = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1), gate, torch.zeros(n, 5,
                       dtype=q.dtype)], dim=1).float().requires_grad_()
    cols = torch.tensor([0, q[0].numel(), k[0].numel(), v[0].numel(), 3]).cumsum(0).tolist()
    views = [merged[:, a:b] for a, b in zip(cols[:-1], cols[1:])]
    q2, k2, v2 = (t.view(n, *s.shape[1:]) for t, s in zip(views[:3], (q, k, v)))
    cmp = torch.cat([k_cmp, v_cmp], dim=2).float().requires_grad_()  # k_cmp, v_cmp: views of a wider tensor
    d = k_cmp.shape[2]
    k_cmp2, v_cmp2 = cmp[:, :, :d], cmp[:, :, d:]
    assert k2.stride() == v2.stride() and k2.stride(0) == merged.shape[1] and views[3].stride(0) != 3
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    o = ssa_kernels.spatial_sparse_attention(q2, k2, v2, k_cmp2, v_cmp2, views[3], layout, topk=3, shift=4)
    assert rel_err(o, o_ref) < F32_TOL
    gm, gc = torch.autograd.grad(o, [merged, cmp], do.float())
    grads = [gm[:, a:b] for a, b in zip(cols[:-1], cols[1:])] + [gc[:, :, :d], gc[:, :, d:]]
    for name, a, b in zip(("q", "k", "v", "gate", "k_cmp", "v_cmp"), grads, [*g_ref[:3], g_ref[5], *g_ref[3:5]]):
        assert rel_err(a.reshape(b.shape), b) < F32_TOL, f"d{name}: {rel_err(a.reshape(b.shape), b):.2e}"
    v_other = v.float().permute(0, 2, 1).contiguous().permute(0, 2, 1)  # no unit last stride
    o2 = ssa_kernels.spatial_sparse_attention(q.float(), k.float(), v_other, k_cmp.float(), v_cmp.float(),
                                              gate.float(), layout, topk=3, shift=4)
    assert rel_err(o2, o_ref) < F32_TOL


@pytest.mark.parametrize("every", [1, 2])
def test_whole_op_float16_with_fma_exponentials_in_the_compression_kernels(every):
    """Launch setting ``fma_exp_every`` of the three compression kernels (every k-th tile's exponentials from the
    FMA-unit cubic, ``exp2_fma``; 16-key tiles so that a program walks several): the whole op in float16 against
    the float64 reference, with the kernels launched with the setting."""
    import ssa_kernels.compression as compression

    coords, inp = _make((48, 24), 14, 4, 8, 8, 2, 32, seed=11)
    fma = dict(fma_exp_every=every)
    with pytest.MonkeyPatch.context() as mp:
        seen = spy_launches(mp, compression, ("_cmp_fwd_kernel", "_cmp_bwd_dq_kernel", "_cmp_bwd_dkdv_kernel"),
                             "FMA_EVERY")
        with ssa_kernels.launch.overriding("compression.FWD", dict(fma, block_n=16)), \
                ssa_kernels.launch.overriding("compression.DQ", dict(fma, block_n=16)), \
                ssa_kernels.launch.overriding("compression.DKDV", dict(fma, rows=16)):
            o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float16, mc=4, ms=8, topk=3, window=8,
                                                    shift=0)
    assert len(seen) >= 3 and set(seen) == {every}
    _assert_like_reference(o, g, o_ref, g_ref, F16_TOL)


@pytest.mark.parametrize("every", [0, 2])
def test_whole_op_with_unmasked_whole_selection_tiles(every):
    """Launch setting ``whole_tiles`` of the query-outer selection forward and dQ (one-token programs: a block's
    whole key tiles without the per-score mask, the part-filled last one masked; 16-key tiles so that blocks hold
    several of each), alone and with FMA exponentials on every 2nd tile: the whole op in float16 against the
    float64 reference, with the kernels launched with the setting."""
    import ssa_kernels.selection as selection

    coords, inp = _make((48, 24), 14, 4, 8, 16, 1, 32, seed=29 + every)
    cfg = dict(whole_tiles=1, block_n=16, fma_exp_every=every)
    with pytest.MonkeyPatch.context() as mp:
        seen = spy_launches(mp, selection, ("_sel_fwd_kernel", "_sel_bwd_dq_kernel"), "WHOLE_TILES", "FMA_EVERY")
        with ssa_kernels.launch.overriding("selection.FWD", cfg), ssa_kernels.launch.overriding("selection.DQ", cfg):
            o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float16, mc=4, ms=8, topk=3, window=8,
                                                    shift=4)
    assert len(seen) == 2 and set(seen) == {(True, every)}
    _assert_like_reference(o, g, o_ref, g_ref, F16_TOL)


@pytest.mark.parametrize("every,merged,hq,hkv", [(1, 0, 8, 2), (2, 0, 8, 2), (3, 0, 16, 1), (2, 1, 16, 1)],
                         ids=["every1-4tok", "every2-4tok", "every3-1tok", "every2-merged"])
def test_whole_op_float16_with_fma_exponentials_in_the_selection_kernels(every, merged, hq, hkv):
    """Launch setting ``fma_exp_every`` of the query-outer selection forward and dQ (every k-th key tile a program
    visits, counted over its blocks, takes its exponentials from ``exp2_fma``; 16-key tiles; tiles of 4 tokens and
    of one, block by block and as one merged stream): the whole op in float16 against the float64 reference."""
    import ssa_kernels.selection as selection

    coords, inp = _make((48, 24), 14, 4, 8, hq, hkv, 32, seed=17 + every)
    cfg = dict(fma_exp_every=every, block_n=16, merged=merged)
    with pytest.MonkeyPatch.context() as mp:
        seen = spy_launches(mp, selection, ("_sel_fwd_kernel", "_sel_bwd_dq_kernel"), "FMA_EVERY", "MERGED")
        with ssa_kernels.launch.overriding("selection.FWD", cfg), ssa_kernels.launch.overriding("selection.DQ", cfg):
            o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float16, mc=4, ms=8, topk=3, window=8,
                                                    shift=4)
    assert len(seen) == 2 and set(seen) == {(every, bool(merged))}
    _assert_like_reference(o, g, o_ref, g_ref, F16_TOL)


@pytest.mark.parametrize("every", [1, 2])
def test_whole_op_float16_with_fma_exponentials_in_scoring(every):
    """Launch setting ``fma_exp_every`` of the scoring kernel (16 heads per kv group: one token per matrix product,
    4 tokens per program, every k-th product's exponentials from ``exp2_fma``): the whole op in float16 against the
    float64 reference, the kernel launched with the setting."""
    import ssa_kernels.scoring as scoring

    coords, inp = _make((40, 25), 16, 4, 8, 16, 1, 32, seed=13)
    with pytest.MonkeyPatch.context() as mp:
        steps = spy_launches(mp, scoring, ("_score_topk_kernel",), "FMA_STEP", "TOK_LOOP")
        with ssa_kernels.launch.overriding("scoring.SCORE", dict(fma_exp_every=every, tokens_per_program=4)):
            o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float16, mc=4, ms=8, topk=3, window=8,
                                                    shift=0)
    assert steps and all(step == (every, 4) for step in steps)
    _assert_like_reference(o, g, o_ref, g_ref, F16_TOL)


def test_whole_op_float16():
    coords, inp = _make((48, 24), 14, 4, 8, 8, 2, 32, seed=11)
    o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float16, mc=4, ms=8, topk=3, window=8, shift=0)
    assert o.dtype == torch.float16
    _assert_like_reference(o, g, o_ref, g_ref, F16_TOL)


def test_whole_op_backward_in_another_kernel_order(monkeypatch):
    """The backward's two kernel chains (``ssa.BACKWARD``) in other orders: the first dQ kernel must write and
    the others add, whichever comes first, so the gradients still match the reference. A bad order is refused.
    One forward serves every order (the graph is kept)."""
    from ssa_kernels.launch import overriding

    coords, inp = _make((40, 20), 12, 4, 8, 8, 2, 16, seed=3)
    ref_in = [t.clone().requires_grad_() for t in inp]
    o_ref = reference.spatial_sparse_attention(*ref_in, coords, compression_block=4, selection_block=8, topk=3,
                                               window=8, shift=4)
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, ref_in, do)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    x = [t.float().requires_grad_() for t in inp]
    o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=3, shift=4)
    for order in (dict(dq_order="sel-cmp-win", dkdv_order="sel-cmp-win", streams=2),
                  dict(dq_order="win-sel-cmp", dkdv_order="cmp-sel-win", streams=1)):
        with overriding("ssa.BACKWARD", order):
            g = torch.autograd.grad(o, x, do.float(), retain_graph=True)
        for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gate"), g, g_ref):
            assert rel_err(a, b) < F32_TOL, f"{order} d{name}: {rel_err(a, b):.2e}"
    for key, bad in (("dq_order", "cmp-sel"), ("dkdv_order", "cmp-cmp-win"), ("side", "dk")):
        with overriding("ssa.BACKWARD", {key: bad}), pytest.raises(ValueError, match=key):
            torch.autograd.grad(o.sum(), x, retain_graph=True)


def test_whole_op_recomputes_the_window_output_above_the_size_setting():
    """With ``recompute_window_bytes`` below q's size the forward keeps no window output and the backward recomputes
    it with the same kernel: the gradients are bitwise those of the path that keeps it."""
    from ssa_kernels.launch import overriding
    from ssa_kernels.ssa import RECOMPUTE_WINDOW_SETTING

    coords, inp = _make((40, 20), 12, 4, 8, 8, 2, 16, seed=5)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    do = torch.randn(inp[0].shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for limit in (2**40, 0):
        x = [t.float().requires_grad_() for t in inp]
        with overriding("ssa.BACKWARD", {RECOMPUTE_WINDOW_SETTING: limit}):
            o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=3, shift=4)
            saved = [t for t in o.grad_fn.saved_tensors if t.dim() == 3 and t.shape == x[0].shape]
            grads.append(torch.autograd.grad(o, x, do))
        # q and the branch outputs: the window's only when kept
        assert len(saved) == (4 if limit else 3), [tuple(t.shape) for t in saved]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mc", [4, 8])
def test_compression_branch(mc):
    coords, (q, k, v, kc, vc, gate) = _make((60, 0, 50), 16, mc, 8, 8, 2, 32, seed=mc)
    ref_in = [t.clone().requires_grad_() for t in (q, kc, vc)]
    o_ref, lse_ref = reference.compression_attention(*ref_in, coords, compression_block=mc)
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, ref_in, do)
    layout = ssa_kernels.build_layout(coords, compression_block=mc, selection_block=8, window=8)
    x = [t.float().requires_grad_() for t in (q, kc, vc)]
    o, lse = ssa_kernels.compression_attention(*x, layout)
    g = torch.autograd.grad(o, x, do.float())
    assert rel_err(o, o_ref) < F32_TOL and rel_err(lse, lse_ref) < F32_TOL
    assert all(rel_err(a, b) < F32_TOL for a, b in zip(g, g_ref))


@pytest.mark.parametrize("mc,hq,hkv,topk,aggregates", [
    (4, 8, 2, 4, ("prefix", "mask")), (8, 32, 2, 8, ("prefix",)), (2, 3, 1, 5, ("prefix", "mask")),
    (4, 4, 4, 16, ("prefix",)), (4, 32, 2, 8, ("prefix", "mask"))],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else None)
def test_select_blocks_equals_reference_where_not_tied(mc, hq, hkv, topk, aggregates, monkeypatch):
    """Both ways of summing compressed keys into selection blocks (``aggregate``; with ``mc == ms`` there is
    nothing to sum) on the same inputs, at the default chunks and (some layouts) at 16-block chunks of 16-key
    tiles, masked and with ``whole_tiles`` (the chunks wholly inside the tokens' batch element unmasked: the very
    same choice as masked), and, where 16 or more heads share a kv head, with ``key_rows`` (keys x heads
    products, the head sum along rows: the same choice with or without ``whole_tiles``). The first batch element
    (70 tokens) has more selection blocks than topk (about 23 of 27: asserted), the last (7 tokens) fewer than topk
    8 and 16."""
    import ssa_kernels.scoring as scoring
    from ssa_kernels.launch import overriding

    coords, (q, k, v, kc, vc, gate) = _make((70, 20, 0, 7), 20, mc, 8, hq, hkv, 16, seed=hq * 7 + topk)
    _, lse_ref = reference.compression_attention(q, kc, vc, coords, compression_block=mc)
    scores = reference.block_scores(q, kc, lse_ref, coords, compression_block=mc, selection_block=8)
    ref_idx = reference.select_blocks(scores, topk)
    layout = ssa_kernels.build_layout(coords, compression_block=mc, selection_block=8, window=8)
    assert int((layout.batch_sel_offsets[1:] - layout.batch_sel_offsets[:-1]).max()) > topk
    _, lse = ssa_kernels.compression_attention(q.float(), kc.float(), vc.float(), layout)
    # compare where the reference's k-th and (k+1)-th scores are clearly apart
    srt = scores.sort(-1, descending=True).values
    k_eff = min(topk, srt.shape[-1] - 1)
    gap = (srt[..., k_eff - 1] - srt[..., k_eff]).abs() / srt[..., 0].clamp_min(1e-30)
    clear = (gap > 1e-5) | torch.isinf(srt[..., k_eff])
    assert clear.float().mean() > 0.9
    launched = spy_launches(monkeypatch, scoring, ("_score_topk_kernel",), "WHOLE_TILES", "KEY_ROWS")
    small = dict(block_n=16, block_s=16)
    # the unmasked chunks on one layout of each kind (one compressed block per selection block, several)
    whole_pairs = [(small, dict(small, whole_tiles=1))] if (mc, hq) in ((8, 32), (4, 8)) else []
    expect = []
    for aggregate in aggregates:
        pairs = list(whole_pairs)
        if hq // hkv >= 16 and aggregate == aggregates[0]:  # key rows: one token per product
            pairs.append((dict(small, key_rows=1), dict(small, key_rows=1, whole_tiles=1)))
        variants = [{}] + [v for pair in pairs for v in pair]
        expect += [(bool(v.get("whole_tiles")), bool(v.get("key_rows"))) for v in variants]
        picks = []
        for settings in variants:
            with overriding("scoring.SCORE", {"aggregate": aggregate, **settings}):
                idx = ssa_kernels.select_blocks(q.float(), kc.float(), lse, layout, topk=topk)
            assert idx.dtype == torch.int32 and idx.shape == ref_idx.shape
            same = (idx.long().sort(-1).values == ref_idx.sort(-1).values).all(-1)
            assert bool(same[clear].all()), (aggregate, settings)
            # -1 exactly where the batch element has fewer blocks than topk, and in order: best first
            assert torch.equal(idx < 0, ref_idx < 0), (aggregate, settings)
            picks.append(idx)
        for i in range(len(pairs)):  # whole_tiles: the same scores, so the same choice
            assert torch.equal(picks[1 + 2 * i], picks[2 + 2 * i]), (aggregate, pairs[i])
    assert launched == expect


def _choice(layout, hkv, topk, pick):
    """A top-k choice ``idx [N, Hkv, topk]`` int32: ``pick(lo, hi, g)`` lists the blocks (ids in ``[lo, hi)``, the
    token's batch element) one token chooses for kv head g; the slots after them stay -1."""
    idx = torch.full((layout.num_tokens, hkv, topk), -1, dtype=torch.int32)
    bounds = layout.batch_sel_offsets.tolist()
    for t, b in enumerate(layout.token_batch.tolist()):
        for g in range(hkv):
            blocks = pick(bounds[b], bounds[b + 1], g)
            idx[t, g, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return idx


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 32), (4, 4, 16), (16, 1, 64)])
def test_selection_branch_given_the_reference_choice(hq, hkv, d):
    coords, (q, k, v, kc, vc, gate) = _make((40, 25), 16, 4, 8, hq, hkv, d, seed=hq + d)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    gen = torch.Generator().manual_seed(d)

    def pick(lo, hi, g):  # up to 4 distinct random blocks of the token's batch element, some slots empty
        return (lo + torch.randperm(hi - lo, generator=gen)[:int(torch.randint(1, 5, (), generator=gen))]).tolist()

    idx = _choice(layout, hkv, 4, pick)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = reference.selection_attention(*ref_in, idx, coords, selection_block=8)
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, ref_in, do)
    x = [t.float().requires_grad_() for t in (q, k, v)]
    o = ssa_kernels.selection_attention(*x, idx.int(), layout)
    g = torch.autograd.grad(o, x, do.float())
    assert rel_err(o, o_ref) < F32_TOL
    assert all(rel_err(a, b) < F32_TOL for a, b in zip(g, g_ref))


@pytest.mark.parametrize("hq,hkv,d,scratch", [(8, 2, 32, 2**29), (16, 1, 64, 2**29), (4, 4, 16, 20_000)],
                         ids=["G4-d32", "G16-d64", "G1-d16-in-4-chunks"])
def test_selection_forward_key_outer_equals_reference(hq, hkv, d, scratch, monkeypatch):
    """The key-outer forward (one block x the queries that chose it, then each query's partials merged): the
    float64 reference's output and log-sum-exp, with empty slots, a hub block most queries chose, and queries in
    chunks (at G1-d16 a token's partials take 4 x 4 x 1 x 16 x 4 = 1,024 bytes, so ``scratch_bytes`` of 20,000
    makes chunks of 19 tokens: 4 chunks of the 65). With ``ko_persistent`` (two programs per interpreter
    "multiprocessor", each looping over many work items with the next one's loads ahead) the very same result."""
    import ssa_kernels.selection as selection
    import ssa_kernels.selection_key_outer as key_outer

    coords, (q, k, v, *_) = _make((40, 25), 16, 4, 8, hq, hkv, d, seed=hq + d + scratch % 7)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    gen = torch.Generator().manual_seed(d)

    def pick(lo, hi, g):  # a hub block, then up to 3 distinct random ones; some slots stay empty
        hub = lo + g % (hi - lo)
        rest = [blk for blk in (lo + torch.randperm(hi - lo, generator=gen)).tolist() if blk != hub]
        return [hub] + rest[: int(torch.randint(0, 4, (), generator=gen))]

    idx = _choice(layout, hkv, 4, pick)
    o_ref, lse_ref = reference.selection_attention(q, k, v, idx, coords, selection_block=8, return_lse=True)
    settings = dict(key_outer=1, scratch_bytes=scratch, ko_rows=32, merge_rows=16)
    persistent = spy_launches(monkeypatch, key_outer, ("_sel_fwd_ko_kernel",), "PERSISTENT")
    outs = []
    for programs in (0, 2):
        with ssa_kernels.launch.overriding("selection.FWD", dict(settings, ko_persistent=programs)):
            outs.append(selection.selection_forward(q.float(), k.float(), v.float(), idx, layout, d**-0.5))
    (o, lse), again = outs
    assert rel_err(o, o_ref) < F32_TOL
    assert rel_err(lse, lse_ref) < F32_TOL
    assert torch.equal(again[0], o) and torch.equal(again[1], lse)
    chunks = len(persistent) // 2
    assert persistent == [False] * chunks + [True] * chunks


def test_whole_op_with_the_key_outer_selection_forward_and_dq():
    """The whole op (several batch elements, one empty; fewer blocks than topk in one) with the key-outer selection
    forward and dQ (the dQ in chunks of 8 tokens: 2 x 3 x 4 x 32 x 4 bytes each): output and the six gradients
    against the float64 reference, as with the query-outer kernels."""
    coords, inp = _make((45, 0, 30), 16, 4, 8, 8, 2, 32, seed=11)
    ko = dict(key_outer=1, ko_rows=32, merge_rows=16)
    with ssa_kernels.launch.overriding("selection.FWD", ko), \
            ssa_kernels.launch.overriding("selection.DQ", {**ko, "scratch_bytes": 8 * 2 * 3 * 4 * 32 * 4}):
        o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float32, mc=4, ms=8, topk=3, window=8, shift=4)
    _assert_like_reference(o, g, o_ref, g_ref, F32_TOL)


@pytest.mark.parametrize("hq,hkv,d", [(16, 1, 32), (32, 2, 16)], ids=["G16-d32", "G16-d16-2kv"])
def test_whole_op_with_the_merged_selection_stream(hq, hkv, d):
    """The query-outer selection forward and dQ walking each token's blocks as one stream of 16-key tiles (launch
    setting ``merged``; one token per program at 16 heads per kv group): the whole op (several batch elements, one
    empty; fewer blocks than topk in places) against the float64 reference, and the merged kernels really ran."""
    import ssa_kernels.selection as selection

    coords, inp = _make((45, 0, 30), 16, 4, 8, hq, hkv, d, seed=hq + d)
    merged = dict(merged=1, block_n=16)
    with pytest.MonkeyPatch.context() as mp:
        launched = spy_launches(mp, selection, ("_sel_fwd_kernel", "_sel_bwd_dq_kernel"), "MERGED")
        with ssa_kernels.launch.overriding("selection.FWD", merged), \
                ssa_kernels.launch.overriding("selection.DQ", merged):
            o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float32, mc=4, ms=8, topk=3, window=8,
                                                    shift=4)
    assert launched and all(launched)
    _assert_like_reference(o, g, o_ref, g_ref, F32_TOL)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")
def test_key_outer_selection_dq_with_gates_of_any_sign_equals_the_query_outer_one(monkeypatch):
    """The key-outer selection dQ against the query-outer one on the same choice, with gates of both signs and
    zero (the sign applied when the partials are summed, the magnitude folded into the log-sum-exp), written into
    a fresh accumulator and (persistent partials programs, ``ko_persistent``) added to a given one."""
    import ssa_kernels.selection_key_outer as key_outer

    persistent = spy_launches(monkeypatch, key_outer, ("_sel_bwd_dq_ko_kernel",), "PERSISTENT")
    hq, hkv, d = 8, 2, 32
    coords, (q, k, v, *_) = _make((40, 25), 16, 4, 8, hq, hkv, d, seed=5)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    gen = torch.Generator().manual_seed(5)

    def pick(lo, hi, g):
        return (lo + torch.randperm(hi - lo, generator=gen)[:int(torch.randint(1, 5, (), generator=gen))]).tolist()

    idx = _choice(layout, hkv, 4, pick)
    q, k, v = q.float(), k.float(), v.float()
    o, lse = ssa_kernels.selection.selection_forward(q, k, v, idx, layout, d**-0.5)
    do = torch.randn_like(o)
    delta = (do * o).sum(-1)
    gate = torch.randn(q.shape[0], 3, generator=gen)
    gate[::5, 1] = 0.0
    run = lambda **kw: ssa_kernels.selection.selection_backward(  # noqa: E731
        do, q, k, v, idx, lse, delta, layout, d**-0.5, gate=gate, gate_idx=1, parts=("dq",), **kw)[0]
    want = run()
    base = torch.randn_like(q)
    want_added = run(dq_acc=base.clone(), dk_acc=None, dv_acc=None, accumulate=True)
    ko = dict(key_outer=1, ko_rows=32, merge_rows=16)
    with ssa_kernels.launch.overriding("selection.DQ", ko):
        got = run()
    with ssa_kernels.launch.overriding("selection.DQ", dict(ko, ko_persistent=2)):
        got_added = run(dq_acc=base.clone(), dk_acc=None, dv_acc=None, accumulate=True)
    assert rel_err(got, want) < F32_TOL
    assert rel_err(got_added, want_added) < F32_TOL
    assert persistent == [False, True]


@pytest.mark.parametrize("max_queries", [1, 3, 7])
def test_selection_dkdv_split_over_a_block_most_queries_chose(max_queries):
    """A block chosen by most queries (a "hub", as a model's attention makes them) is cut into chunks of
    ``max_queries`` queries whose partial dK/dV are added in chunk order: the float64 reference's gradients, and the
    same bits on a second run."""
    hq, hkv, d = 4, 2, 16
    coords, (q, k, v, *_) = _make((40, 25), 16, 4, 8, hq, hkv, d, seed=max_queries)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    gen = torch.Generator().manual_seed(max_queries)

    def pick(lo, hi, g):
        hub = lo + g % (hi - lo)  # every token of the batch element chooses it
        rest = [blk for blk in (lo + torch.randperm(hi - lo, generator=gen)).tolist() if blk != hub]
        return [hub] + rest[: int(torch.randint(0, 3, (), generator=gen))]

    idx = _choice(layout, hkv, 3, pick)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = reference.selection_attention(*ref_in, idx, coords, selection_block=8)
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, ref_in, do)
    runs = []
    with ssa_kernels.launch.overriding("selection.DKDV", dict(max_queries=max_queries)):
        for _ in range(2):
            x = [t.float().requires_grad_() for t in (q, k, v)]
            runs.append(torch.autograd.grad(ssa_kernels.selection_attention(*x, idx, layout), x, do.float()))
    assert all(rel_err(a, b) < F32_TOL for a, b in zip(runs[0], g_ref))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("max_queries", [0, 2], ids=["whole-buckets", "split-buckets"])
def test_selection_dkdv_half_tail_tiles(max_queries):
    """Launch setting ``tail``: a block's last key tile with at most half a tile of keys left runs as a half tile
    (32-key tiles, so 16-key halves), with whole buckets and with buckets split into chunks (the half tiles' partial
    sums fill half a slot): the whole op against the float64 reference; blocks whose last tile is a half tile and
    blocks whose last tile is not are both present, and the kernel ran with ``TAIL``."""
    import ssa_kernels.selection as selection

    hq, hkv, d = 4, 2, 16
    coords, inp = _make((150,), 16, 4, 8, hq, hkv, d, seed=11)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    last = torch.diff(layout.sel_offsets.long()) % 32
    assert ((last > 0) & (last <= 16)).any() and ((last == 0) | (last > 16)).any()
    with pytest.MonkeyPatch.context() as mp:
        launched = spy_launches(mp, selection, ("_sel_bwd_dkdv_kernel",), "TAIL")
        with ssa_kernels.launch.overriding("selection.DKDV", dict(tail=1, block_n=32, max_queries=max_queries)):
            o, g, o_ref, g_ref = _against_reference(coords, inp, torch.float32, mc=4, ms=8, topk=3, window=8,
                                                    shift=4)
    assert launched and all(launched)
    _assert_like_reference(o, g, o_ref, g_ref, F32_TOL)


@pytest.mark.parametrize("max_queries", [1, 2, 5, 1000])
def test_split_buckets_cover_every_query_once(max_queries):
    gen = torch.Generator().manual_seed(max_queries)
    counts = torch.randint(0, 12, (30,), generator=gen)
    counts[4] = 0
    counts[7] = 200
    offsets = torch.zeros(31, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    bound = int(offsets[-1]) + 3  # any bound at least the number of entries
    item_bucket, item_start, slots = split_buckets(offsets, max_queries, bound)
    assert item_bucket.numel() == 30 + slots
    chunks = (item_start[1:] - item_start[:-1]).tolist()
    for b, c in enumerate(counts.tolist()):
        assert chunks[b] == max(1, -(-c // max_queries))
        assert (item_bucket[item_start[b]: item_start[b + 1]] == b).all()
    assert (item_bucket[int(item_start[-1]):] == 30).all()  # spare items do nothing
    assert int(item_start[-1]) - 30 <= slots  # chunks after the first fit the partial-sum slots
    with pytest.raises(ValueError, match="max_queries"):
        split_buckets(offsets, 0, bound)


def test_window_branch_both_shifts():
    coords, (q, k, v, *_) = _make((60, 0, 40), 20, 4, 8, 8, 2, 32, seed=3)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    for shift in (0, 4):  # the layout holds both window partitions
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref = reference.window_attention(*ref_in, coords, window=8, shift=shift)
        do = torch.randn_like(o_ref)
        g_ref = torch.autograd.grad(o_ref, ref_in, do)
        x = [t.float().requires_grad_() for t in (q, k, v)]
        o = ssa_kernels.window_attention(*x, layout, shift=shift)
        g = torch.autograd.grad(o, x, do.float())
        assert rel_err(o, o_ref) < F32_TOL, shift
        assert all(rel_err(a, b) < F32_TOL for a, b in zip(g, g_ref)), shift


@pytest.mark.parametrize("max_queries", [8192, 3])
def test_dkdv_with_scores_whose_padding_keys_overflow(max_queries):
    """Every score near -140: the log-sum-exp is near -136 (base 2: -196), so a zero padding key's ``exp2(-lse2)``
    would overflow float32 (the dK/dV kernels mask it; without the mask it stays in that key's unstored rows, but
    that variant measured slower on an H100, reports/kernels.md). The compression, selection and window gradients
    must be finite and equal the float64 reference's, with two batch elements (key tiles of one and straddling
    both), block queries kept whole and cut into chunks of 3 (the partial sums)."""
    coords, (q, k, v, k_cmp, v_cmp, _) = _make((40, 25), 16, 4, 8, 8, 2, 32, seed=41)
    gen = torch.Generator().manual_seed(41)
    q = 5.0 + 0.05 * torch.randn(q.shape, generator=gen, dtype=q.dtype)  # q.k * scale ~ -800 / sqrt(32)
    k = -5.0 + 0.05 * torch.randn(k.shape, generator=gen, dtype=k.dtype)
    k_cmp = -5.0 + 0.05 * torch.randn(k_cmp.shape, generator=gen, dtype=k.dtype)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    idx = _choice(layout, 2, 4, lambda lo, hi, g: list(range(lo, min(hi, lo + 3))))
    for branch in ("compression", "selection", "window"):
        kv = (k_cmp, v_cmp) if branch == "compression" else (k, v)
        ref_in = [t.clone().requires_grad_() for t in (q, *kv)]
        if branch == "compression":
            o_ref = reference.compression_attention(*ref_in, coords, compression_block=4)[0]
        elif branch == "selection":
            o_ref = reference.selection_attention(*ref_in, idx, coords, selection_block=8)
        else:
            o_ref = reference.window_attention(*ref_in, coords, window=8, shift=4)
        do = torch.randn_like(o_ref)
        g_ref = torch.autograd.grad(o_ref, ref_in, do)
        x = [t.float().requires_grad_() for t in (q, *kv)]
        with ssa_kernels.launch.overriding("selection.DKDV", dict(max_queries=max_queries)), \
                ssa_kernels.launch.overriding("compression.DKDV", dict(block_n=16)):
            if branch == "compression":
                o = ssa_kernels.compression_attention(*x, layout)[0]
            elif branch == "selection":
                o = ssa_kernels.selection_attention(*x, idx.int(), layout)
            else:
                o = ssa_kernels.window_attention(*x, layout, shift=4)
            g = torch.autograd.grad(o, x, do.float())
        assert all(torch.isfinite(t).all() for t in g), branch
        # float32 scores of magnitude ~140 carry ~1e-5 of rounding into the exponent: 10x the usual bound
        errors = [rel_err(a, b) for a, b in zip(g, g_ref)]
        assert max(errors) < 10 * F32_TOL, (branch, errors)


def test_window_branch_whole_key_tiles():
    """Dense windows (up to 64 tokens of a 10^3 grid) with 8-key tiles: the forward kernel walks several whole key
    tiles per window without the per-score mask and ends on a masked part-filled one; output and gradients as the
    float64 reference's, both shifts."""
    coords, (q, k, v, *_) = _make((150, 90), 10, 4, 8, 8, 2, 32, seed=9)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    assert layout.window_partition(0).max_window_tokens > 3 * 8
    small = dict(block_n=8)
    for shift in (0, 4):
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref = reference.window_attention(*ref_in, coords, window=8, shift=shift)
        do = torch.randn_like(o_ref)
        g_ref = torch.autograd.grad(o_ref, ref_in, do)
        x = [t.float().requires_grad_() for t in (q, k, v)]
        with ssa_kernels.launch.overriding("window.FWD", small), ssa_kernels.launch.overriding("window.DQ", small):
            o = ssa_kernels.window_attention(*x, layout, shift=shift)
            g = torch.autograd.grad(o, x, do.float())
        assert rel_err(o, o_ref) < F32_TOL, shift
        assert all(rel_err(a, b) < F32_TOL for a, b in zip(g, g_ref)), shift


def test_window_shift_with_no_effect_is_the_same_partition():
    # every voxel coordinate is a multiple of 8 plus 0..3: shifting by 4 never moves a voxel to another window
    gen = torch.Generator().manual_seed(5)
    xyz = torch.randint(0, 4, (40, 3), generator=gen) + 8 * torch.randint(0, 3, (40, 3), generator=gen)
    coords = torch.unique(torch.cat([torch.zeros(40, 1, dtype=torch.long), xyz], 1), dim=0)
    coords = coords[ssa_kernels.layout_order(coords, compression_block=4, selection_block=8)]
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    q, k, v = torch.randn(3, coords.shape[0], 2, 16).unbind(0)
    torch.testing.assert_close(ssa_kernels.window_attention(q, k, v, layout, shift=0),
                               ssa_kernels.window_attention(q, k, v, layout, shift=4))


@pytest.mark.parametrize("n,s", [(300, 40), (5, 40), (0, 40), (90, 20000)])
def test_block_query_index_is_the_inverse_of_the_choice(n, s):
    gen = torch.Generator().manual_seed(n)
    hkv, topk = 2, 5
    rows = [torch.randperm(s, generator=gen)[:topk] for _ in range(n * hkv)]
    idx = (torch.stack(rows) if rows else torch.zeros(0, topk, dtype=torch.long)).view(n, hkv, topk)
    idx[::7, :, -2:] = -1
    offsets, tokens = block_query_index(idx.int(), s)
    again = block_query_index(idx.int(), s, positions=True)
    assert torch.equal(again[0], offsets) and torch.equal(again[1], tokens)
    pos = again[2]  # where each choice sits in the index: back to the token, -1 for the empty slots
    assert pos.shape == idx.shape and torch.equal(pos < 0, idx < 0)
    chosen = pos >= 0
    assert torch.equal(tokens[pos[chosen].long()].long(), torch.nonzero(chosen)[:, 0])
    assert pos[chosen].unique().numel() == int(chosen.sum())
    assert offsets.shape == (hkv * s + 1,) and offsets[0] == 0 and bool((offsets[1:] >= offsets[:-1]).all())
    assert offsets[-1] == int((idx >= 0).sum())
    for g in range(hkv):
        for b in range(s):
            got = tokens[offsets[g * s + b]: offsets[g * s + b + 1]].tolist()
            expect = torch.nonzero((idx[:, g, :] == b).any(-1)).squeeze(1).tolist()
            assert got == expect  # increasing token order


def test_deterministic():
    coords, inp = _make((20, 8), 14, 4, 8, 4, 2, 32, seed=3)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    do = torch.randn(coords.shape[0], 4, 32)
    outs = []
    for _ in range(2):
        x = [t.float().requires_grad_() for t in inp]
        o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=3, shift=4)
        outs.append([o, *torch.autograd.grad(o, x, do)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_torch_compile_traces_the_op():
    coords, inp = _make((50,), 10, 4, 8, 4, 2, 16, seed=9)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    x = [t.float().requires_grad_() for t in inp]

    def f(q, k, v, kc, vc, gate):
        return ssa_kernels.spatial_sparse_attention(q * 2, k, v, kc, vc, gate.sigmoid(), layout, topk=2, shift=0).sum()

    eager = torch.autograd.grad(f(*x), x)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*x), x)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_bad_input():
    coords, (q, k, v, kc, vc, gate) = _make((40,), 10, 4, 8, 4, 2, 16, seed=1)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    f = [t.float() for t in (q, k, v, kc, vc, gate)]
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ssa_kernels.spatial_sparse_attention(q, k, v, kc, vc, gate, layout, topk=2, shift=0)  # float64
    with pytest.raises(ValueError, match="shift must be one of"):
        ssa_kernels.spatial_sparse_attention(*f, layout, topk=2, shift=2)
    with pytest.raises(ValueError, match="layout was built for"):
        ssa_kernels.spatial_sparse_attention(*[t[:-1] if i in (0, 1, 2, 5) else t for i, t in enumerate(f)],
                                             layout, topk=2, shift=0)
    with pytest.raises(ValueError, match="compression blocks"):
        ssa_kernels.spatial_sparse_attention(*f[:3], f[3][:-1], f[4][:-1], f[5], layout, topk=2, shift=0)
    with pytest.raises(TypeError, match="BlockLayout"):
        ssa_kernels.spatial_sparse_attention(*f, coords, topk=2, shift=0)
    with pytest.raises(ValueError, match="topk"):
        ssa_kernels.spatial_sparse_attention(*f, layout, topk=0, shift=0)
    with pytest.raises(TypeError, match="bfloat16 kernels need a GPU"):
        ssa_kernels.spatial_sparse_attention(*[t.bfloat16() for t in f], layout, topk=2, shift=0)
    with pytest.raises(ValueError, match="window"):
        ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=0)


def test_selection_record_replays_in_order_and_checks_the_calls():
    """SelectionRecord hands the kept choices back in call order (the recomputation of a checkpointed function),
    and says so when the recomputed calls are not the recorded ones."""
    from torch.utils.checkpoint import checkpoint

    coords, inp = _make((30, 20), 12, 4, 8, 4, 2, 16, seed=11)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    x = [t.float().requires_grad_() for t in inp]

    def two_calls(q, k, v, kc, vc, gate):
        o = ssa_kernels.spatial_sparse_attention(q, k, v, kc, vc, gate, layout, topk=2, shift=0)
        return ssa_kernels.spatial_sparse_attention(o, k, v, kc, vc, gate, layout, topk=3, shift=4)

    plain = torch.autograd.grad(checkpoint(two_calls, *x, use_reentrant=False).sum(), x)
    record = ssa_kernels.SelectionRecord()
    reused = torch.autograd.grad(checkpoint(two_calls, *x, use_reentrant=False,
                                            context_fn=record.contexts).sum(), x)
    assert [tuple(i.shape) for i in record._kept] == [(50, 2, 2), (50, 2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(plain, reused))
    with record.replaying(), pytest.raises(RuntimeError, match="not the recorded ones"):
        ssa_kernels.spatial_sparse_attention(*x, layout, topk=3, shift=0)  # the first kept choice has topk 2
