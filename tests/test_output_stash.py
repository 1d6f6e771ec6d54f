"""The outputs of a checkpointed forward kept for its recomputation (:mod:`ssa_kernels.output_stash`): the stash on
its own, the cross-attention kernel under ``checkpoint`` with it, and the DiT's training step with
``STASH_CROSS_ATTENTION``, ``STASH_SELECTION`` and the reused top-k choice (the same loss and gradients bit for bit,
each skipped kernel once per block instead of twice). CPU: kernels through the Triton interpreter, outputs kept as
they are; GPU: kept in pinned host memory (the DiT's GPU step, not bitwise reproducible run to run, is compared
against its own spread)."""
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


def _kernel_dit(monkeypatch, device):
    """The tiny DiT of the kernel backend on ``device`` with spies on the kernels that a recomputation may skip:
    ``(dit, x0, cond, calls)``, ``calls`` counting the scoring passes, the cross-attention kernel's launches and the
    selection forwards."""
    import model.nets.dit_block as dit_block
    import ssa_kernels.ssa as ssa

    _on_device(device)
    if device == "cpu":  # the routing takes CUDA tensors only; the interpreter runs the kernels on the CPU ones
        monkeypatch.setattr(dit_block, "_kernel_fits", lambda q, kv, mask: mask is None and ck.supports(
            q, kv[:, :, 0], kv[:, :, 1]))
    dit, x0, cond = _tiny_dit(backend="kernels", tokens=90, extent=8, seed=3, cond_tokens=5)
    calls = dict(scoring=[], selection=[], cross_attention=spy_launches(monkeypatch, ck, ("_cross_attention_kernel",),
                                                                        "BLOCK_M"))
    for name, attr in (("scoring", "select_blocks_forward"), ("selection", "selection_forward")):
        real = getattr(ssa, attr)
        monkeypatch.setattr(ssa, attr, lambda *a, _real=real, _seen=calls[name], **k: _seen.append(1) or _real(*a, **k))
    return dit.to(device), x0.to(device), cond.to(device), calls


#: The DiT's switches that let a checkpointed block's recomputation skip work, and the kernel each one skips.
RECOMPUTE_SAVINGS = {"REUSE_SELECTION": "scoring", "STASH_CROSS_ATTENTION": "cross_attention",
                     "STASH_SELECTION": "selection"}


def test_dit_step_with_each_recompute_saving_is_the_same_step_on_the_cpu(monkeypatch):
    """``REUSE_SELECTION`` (the recomputation takes the first forward's top-k choice), ``STASH_CROSS_ATTENTION``
    (its cross-attention output and LSE; on by default) and ``STASH_SELECTION`` (the SSA op's selection-branch
    output and LSE; off), switched on one after another from none: each makes its kernel run once per checkpointed
    block instead of twice and leaves the loss and every gradient of a float32 training step equal bit for bit to
    those of computing everything again (kernels through the Triton interpreter)."""
    import model.nets.dit as dit_module

    dit, x0, cond, calls = _kernel_dit(monkeypatch, "cpu")
    blocks = dit.config.num_blocks
    steps = []
    for n_on in range(len(RECOMPUTE_SAVINGS) + 1):
        for i, switch in enumerate(RECOMPUTE_SAVINGS):
            monkeypatch.setattr(dit_module, switch, i < n_on)
        for seen in calls.values():
            seen.clear()
        steps.append(_step_grads(dit, x0, cond))
        for i, kernel in enumerate(RECOMPUTE_SAVINGS.values()):
            assert len(calls[kernel]) == (blocks if i < n_on else 2 * blocks), (n_on, kernel)
    for loss, grads in steps[1:]:
        assert torch.equal(loss, steps[0][0]) and torch.equal(grads, steps[0][1])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("switch", ["STASH_CROSS_ATTENTION", "STASH_SELECTION"])
def test_dit_step_with_a_stash_is_the_same_step(monkeypatch, device, switch):
    """``STASH_CROSS_ATTENTION`` and ``STASH_SELECTION`` on the GPU, outputs kept in pinned host memory: the kernel
    runs once per block instead of twice, and the loss and gradients of a float32 training step are within the
    step's own run-to-run spread of computing it again (atomic sums make it not bitwise reproducible there; the
    CPU test above asks bit for bit). The top-k choice is reused as always (``REUSE_SELECTION``)."""
    import model.nets.dit as dit_module

    dit, x0, cond, calls = _kernel_dit(monkeypatch, device)
    seen = calls[RECOMPUTE_SAVINGS[switch]]
    out = {}
    for stash in (False, True):
        monkeypatch.setattr(dit_module, switch, stash)
        seen.clear()
        out[stash] = (*_step_grads(dit, x0, cond), len(seen))
    blocks = dit.config.num_blocks
    assert out[False][2] == 2 * blocks and out[True][2] == blocks
    assert torch.equal(out[True][0], out[False][0])
    spread = _rel(_step_grads(dit, x0, cond)[1], out[True][1])
    assert _rel(out[True][1], out[False][1]) <= max(4 * spread, 1e-6), spread


def test_stash_kinds():
    stash = OutputStash(["selection"])
    with stash.recording():
        assert output_stash.active("selection") is stash and output_stash.active("cross_attention") is None
        assert output_stash.active() is stash
    with pytest.raises(ValueError, match="kinds"):
        OutputStash(["attention"])
