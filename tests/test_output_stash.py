"""The outputs of a checkpointed forward kept for its recomputation (:mod:`ssa_kernels.output_stash`): the stash on
its own, the cross-attention kernel under ``checkpoint`` with it, and the DiT's training step with
``STASH_CROSS_ATTENTION`` (the same loss and gradients bit for bit, the forward kernel once per block instead of
twice). CPU: kernels through the Triton interpreter, outputs kept as they are; GPU: kept in pinned host memory (the
DiT's GPU step, not bitwise reproducible run to run, is compared against its own spread)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import model.nets.cross_attention_kernel as ck
from ssa_kernels import output_stash
from ssa_kernels.output_stash import OutputStash
from tests.helpers import spy_launches
from tests.test_training_memory import _rel, _step_grads, _tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def _on_device(device):
    if device == "cpu" and not ck._interpreting():
        pytest.skip("the kernels on CPU tensors need the Triton interpreter")


@pytest.mark.parametrize("device", DEVICES)
def test_stash_hands_back_what_it_kept_in_order(device):
    a, b = torch.randn(5, 3, device=device), torch.arange(4, device=device, dtype=torch.int32)
    stash = OutputStash()
    keep, take = stash.contexts()
    assert output_stash.active() is None
    with keep:
        assert output_stash.active() is stash and stash.take(((5, 3), a.dtype)) is None  # recording: nothing to take
        stash.keep(a, b)
        stash.keep(b)
    assert output_stash.active() is None
    a_kept = a.clone()
    a.add_(1.0)  # the caller's tensor changes after the forward; CUDA keeps a copy, the CPU keeps the tensor
    with take:
        first = stash.take(((5, 3), torch.float32), ((4,), torch.int32))
        second = stash.take(((4,), torch.int32))
        with pytest.raises(RuntimeError, match="more calls"):
            stash.take(((4,), torch.int32))
    assert first[0].device == a.device and torch.equal(first[1], b) and torch.equal(second[0], b)
    assert torch.equal(first[0], a_kept if device == "cuda" else a)


def test_stash_refuses_calls_that_are_not_the_recorded_ones():
    stash = OutputStash()
    keep, take = stash.contexts()
    with keep:
        stash.keep(torch.zeros(2, 3))
    with take, pytest.raises(RuntimeError, match="not the recorded ones"):
        stash.take(((2, 4), torch.float32))
    stash = OutputStash()
    keep, take = stash.contexts()
    with keep:
        stash.keep(torch.zeros(2, 3))
    with take, pytest.raises(RuntimeError, match="not the recorded ones"):
        stash.take(((2, 3), torch.float16))


@pytest.mark.parametrize("device", DEVICES)
def test_checkpointed_cross_attention_takes_its_kept_output(monkeypatch, device):
    """``checkpoint`` with the stash's contexts: the recomputation takes the first forward's output and LSE (one
    forward launch instead of two) and the gradients equal those of computing again, bit for bit."""
    _on_device(device)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*shape, generator=g).to(device).requires_grad_() for shape in
               ((70, 2, 16), (9, 2, 16), (9, 2, 16)))
    w = torch.randn(70, 32, generator=g).to(device)
    launches = spy_launches(monkeypatch, ck, ("_cross_attention_kernel",), "BLOCK_M")

    def fn(q, k, v):
        return (ck.cross_attention(q * 1.5, k, v).reshape(70, 32) * w).tanh().sum()

    out = {}
    for stash in (False, True):
        launches.clear()
        kw = dict(context_fn=OutputStash().contexts) if stash else {}
        loss = checkpoint(fn, q, k, v, use_reentrant=False, **kw)
        grads = torch.autograd.grad(loss, (q, k, v))
        out[stash] = (len(launches), loss.detach(), grads)
    assert out[False][0] == 2 and out[True][0] == 1
    assert torch.equal(out[True][1], out[False][1])
    assert all(torch.equal(a, b) for a, b in zip(out[True][2], out[False][2]))
    # a second backward pass through the same graph: the kept outputs were handed out, so it computes them again
    launches.clear()
    loss = checkpoint(fn, q, k, v, use_reentrant=False, context_fn=OutputStash().contexts)
    first = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
    second = torch.autograd.grad(loss, (q, k, v))
    assert len(launches) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))  # forward, 2nd backward
    assert all(torch.equal(a, b) for a, b in zip(first, out[False][2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("switch", ["STASH_CROSS_ATTENTION", "STASH_SELECTION"])
def test_dit_step_with_a_stash_is_the_same_step(monkeypatch, device, switch):
    """``STASH_CROSS_ATTENTION`` (on by default) and ``STASH_SELECTION`` (off): every checkpointed block's
    recomputation takes the cross-attention kernel's output, or the SSA op's selection-branch output and LSE, from
    the first forward (in pinned host memory on the GPU): that kernel runs once per block instead of twice, and the
    loss and every gradient of a float32 training step are those of computing it again: bit for bit on the CPU,
    within the step's own run-to-run spread on the GPU (atomic sums make it not bitwise reproducible there). The
    top-k choice is reused as always (``REUSE_SELECTION``)."""
    import model.nets.dit as dit_module
    import model.nets.dit_block as dit_block
    import ssa_kernels.ssa as ssa

    _on_device(device)
    if device == "cpu":  # the routing takes CUDA tensors only; the interpreter runs the kernels on the CPU ones
        monkeypatch.setattr(dit_block, "_kernel_fits", lambda q, kv, mask: mask is None and ck.supports(
            q, kv[:, :, 0], kv[:, :, 1]))
    dit, x0, cond = _tiny_dit(backend="kernels", tokens=90, extent=8, seed=3, cond_tokens=5)
    dit, x0, cond = dit.to(device), x0.to(device), cond.to(device)
    if switch == "STASH_CROSS_ATTENTION":
        calls = spy_launches(monkeypatch, ck, ("_cross_attention_kernel",), "BLOCK_M")
    else:
        forward, calls = ssa.selection_forward, []
        monkeypatch.setattr(ssa, "selection_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    out = {}
    for stash in (False, True):
        monkeypatch.setattr(dit_module, switch, stash)
        calls.clear()
        out[stash] = (*_step_grads(dit, x0, cond), len(calls))
    blocks = dit.config.num_blocks
    assert out[False][2] == 2 * blocks and out[True][2] == blocks
    assert torch.equal(out[True][0], out[False][0])
    if device == "cpu":
        assert torch.equal(out[True][1], out[False][1])
    else:
        spread = _rel(_step_grads(dit, x0, cond)[1], out[True][1])
        assert _rel(out[True][1], out[False][1]) <= max(4 * spread, 1e-6), spread


def test_stash_kinds():
    stash = OutputStash(["selection"])
    with stash.recording():
        assert output_stash.active("selection") is stash and output_stash.active("cross_attention") is None
        assert output_stash.active() is stash
    with pytest.raises(ValueError, match="kinds"):
        OutputStash(["attention"])
