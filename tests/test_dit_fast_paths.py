"""The DiT's sampling fast paths against the plain ones: the fused layer norm + modulation kernel (CPU through the
Triton interpreter, float32), the zeroed-condition shortcut, batched guidance and the kept condition projections
(CPU, float32, reference SSA), and on a GPU the whole fast path in bfloat16 against the unfused two-forward path."""
from __future__ import annotations

import pytest
import torch

import model.nets.fused as fused
from model.flow import euler_sample
from model.nets.dit import Condition, DiTConfig, SparseDiT
from model.sparse import SparseTensor

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _coords(n, extent, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(extent**3, generator=g)[:n]
    return torch.stack([lin // extent**2, (lin // extent) % extent, lin % extent], 1).int()


def _model(device="cpu", backend="reference", seed=0):
    torch.manual_seed(seed)
    dit = SparseDiT(DiTConfig.tiny(backend=backend)).to(device).eval()
    with torch.no_grad():
        for p in dit.parameters():  # biases too: the zeroed-condition output is the value bias through to_out
            p.normal_(0.0, 0.1)
    return dit


@pytest.mark.parametrize("affine,mod,batched", [(False, True, False), (True, False, False), (False, True, True)])
def test_fused_norm_modulate_matches_pytorch(affine, mod, batched):
    if not fused._interpreting():
        pytest.skip("the CPU run of the kernel needs the Triton interpreter")
    g = torch.Generator().manual_seed(1)
    n, c = 37, 48  # a channel count that is not a power of two: the masked tail
    x = torch.randn(n, c, generator=g) * 3 + 1
    w, b = (torch.randn(c, generator=g), torch.randn(c, generator=g)) if affine else (None, None)
    rows = 2 if batched else 1
    shift, scale = (torch.randn(rows, c, generator=g), torch.randn(rows, c, generator=g)) if mod else (None, None)
    bidx = (torch.arange(n) >= 20).long() if batched else None
    got = fused.layer_norm_modulate(x, 1e-6, weight=w, bias=b, shift=shift, scale=scale, batch_index=bidx)
    want = fused._reference(x, 1e-6, w, b, shift, scale, bidx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="together"):
        fused.layer_norm_modulate(x, 1e-6, weight=torch.ones(c))
    with pytest.raises(ValueError, match="need batch_index"):
        fused.layer_norm_modulate(x, 1e-6, shift=torch.zeros(2, c), scale=torch.zeros(2, c))


def test_fused_norm_adds_the_pending_constant_in_place():
    """``add=``: the kernel stores ``round(x + add)`` into x (the residual stream) and normalises that; ``out=``
    writes into a given tensor (row slices of one buffer); the PyTorch fallback does the same."""
    if not fused._interpreting():
        pytest.skip("the CPU run of the kernel needs the Triton interpreter")
    g = torch.Generator().manual_seed(2)
    n, c = 29, 40
    x = (torch.randn(n, c, generator=g) * 2).to(torch.float16)
    add = torch.randn(c, generator=g)
    shift, scale = torch.randn(1, c, generator=g), torch.randn(1, c, generator=g)
    want_x = (x.float() + add).to(torch.float16)
    want = fused._reference(want_x, 1e-6, None, None, shift, scale)
    got_x, out = x.clone(), torch.empty(n + 3, c, dtype=torch.float16)
    got = fused.layer_norm_modulate(got_x, 1e-6, shift=shift, scale=scale, add=add, out=out[3:])
    assert got.data_ptr() == out[3:].data_ptr()
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    norm = torch.nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
    with torch.no_grad():
        fallback_x = x.float()  # float32 on the CPU: the PyTorch ops (use_fused is for CUDA tensors)
        y = fused.norm_modulate(norm, fallback_x, shift, scale, add=add)
    torch.testing.assert_close(fallback_x, x.float() + add)
    torch.testing.assert_close(y, fused._reference(x.float() + add, 1e-6, None, None, shift, scale))
    with pytest.raises(ValueError, match="add must have"):
        fused.layer_norm_modulate(x.clone(), 1e-6, add=torch.zeros(c + 1))
    with pytest.raises(ValueError, match="out must be"):
        fused.layer_norm_modulate(x.clone(), 1e-6, out=torch.empty(n, c))
    with pytest.raises(ValueError, match="inference"):
        fused.norm_modulate(norm, x.float(), add=add)


def test_zeroed_condition_shortcut_batched_guidance_and_kept_projections():
    dit = _model()
    x = SparseTensor.from_list([_coords(150, 16, 0), _coords(90, 16, 1)],
                               [torch.randn(150, 4), torch.randn(90, 4)])
    cond = Condition(torch.randn(2, 21, 32))
    t = torch.tensor([500.0, 200.0])
    with torch.no_grad():
        v_c = dit(x, t, cond.tokens).feats  # a plain tensor: attended everywhere, nothing kept
        v_u = dit(x, t, torch.zeros_like(cond.tokens)).feats
        shortcut = dit(x, t, cond.zeros_like()).feats  # null: the constant instead of attention
        torch.testing.assert_close(shortcut, v_u, rtol=1e-5, atol=1e-5)
        want = v_u + 7.0 * (v_c - v_u)
        for batched in (True, False):
            got = dit.guided_velocity(x, t, cond, 7.0, batched=batched).feats
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    kept = cond.cache[("dit_cross_kv", id(dit))]
    assert len(kept) == len(dit.blocks)  # one projection per block, reused by every later call
    with torch.no_grad():  # an in-place weight update makes the kept projections stale: they are recomputed
        dit.blocks[0].cross_attn.to_kv.weight.mul_(2)
        again = dit.guided_velocity(x, t, cond, 7.0).feats
        fresh = dit.guided_velocity(x, t, Condition(cond.tokens), 7.0).feats
    torch.testing.assert_close(again, fresh)


def test_inference_blocks_match_the_plain_blocks():
    """``SparseDiTBlock.forward_inference`` (residual adds in the products' epilogues, adaLN gates folded into the
    weights, bias constants carried into the next norm, merged q/k/v/gate projection) against the plain blocks: one
    and two elements, a shared and per-element timestep, a plain condition tensor, the zeroed-condition shortcut and
    batched guidance (float32, reference SSA)."""
    import model.nets.dit as dit_module

    dit = _model()
    x = SparseTensor.from_list([_coords(150, 16, 0), _coords(90, 16, 1)],
                               [torch.randn(150, 4), torch.randn(90, 4)])
    cond = torch.randn(2, 21, 32)
    calls = []
    original = dit.blocks[0].forward_inference
    dit.blocks[0].forward_inference = lambda *a, **k: calls.append(1) or original(*a, **k)

    def both(fn):
        with torch.no_grad():
            dit_module.INFERENCE_PATH = False
            try:
                plain = fn()
            finally:
                dit_module.INFERENCE_PATH = True
            before = len(calls)
            fast = fn()
            return plain, fast, len(calls) > before

    for t in (torch.tensor([500.0]), 300.0):
        plain, fast, used = both(lambda: dit(x, t, cond).feats)
        assert used
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        for batched in (True, False):
            plain, fast, used = both(lambda: dit.guided_velocity(x, t, Condition(cond), 7.0, batched=batched).feats)
            assert used
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    plain, fast, used = both(lambda: dit(x, torch.tensor([500.0, 200.0]), cond).feats)
    assert not used  # two modulation rows: the plain blocks
    torch.testing.assert_close(fast, plain)
    with torch.enable_grad():
        out = dit(x, torch.tensor([500.0]), cond).feats
        out.square().mean().backward()  # autograd runs the plain blocks
    assert dit.blocks[0].self_attn.proj_q.weight.grad is not None


def test_euler_sample_takes_the_guided_path():
    dit = _model()
    x = SparseTensor.from_list([_coords(120, 16, 2)], [torch.zeros(120, 4)])
    cond = torch.randn(1, 21, 32)
    calls = []
    plain = lambda xt, t, c: dit(xt, t, c)  # noqa: E731  (no guided_velocity: two forwards per step)
    ref = euler_sample(plain, x, cond, steps=3, guidance=5.0, seed=3).feats
    original = dit.guided_velocity
    dit.guided_velocity = lambda *a, **k: calls.append(k) or original(*a, **k)
    for batched in (True, False):
        got = euler_sample(dit, x, cond, steps=3, guidance=5.0, seed=3, batched_guidance=batched).feats
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert [c["batched"] for c in calls] == [True] * 3 + [False] * 3


def _dense(device="cpu"):
    from model.nets.dense import DenseDiT, DenseDiTConfig

    torch.manual_seed(0)
    dit = DenseDiT(DenseDiTConfig.tiny()).to(device).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.1)
    return dit


def test_dense_dit_guided_velocity_is_one_forward_with_the_shortcut():
    dit = _dense()
    cfg = dit.config
    r = cfg.resolution
    x = torch.randn(1, cfg.in_channels, r, r, r)
    cond = torch.randn(1, 7, cfg.cond_channels)
    t = torch.tensor([300.0])
    with torch.no_grad():
        v_c, v_u = dit(x, t, cond), dit(x, t, torch.zeros_like(cond))
        torch.testing.assert_close(dit(x, t, Condition(cond).zeros_like()), v_u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dit.guided_velocity(x, t, cond, 7.0), v_u + 7.0 * (v_c - v_u),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dense_stage_cuda_graph_replays_the_eager_step():
    """The cascade's dense velocity replayed from a CUDA graph equals the eager guided step on every step (new
    latents and timesteps each time)."""
    import model.nets.dense as dense_mod
    from model.nets.dense import DenseTokenVelocity

    dit = _dense("cuda").to(torch.bfloat16)
    cfg = dit.config
    r, ch = cfg.resolution, cfg.in_channels
    axis = torch.arange(r, device="cuda")
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros_like(grid[:, :1]), grid], 1)
    cond = Condition(torch.randn(1, 7, cfg.cond_channels, device="cuda", dtype=torch.bfloat16))
    graphed, eager = DenseTokenVelocity(dit, cuda_graph=True), DenseTokenVelocity(dit)
    for step in range(3):
        x = SparseTensor(coords, torch.randn(r**3, ch, device="cuda", dtype=torch.bfloat16), resolution=r)
        t = torch.tensor([900.0 - 300 * step], device="cuda")
        torch.testing.assert_close(graphed.guided_velocity(x, t, cond, 7.0).feats,
                                   eager.guided_velocity(x, t, cond, 7.0).feats)
    # a second sampling run on the same inputs (a second image in one process) captures without warm-up steps
    assert dense_mod._warm_key(x.feats.t().reshape(1, ch, r, r, r), cond) in dense_mod._WARM_INPUTS
    again = DenseTokenVelocity(dit, cuda_graph=True)
    for step in range(2):
        x = SparseTensor(coords, torch.randn(r**3, ch, device="cuda", dtype=torch.bfloat16), resolution=r)
        t = torch.tensor([800.0 - 300 * step], device="cuda")
        torch.testing.assert_close(again.guided_velocity(x, t, cond, 7.0).feats,
                                   eager.guided_velocity(x, t, cond, 7.0).feats)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fast_path_matches_the_unfused_two_forward_path():
    """bfloat16 on the GPU with the Triton SSA kernels: fused norms + zeroed-condition shortcut + (batched) guidance
    against the float32 two-forward step (unfused), next to the unfused bfloat16 two-forward step: the fast path
    is as close to float32 as the plain bfloat16 path (within 1.5x its error: bfloat16 noise, not a new error)."""
    dit = _model("cuda", backend="kernels")
    x = SparseTensor.from_list([_coords(3000, 24, 4)], [torch.randn(3000, 4)]).to("cuda")
    cond = torch.randn(1, 21, 32, device="cuda")
    t = torch.tensor([700.0], device="cuda")

    def plain(model, xx, c):
        fused.ENABLED = False
        try:
            v_c = model(xx, t, c).feats.float()
            v_u = model(xx, t, torch.zeros_like(c)).feats.float()
        finally:
            fused.ENABLED = True
        return v_u + 7.0 * (v_c - v_u)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    with torch.no_grad():
        truth = plain(dit, x, cond)  # float32 weights, float32 kernels
        dit16 = dit.to(torch.bfloat16)
        x16, cond16 = x.replace(x.feats.to(torch.bfloat16)), cond.to(torch.bfloat16)
        noise = rel(plain(dit16, x16, cond16), truth)
        assert noise < 0.25, noise  # guidance 7 amplifies the bf16 rounding of the two velocities
        for batched in (True, False):
            err = rel(dit16.guided_velocity(x16, t, cond16, 7.0, batched=batched).feats, truth)
            assert err <= 1.5 * noise + 1e-3, (batched, err, noise)
