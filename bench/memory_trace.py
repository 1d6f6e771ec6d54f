"""Trace GPU memory through one forward + backward of the fused SSA op: a developer tool for memory work.

    python -m bench.memory_trace [--shape shell-2048] [--config v1.1]

Wraps every launcher the fused op calls and prints, after each, the memory allocated and the peak so far, both
above what was allocated before the forward (the benchmark's "peak memory above the inputs").
"""
from __future__ import annotations

import argparse
import functools

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="shell-2048")
    p.add_argument("--config", default="v1.1")
    a = p.parse_args(argv)
    import ssa_kernels
    import ssa_kernels.ssa as ssa_mod
    from bench.kernel_profile import _inputs

    c, coords, inp = _inputs(a.shape, a.config)
    layout = ssa_kernels.build_layout(coords, compression_block=c.compression_block,
                                      selection_block=c.selection_block, window=c.window)
    x = [t.clone().requires_grad_() for t in inp]
    do = torch.randn_like(inp[0])
    unit = inp[0].numel() * inp[0].element_size() / 1e9
    print(f"{a.shape} {a.config}: {inp[0].shape[0]} tokens; one [N, Hq, D] tensor of q's dtype = {unit:.3f} GB")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    def report(name):
        torch.cuda.synchronize()
        now = (torch.cuda.memory_allocated() - base) / 1e9
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        print(f"  after {name:24s} allocated {now:7.3f} GB ({now / unit:5.2f} units)  peak {peak:7.3f} GB "
              f"({peak / unit:5.2f} units)", flush=True)

    for name in ("compression_forward", "select_blocks_forward", "selection_forward", "window_forward",
                 "gate_backward", "compression_backward", "selection_backward", "window_backward"):
        fn = getattr(ssa_mod, name)

        def wrapped(*args, _fn=fn, _name=name, **kw):
            out = _fn(*args, **kw)
            report(_name)
            return out

        setattr(ssa_mod, name, functools.wraps(fn)(wrapped))
    o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=c.topk, shift=0)
    report("forward (op returned)")
    g = torch.autograd.grad(o, x, do)
    report("backward (grads returned)")
    del g


if __name__ == "__main__":
    main()
