"""Every kernel launch of a small workload, compiled for an H100 on the CPU (tests/compile_sm90.py).

The workload: the SSA op forward and backward in float16 with the default launches and with each launch setting
that is off by default switched on (the merged selection stream, the unmasked whole tiles of the selection forward
and dQ, the half tail tiles of the selection dK/dV, the FMA-unit exponentials of the compression and scoring
kernels), and the cross-attention kernels forward and
backward with one and with several batch elements, with and without their FMA exponentials, and the DiT's fused
layer norm (forward and backward) and GELU-step kernels. Each distinct launch
is compiled to a cubin for sm_90 in a subprocess without the interpreter; a launch that does not compile fails the
test with the compiler's message. (float16 stands in for bfloat16, which the interpreter computes wrongly: the
kernels take both through the same code.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.compile_sm90 import record, ssa_workload

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records the launches through the Triton interpreter")

ROOT = Path(__file__).resolve().parent.parent
#: Launch settings that are off by default, each switched on for one pass of the SSA op.
SSA_SWITCHES = (
    {},
    {"selection.FWD": dict(merged=1, block_n=16), "selection.DQ": dict(merged=1, block_n=16)},
    {"selection.FWD": dict(fma_exp_every=2), "selection.DQ": dict(fma_exp_every=2)},
    {"selection.FWD": dict(whole_tiles=1), "selection.DQ": dict(whole_tiles=1, fma_exp_every=2)},
    {"selection.FWD": dict(merged=1, fma_exp_every=2), "selection.DQ": dict(merged=1, fma_exp_every=2)},
    {"selection.DKDV": dict(tail=1, block_n=32, max_queries=2), "scoring.SCORE": dict(aggregate="mask", key_rows=1)},
    {"compression.FWD": dict(fma_exp_every=2), "compression.DQ": dict(fma_exp_every=2),
     "compression.DKDV": dict(fma_exp_every=2), "scoring.SCORE": dict(fma_exp_every=2, tokens_per_program=4)},
    {"scoring.SCORE": dict(whole_tiles=1), "selection.FWD": dict(key_outer=1, ko_persistent=1),
     "selection.DQ": dict(key_outer=1, ko_persistent=1)},
    {"scoring.SCORE": dict(whole_tiles=1, aggregate="mask", fma_exp_every=2)},
)


def _cross_attention_pass(batch_sizes, every: int):
    from model.nets.cross_attention_kernel import cross_attention

    gen = torch.Generator().manual_seed(1)
    n, heads, d, keys = sum(batch_sizes), 2, 32, 40
    q = torch.randn(n, heads, d, generator=gen).half().requires_grad_()
    kv = torch.randn(len(batch_sizes), keys, 2, heads, d, generator=gen).half().requires_grad_()
    bounds = [0]
    for size in batch_sizes:
        bounds.append(bounds[-1] + size)
    one = dict(num_warps=4, num_stages=2)
    backward = dict(dq=dict(block_m=16, block_n=16, fma_exp_every=every, **one),
                    dkdv=dict(block_m=16, block_n=16, chunk_rows=32, fma_exp_every=every, **one))
    o = cross_attention(q, kv[:, :, 0], kv[:, :, 1], bounds if len(batch_sizes) > 1 else None, block_m=16,
                        block_n=16, fma_exp_every=every, backward=backward, **one)
    o.float().sum().backward()


def _dit_kernels_pass():
    """The DiT training path's own kernels: the fused layer norm + modulation forward and backward (also adding the
    residual stream's gradient), and the GELU step of the MLP's backward."""
    import model.nets.fused as fused
    import model.sparse.gelu_grad_kernel as gk

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 64, generator=gen).requires_grad_()
    shift, scale = torch.randn(1, 64, generator=gen).requires_grad_(), torch.randn(1, 64, generator=gen)
    y = fused.layer_norm_modulate(x, 1e-6, shift=shift, scale=scale.requires_grad_(), dtype=torch.float16)
    torch.autograd.grad(y, [x, shift, scale], torch.randn_like(y))
    y, x_out = fused.layer_norm_modulate(x, 1e-6, shift=shift, scale=scale, dtype=torch.float16, pass_input=True)
    torch.autograd.grad([y, x_out], [x], [torch.randn_like(y), torch.randn_like(x_out)])  # HAS_SKIP
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gk, "INTERPRET_ON_CPU", True)
        gk.gelu_grad_(torch.randn(30, 128, generator=gen).half(), torch.randn(30, 128, generator=gen).half())


def test_every_launch_compiles_for_sm90(tmp_path):
    with record() as launches:
        _dit_kernels_pass()
        for switches in SSA_SWITCHES:
            ssa_workload(switches, hq=16, hkv=1)
        ssa_workload({}, hq=8, hkv=2)
        ssa_workload({"scoring.SCORE": dict(whole_tiles=1, key_rows=1)}, hq=16, hkv=1,
                     compression_block=8)  # one compressed block per selection block
        for sizes in ((50,), (20, 0, 45)):
            for every in (0, 2):
                _cross_attention_pass(sizes, every)
    kernels = {e["name"] for e in launches}
    for name in ("_sel_bwd_dkdv_kernel", "_sel_fwd_ko_kernel", "_sel_bwd_dq_ko_kernel", "_cmp_fwd_kernel",
                 "_score_topk_kernel", "_cross_attention_dkdv_kernel", "_gelu_grad_kernel",
                 "_layer_norm_modulate_bwd_kernel"):
        assert name in kernels
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches, default=str))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "tests.compile_sm90", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(launches)
    failed = [r for r in results if "error" in r]
    assert not failed, "\n\n".join(f"{r['name']} {r['constexprs']}:\n{r['error']}" for r in failed[:3])
