"""The dense reference against hand-checkable cases, properties, a per-token loop version of DESIGN.md 2,
and finite differences."""
import math

import pytest
import torch

import reference
from tests.helpers import random_coords, random_inputs, rel_err


def _full_attention(q, k, v, scale):
    """Plain softmax attention over all tokens: q [T, Hq, D], k/v [T, Hkv, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    p = torch.softmax(torch.einsum("thd,shd->hts", q, k) * scale, dim=-1)
    return torch.einsum("hts,shd->thd", p, v)


def _per_token_ssa(q, k, v, k_cmp, v_cmp, gate, coords, mc, ms, topk, window, shift, scale):
    """DESIGN.md 2 written token by token with Python dictionaries: slow, independent of the reference."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g_size = hq // hkv
    c = coords.tolist()
    # compression blocks in order of first appearance, selection blocks likewise
    cmp_of, sel_of, cmp_rows, sel_order = [], [], {}, {}
    for b, x, y, z in c:
        ck = (b, x // mc, y // mc, z // mc)
        sk = (b, x // ms, y // ms, z // ms)
        cmp_rows.setdefault(ck, len(cmp_rows))
        sel_order.setdefault(sk, len(sel_order))
        cmp_of.append(cmp_rows[ck])
        sel_of.append(sel_order[sk])
    cmp_batch = {row: key[0] for key, row in cmp_rows.items()}
    cmp_sel = {cmp_of[i]: sel_of[i] for i in range(n)}
    out = torch.zeros_like(q)
    for t in range(n):
        b = c[t][0]
        same_batch = [u for u in range(n) if c[u][0] == b]
        rows = [j for j in range(len(cmp_rows)) if cmp_batch[j] == b]
        blocks = sorted({sel_of[u] for u in same_batch})
        wkey = tuple((a + shift) // window for a in c[t][1:])
        win = [u for u in same_batch if tuple((a + shift) // window for a in c[u][1:]) == wkey]
        for h in range(hq):
            g = h // g_size
            s = torch.stack([q[t, h] @ k_cmp[j, g] for j in rows]) * scale
            p = torch.softmax(s, 0)
            o_cmp = sum(p[i] * v_cmp[j, g] for i, j in enumerate(rows))
            # scores need all heads of the group
            score = {blk: 0.0 for blk in blocks}
            for h2 in range(g * g_size, (g + 1) * g_size):
                s2 = torch.stack([q[t, h2] @ k_cmp[j, g] for j in rows]) * scale
                lse = torch.logsumexp(s2, 0)
                for i, j in enumerate(rows):
                    score[cmp_sel[j]] += float(torch.exp(s2[i] - lse))
            chosen = set(sorted(blocks, key=lambda blk: -score[blk])[:topk])
            keys = [u for u in same_batch if sel_of[u] in chosen]
            ps = torch.softmax(torch.stack([q[t, h] @ k[u, g] for u in keys]) * scale, 0)
            o_sel = sum(ps[i] * v[u, g] for i, u in enumerate(keys))
            pw = torch.softmax(torch.stack([q[t, h] @ k[u, g] for u in win]) * scale, 0)
            o_win = sum(pw[i] * v[u, g] for i, u in enumerate(win))
            out[t, h] = gate[t, 0] * o_cmp + gate[t, 1] * o_sel + gate[t, 2] * o_win
    return out


@pytest.mark.parametrize(
    "sizes,hq,hkv,d,mc,shift",
    [
        ((40, 0, 25), 2, 2, 16, 4, 0),  # GQA ratio 1, an empty batch element in the middle
        ((30, 45), 4, 2, 32, 8, 4),  # GQA ratio 2
        ((50, 12, 20), 8, 1, 64, 4, 4),  # GQA ratio 8, head dim 64
        ((35,), 16, 2, 24, 8, 0),  # G = 8, head dim 24
    ],
)
def test_reference_matches_design_token_by_token(sizes, hq, hkv, d, mc, shift):
    gen = torch.Generator().manual_seed(hash((sizes, hq, hkv, d, mc, shift)) % 2**31)
    ms, topk, window = 8, 3, 8
    coords = random_coords(sizes, 20, compression_block=mc, selection_block=ms, generator=gen)
    inp = random_inputs(coords, hq, hkv, d, compression_block=mc, selection_block=ms, generator=gen)
    scale = 0.7 / math.sqrt(d)
    kw = dict(compression_block=mc, selection_block=ms, topk=topk, window=window, shift=shift, scale=scale)
    o = reference.spatial_sparse_attention(*inp, coords, **kw)
    expect = _per_token_ssa(*inp, coords, mc, ms, topk, window, shift, scale)
    assert rel_err(o, expect) < 1e-12


def test_single_token_is_hand_checkable():
    coords = torch.tensor([[0, 3, 5, 7]])
    q, k, v = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 1, 4, dtype=torch.float64), torch.randn(
        1, 1, 4, dtype=torch.float64
    )
    k_cmp, v_cmp = torch.randn(1, 1, 4, dtype=torch.float64), torch.randn(1, 1, 4, dtype=torch.float64)
    gate = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    o, (oc, osel, ow) = reference.spatial_sparse_attention(
        q, k, v, k_cmp, v_cmp, gate, coords, compression_block=4, selection_block=8, topk=8, window=8, shift=4,
        return_branches=True,
    )
    # a softmax over one key is that key's value, for every head
    torch.testing.assert_close(oc, v_cmp.expand(1, 2, 4))
    torch.testing.assert_close(osel, v.expand(1, 2, 4))
    torch.testing.assert_close(ow, v.expand(1, 2, 4))
    torch.testing.assert_close(o, (0.2 * v_cmp + 0.8 * v).expand(1, 2, 4))


def test_two_tokens_by_hand():
    # two tokens in different compression blocks, same selection block and window
    coords = torch.tensor([[0, 0, 0, 0], [0, 4, 0, 0]])
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    k = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    gate = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    o = reference.spatial_sparse_attention(
        q, k, v, k, v, gate, coords, compression_block=4, selection_block=8, topk=1, window=8, shift=0, scale=1.0
    )
    # token 0 scores keys (2, 0): weights e^2/(e^2+1), 1/(e^2+1)
    w = math.exp(2) / (math.exp(2) + 1)
    torch.testing.assert_close(o[0, 0], torch.tensor([w, 1 - w], dtype=torch.float64))
    # token 1 scores keys (0, 0): uniform
    torch.testing.assert_close(o[1, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_topk_covering_all_blocks_is_full_attention_per_batch():
    gen = torch.Generator().manual_seed(1)
    coords = random_coords((60, 35, 80), 24, compression_block=4, selection_block=8, generator=gen)
    q, k, v, kc, vc, gate = random_inputs(coords, 4, 2, 16, compression_block=4, selection_block=8, generator=gen)
    chosen = reference.select_blocks(
        reference.block_scores(q, kc, reference.compression_attention(q, kc, vc, coords, compression_block=4)[1],
                               coords, compression_block=4, selection_block=8), topk=10_000)
    o_sel = reference.selection_attention(q, k, v, chosen, coords, selection_block=8)
    for b in range(3):
        m = coords[:, 0] == b
        torch.testing.assert_close(o_sel[m], _full_attention(q[m], k[m], v[m], 16**-0.5))


def test_window_covering_grid_is_full_attention_per_batch():
    gen = torch.Generator().manual_seed(2)
    coords = random_coords((50, 70), 16, compression_block=4, selection_block=8, generator=gen)
    q, k, v, *_ = random_inputs(coords, 8, 2, 32, compression_block=4, selection_block=8, generator=gen)
    o_win = reference.window_attention(q, k, v, coords, window=64, shift=0)
    for b in range(2):
        m = coords[:, 0] == b
        torch.testing.assert_close(o_win[m], _full_attention(q[m], k[m], v[m], 32**-0.5))


def test_blocks_of_one_voxel_reduce_to_ordinary_attention():
    # m = 1 everywhere: compression over per-token keys is full attention; the selection with topk >= N is too;
    # a window of 1 voxel is the token itself.
    gen = torch.Generator().manual_seed(3)
    coords = random_coords((30, 20), 6, compression_block=1, selection_block=1, generator=gen)
    q, k, v, _, _, gate = random_inputs(coords, 4, 4, 8, compression_block=1, selection_block=1, generator=gen)
    o, (oc, osel, ow) = reference.spatial_sparse_attention(
        q, k, v, k, v, gate, coords, compression_block=1, selection_block=1, topk=100, window=1, shift=0,
        return_branches=True,
    )
    for b in range(2):
        m = coords[:, 0] == b
        full = _full_attention(q[m], k[m], v[m], 8**-0.5)
        torch.testing.assert_close(oc[m], full)
        torch.testing.assert_close(osel[m], full)
    torch.testing.assert_close(ow, v)


def test_selection_branch_picks_the_best_block():
    # topk = 1, two selection blocks; the compressed key of block 1 aligns with the query: it must be chosen
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 8, 0, 0]])
    d = 2
    q = torch.tensor([[[0.0, 5.0]]] * 3, dtype=torch.float64)
    k = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 3.0]]], dtype=torch.float64)
    k_cmp = torch.tensor([[[5.0, 0.0]], [[0.0, 5.0]]], dtype=torch.float64)
    v_cmp = torch.zeros(2, 1, d, dtype=torch.float64)
    gate = torch.tensor([[0.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    o = reference.spatial_sparse_attention(
        q, k, v, k_cmp, v_cmp, gate, coords, compression_block=8, selection_block=8, topk=1, window=8, shift=0
    )
    torch.testing.assert_close(o[:, 0], torch.tensor([[0.0, 3.0]] * 3, dtype=torch.float64))


def test_batch_elements_never_see_each_other():
    gen = torch.Generator().manual_seed(4)
    coords = random_coords((40, 55, 33), 16, compression_block=4, selection_block=8, generator=gen)
    inp = random_inputs(coords, 8, 2, 16, compression_block=4, selection_block=8, generator=gen)
    kw = dict(compression_block=4, selection_block=8, topk=2, window=8, shift=4)
    o = reference.spatial_sparse_attention(*inp, coords, **kw)
    # perturb everything of batch element 1 (tokens and its compression rows)
    from ssa_kernels.layout import compression_block_index

    cid = compression_block_index(coords, compression_block=4, selection_block=8)
    tok1 = coords[:, 0] == 1
    rows1 = torch.zeros(inp[3].shape[0], dtype=torch.bool)
    rows1[cid[tok1]] = True
    pert = [t.clone() for t in inp]
    for i in (0, 1, 2, 5):
        pert[i][tok1] = torch.rand_like(pert[i][tok1])
    for i in (3, 4):
        pert[i][rows1] = 10 * torch.randn_like(pert[i][rows1])
    o2 = reference.spatial_sparse_attention(*pert, coords, **kw)
    assert torch.equal(o[~tok1], o2[~tok1])
    assert not torch.allclose(o[tok1], o2[tok1])


def test_gradcheck_all_six_inputs():
    gen = torch.Generator().manual_seed(5)
    coords = random_coords((9, 7), 6, compression_block=2, selection_block=4, generator=gen)
    inp = random_inputs(coords, 4, 2, 4, compression_block=2, selection_block=4, generator=gen, requires_grad=True)

    def f(*x):
        return reference.spatial_sparse_attention(
            *x, coords, compression_block=2, selection_block=4, topk=2, window=4, shift=2
        )

    assert torch.autograd.gradcheck(f, tuple(inp), eps=1e-6, atol=1e-7)
    out = f(*inp)
    out.square().sum().backward()
    for t in inp:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_block_ids_first_appearance():
    coords = torch.tensor([[0, 9, 0, 0], [0, 0, 0, 0], [0, 9, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]])
    assert reference.block_ids(coords, 8).tolist() == [0, 1, 0, 2, 1]
    assert reference.block_ids(coords, 8, shift=4).tolist() == [0, 1, 0, 2, 1]
    assert reference.block_ids(coords, 2).tolist() == [0, 1, 0, 2, 1]
    assert reference.block_ids(coords, 1).tolist() == [0, 1, 2, 3, 4]


def test_select_blocks_pads_when_fewer_blocks_than_topk():
    scores = torch.tensor([[[0.5, 0.25, float("-inf")]], [[float("-inf"), float("-inf"), 1.0]]])
    idx = reference.select_blocks(scores, topk=4)
    assert idx.tolist() == [[[0, 1, -1, -1]], [[2, -1, -1, -1]]]
