"""model.nets.cross_attention_kernel against float64 softmax attention, and its routing in the DiT's cross-attention.

Without CUDA the kernel runs through the Triton interpreter (root conftest.py; bfloat16 products are wrong there, so
the CPU cases use float16 and float32). Errors are relative norms ``||got - want|| / ||want||`` against float64.
"""
import pytest
import torch

import model.nets.cross_attention_kernel as ck
from model.nets.cross_attention_kernel import cross_attention, supports
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
    with pytest.raises(ValueError, match="no backward"):
        cross_attention(q.requires_grad_(), k, k)


def test_supports():
    q, k = torch.zeros(4, 2, 16), torch.zeros(3, 2, 16)
    on_device = torch.cuda.is_available() or ck._interpreting()
    assert supports(q.to(DEVICE), k.to(DEVICE), k.to(DEVICE)) == on_device
    assert not supports(q, k, k[:, :1])
    assert not supports(torch.zeros(4, 2, 24), torch.zeros(3, 2, 24), torch.zeros(3, 2, 24))
    assert not supports(q, k.half(), k.half())
    assert not supports(q.requires_grad_(), k, k)


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
