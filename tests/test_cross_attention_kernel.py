"""model.nets.cross_attention_kernel against float64 softmax attention, and its routing in the DiT's cross-attention.

Without CUDA the kernel runs through the Triton interpreter (root conftest.py; bfloat16 products are wrong there, so
the CPU cases use float16 and float32). Errors are relative norms ``||got - want|| / ||want||`` against float64.
"""
import pytest
import torch

import model.nets.cross_attention_kernel as ck
from model.nets.cross_attention_kernel import cross_attention, supports
from ssa_kernels._common import EXP2_FMA_MIN, exp2_fma
from tests.helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() or ck._interpreting()),
                                  reason="needs a CUDA GPU or TRITON_INTERPRET=1")


def _reference(q, k, v, scale=None):
    """float64 ``softmax(q k^T * scale) v`` per head: ``q [N, H, D]``, ``k, v [L, H, D]``."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("nhd,lhd->hnl", q, k) * scale
    return torch.einsum("hnl,lhd->nhd", s.softmax(-1), v)


def _projected(n, length, heads, d, dtype, *, seed=0, spread=2.0):
    """``q [n, H, D]`` as a view of an ``[n, H * D]`` projection and ``k, v [L, H, D]`` as views of an
    ``[L, 2, H, D]`` key/value projection (the DiT's layouts: strided, last stride 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, heads * d, generator=gen) * spread).to(device=DEVICE, dtype=dtype).view(n, heads, d)
    kv = torch.randn(length, 2, heads, d, generator=gen).to(device=DEVICE, dtype=dtype)
    return q, kv[:, 0], kv[:, 1]


# (rows, keys, heads, head dim, dtype, block_m, block_n): rows and keys not multiples of the tiles, fewer keys than
# one tile, one key, keys an exact multiple of the tile (no masked tail), one row, head dims 16 to 128
CASES = [
    pytest.param(77, 50, 2, 32, torch.float16, 32, 16, id="tail-f16"),
    pytest.param(40, 5, 3, 16, torch.float32, 16, 32, id="fewer-keys-than-a-tile-f32"),
    pytest.param(33, 1, 2, 64, torch.float16, 32, 16, id="one-key-f16"),
    pytest.param(50, 64, 2, 64, torch.float32, 16, 32, id="exact-tiles-f32"),
    pytest.param(1, 37, 1, 128, torch.float16, 16, 16, id="one-row-d128-f16"),
]


@needs_kernel
@pytest.mark.parametrize("n, length, heads, d, dtype, block_m, block_n", CASES)
def test_cross_attention_matches_float64(n, length, heads, d, dtype, block_m, block_n):
    q, k, v = _projected(n, length, heads, d, dtype, seed=n + length)
    with torch.no_grad():
        got = cross_attention(q, k, v, block_m=block_m, block_n=block_n, num_warps=1, num_stages=1)
    assert got.shape == (n, heads, d) and got.dtype == dtype and got.is_contiguous()
    assert rel_err(got.cpu(), _reference(q, k, v)) < TOL[dtype]


@needs_kernel
def test_cross_attention_scale_and_large_logits():
    """A given scale is used, and logits far from zero (q 30x larger) do not overflow: the running maximum is
    subtracted before every exponential."""
    q, k, v = _projected(20, 45, 2, 32, torch.float32, seed=3, spread=30.0)
    with torch.no_grad():
        got = cross_attention(q, k, v, scale=0.3, block_m=16, block_n=16, num_warps=1, num_stages=1)
    assert torch.isfinite(got).all()
    assert rel_err(got.cpu(), _reference(q, k, v, scale=0.3)) < 1e-5


@needs_kernel
def test_cross_attention_launches_agree():
    """Two launches (tile shapes) give the same attention up to float32 summation order."""
    q, k, v = _projected(45, 70, 2, 32, torch.float32, seed=5)
    with torch.no_grad():
        a = cross_attention(q, k, v, block_m=16, block_n=16, num_warps=1, num_stages=1)
        b = cross_attention(q, k, v, block_m=64, block_n=64, num_warps=1, num_stages=1)
    assert rel_err(a.cpu(), b.cpu()) < 1e-6


@needs_kernel
def test_cross_attention_empty_queries():
    q, k, v = _projected(0, 9, 2, 16, torch.float32)
    with torch.no_grad():
        assert cross_attention(q, k, v).shape == (0, 2, 16)


def test_cross_attention_rejects_bad_input():
    q = torch.zeros(4, 2, 16)
    k = torch.zeros(3, 2, 16)
    with pytest.raises(TypeError, match="q"):
        cross_attention(q.numpy(), k, k)
    with pytest.raises(ValueError, match="3 dims"):
        cross_attention(q[0], k, k)
    with pytest.raises(ValueError, match="k and v"):
        cross_attention(q, k, k[:2])
    with pytest.raises(ValueError, match="k must be"):
        cross_attention(q, torch.zeros(3, 1, 16), torch.zeros(3, 1, 16))
    with pytest.raises(ValueError, match="at least one key"):
        cross_attention(q, k[:0], k[:0])
    with pytest.raises(ValueError, match="head dim"):
        cross_attention(torch.zeros(4, 2, 24), torch.zeros(3, 2, 24), torch.zeros(3, 2, 24))
    with pytest.raises(TypeError, match="dtype"):
        cross_attention(q, k.half(), k.half())
    with pytest.raises(TypeError, match="q must be one of"):
        cross_attention(q.long(), k.long(), k.long())
    with pytest.raises(ValueError, match="unit stride"):
        cross_attention(q, k, torch.zeros(3, 16, 2).transpose(1, 2))
    with pytest.raises(ValueError, match="block_m"):
        cross_attention(q, k, k, block_m=24)
    with pytest.raises(ValueError, match="num_warps"):
        cross_attention(q, k, k, num_warps=0)
    if not ck._interpreting():
        with pytest.raises(ValueError, match="CUDA"):
            cross_attention(q, k, k)



def test_cross_attention_rejects_bad_backward_settings(monkeypatch):
    """Under autograd: a switched-off backward, unknown or malformed backward launch settings are refused."""
    if not ck._interpreting() and not torch.cuda.is_available():
        pytest.skip("the device check comes first without CUDA or the interpreter")
    q = torch.zeros(4, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.zeros(3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="backward must be a dict"):
        cross_attention(q, k, k, backward={"dx": {}})
    with pytest.raises(ValueError, match=r"backward\['dq'\] must be a dict"):
        cross_attention(q, k, k, backward={"dq": 3})
    with pytest.raises(ValueError, match="unknown launch setting backward\\['dq'\\].chunk_rows"):
        cross_attention(q, k, k, backward={"dq": {"chunk_rows": 64}})
    with pytest.raises(ValueError, match=r"backward\['dkdv'\].block_n must be a power of two"):
        cross_attention(q, k, k, backward={"dkdv": {"block_n": 48}})
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
        cross_attention(q, k, k, backward={"dkdv": {"chunk_rows": 0}})
    monkeypatch.setattr(ck, "TRAINABLE", False)
    with pytest.raises(ValueError, match="switched off"):
        cross_attention(q, k, k)
    assert not supports(q, k, k)
    with torch.no_grad():
        assert cross_attention(q, k, k).shape == (4, 2, 16)


def test_supports():
    q, k = torch.zeros(4, 2, 16), torch.zeros(3, 2, 16)
    on_device = torch.cuda.is_available() or ck._interpreting()
    assert supports(q.to(DEVICE), k.to(DEVICE), k.to(DEVICE)) == on_device
    assert not supports(q, k, k[:, :1])
    assert not supports(torch.zeros(4, 2, 24), torch.zeros(3, 2, 24), torch.zeros(3, 2, 24))
    assert not supports(q, k.half(), k.half())
    assert supports(q.to(DEVICE).requires_grad_(), k.to(DEVICE), k.to(DEVICE)) == on_device  # the backward kernels


def _gradients(q, kv, do, scale=None, **kw):
    """Output and gradients ``(o, dq, dkv)`` of :func:`cross_attention` on ``q`` and the ``[L, 2, H, D]`` key/value
    projection ``kv`` (keys and values as its views) for the output gradient ``do``."""
    q = q.detach().requires_grad_()
    kv = kv.detach().requires_grad_()
    o = cross_attention(q, kv[:, 0], kv[:, 1], scale=scale, **kw)
    o.backward(do)
    return o.detach(), q.grad, kv.grad


def _reference_gradients(q, kv, do, scale=None):
    """float64 ``(o, dq, dkv)`` of :func:`_reference` on the CPU."""
    q = q.detach().double().cpu().requires_grad_()
    kv = kv.detach().double().cpu().requires_grad_()
    o = _reference(q, kv[:, 0], kv[:, 1], scale=scale)
    o.backward(do.double().cpu())
    return o.detach(), q.grad, kv.grad


def _projected_kv(n, length, heads, d, dtype, seed, spread=2.0):
    """``q [n, H, D]`` (a view of ``[n, H * D]``), the ``[L, 2, H, D]`` key/value projection and an output gradient
    ``[n, H, D]``."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, heads * d, generator=gen) * spread).to(device=DEVICE, dtype=dtype).view(n, heads, d)
    kv = torch.randn(length, 2, heads, d, generator=gen).to(device=DEVICE, dtype=dtype)
    do = torch.randn(n, heads, d, generator=gen).to(device=DEVICE, dtype=dtype)
    return q, kv, do


def _small_backward(block_m=16, block_n=16, chunk_rows=32):
    one = dict(num_warps=1, num_stages=1)
    return dict(dq=dict(block_m=block_m, block_n=block_n, **one),
                dkdv=dict(block_m=block_m, block_n=block_n, chunk_rows=chunk_rows, **one))


# (rows, keys, heads, head dim, dtype, backward tiles, chunk rows): query chunks that split the rows (several partial
# sums, the last chunk short) or hold all of them; rows and keys not multiples of the tiles; fewer keys than a tile;
# one key; one row; head dims 16 to 128
GRAD_CASES = [
    pytest.param(77, 50, 2, 32, torch.float32, 16, 32, id="chunks-tail-f32"),
    pytest.param(70, 50, 2, 32, torch.float16, 32, 64, id="two-chunks-f16"),
    pytest.param(40, 5, 3, 16, torch.float32, 16, 4096, id="fewer-keys-than-a-tile-one-chunk-f32"),
    pytest.param(33, 1, 2, 64, torch.float16, 16, 16, id="one-key-f16"),
    pytest.param(1, 37, 1, 128, torch.float32, 16, 16, id="one-row-d128-f32"),
]


@needs_kernel
@pytest.mark.parametrize("n, length, heads, d, dtype, tile, chunk_rows", GRAD_CASES)
def test_cross_attention_gradients_match_float64(n, length, heads, d, dtype, tile, chunk_rows):
    """Output, dq and the key/value projection's gradient (through the k / v views) against float64 autograd."""
    q, kv, do = _projected_kv(n, length, heads, d, dtype, seed=n + 3 * length)
    got = _gradients(q, kv, do, block_m=16, block_n=16, num_warps=1, num_stages=1,
                     backward=_small_backward(tile, tile, chunk_rows))
    want = _reference_gradients(q, kv, do)
    assert got[1].shape == q.shape and got[1].dtype == dtype and got[2].shape == kv.shape
    if length == 1:  # one key: the softmax is constant, dq and dk vanish (the kernels' rounding is what is left)
        assert got[1].abs().max() < 1e-5 and got[2][:, 0].abs().max() < 1e-5
        got, want = (got[0], got[2][:, 1]), (want[0], want[2][:, 1])
    for name, a, b in zip(("o", "dq", "dkv") if length > 1 else ("o", "dv"), got, want):
        assert rel_err(a.cpu(), b) < TOL[dtype], name


@needs_kernel
def test_cross_attention_gradients_scale_large_logits_and_chunking():
    """A given scale reaches all three gradients; logits 30x larger stay finite (the LSE is subtracted before
    every exponential); the query chunking of the dK / dV partial sums changes nothing beyond summation order."""
    q, kv, do = _projected_kv(50, 45, 2, 32, torch.float32, seed=11, spread=30.0)
    want = _reference_gradients(q, kv, do, scale=0.3)
    runs = [_gradients(q, kv, do, scale=0.3, block_m=16, block_n=16, num_warps=1, num_stages=1,
                       backward=_small_backward(16, 16, chunk)) for chunk in (16, 4096)]
    for got in runs:
        assert all(torch.isfinite(t).all() for t in got)
        for a, b in zip(got, want):
            assert rel_err(a.cpu(), b) < 1e-5
    assert rel_err(runs[0][2].cpu(), runs[1][2].cpu()) < 1e-6


@needs_kernel
def test_cross_attention_gradients_int64_offsets(monkeypatch):
    """Past the int32 offset limit (lowered here) the backward kernels index in int64: same gradients."""
    q, kv, do = _projected_kv(37, 21, 2, 16, torch.float32, seed=13)
    a = _gradients(q, kv, do, backward=_small_backward())
    monkeypatch.setattr(ck, "INDEX_32_LIMIT", 1)
    b = _gradients(q, kv, do, backward=_small_backward())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _batch_reference(q, kv, do, bounds):
    """float64 ``(o, dq, dkv)`` per batch element: rows ``bounds[b]:bounds[b+1]`` of ``q`` over ``kv[b]``."""
    q64 = q.detach().double().cpu().requires_grad_()
    kv64 = kv.detach().double().cpu().requires_grad_()
    o = torch.cat([_reference(q64[a:z], kv64[b, :, 0], kv64[b, :, 1])
                   for b, (a, z) in enumerate(zip(bounds[:-1], bounds[1:]))])
    o.backward(do.double().cpu())
    return o.detach(), q64.grad, kv64.grad


@needs_kernel
@pytest.mark.parametrize("sizes, chunk_rows", [
    pytest.param((0, 1, 37, 70), 32, id="empty-one-row-partial-tiles-chunked"),
    pytest.param((20, 45, 16), 4096, id="one-chunk-per-element"),
])
def test_cross_attention_batch_elements_match_float64(sizes, chunk_rows):
    """Several batch elements (``k, v [B, L, H, D]`` and CSR offsets): each element's rows attend to its own keys
    only; output and gradients against float64 per element, with an empty element, a one-row element, elements of
    partial tiles and several dK/dV chunks per element; offsets as a list or a tensor give the same."""
    gen = torch.Generator().manual_seed(31)
    n, batch, length, heads, d = sum(sizes), len(sizes), 23, 2, 32
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    q = torch.randn(n, heads * d, generator=gen).to(DEVICE, torch.float16).view(n, heads, d)
    kv = torch.randn(batch, length, 2, heads, d, generator=gen).to(DEVICE, torch.float16)
    do = torch.randn(n, heads, d, generator=gen).to(DEVICE, torch.float16)
    one = dict(num_warps=1, num_stages=1)
    bw = dict(dq=dict(block_m=16, block_n=16, **one), dkdv=dict(block_m=16, block_n=16, chunk_rows=chunk_rows, **one))
    runs = []
    for offsets in (bounds, torch.tensor(bounds, device=DEVICE)):
        qg, kvg = q.detach().requires_grad_(), kv.detach().requires_grad_()
        o = cross_attention(qg, kvg[:, :, 0], kvg[:, :, 1], offsets, block_m=16, block_n=16, backward=bw, **one)
        o.backward(do)
        runs.append((o.detach(), qg.grad, kvg.grad))
    want = _batch_reference(q, kv, do, bounds)
    for name, a, b in zip(("o", "dq", "dkv"), runs[0], want):
        assert rel_err(a.cpu(), b) < TOL[torch.float16], name
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with torch.no_grad():
        plain = cross_attention(q, kv[:, :, 0], kv[:, :, 1], bounds, block_m=16, block_n=16, **one)
    assert torch.equal(plain, runs[0][0])


def test_cross_attention_rejects_bad_offsets():
    if not ck._interpreting() and not torch.cuda.is_available():
        pytest.skip("the device check comes first without CUDA or the interpreter")
    q = torch.zeros(5, 2, 16, device=DEVICE)
    k = torch.zeros(2, 3, 2, 16, device=DEVICE)
    with torch.no_grad():
        with pytest.raises(ValueError, match="give their rows' CSR offsets"):
            cross_attention(q, k, k)
        with pytest.raises(ValueError, match="must hold 3 entries"):
            cross_attention(q, k, k, [0, 5])
        with pytest.raises(ValueError, match="rise from 0 to q's 5 rows"):
            cross_attention(q, k, k, [0, 2, 4])
        with pytest.raises(ValueError, match="rise from 0"):
            cross_attention(q, k, k, [0, 4, 3])
        with pytest.raises(TypeError, match="offsets must be"):
            cross_attention(q, k, k, torch.tensor([0.0, 2.0, 5.0]))
        with pytest.raises(TypeError, match="offsets must be"):
            cross_attention(q, k, k, [0, 2.5, 5])
        with pytest.raises(ValueError, match="k must have 3 dims"):
            cross_attention(q, k[None], k[None])
        with pytest.raises(ValueError, match="must hold 2 entries"):
            cross_attention(q, k[0], k[0], [0, 2, 5])
        assert cross_attention(q, k[:1], k[:1], [0, 5]).shape == (5, 2, 16)


@needs_kernel
def test_exp2_fma_accuracy():
    """The multiply-add exponential: within 8e-5 of ``2^x`` relative over [-125, 0] (integers, half-integers where
    the rounding switches, and random points), and at most ``2^-125`` below (clamped)."""
    import triton
    import triton.language as tl

    @triton.jit
    def apply(X, Y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        tl.store(Y + i, exp2_fma(tl.load(X + i, mask=ok, other=0.0)), mask=ok)

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.arange(-125.0, 0.5, 0.5), -torch.rand(4000, generator=gen) * 125,
                   -torch.rand(1000, generator=gen), torch.tensor([-125.4, -130.0, -1e4])])
    x = x.to(DEVICE)
    y = torch.empty_like(x)
    apply[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    x, y = x.double().cpu(), y.double().cpu()
    inside = x >= EXP2_FMA_MIN
    rel = ((y - torch.exp2(x)) / torch.exp2(x))[inside].abs().max()
    assert rel < 8e-5, rel
    assert (y[~inside] <= 2.0 ** -125 * (1 + 1e-4)).all() and (y[~inside] >= 0).all()


@needs_kernel
@pytest.mark.parametrize("every", [1, 2, 3])
def test_cross_attention_fma_exponentials_match_float64(every):
    """``fma_exp_every`` in the forward, dQ and dK/dV kernels (fp16; 150 keys and 96 rows: groups of full tiles, a
    full tile left over and a masked tail): output and gradients as close to float64 as with ``exp2`` alone; float32
    inputs ignore the setting (bit-identical)."""
    q, kv, do = _projected_kv(96, 150, 2, 32, torch.float16, seed=21)
    want = _reference_gradients(q, kv, do)
    one = dict(num_warps=1, num_stages=1)
    runs = {}
    for e in (0, every):
        bw = dict(dq=dict(block_m=16, block_n=16, fma_exp_every=e, **one),
                  dkdv=dict(block_m=16, block_n=16, chunk_rows=48, fma_exp_every=e, **one))
        runs[e] = _gradients(q, kv, do, block_m=16, block_n=16, fma_exp_every=e, backward=bw, **one)
    for name, a, b, base in zip(("o", "dq", "dkv"), runs[every], want, runs[0]):
        assert rel_err(a.cpu(), b) < 1.2 * rel_err(base.cpu(), b) + 1e-4, name
    q32, kv32, _ = _projected_kv(40, 50, 2, 16, torch.float32, seed=22)
    with torch.no_grad():
        plain = cross_attention(q32, kv32[:, 0], kv32[:, 1], block_m=16, block_n=16, **one)
        fma = cross_attention(q32, kv32[:, 0], kv32[:, 1], block_m=16, block_n=16, fma_exp_every=1, **one)
    assert torch.equal(plain, fma)
    with pytest.raises(ValueError, match="fma_exp_every must be an int >= 0"):
        cross_attention(q32, kv32[:, 0], kv32[:, 1], fma_exp_every=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("every", [1, 2])
def test_gpu_cross_attention_fma_exponentials_against_sdpa(every):
    """bf16 at the DiTs' shape with ``fma_exp_every`` in all three kernels: output and gradients no farther from
    float64 than 1.5x SDPA's."""
    import torch.nn.functional as F

    q, kv, do = _projected_kv(6000, 1374, 32, 32, torch.bfloat16, seed=23)
    bw = {name: dict(fma_exp_every=every) for name in ("dq", "dkdv")}
    got = _gradients(q, kv, do, fma_exp_every=every, backward=bw)
    qs, kvs = q.detach().requires_grad_(), kv.detach().requires_grad_()
    os_ = F.scaled_dot_product_attention(qs.transpose(0, 1), kvs[:, 0].transpose(0, 1),
                                         kvs[:, 1].transpose(0, 1)).transpose(0, 1)
    os_.backward(do)
    want = _reference_gradients(q, kv, do)
    for name, a, s_, b in zip(("o", "dq", "dkv"), got, (os_.detach(), qs.grad, kvs.grad), want):
        err, err_sdpa = rel_err(a.cpu(), b), rel_err(s_.cpu(), b)
        assert err < 1.5 * err_sdpa + 1e-3, (name, err, err_sdpa)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,dim", [(32, 32), (16, 64)])
def test_gpu_cross_attention_gradients_against_sdpa_and_float64(dtype, heads, dim):
    """At the DiTs' shape (1,374 keys, 32 heads of 32) and at 16 heads of 64 with the default launches: output and
    gradients no farther from float64 than SDPA's, and bit-identical over two runs (no atomics)."""
    import torch.nn.functional as F

    q, kv, do = _projected_kv(6000, 1374, heads, dim, dtype, seed=17)
    got = _gradients(q, kv, do)
    again = _gradients(q, kv, do)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    qs, kvs = q.detach().requires_grad_(), kv.detach().requires_grad_()
    os_ = F.scaled_dot_product_attention(qs.transpose(0, 1), kvs[:, 0].transpose(0, 1),
                                         kvs[:, 1].transpose(0, 1)).transpose(0, 1)
    os_.backward(do)
    sdpa = (os_.detach(), qs.grad, kvs.grad)
    want = _reference_gradients(q, kv, do)
    for name, a, s_, b in zip(("o", "dq", "dkv"), got, sdpa, want):
        err, err_sdpa = rel_err(a.cpu(), b), rel_err(s_.cpu(), b)
        assert err < 1.5 * err_sdpa + 1e-3, (name, err, err_sdpa)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,dim", [(32, 32), (16, 64)])
def test_gpu_cross_attention_against_sdpa_and_float64(dtype, heads, dim):
    """At the sparse DiTs' shape (32 heads of 32, 1,374 condition keys) and at 16 heads of 64: no farther from
    float64 than SDPA is (bf16 probabilities), with the default launch."""
    import torch.nn.functional as F

    q, k, v = _projected(5000, 1374, heads, dim, dtype, seed=7)
    with torch.no_grad():
        got = cross_attention(q, k, v)
        sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
    want = _reference(q, k, v)
    err, err_sdpa = rel_err(got.cpu(), want), rel_err(sdpa.cpu(), want)
    assert err < 2 * err_sdpa + 1e-3, (err, err_sdpa)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dit_cross_attention_routes_to_the_kernel(monkeypatch):
    """``CrossAttention.attend`` takes the kernel on CUDA without autograd (one batch element, no mask) and
    gives SDPA's output within bf16 noise; with a key mask, or under autograd, it stays on SDPA."""
    from model.nets.dit_block import CrossAttention

    torch.manual_seed(0)
    ca = CrossAttention(256, 96, 4).cuda().to(torch.bfloat16)
    h = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 96, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 3000], device="cuda")
    calls = []
    real = ck.cross_attention
    monkeypatch.setattr(ck, "cross_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        fast = ca.attend(h, offsets, ctx, None)
        assert calls, "the kernel was not used"
        monkeypatch.setattr(ck, "ENABLED", False)
        slow = ca.attend(h, offsets, ctx, None)
    assert len(calls) == 1
    assert rel_err(fast.float(), slow.float()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dit_cross_attention_trains_through_the_kernel(monkeypatch):
    """Under autograd ``CrossAttention`` takes the kernels (``TRAINABLE``): its output and every parameter's and the
    input's gradient agree with the SDPA path's within bf16 noise."""
    from model.nets.dit_block import CrossAttention

    torch.manual_seed(0)
    ca = CrossAttention(256, 96, 8).cuda().to(torch.bfloat16)
    h = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 96, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 3000], device="cuda")
    calls = []
    real = ck._CrossAttention.apply
    monkeypatch.setattr(ck._CrossAttention, "apply", lambda *a: calls.append(1) or real(*a))
    runs = []
    for trainable in (True, False):
        monkeypatch.setattr(ck, "TRAINABLE", trainable)
        ca.zero_grad(set_to_none=True)
        x = h.clone().requires_grad_()
        out = ca(x, offsets, ctx, None)
        out.float().square().mean().backward()
        runs.append([out.detach(), x.grad] + [p.grad for p in ca.parameters()])
    assert len(calls) == 1
    for a, b in zip(*runs):
        assert rel_err(a.float(), b.float()) < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dit_cross_attention_batch_elements(monkeypatch):
    """Three batch elements of different sizes: ``CrossAttention`` takes the kernels (offsets from the host copy
    kept in the cache) and agrees with SDPA's padded path, output and gradients, within bf16 noise."""
    from model.nets.dit_block import CrossAttention

    torch.manual_seed(1)
    ca = CrossAttention(256, 96, 8).cuda().to(torch.bfloat16)
    sizes = (1000, 37, 2500)
    h = torch.randn(sum(sizes), 256, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(3, 77, 96, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 1000, 1037, 3537], device="cuda")
    calls = []
    real = ck._CrossAttention.apply
    monkeypatch.setattr(ck._CrossAttention, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(ck, "ENABLED", enabled)
        ca.zero_grad(set_to_none=True)
        x = h.clone().requires_grad_()
        cache = {}
        out = ca(x, offsets, ctx, None, cache=cache)
        out.float().square().mean().backward()
        runs.append([out.detach(), x.grad] + [p.grad for p in ca.parameters()])
    assert calls == [(0, 1000, 1037, 3537)]
    for a, b in zip(*runs):
        assert rel_err(a.float(), b.float()) < 3e-2


def test_report_smoke_run(tmp_path, capsys):
    """``python -m model.reports.cross_attention`` on the CPU: a labelled smoke run that writes both files, with
    the kernel's rows when the interpreter runs it."""
    import json

    from model.reports.cross_attention import main

    assert main(["--out", str(tmp_path), "--device", "cpu", "--reps", "1", "--warmup", "1"]) == 0
    r = json.loads((tmp_path / "cross_attention.json").read_text())
    assert r["smoke"] and "SMOKE RUN" in (tmp_path / "cross_attention.md").read_text()
    names = {e["variant"] for e in r["results"]}
    assert "SDPA (default backend)" in names
    if ck._interpreting():
        kernel = [e for e in r["results"] if e["variant"].startswith("Triton")]
        assert kernel and all(e["rel_err"] < 1e-5 for e in kernel)
    assert "no CUDA GPU" in capsys.readouterr().out


@needs_kernel
def test_cross_attention_int64_offsets(monkeypatch):
    """Past the int32 offset limit (lowered here) the kernel forms its row and key offsets in int64: same result."""
    q, k, v = _projected(37, 21, 2, 16, torch.float32, seed=9)
    with torch.no_grad():
        a = cross_attention(q, k, v, block_m=16, block_n=16, num_warps=1, num_stages=1)
        monkeypatch.setattr(ck, "INDEX_32_LIMIT", 1)
        b = cross_attention(q, k, v, block_m=16, block_n=16, num_warps=1, num_stages=1)
    assert torch.equal(a, b)
    assert rel_err(b.cpu(), _reference(q, k, v)) < 1e-5
