"""Time every kernel of the SSA op on the headline shapes in one call: a developer tool for kernel work.

    python -m bench.kernel_profile [--cases shell-1024:v1.1,shell-1024:v1.0] [--out DIR] [--large] [--trace]
        [--launch "selection.FWD:key_outer=1,ko_rows=64"]

Prints, per case, each branch's forward and backward kernels, the whole op, FlashAttention-2 (PyTorch's SDPA
FLASH backend) on the same tokens, peak memory, and useful TFLOP/s; writes the figures as JSON to ``--out``.
The benchmark proper (what reports are made from) is ``pytest bench --benchmark-only``; this script exists to
compare kernel variants quickly and to record before/after figures of a kernel change.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys

import torch


def _env():
    import triton

    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=datetime.date.today().isoformat())


def _inputs(shape, cfg, seed=0, batch_copies=1):
    from ssa_kernels.shapes import CONFIGS, shape_coords
    from bench.inputs import compressed_kv

    c = CONFIGS[cfg]
    coords = shape_coords(shape, compression_block=c.compression_block, selection_block=c.selection_block)
    if batch_copies > 1:
        parts = []
        for b in range(batch_copies):
            cb = coords.clone()
            cb[:, 0] = b
            parts.append(cb)
        coords = torch.cat(parts)
    coords = coords.cuda()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = coords.shape[0]
    bf = torch.bfloat16
    q = torch.randn(n, c.num_q_heads, c.head_dim, device="cuda", generator=gen, dtype=bf)
    k = torch.randn(n, c.num_kv_heads, c.head_dim, device="cuda", generator=gen, dtype=bf)
    v = torch.randn(n, c.num_kv_heads, c.head_dim, device="cuda", generator=gen, dtype=bf)
    kc, vc = compressed_kv(k.float(), v.float(), coords, compression_block=c.compression_block,
                           selection_block=c.selection_block)
    gate = torch.rand(n, 3, device="cuda", generator=gen, dtype=bf)
    return c, coords, [q, k, v, kc.to(bf), vc.to(bf), gate]


def _bench(fn, rep=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def _samples(fn, n):
    """``n`` single-call times (ms, CUDA events, the L2 cache cleared before each as ``do_bench`` does): the spread
    that a median hides (e.g. whether the backward's two streams overlapped on every call)."""
    from bench.timing import _event_ms, _l2_flusher

    fn()
    flush = _l2_flusher()
    return [_event_ms(fn, before=flush) for _ in range(n)]


#: Which timed function exercises each tunable launch configuration.
_SWEEP_TARGET = {
    "compression.FWD": "cmp_fwd", "compression.DQ": "cmp_dq", "compression.DKDV": "cmp_bwd",
    "scoring.SCORE": "score_topk",
    "selection.FWD": "sel_fwd", "selection.DQ": "sel_dq", "selection.DKDV": "sel_bwd",
    "window.FWD": "win_fwd", "window.DQ": "win_bwd", "window.DKDV": "win_bwd",
    "ssa.BACKWARD": "ssa_fwd_bwd",
}


def parse_sweeps(text):
    """``"selection.FWD:block_n=32|64,num_warps=2|4;scoring.SCORE:keys=32|64"`` -> [(name, [config, ...])]
    (:func:`ssa_kernels.launch.parse_sweep`), each kernel one this script can time."""
    from ssa_kernels.launch import parse_sweep

    out = parse_sweep(text)
    for name, _ in out:
        if name not in _SWEEP_TARGET:
            raise ValueError(f"unknown kernel configuration {name!r}; known: {sorted(_SWEEP_TARGET)}")
    return out


def run_sweeps(fns, sweeps, rep, target=None, samples=0):
    """Time each configuration of ``sweeps`` with the function that exercises it, or with ``fns[target]``
    (e.g. the whole op, where the kernels of the backward share the GPU); with ``samples``, the median of that
    many single calls, all of them kept."""
    from ssa_kernels.launch import overriding

    rows = []
    for name, combos in sweeps:
        for combo in combos:
            fn = fns[target or _SWEEP_TARGET[name]]
            calls = []
            with overriding(name, combo):  # the table itself is not changed (ssa_kernels.launch)
                try:
                    if samples:
                        calls = _samples(fn, samples)
                        ms = statistics.median(calls)
                    else:
                        ms = _bench(fn, rep)
                except Exception as e:  # a configuration that does not compile or fit is a result too
                    ms = float("nan")
                    print(f"{name} {combo}: {type(e).__name__}: {str(e)[:200]}")
            rows.append(dict(kernel=name, config=dict(combo), ms=ms, timed=target or _SWEEP_TARGET[name],
                             samples_ms=calls))
            spread = f" (min {min(calls):.2f}, max {max(calls):.2f} over {len(calls)} calls)" if calls else ""
            print(f"sweep {name} {combo}: {ms:.3f} ms{spread}", flush=True)
    return rows


def best_entries(results, arch):
    """The launch-table entries of a sweep (:mod:`ssa_kernels.launch`): per kernel, head dim and dtype, the swept
    configuration with the least time summed over the cases that share them (e.g. v1.1 and v1.0, both head dim
    32: one table entry serves both, so neither case's winner may silently replace the other's); a configuration
    that failed in any of those cases (NaN) is not chosen. For ``arch`` and that head dim and dtype."""
    from ssa_kernels.launch import Entry

    totals = {}  # (kernel, head dim, dtype) -> {config key: [config, summed ms, cases]}
    cases = {}
    for r in results:
        where = (r["head_dim"], r["dtype"])
        for row in r.get("sweeps", ()):
            key = (row["kernel"], *where)
            cases.setdefault(key, set()).add(id(r))
            slot = totals.setdefault(key, {}).setdefault(json.dumps(row["config"], sort_keys=True),
                                                         [row["config"], 0.0, set()])
            slot[1] += row["ms"]
            slot[2].add(id(r))
    entries = []
    for key, configs in totals.items():
        full = [c for c in configs.values() if c[1] == c[1] and c[2] == cases[key]]
        if full:
            best = min(full, key=lambda c: c[1])
            entries.append(Entry(key[0], dict(best[0]), arch=arch, min_head_dim=key[1], max_head_dim=key[1],
                                 dtypes=(key[2],)))
    return entries


def load_baseline(path):
    """Import a copy of the ``ssa_kernels`` package at ``path`` (e.g. ``git archive HEAD~1 ssa_kernels``) under
    another name, so that a kernel change is timed against its predecessor in the same process. The copy is
    made in a temporary folder with its custom ops renamed (``ssa_kernels::`` -> ``ssa_kernels_baseline::``)."""
    import importlib.util
    import shutil
    import tempfile

    if not os.path.isfile(os.path.join(path, "__init__.py")):
        raise ValueError(f"--baseline {path!r}: no __init__.py there (give the folder of an ssa_kernels copy)")
    copy = os.path.join(tempfile.mkdtemp(), "ssa_kernels_baseline")
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for name in os.listdir(copy):
        if name.endswith(".py"):
            f = os.path.join(copy, name)
            with open(f) as fh:
                text = fh.read()
            with open(f, "w") as fh:
                fh.write(text.replace("ssa_kernels::", "ssa_kernels_baseline::"))
    init = os.path.join(copy, "__init__.py")
    spec = importlib.util.spec_from_file_location("ssa_kernels_baseline", init,
                                                  submodule_search_locations=[copy])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def profile_case(shape, cfg, rep=200, with_fa2=True, sweeps=(), baseline=None, sweep_target=None, samples=0):
    import ssa_kernels
    from ssa_kernels import compression, scoring, selection, window
    from ssa_kernels.gate import gate_backward

    c, coords, inp = _inputs(shape, cfg)
    q, k, v, kc, vc, gate = inp
    n = q.shape[0]
    res = dict(shape=shape, config=cfg, tokens=n, head_dim=c.head_dim, dtype=str(q.dtype).replace("torch.", ""))
    res["layout_ms"] = _bench(lambda: ssa_kernels.build_layout(coords, compression_block=c.compression_block,
                                                               selection_block=c.selection_block, window=c.window),
                              rep=50)
    layout = ssa_kernels.build_layout(coords, compression_block=c.compression_block,
                                      selection_block=c.selection_block, window=c.window)
    scale = c.head_dim**-0.5
    o_cmp, lse_cmp = compression.compression_forward(q, kc, vc, layout, scale)
    idx = scoring.select_blocks_forward(q, kc, lse_cmp, layout, c.topk, scale)
    o_sel, lse_sel = selection.selection_forward(q, k, v, idx, layout, scale)
    o_win, lse_win = window.window_forward(q, k, v, layout, 0, scale)
    sizes = (layout.sel_offsets[1:] - layout.sel_offsets[:-1]).long()
    sel_keys = torch.where(idx >= 0, sizes[idx.long().clamp_min(0)], 0).sum(-1).float()  # [N, Hkv]
    res["selected_keys_per_query"] = float(sel_keys.mean())
    part = layout.window_partition(0)
    wsz = (part.offsets[1:] - part.offsets[:-1]).long()
    win_keys = float((wsz.float() ** 2).sum() / n)
    hq, d = c.num_q_heads, c.head_dim
    nc = layout.num_cmp_blocks
    fl = dict(cmp=4.0 * n * nc * hq * d, score=2.0 * n * nc * hq * d, sel=4.0 * hq * d * n * res["selected_keys_per_query"],
              win=4.0 * hq * d * n * win_keys)
    res["useful_gflop_fwd"] = sum(fl.values()) / 1e9

    do = torch.randn_like(q)
    delta = (do.float() * o_cmp.float()).sum(-1)
    fns = {
        "cmp_fwd": lambda: compression.compression_forward(q, kc, vc, layout, scale),
        "score_topk": lambda: scoring.select_blocks_forward(q, kc, lse_cmp, layout, c.topk, scale),
        "sel_fwd": lambda: selection.selection_forward(q, k, v, idx, layout, scale),
        "win_fwd": lambda: window.window_forward(q, k, v, layout, 0, scale, mix=(o_cmp, o_sel, gate)),
        "gate_bwd": lambda: gate_backward(do, o_cmp, o_sel, o_win, gate),
        "cmp_bwd": lambda: compression.compression_backward(do, q, kc, vc, lse_cmp, delta, layout, scale),
        "cmp_dq": lambda: compression.compression_backward(do, q, kc, vc, lse_cmp, delta, layout, scale, parts=("dq",)),
        "sel_csr": lambda: selection.block_query_index(idx, layout.num_sel_blocks),
        "sel_bwd": lambda: selection.selection_backward(do, q, k, v, idx, lse_sel, delta, layout, scale),
        "sel_dq": lambda: selection.selection_backward(do, q, k, v, idx, lse_sel, delta, layout, scale, parts=("dq",)),
        "win_bwd": lambda: window.window_backward(do, q, k, v, lse_win, delta, layout, 0, scale),
        # the same with the branch gates (as inside the whole op)
        "cmp_bwd_gated": lambda: compression.compression_backward(do, q, kc, vc, lse_cmp, delta, layout, scale,
                                                                  gate=gate, gate_idx=0),
        "sel_bwd_gated": lambda: selection.selection_backward(do, q, k, v, idx, lse_sel, delta, layout, scale,
                                                              gate=gate, gate_idx=1),
        "win_bwd_gated": lambda: window.window_backward(do, q, k, v, lse_win, delta, layout, 0, scale, gate=gate,
                                                        gate_idx=2),
        "cmp_dq_gated": lambda: compression.compression_backward(do, q, kc, vc, lse_cmp, delta, layout, scale,
                                                                 gate=gate, gate_idx=0, parts=("dq",)),
        "sel_dq_gated": lambda: selection.selection_backward(do, q, k, v, idx, lse_sel, delta, layout, scale,
                                                             gate=gate, gate_idx=1, parts=("dq",)),
    }
    x = [tt.clone().requires_grad_() for tt in inp]

    def fwd():
        return ssa_kernels.spatial_sparse_attention(*x, layout, topk=c.topk, shift=0)

    def fwd_bwd():
        o = fwd()
        torch.autograd.grad(o, x, do)

    fns["ssa_fwd_bwd"] = fwd_bwd
    t = {name: _bench(fn, rep) for name, fn in fns.items()}
    with torch.no_grad():
        t["ssa_fwd"] = _bench(fwd, rep)
    t["ssa_bwd"] = t["ssa_fwd_bwd"] - t["ssa_fwd"]
    if baseline is not None:  # the same op from the baseline copy, same inputs, same process
        base_layout = baseline.build_layout(coords, compression_block=c.compression_block,
                                            selection_block=c.selection_block, window=c.window)

        def base_fwd():
            return baseline.spatial_sparse_attention(*x, base_layout, topk=c.topk, shift=0)

        t["base_fwd_bwd"] = _bench(lambda: torch.autograd.grad(base_fwd(), x, do), rep)
        with torch.no_grad():
            t["base_fwd"] = _bench(base_fwd, rep)
        t["base_bwd"] = t["base_fwd_bwd"] - t["base_fwd"]
    if sweeps:
        res["sweeps"] = run_sweeps(fns, sweeps, rep, sweep_target, samples)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    res["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    res["tflops_fwd"] = res["useful_gflop_fwd"] / t["ssa_fwd"]  # GFLOP per ms = TFLOP/s
    res["tflops_bwd"] = 2.5 * (fl["cmp"] + fl["sel"] + fl["win"]) / 1e9 / t["ssa_bwd"]

    if with_fa2:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = hq // c.num_kv_heads
        qd = q.transpose(0, 1).unsqueeze(0)
        kd = k.repeat_interleave(g, 1).transpose(0, 1).unsqueeze(0).contiguous()
        vd = v.repeat_interleave(g, 1).transpose(0, 1).unsqueeze(0).contiguous()
        fr = max(5, rep // 20)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t["fa2_fwd"] = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd), fr)
            qg, kg, vg = (z.clone().requires_grad_() for z in (qd, kd, vd))
            dod = torch.randn_like(qd)

            def fa_fb():
                od = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
                torch.autograd.grad(od, (qg, kg, vg), dod)

            t["fa2_bwd"] = _bench(fa_fb, fr) - t["fa2_fwd"]
        res["speedup_fwd"] = t["fa2_fwd"] / t["ssa_fwd"]
        res["speedup_bwd"] = t["fa2_bwd"] / t["ssa_bwd"]
    res["ms"] = t
    return res


def large_case(shape="shell-2048", cfg="v1.1", copies=2):
    """Forward + backward once at ``copies`` x shape tokens: does it complete, how long, how much memory."""
    import time

    import ssa_kernels

    c, coords, inp = _inputs(shape, cfg, batch_copies=copies)
    layout = ssa_kernels.build_layout(coords, compression_block=c.compression_block,
                                      selection_block=c.selection_block, window=c.window)
    x = [tt.clone().requires_grad_() for tt in inp]
    do = torch.randn_like(inp[0])
    out = {}
    for it in range(2):  # the first run compiles
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=c.topk, shift=4)
        torch.cuda.synchronize()
        after_fwd = (torch.cuda.memory_allocated() - base) / 1e9
        peak_fwd = (torch.cuda.max_memory_allocated() - base) / 1e9
        g = torch.autograd.grad(o, x, do)
        torch.cuda.synchronize()
        out = dict(shape=f"{copies}x{shape}", config=cfg, tokens=coords.shape[0], fwd_bwd_s=time.perf_counter() - t0,
                   peak_mem_gb=(torch.cuda.max_memory_allocated() - base) / 1e9, mem_after_fwd_gb=after_fwd,
                   peak_fwd_gb=peak_fwd,
                   finite=bool(torch.isfinite(o).all() and all(torch.isfinite(z).all() for z in g)))
        del o, g
    return out


def trace_case(shape, cfg, out_dir, iters=3):
    """``torch.profiler`` table of one forward and one backward of the whole op (after ``iters`` warm-up rounds):
    every CUDA kernel and copy with its time, so what the per-kernel figures do not cover shows up."""
    import ssa_kernels
    from torch.profiler import ProfilerActivity, profile, record_function

    c, coords, inp = _inputs(shape, cfg)
    layout = ssa_kernels.build_layout(coords, compression_block=c.compression_block,
                                      selection_block=c.selection_block, window=c.window)
    x = [tt.clone().requires_grad_() for tt in inp]
    do = torch.randn_like(inp[0])

    def step():
        with record_function("ssa_forward"):
            o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=c.topk, shift=0)
        with record_function("ssa_backward"):
            torch.autograd.grad(o, x, do)

    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    path = os.path.join(out_dir, f"trace_{shape}_{cfg}.txt")
    with open(path, "w") as f:
        f.write(table)
    trace_path = os.path.join(out_dir, f"trace_{shape}_{cfg}.json")
    prof.export_chrome_trace(trace_path)
    print(table)
    timeline = kernel_timeline(trace_path)
    with open(os.path.join(out_dir, f"timeline_{shape}_{cfg}.json"), "w") as f:
        json.dump(timeline, f, indent=1)
    plot_timeline(timeline, os.path.join(out_dir, f"timeline_{shape}_{cfg}.png"), f"{shape} / {cfg}")
    return path


def kernel_timeline(trace_path):
    """The GPU kernels of a ``torch.profiler`` chrome trace as ``[{name, stream, start_ms, ms}]``, start times
    relative to the first kernel: which kernels ran side by side on which stream."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return []
    t0 = min(e["ts"] for e in kernels)
    rows = [dict(name=e["name"], stream=e.get("args", {}).get("stream", e.get("tid")), start_ms=(e["ts"] - t0) / 1e3,
                 ms=e["dur"] / 1e3) for e in kernels]
    return sorted(rows, key=lambda r: r["start_ms"])


def plot_timeline(timeline, path, title):
    """One row per CUDA stream, one bar per kernel (Triton kernels by name, everything else grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = sorted({r["stream"] for r in timeline}, key=str)
    names = sorted({r["name"] for r in timeline if r["name"].startswith("_")})
    colours = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * len(streams)))
    for y, st in enumerate(streams):
        for r in timeline:
            if r["stream"] == st:
                ax.barh(y, r["ms"], left=r["start_ms"], color=colours.get(r["name"], "0.7"), edgecolor="none")
    ax.set_yticks(range(len(streams)), [f"stream {st}" for st in streams])
    ax.set_xlabel("ms from the first kernel")
    ax.set_title(f"{title}: GPU kernels of one forward + backward")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]
    ax.legend(handles, names, fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(streams)))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def compiled_kernels():
    """Registers and spills of every kernel compiled so far in ``ssa_kernels``, one row per compiled variant:
    ``[{kernel, regs, spills}]`` (a kernel that spills or needs many registers shows up here before it shows up in
    a timing)."""
    import ssa_kernels
    from triton.runtime.jit import JITFunction

    rows = []
    for mod_name in ("compression", "scoring", "selection", "selection_key_outer", "window", "gate"):
        mod = getattr(ssa_kernels, mod_name, None) or __import__(f"ssa_kernels.{mod_name}", fromlist=["_"])
        for name, fn in vars(mod).items():
            if not isinstance(fn, JITFunction) or not name.endswith("kernel"):
                continue
            for caches in fn.device_caches.values():
                for kernel in caches[0].values():
                    rows.append(dict(kernel=name, regs=getattr(kernel, "n_regs", None),
                                     spills=getattr(kernel, "n_spills", None)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="shell-1024:v1.1,shell-1024:v1.0")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--large", action="store_true", help="also shell-2048 memory and a 1.1M-token fwd+bwd")
    p.add_argument("--no-fa2", action="store_true")
    p.add_argument("--sweep", default="", help='e.g. "selection.FWD:block_n=32|64,num_warps=2|4;scoring.SCORE:rows=64|128"')
    p.add_argument("--sweep-cases", default="shell-1024:v1.1", help="cases on which the sweeps run")
    p.add_argument("--sweep-op", action="store_true",
                   help="time every sweep with the whole op's forward + backward instead of the kernel alone")
    p.add_argument("--samples", type=int, default=0,
                   help="time every sweep configuration as this many single calls (median, min, max) instead")
    p.add_argument("--write-table", nargs="?", const="", default=None, metavar="PATH",
                   help="after the sweeps, record each kernel's fastest swept configuration for this GPU, head dim "
                        "and dtype in the launch table (default ssa_kernels/launch_table.json; give the current "
                        "values among the swept ones, so that a slower set cannot replace them)")
    p.add_argument("--trace", action="store_true", help="only a torch.profiler table of one fwd+bwd per case")
    p.add_argument("--regs", action="store_true", help="also list registers and spills of the compiled kernels")
    p.add_argument("--baseline", default="", help="folder of another ssa_kernels copy: also time its whole op")
    p.add_argument("--launch", default="", metavar="SPEC",
                   help='launch settings held for the whole run, one value each, written as a sweep: '
                        '"selection.FWD:key_outer=1,ko_rows=64;selection.DQ:key_outer=1" (e.g. to --trace them)')
    a = p.parse_args(argv)
    try:
        held_launch = launch_overrides(a.launch)
    except ValueError as e:
        p.error(f"--launch: {e}")
    if not torch.cuda.is_available():
        print("kernel_profile needs a CUDA GPU")
        return 1
    os.makedirs(a.out, exist_ok=True)
    from ssa_kernels.launch import overriding

    with contextlib.ExitStack() as held:
        for kernel, values in held_launch:
            held.enter_context(overriding(kernel, values))
        return _run(a)


def launch_overrides(text):
    """``--launch``'s ``[(kernel, values)]``: a sweep of one configuration per kernel (ValueError otherwise)."""
    from ssa_kernels.launch import parse_sweep

    out = []
    for kernel, variants in parse_sweep(text):
        if len(variants) != 1:
            raise ValueError(f"--launch gives {kernel} {len(variants)} configurations; give one value per setting")
        out.append((kernel, variants[0]))
    return out


def _run(a):
    env = _env()
    if a.launch:
        env["launch"] = a.launch
    print(env)
    if a.trace:
        for case in a.cases.split(","):
            trace_case(*case.split(":"), a.out)
        return 0
    baseline = load_baseline(a.baseline) if a.baseline else None
    results = []
    for case in a.cases.split(","):
        shape, cfg = case.split(":")
        sweeps = parse_sweeps(a.sweep) if case in a.sweep_cases.split(",") else ()
        r = profile_case(shape, cfg, rep=a.rep, with_fa2=not a.no_fa2, sweeps=sweeps, baseline=baseline,
                         sweep_target="ssa_fwd_bwd" if a.sweep_op else None, samples=a.samples)
        r.update(env)
        results.append(r)
        print(json.dumps({kk: vv for kk, vv in r.items() if kk != "sweeps"}), flush=True)
    if a.large:
        for copies, shape in ((1, "shell-2048"), (2, "shell-2048")):
            r = large_case(shape, "v1.1", copies)
            r.update(env)
            results.append(r)
            print(json.dumps(r), flush=True)
    if a.regs:
        regs = compiled_kernels()
        for row in regs:
            print(f"{row['kernel']}: regs {row['regs']} spills {row['spills']}")
        results.append(dict(compiled_kernels=regs))
    with open(os.path.join(a.out, "kernel_profile.json"), "w") as f:
        json.dump(results, f, indent=1)
    if a.write_table is not None:
        from ssa_kernels.launch import TABLE_PATH, architecture, write_entries

        entries = best_entries(results, architecture(torch.device("cuda")))
        write_entries(entries, a.write_table or TABLE_PATH)
        print(f"launch table: {len(entries)} entries written to {a.write_table or TABLE_PATH}")
    print("\n| case | tokens | sel keys/q | " + " | ".join(results[0]["ms"]) + " | fwd x | bwd x | mem GB |")
    for r in results:
        if "compiled_kernels" in r:
            continue
        if "ms" in r:
            print(f"| {r['shape']} {r['config']} | {r['tokens']} | {r['selected_keys_per_query']:.0f} | "
                  + " | ".join(f"{v:.2f}" for v in r["ms"].values())
                  + f" | {r.get('speedup_fwd', 0):.1f} | {r.get('speedup_bwd', 0):.1f} | {r['peak_mem_gb']:.2f} |")
        else:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
