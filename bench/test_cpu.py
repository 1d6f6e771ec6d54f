"""The CPU-meaningful part of the benchmark: it runs everywhere, and its figures are labelled CPU.

- the layout order and the full layout build on CPU tensors (the real CPU cost of that host-side step);
- the float32 reference on a 1,000-token slice (a yardstick);
- reference vs kernels under the Triton interpreter (``--cpu-tokens``, 128 by default, small heads
  ``INTERPRETER_HEADS``, float32, one round: the interpreter takes seconds per call): it shows the kernels run
  end to end here; interpreter time is not kernel speed.

These are plain CPU wall-clock timings (synchronous), taken by pytest-benchmark itself.
"""
import pytest
import torch

import reference
from bench.cases import PASS_FWD, PASS_FWDBWD, case_coords
from bench.inputs import compressed_kv, make_ssa_inputs
from ssa_kernels.shapes import CONFIGS, shape_coords
from ssa_kernels.layout import build_layout, layout_order

#: Tokens of the reference yardstick (a slice of shell-512).
REFERENCE_TOKENS = 1000
#: Rounds of the slow CPU timings (each round is one call).
SLOW_ROUNDS = 3
#: Rounds of the (fast) layout timings: a fixed count keeps the CPU part's run time predictable.
LAYOUT_ROUNDS = 10
#: Rounds (after warm-up rounds) of the interpreter comparison: the reference is cheap, the interpreter is not
#: (and has nothing to warm up: no compilation).
REFERENCE_ROUNDS, REFERENCE_WARMUP = 3, 1
INTERPRETER_ROUNDS, INTERPRETER_WARMUP = 1, 0
#: (Hq, Hkv, D) of the interpreter comparison: v1.1's 32 heads take ~15 s per interpreted call at 128 tokens.
INTERPRETER_HEADS = (4, 2, 16)
CPU_CONFIG = "v1.1"
CPU_SHAPE = "shell-512"


def _cpu_info(**kw):
    return {"kind": "cpu", "device": "cpu", **kw}


@pytest.mark.parametrize("shape", ["shell-512", "shell-1024"])
def test_cpu_layout_order(benchmark, shape):
    coords = shape_coords(shape)
    shuffled = coords[torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(0))]
    benchmark.extra_info.update(_cpu_info(shape=shape, impl="layout-order", measured_pass="build",
                                          tokens=coords.shape[0]))
    perm = benchmark.pedantic(layout_order, args=(shuffled,), kwargs=dict(compression_block=8, selection_block=8),
                              rounds=LAYOUT_ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.equal(shuffled[perm], coords)


@pytest.mark.parametrize("shape", ["shell-512", "shell-1024"])
def test_cpu_layout_build(benchmark, shape):
    """``build_layout`` (every block table, both window shifts) on CPU tensors, v1.1 block sizes."""
    cfg = CONFIGS[CPU_CONFIG]
    coords = case_coords(shape, compression_block=cfg.compression_block, selection_block=cfg.selection_block)
    kw = dict(compression_block=cfg.compression_block, selection_block=cfg.selection_block, window=cfg.window)
    benchmark.extra_info.update(_cpu_info(shape=shape, config=CPU_CONFIG, impl="layout-build",
                                          measured_pass="build", tokens=coords.shape[0]))
    layout = benchmark.pedantic(build_layout, args=(coords,), kwargs=kw, rounds=LAYOUT_ROUNDS, warmup_rounds=1,
                                iterations=1)
    assert layout.num_tokens == coords.shape[0]


def test_cpu_reference_small(benchmark):
    """The float32 reference on a 1,000-token slice of shell-512 (v1.1 heads): a CPU yardstick, not a kernel figure."""
    cfg = CONFIGS[CPU_CONFIG]
    coords = shape_coords(CPU_SHAPE)[:REFERENCE_TOKENS]
    gen = torch.Generator().manual_seed(0)
    n = coords.shape[0]
    q = torch.randn(n, cfg.num_q_heads, cfg.head_dim, generator=gen)
    k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    k_cmp, v_cmp = compressed_kv(k, v, coords, compression_block=8, selection_block=8)
    gate = torch.rand(n, 3, generator=gen)
    benchmark.extra_info.update(_cpu_info(shape=CPU_SHAPE, config=CPU_CONFIG, impl="reference",
                                          measured_pass=PASS_FWD, tokens=n, inputs="scaled", hq=cfg.num_q_heads,
                                          hkv=cfg.num_kv_heads, d=cfg.head_dim))
    o = benchmark.pedantic(
        reference.spatial_sparse_attention,
        args=(q, k, v, k_cmp, v_cmp, gate, coords),
        kwargs=dict(compression_block=8, selection_block=8, topk=cfg.topk, window=cfg.window, shift=0),
        rounds=SLOW_ROUNDS,
        iterations=1,
    )
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("passname", [PASS_FWD, PASS_FWDBWD])
@pytest.mark.parametrize("impl", ["reference", "kernels-interpreter"])
def test_cpu_interpreter_vs_reference(benchmark, request, impl, passname):
    """The whole op, reference vs our kernels under the Triton interpreter, float32, ``--cpu-tokens`` tokens of
    shell-512 with v1.1's block sizes and ``INTERPRETER_HEADS``."""
    import os

    from bench.harness import ReferenceStandIn, load_kernel_api

    if impl != "reference":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton interpreter is off here (a CUDA GPU is present): the GPU items time the kernels")
        api = load_kernel_api()
        if "spatial_sparse_attention" in api.missing:
            pytest.skip(f"ssa_kernels.spatial_sparse_attention: {api.missing['spatial_sparse_attention']}")
        fn = api.spatial_sparse_attention
    else:
        fn = ReferenceStandIn.spatial_sparse_attention
    cfg = CONFIGS[CPU_CONFIG]
    tokens = request.config.getoption("--cpu-tokens")
    coords = case_coords(CPU_SHAPE, compression_block=cfg.compression_block, selection_block=cfg.selection_block,
                         max_tokens=tokens)
    layout = build_layout(coords, compression_block=cfg.compression_block, selection_block=cfg.selection_block,
                          window=cfg.window)
    x = make_ssa_inputs(layout, *INTERPRETER_HEADS, dtype=torch.float32)
    leaves = [x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gate]

    def run():
        o = fn(*leaves, layout, topk=cfg.topk, shift=0)
        if passname == PASS_FWDBWD:
            torch.autograd.grad(o, leaves, x.dout)
        return o

    hq, hkv, d = INTERPRETER_HEADS
    benchmark.extra_info.update(_cpu_info(shape=CPU_SHAPE, config=CPU_CONFIG, impl=impl, measured_pass=passname,
                                          tokens=layout.num_tokens, hq=hq, hkv=hkv, d=d, inputs="scaled",
                                          interpreter=impl != "reference"))
    if impl == "reference":
        rounds, warmup = REFERENCE_ROUNDS, REFERENCE_WARMUP
    else:
        rounds, warmup = INTERPRETER_ROUNDS, INTERPRETER_WARMUP
    o = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert torch.isfinite(o).all()
