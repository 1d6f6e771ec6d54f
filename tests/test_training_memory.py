"""The training step's memory savings against the plain paths (CPU): the MLP that recomputes its hidden layer in the
backward pass (float64 against the plain modules, bf16 autocast), the DiT's half-precision residual stream under
autocast, and the report's training variants that switch them one after the other."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import model.sparse.layers as layers
from model.flow import flow_loss
from model.nets.dit import DiTConfig, SparseDiT
from model.sparse import SparseTensor
from model.sparse.layers import FeedForward
from tests.helpers import spy_launches

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _grads(mlp, x, g):
    out = mlp(x)
    return [out, *torch.autograd.grad(out, [x, *mlp.parameters()], g)]


@pytest.mark.parametrize("n,chunk", [(23, 7), (1, 4), (16, 16)])
def test_recomputed_mlp_matches_the_plain_modules_in_float64(monkeypatch, n, chunk):
    monkeypatch.setattr(layers, "RECOMPUTE_CHUNK_ROWS", chunk)  # several chunks, a short last one
    torch.manual_seed(n)
    mlp = FeedForward(12, mlp_ratio=3.0).double()
    x = torch.randn(n, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, 12, dtype=torch.float64)
    got = _grads(mlp, x, g)
    monkeypatch.setattr(layers, "RECOMPUTE_HIDDEN", False)
    want = _grads(mlp, x, g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < 1e-12


def test_recomputed_mlp_saves_only_its_input():
    """What autograd keeps for the backward pass: the input and the parameters, no ``[N, 4C]`` hidden layer."""
    mlp = FeedForward(8)
    x = torch.randn(10, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        mlp(x)
    assert (10, 32) not in saved and (10, 8) in saved
    layers.RECOMPUTE_HIDDEN = False
    try:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            mlp(x)
        assert (10, 32) in saved  # the plain modules keep the hidden layer (the test would see a regression)
    finally:
        layers.RECOMPUTE_HIDDEN = True


def test_recomputed_mlp_under_bf16_autocast_and_frozen_weights():
    torch.manual_seed(3)
    mlp = FeedForward(16)
    x = torch.randn(40, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
        layers.RECOMPUTE_HIDDEN = False
        try:
            want = mlp(x)
        finally:
            layers.RECOMPUTE_HIDDEN = True
    assert out.dtype == want.dtype == torch.bfloat16
    assert _rel(out.float(), want.float()) < 2e-2
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in mlp.parameters())
    for p in mlp.parameters():
        p.requires_grad_(False)
    x.grad = None
    mlp(x).sum().backward()  # input gradient only
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("with_h", [True, False])
def test_gated_branches_match_addcmul_in_float64(monkeypatch, with_h):
    """``h + gate * branch(x)`` through the functions that keep no branch output, against ``addcmul`` on the plain
    modules: the output and every gradient (h, x, weights, biases, gate)."""
    monkeypatch.setattr(layers, "RECOMPUTE_CHUNK_ROWS", 6)
    torch.manual_seed(4)
    n, c = 17, 10
    d = dict(dtype=torch.float64)
    mlp = FeedForward(c, mlp_ratio=2.0).double()
    w = torch.randn(c, c, **d, requires_grad=True)
    h = torch.randn(n, c, **d, requires_grad=with_h)
    x = torch.randn(n, c, **d, requires_grad=True)
    gate = torch.randn(1, c, **d, requires_grad=True)
    g = torch.randn(n, c, **d)
    for fast, plain, params in (
            (lambda: layers.gated_linear_add(h, x, w, gate), lambda: torch.addcmul(h, gate, x @ w.t()), [w]),
            (lambda: mlp.gated_residual(x, h, gate), lambda: torch.addcmul(h, gate, mlp.mlp(x)),
             list(mlp.parameters()))):
        inputs = [t for t in (h, x, gate, *params) if t.requires_grad]
        got, want = fast(), plain()
        assert _rel(got, want) < 1e-12
        for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
            assert a.shape == b.shape and _rel(a, b) < 1e-12


def test_gated_branches_keep_no_branch_output():
    mlp = FeedForward(8)
    w = torch.randn(8, 8, requires_grad=True)
    h, x = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    gate = torch.randn(1, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out1 = layers.gated_linear_add(h, x, w, gate)
        out2 = mlp.gated_residual(x, h, gate)
    big = [t for t in saved if t.shape == (10, 8)]
    assert all(t is x for t in big)  # the input only (the products and branch outputs are not kept)
    assert out1.shape == out2.shape == (10, 8)


def _coords(n, extent, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(extent**3, generator=g)[:n]
    return torch.stack([torch.zeros_like(lin), lin // extent**2, (lin // extent) % extent, lin % extent], 1).int()


def _tiny_dit(backend="reference", tokens=150, extent=12, seed=1, cond_tokens=7):
    torch.manual_seed(0)
    dit = SparseDiT(DiTConfig.tiny(backend=backend, use_checkpoint=True))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.05)
    coords = _coords(tokens, extent, seed)
    x0 = SparseTensor(coords, torch.randn(coords.shape[0], dit.config.in_channels))
    cond = torch.randn(1, cond_tokens, dit.config.cond_channels)
    return dit, x0, cond


def _step_grads(dit, x0, cond):
    """Loss and flat gradient of one float32 training step (no autocast) from zeroed gradients."""
    dit.zero_grad(set_to_none=True)
    loss = flow_loss(dit, x0, cond, generator=torch.Generator().manual_seed(1))["loss"]
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in dit.parameters() if p.grad is not None])


def _loss(dit, x0, cond):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return flow_loss(dit, x0, cond, generator=torch.Generator().manual_seed(1))["loss"]


def test_half_stream_carries_the_blocks_in_the_autocast_dtype():
    dit, x0, cond = _tiny_dit()
    seen = []
    hook = dit.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[1].dtype))
    losses, grads = {}, {}
    for half in (False, True):
        dit.config = dit.config.replace(half_stream=half)
        dit.zero_grad(set_to_none=True)
        loss = _loss(dit, x0, cond)
        loss.backward()
        losses[half] = loss.detach()
        grads[half] = torch.cat([p.grad.reshape(-1) for p in dit.parameters() if p.grad is not None])
    hook.remove()
    # forward + checkpoint recomputation per setting
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    assert _rel(losses[True], losses[False]) < 2e-2
    assert _rel(grads[True], grads[False]) < 5e-2


def _switches(dit):
    import model.nets.cross_attention_kernel as cross_attention_kernel
    import model.nets.dit as dit_module
    import model.nets.dit_block as dit_block
    import model.nets.fused as fused
    import model.nets.ssa_layer as ssa_layer
    from ssa_kernels.launch import config

    return dict(half_stream=dit.config.half_stream, fused_norms=fused.ENABLED, recompute_hidden=layers.RECOMPUTE_HIDDEN,
                gated_residual=dit_block.GATED_RESIDUAL, norm_projection=dit_block.NORM_PROJECTION,
                reuse_selection=dit_module.REUSE_SELECTION, lean_recompute=dit_module.LEAN_RECOMPUTE,
                one_concatenation=ssa_layer.SPLIT_FUNCTION, gelu_kernel=layers.FUSED_GELU_GRAD,
                cross_kernel=cross_attention_kernel.TRAINABLE, query_view=ssa_layer.QUERY_VIEW,
                residual_in_norms=dit_block.RESIDUAL_GRAD_IN_NORMS, stash_cross=dit_module.STASH_CROSS_ATTENTION,
                stash_selection=dit_module.STASH_SELECTION,
                split_queries=config("selection.DKDV", head_dim=dit.config.model_channels // dit.config.num_heads)[
                    "max_queries"])


def test_training_variants_switch_and_restore():
    from model.reports.dit_profile import TRAINING_VARIANTS, training_variants
    from ssa_kernels.launch import BASE

    dit, x0, cond = _tiny_dit()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    calls = []
    before = _switches(dit)

    def time_fn(fn, *, reps, warmup, device):
        fn()
        calls.append(_switches(dit))
        return [1.0] * reps, None

    rows = training_variants(dit, lambda: _loss(dit, x0, cond), opt, time_fn=time_fn, reps=2, warmup=0)
    assert [r["name"] for r in rows] == [v[0] for v in TRAINING_VARIANTS]
    table = BASE["selection.DKDV"]["max_queries"]
    assert calls == [{**v[1], "split_queries": table if v[1]["split_queries"] is None else v[1]["split_queries"]}
                     for v in TRAINING_VARIANTS]
    assert rows[0]["loss_rel_diff"] == 0 and rows[0]["grad_rel_diff"] == 0
    assert all(math.isfinite(r["grad_rel_diff"]) and r["grad_rel_diff"] < 5e-2 for r in rows)
    # every saving on again, those off by default (the report's _ALL_ON) off
    assert _switches(dit) == before and all(v for k, v in before.items() if k not in ("split_queries",
                                                                                      "stash_selection"))
    assert not before["stash_selection"]
    tail = training_variants(dit, lambda: _loss(dit, x0, cond), opt, time_fn=time_fn, reps=1, warmup=0, last=2)
    assert [r["name"] for r in tail] == [v[0] for v in TRAINING_VARIANTS[-2:]] and tail[0]["grad_rel_diff"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_training_savings_are_bf16_noise(monkeypatch, device):
    """Under bf16 autocast: the loss and the gradients with every saving on (bf16 stream, fused norms with their
    backward kernel, recomputed MLP, gated residual products) and the plain path with a float32 stream, both against
    a float32 run (no autocast). The savings stay within 2x the plain bf16 path's error: the bf16 stream rounds once
    more per residual add (as the released model's fp16 stream), the rest adds nothing. CPU: the dense reference SSA
    and the fused norms through the Triton interpreter; GPU: the Triton SSA kernels."""
    from model.reports.dit_profile import TRAINING_VARIANTS, training_switches
    import model.nets.fused as fused

    if device == "cpu":
        if not fused._interpreting():
            pytest.skip("the CPU run of the fused norms needs the Triton interpreter")
        monkeypatch.setattr(fused, "INTERPRET_ON_CPU", True)
    n, extent = (200, 10) if device == "cpu" else (3000, 24)
    torch.manual_seed(0)
    dit = SparseDiT(DiTConfig.tiny(backend="reference" if device == "cpu" else "kernels", use_checkpoint=True))
    dit = dit.to(device)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.05)
    coords = _coords(n, extent, 2).to(device)
    x0 = SparseTensor(coords, torch.randn(coords.shape[0], dit.config.in_channels, device=device))
    cond = torch.randn(1, 21, dit.config.cond_channels, device=device)

    def run(flags, autocast):
        dit.zero_grad(set_to_none=True)
        with training_switches(dit, **flags):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = flow_loss(dit, x0, cond, generator=torch.Generator().manual_seed(1))["loss"]
            loss.backward()
        return loss.detach().double(), torch.cat([p.grad.reshape(-1).double() for p in dit.parameters()])

    before, after = TRAINING_VARIANTS[0][1], TRAINING_VARIANTS[-1][1]
    assert not any(v for k, v in before.items() if k != "split_queries")
    assert all(v for k, v in after.items() if k != "split_queries")
    truth = run(before, autocast=False)
    plain, fast = run(before, autocast=True), run(after, autocast=True)
    for i in range(2):
        noise = _rel(plain[i], truth[i])
        assert 0 < noise < 5e-2, noise
        assert _rel(fast[i], truth[i]) <= 2.0 * noise + 1e-4


def test_position_embedding_is_cached_for_sampling_only():
    """A sampling loop reuses the embedding of its coordinates; a training step must not keep the [N, C] table in the
    tensor's cache through its backward pass."""
    from model.sparse.layers import AbsolutePositionEmbedder

    emb = AbsolutePositionEmbedder(24)
    x = SparseTensor(_coords(30, 8, 5), torch.randn(30, 4))
    first = emb(x)
    assert not any(k[0] == "pos_emb" for k in x.cache if isinstance(k, tuple))
    with torch.no_grad():
        kept = emb(x)
        assert emb(x) is kept  # cached
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_norms_folded_into_projections_give_the_same_gradients_in_float64(monkeypatch):
    """The training path with the norms folded into the merged q/k/v/gate and query projections against the norms
    and modules one after the other: the same loss and gradients (float64, every parameter)."""
    import model.nets.dit_block as dit_block

    dit, x0, cond = _tiny_dit()
    dit = dit.double()
    x0 = x0.replace(x0.feats.double())
    cond = cond.double()
    results = []
    for folded in (False, True):
        monkeypatch.setattr(dit_block, "NORM_PROJECTION", folded)
        dit.zero_grad(set_to_none=True)
        loss = flow_loss(dit, x0, cond, generator=torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in dit.parameters()]))
    (l0, g0), (l1, g1) = results
    assert _rel(l1, l0) < 1e-12
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 1e-10


def test_recomputed_forward_skips_the_mlp_output(monkeypatch):
    """With checkpointing, the recomputed forward of each block records its last branch (the gated MLP) without
    computing it: the MLP's forward products run once per block instead of twice, and the loss and gradients are
    the same bit for bit (the skipped output was read by nothing)."""
    import model.nets.dit as dit_module

    dit, x0, cond = _tiny_dit()
    first_product = layers.gelu_linear
    calls = []
    monkeypatch.setattr(layers, "gelu_linear", lambda *a: calls.append(1) or first_product(*a))
    out = {}
    for lean in (False, True):
        monkeypatch.setattr(dit_module, "LEAN_RECOMPUTE", lean)
        calls.clear()
        dit.zero_grad(set_to_none=True)
        loss = _loss(dit, x0, cond)
        forward_calls = len(calls)
        loss.backward()
        out[lean] = (forward_calls, len(calls) - forward_calls, loss.detach(),
                     [p.grad.clone() for p in dit.parameters()])
    blocks = dit.config.num_blocks
    assert out[False][0] == out[True][0] == blocks  # one chunk per block at these sizes
    assert out[False][1] == blocks and out[True][1] == 0
    assert torch.equal(out[False][2], out[True][2])
    assert all(torch.equal(a, b) for a, b in zip(out[False][3], out[True][3]))


@pytest.mark.parametrize("query_view", [False, True])
def test_split_projection_gradient_matches_slicing(monkeypatch, query_view):
    """The merged q/k/v/gate product split under autograd (one concatenation in the backward pass) against plain
    slices of it: the same parts and the same gradient of the product, padding columns included (zero). With
    ``QUERY_VIEW``, q is a view of the product (no copy) and the rows are padded to ``QUERY_VIEW_ALIGN``."""
    import model.nets.ssa_layer as ssa_layer
    from model.nets.ssa_layer import SpatialSparseAttention

    monkeypatch.setattr(ssa_layer, "QUERY_VIEW", query_view)
    torch.manual_seed(5)
    attn = SpatialSparseAttention(64, 4, 2, compression_block=2, selection_block=2, topk=2, window=2).double()
    rows = attn.merged_weight().shape[0]
    assert rows > 64 + 2 * 32 + 3  # some padding columns
    assert rows % (ssa_layer.QUERY_VIEW_ALIGN if query_view else ssa_layer.MERGED_ALIGN) == 0
    out = torch.randn(9, rows, dtype=torch.float64, requires_grad=True)
    got = attn.split_projection(out, contiguous_q=True)
    c, kv = 64, 32
    want = (out[:, :c].reshape(9, 4, 16), out[:, c:c + kv], out[:, c + kv:c + 2 * kv],
            torch.sigmoid(out[:, c + 2 * kv:c + 2 * kv + 3]))
    weights = [torch.randn_like(w) for w in want]
    g_got, = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, weights)), out)
    g_want, = torch.autograd.grad(sum((a * w).sum() for a, w in zip(want, weights)), out)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].is_contiguous() != query_view and _rel(g_got, g_want) < 1e-15
    assert (got[0].data_ptr() == out.data_ptr()) == query_view
    assert torch.count_nonzero(g_got[:, c + 2 * kv + 3:]) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_gelu_grad_kernel_matches_pytorch(monkeypatch, dtype, tol):
    """The fused GELU step (Triton interpreter on the CPU): the activation, the pre-activation's gradient and its
    column sums against PyTorch's gelu / gelu_backward in float64, on a shape that is no multiple of the tiles and
    with values large enough to saturate the tanh."""
    import model.sparse.gelu_grad_kernel as gk

    if not gk._interpreting():
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setattr(gk, "INTERPRET_ON_CPU", True)
    torch.manual_seed(7)
    pre = (torch.randn(70, 200) * 3).to(dtype)
    pre[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -4.0])
    dact = torch.randn(70, 200).to(dtype)
    x, g = pre.double(), dact.double()
    want_act = F.gelu(x, approximate="tanh")
    want_d = torch.ops.aten.gelu_backward(g, x, approximate="tanh")
    assert gk.supports(pre, dact)
    sums = gk.gelu_grad_(pre, dact)
    assert _rel(pre, want_act) < tol and _rel(dact, want_d) < tol
    assert sums.dtype == torch.float32 and _rel(sums, want_d.sum(0)) < tol
    assert torch.isfinite(pre).all() and torch.isfinite(dact).all()


def test_gelu_grad_kernel_rejects_bad_input(monkeypatch):
    import model.sparse.gelu_grad_kernel as gk

    monkeypatch.setattr(gk, "INTERPRET_ON_CPU", True)
    with pytest.raises(ValueError, match="pre and dact"):
        gk.gelu_grad_(torch.zeros(4, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="pre and dact"):
        gk.gelu_grad_(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="pre and dact"):
        gk.gelu_grad_(torch.zeros(8, 4).t(), torch.zeros(4, 8))


def test_recomputed_mlp_with_the_gelu_kernel_matches_pytorch(monkeypatch):
    """The recomputed MLP's backward with the fused GELU step (interpreter) against the PyTorch step, float32."""
    import model.sparse.gelu_grad_kernel as gk

    if not gk._interpreting():
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setattr(layers, "RECOMPUTE_CHUNK_ROWS", 8)
    torch.manual_seed(3)
    mlp = FeedForward(12, mlp_ratio=2.0)
    x = torch.randn(19, 12, requires_grad=True)
    h = torch.randn(19, 12, requires_grad=True)
    gate = torch.randn(1, 12, requires_grad=True)
    g = torch.randn(19, 12)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(gk, "INTERPRET_ON_CPU", fused)
        out = mlp.gated_residual(x, h, gate)
        results.append(torch.autograd.grad(out, [x, h, gate, *mlp.parameters()], g))
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gelu_grad_kernel_matches_pytorch_in_bf16_on_gpu():
    """The fused GELU step in bf16 on the GPU: within bf16 rounding of a float64 computation, as PyTorch's own
    bf16 kernels are."""
    from model.sparse.gelu_grad_kernel import gelu_grad_

    gen = torch.Generator(device="cuda").manual_seed(2)
    pre = (torch.randn(3001, 4096, device="cuda", generator=gen) * 2).bfloat16()
    dact = torch.randn(3001, 4096, device="cuda", generator=gen).bfloat16()
    x, g = pre.double(), dact.double()
    want_act = F.gelu(x, approximate="tanh")
    want_d = torch.ops.aten.gelu_backward(g, x, approximate="tanh")
    torch_d = torch.ops.aten.gelu_backward(dact, pre, approximate="tanh").double()
    sums = gelu_grad_(pre, dact)
    torch.cuda.synchronize()
    noise = _rel(torch_d, want_d)
    assert _rel(dact, want_d) <= 1.5 * noise + 1e-6 and _rel(pre, want_act) < 1e-2
    assert _rel(sums, want_d.sum(0)) < 1e-3


def test_training_variants_time_launch_rows_with_their_settings_and_restore_the_defaults():
    """``--launch-variant`` rows of the DiT report: every combination is one row after the table's, timed with its
    launch settings in force (SSA kernels and the cross-attention's), the defaults back afterwards; bad specs
    raise ValueError naming the kernel or the setting."""
    import model.nets.cross_attention_kernel as ck
    from model.reports.dit_profile import TRAINING_VARIANTS, parse_launch_variants, training_variants
    from ssa_kernels.launch import config

    rows = parse_launch_variants(["selection.FWD:fma_exp_every=2|4;cross_attention.forward:fma_exp_every=3",
                                  "cross_attention.dkdv:chunk_rows=64"])
    assert [launch for _, launch in rows] == [
        {"selection.FWD": {"fma_exp_every": 2}, "cross_attention.forward": {"fma_exp_every": 3}},
        {"selection.FWD": {"fma_exp_every": 4}, "cross_attention.forward": {"fma_exp_every": 3}},
        {"cross_attention.dkdv": {"chunk_rows": 64}}]
    assert rows[0][0] == "+ launch: selection.FWD fma_exp_every=2; cross_attention.forward fma_exp_every=3"

    def seen():
        return (config("selection.FWD", head_dim=32)["fma_exp_every"], ck.launch_for(32)["fma_exp_every"],
                ck.backward_launch_for(32)["dkdv"]["chunk_rows"])

    default = seen()
    dit, x0, cond = _tiny_dit()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    calls = []

    def time_fn(fn, *, reps, warmup, device):
        fn()
        calls.append(seen())
        return [1.0] * reps, None

    out = training_variants(dit, lambda: _loss(dit, x0, cond), opt, time_fn=time_fn, reps=1, warmup=0, last=1,
                            launch_rows=rows)
    assert [r["name"] for r in out] == [TRAINING_VARIANTS[-1][0]] + [name for name, _ in rows]
    assert calls == [default, (2, 3, default[2]), (4, 3, default[2]), (default[0], default[1], 64)]
    assert out[1]["launch"] == rows[0][1] and "launch" not in out[0]
    assert seen() == default
    for bad, match in (("selection.FWD:nope=1", "nope"), ("cross_attention.fwd:fma_exp_every=1", "cross_attention"),
                       ("cross_attention.dq:bogus=2", "bogus"), ("selection.FWD:fma_exp_every", "setting=value"),
                       ("", "expected KERNEL")):
        with pytest.raises(ValueError, match=match):
            parse_launch_variants([bad])


def test_a_failing_launch_row_is_recorded_not_fatal():
    """A launch row whose step raises (on a GPU: a setting that needs more shared memory than the card has) gets
    ``error`` and no timing; the rows around it run, and a switch row that raises still stops the report."""
    from model.reports.dit_profile import TRAINING_VARIANTS, training_variants
    from ssa_kernels.launch import config

    dit, x0, cond = _tiny_dit()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)

    def loss_fn():
        if config("selection.FWD", head_dim=32)["block_n"] == 8:
            raise RuntimeError("out of resource: shared memory")
        return _loss(dit, x0, cond)

    def time_fn(fn, *, reps, warmup, device):
        fn()
        return [1.0] * reps, None

    rows = [("+ launch: bad", {"selection.FWD": {"block_n": 8}}),
            ("+ launch: good", {"selection.FWD": {"block_n": 16}})]
    out = training_variants(dit, loss_fn, opt, time_fn=time_fn, reps=1, warmup=0, last=1, launch_rows=rows)
    assert [r["name"] for r in out] == [TRAINING_VARIANTS[-1][0], "+ launch: bad", "+ launch: good"]
    assert "shared memory" in out[1]["error"] and "median_ms" not in out[1]
    assert "error" not in out[2] and out[2]["median_ms"] == 1.0
    import json
    from pathlib import Path

    from model.reports.dit import markdown
    report = json.loads((Path(__file__).parent.parent / "reports/dit_runs/85c3ada_savings.json").read_text())
    lines = markdown(dict(report, training_variants=out)).splitlines()
    assert any(line.startswith("| + launch: bad | failed: RuntimeError") for line in lines)


def test_cross_attention_overriding_nests_reaches_other_threads_and_checks_names():
    import threading

    import model.nets.cross_attention_kernel as ck

    base = ck.launch_for(32)
    with ck.overriding("forward", dict(block_m=16)):
        with ck.overriding("forward", dict(block_m=32, fma_exp_every=2)), ck.overriding("dq", dict(block_n=16)):
            got = []
            t = threading.Thread(target=lambda: got.append((ck.launch_for(32), ck.backward_launch_for(32))))
            t.start()
            t.join()
            assert got[0][0] == dict(base, block_m=32, fma_exp_every=2) and got[0][1]["dq"]["block_n"] == 16
        assert ck.launch_for(32) == dict(base, block_m=16)
    assert ck.launch_for(32) == base and ck.backward_launch_for(32) == ck.backward_launch_for(32)
    with pytest.raises(ValueError, match="part must be one of"):
        with ck.overriding("backward", {}):
            pass
    with pytest.raises(ValueError, match="unknown dkdv launch settings"):
        with ck.overriding("dkdv", dict(rows=3)):
            pass


def test_query_view_gives_the_training_step_of_the_copy(monkeypatch):
    """``QUERY_VIEW`` (q handed to the SSA kernels as a strided view of the merged product, rows padded to
    ``QUERY_VIEW_ALIGN``) against the contiguous copy: the same loss and gradients in float32 through the Triton
    kernels (interpreter on the CPU), the SSA op's backward included."""
    import model.nets.ssa_layer as ssa_layer

    dit, x0, cond = _tiny_dit(backend="kernels", tokens=120, extent=10)
    seen = []
    split = ssa_layer._SplitProjection.apply
    monkeypatch.setattr(ssa_layer._SplitProjection, "apply",
                        lambda *a: seen.append(a[-1]) or split(*a))
    out = {}
    for view in (False, True):
        monkeypatch.setattr(ssa_layer, "QUERY_VIEW", view)
        out[view] = _step_grads(dit, x0, cond)
    assert set(seen) == {False, True}
    assert _rel(out[True][0], out[False][0]) < 1e-6
    assert _rel(out[True][1], out[False][1]) < 1e-5


def test_residual_gradient_in_the_norms_gives_the_same_training_step(monkeypatch):
    """``RESIDUAL_GRAD_IN_NORMS``: each block's three fused norms pass the residual stream through their autograd
    function and add its gradient in the backward kernel (``HAS_SKIP`` launches, three per block); the loss and
    every gradient of a float32 training step equal those with autograd's additions (fused norms through the
    Triton interpreter, the reference SSA)."""
    import model.nets.dit_block as dit_block
    import model.nets.fused as fused

    if not fused._interpreting():
        pytest.skip("the CPU run of the fused norms needs the Triton interpreter")
    monkeypatch.setattr(fused, "INTERPRET_ON_CPU", True)
    dit, x0, cond = _tiny_dit(tokens=120, extent=10)
    launches = spy_launches(monkeypatch, fused, ("_layer_norm_modulate_bwd_kernel",), "HAS_SKIP")
    out = {}
    for on in (False, True):
        monkeypatch.setattr(dit_block, "RESIDUAL_GRAD_IN_NORMS", on)
        launches.clear()
        out[on] = (*_step_grads(dit, x0, cond), launches.count(True), len(launches))
    blocks = dit.config.num_blocks
    assert out[False][2] == 0 and out[True][2] == 3 * blocks and out[True][3] == out[False][3] == 3 * blocks
    assert _rel(out[True][0], out[False][0]) < 1e-6
    assert _rel(out[True][1], out[False][1]) < 1e-5
