"""The SSA operation on the inputs a DiT gives it, against the benchmark's random inputs.

``python -m model.reports.ssa_inputs --out DIR`` (one CUDA GPU) runs one forward of the ``released_1024`` DiT (random
weights of the released sizes, as ``model.reports.dit`` builds it; bf16 autocast) on a benchmark token set and keeps
the arguments of the SSA calls of some blocks (q, k, v, the compressed keys and values, the gates, the layout). On
each block's arguments and on the benchmark's ``scaled`` inputs of the same tokens (BENCHMARK.md) it records:

- how the top-k choice spreads over the selection blocks: per (kv head, block) "bucket", how many queries chose
  it (mean, largest, the largest over the mean), and the share of all choices that go to the most chosen 1% of the
  buckets. The selection dK/dV kernel runs one program per bucket and key tile, so a bucket that most queries chose
  is one long program;
- the whole op's forward and forward + backward, and the selection dK/dV kernels alone (gated, as inside the op),
  for each ``--max-queries`` setting of the ``selection.DKDV`` launch configuration (0: one program per bucket);
- how much of the top-k choice neighbouring tokens share: the distinct blocks that tiles of 1, 2, 4 and 8
  consecutive tokens chose, per token. The query-outer selection kernels visit the union of a tile's choices, so
  tiles of several tokens load each shared block once;
- with ``--sweep`` (the grammar of :func:`ssa_kernels.launch.parse_sweep`), the selection kernels alone under
  each listed launch configuration (``selection.FWD``, ``selection.DQ``, ``selection.DKDV``): a model's inputs
  may favour other tiles than the benchmark's.

Writes ``ssa_inputs.json`` and ``ssa_inputs.md`` (the commit, GPU and versions in both). Timing: medians of
``triton.testing.do_bench``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

#: Blocks of the 24 whose SSA inputs are kept by default (first, middle, last).
DEFAULT_BLOCKS = (0, 12, 23)
#: ``selection.DKDV`` max_queries settings timed by default (0 = one program per bucket).
DEFAULT_MAX_QUERIES = (0, 1024, 2048, 4096, 8192)
#: Share of the buckets counted as "the most chosen" in the spread statistics.
TOP_SHARE = 0.01
#: Tokens per tile of the choice-sharing statistics.
TILE_TOKENS = (1, 2, 4, 8)
#: Launch configurations ``--sweep`` can time (each selection kernel alone).
SWEEPABLE = ("selection.FWD", "selection.DQ", "selection.DKDV")
#: Condition tokens of the released image encoder (DINOv2 at 518 px: 37 x 37 patches + 5 tokens).
CONDITION_TOKENS = 1374


class _Captured(Exception):
    """Ends the forward once every wanted block's SSA arguments are kept (CPU: the dense reference is slow)."""


def capture(shape: str = "shell-1024", blocks=DEFAULT_BLOCKS, seed: int = 0, timestep: float = 500.0,
            device: str = "cuda") -> list[dict]:
    """One forward of the released DiT; the SSA arguments of ``blocks`` as
    ``{"block", "args": [q, k, v, k_cmp, v_cmp, gate], "layout", "topk", "shift"}`` (tensors detached).

    On CUDA: the Triton kernels under bf16 autocast. On the CPU: the dense reference SSA in float32, and the forward
    stops after the last wanted block."""
    import reference
    import ssa_kernels
    from model.nets.dit import DiTConfig, SparseDiT
    from model.reports.dit import fill_zero_parameters
    from model.sparse.tensor import SparseTensor
    from ssa_kernels.shapes import shape_coords

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(seed)
    cfg = DiTConfig.released_1024(backend="kernels" if cuda else "reference")
    coords = shape_coords(shape, compression_block=cfg.compression_block, selection_block=cfg.selection_block)
    model = fill_zero_parameters(SparseDiT(cfg).to(dev).eval())
    gen = torch.Generator().manual_seed(seed)
    n = coords.shape[0]
    x = SparseTensor(coords.to(dev), torch.randn(n, cfg.in_channels, generator=gen).to(dev), validate=False)
    cond = torch.randn(1, CONDITION_TOKENS, cfg.cond_channels, generator=gen).to(dev)
    kept: list[dict] = []
    calls = [0]
    owner = ssa_kernels if cuda else reference
    original = owner.spatial_sparse_attention

    def keep(*args, **kw):
        if calls[0] in blocks:
            layout = args[6] if cuda else ssa_kernels.build_layout(
                args[6], compression_block=kw["compression_block"], selection_block=kw["selection_block"],
                window=kw["window"])
            kept.append(dict(block=calls[0], args=[a.detach().clone() for a in args[:6]], layout=layout,
                             topk=kw["topk"], shift=kw["shift"]))
        calls[0] += 1
        if not cuda and calls[0] > max(blocks):
            raise _Captured
        return original(*args, **kw)

    owner.spatial_sparse_attention = keep
    try:
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            model(x, torch.full((1,), timestep, device=dev), cond)
    except _Captured:
        pass
    finally:
        owner.spatial_sparse_attention = original
    del model
    if cuda:
        torch.cuda.empty_cache()
    return kept


def benchmark_inputs(layout, like: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """The benchmark's ``scaled`` random inputs (BENCHMARK.md: standard-normal q, k, v, gates uniform in (0, 1),
    ``k_cmp`` the mean of k over each compression block times the square root of its token count, ``v_cmp`` the
    mean of v) with the shapes and dtype of ``like``."""
    from model.nets.ssa_layer import block_mean

    q, k, v = like[:3]
    gen = torch.Generator(device=q.device).manual_seed(seed)
    qr, kr, vr = (torch.randn(t.shape, device=q.device, generator=gen, dtype=q.dtype) for t in (q, k, v))
    counts = (layout.cmp_offsets[1:] - layout.cmp_offsets[:-1]).double().sqrt().view(-1, 1, 1)
    kc = block_mean(kr.flatten(1).double(), layout, "mean").view(-1, *k.shape[1:]) * counts
    vc = block_mean(vr.flatten(1).double(), layout, "mean").view(-1, *v.shape[1:])
    gate = torch.rand(q.shape[0], 3, device=q.device, generator=gen, dtype=q.dtype)
    return [qr, kr, vr, kc.to(q.dtype), vc.to(q.dtype), gate]


def choice_spread(args, layout, topk: int) -> dict:
    """How the top-k choice of these inputs spreads over the (kv head, selection block) buckets (module docstring)."""
    from ssa_kernels import compression, scoring
    from ssa_kernels.selection import block_query_index

    q, k, v, kc, vc, gate = args
    if q.is_cuda:
        scale = q.shape[-1] ** -0.5
        _, lse = compression.compression_forward(q, kc, vc, layout, scale)
        idx = scoring.select_blocks_forward(q, kc, lse, layout, topk, scale)
    else:  # the float64 reference (the interpreter would take hours at these sizes)
        import reference

        m = dict(compression_block=layout.compression_block)
        q64, kc64 = q.double(), kc.double()
        _, lse = reference.compression_attention(q64, kc64, vc.double(), layout.coords, **m)
        scores = reference.block_scores(q64, kc64, lse, layout.coords, selection_block=layout.selection_block, **m)
        # the reference numbers selection blocks by first appearance: in layout order, the layout's numbering
        idx = reference.select_blocks(scores, topk).int()
    offsets, _ = block_query_index(idx, layout.num_sel_blocks)
    counts = (offsets[1:] - offsets[:-1]).double()
    top = max(1, int(round(TOP_SHARE * counts.numel())))
    sizes = (layout.sel_offsets[1:] - layout.sel_offsets[:-1]).long()
    keys = torch.where(idx >= 0, sizes[idx.long().clamp_min(0)], 0).sum(-1).double()
    mean = float(counts.mean())
    return dict(buckets=counts.numel(), choices=int(counts.sum()), mean_queries=mean,
                max_queries=int(counts.max()), max_over_mean=float(counts.max()) / mean if mean else 0.0,
                top_share=float(counts.topk(top).values.sum() / counts.sum().clamp_min(1)),
                selected_keys_per_query=float(keys.mean()),
                blocks_per_token={str(t): tile_union(idx, t) for t in TILE_TOKENS})


def tile_union(idx: torch.Tensor, tokens: int) -> float:
    """Mean number of distinct blocks chosen by a tile of ``tokens`` consecutive tokens (one kv head), divided by
    ``tokens``: the block visits per token of a query-outer selection kernel with such tiles. ``idx [N, Hkv,
    topk]`` (-1 = none); the last, partial tile is left out."""
    n, hkv, topk = idx.shape
    m = n // tokens * tokens
    if m == 0:
        return 0.0
    tiles = idx[:m].reshape(m // tokens, tokens, hkv, topk).transpose(1, 2).reshape(m // tokens, hkv, tokens * topk)
    ordered = tiles.sort(-1).values
    first = (ordered[..., :1] >= 0).sum(-1)
    new = ((ordered[..., 1:] != ordered[..., :-1]) & (ordered[..., 1:] >= 0)).sum(-1)
    return float((first + new).double().mean()) / tokens


def _selection_state(args, layout, topk: int):
    """What the selection kernels alone need beside ``args``: ``(scale, do, idx, lse, delta, index)``, the top-k
    choice and the selection branch's forward through the kernels, a random output gradient, its ``delta`` and the
    block -> queries index."""
    from ssa_kernels import compression, scoring, selection

    q, k, v, kc, vc, _ = args
    scale = q.shape[-1] ** -0.5
    do = torch.randn_like(q)
    _, lse_cmp = compression.compression_forward(q, kc, vc, layout, scale)
    idx = scoring.select_blocks_forward(q, kc, lse_cmp, layout, topk, scale)
    o_sel, lse_sel = selection.selection_forward(q, k, v, idx, layout, scale)
    delta = (do.float() * o_sel.float()).sum(-1)
    return scale, do, idx, lse_sel, delta, selection.block_query_index(idx, layout.num_sel_blocks)


def time_op(args, layout, topk: int, shift: int, max_queries, rep: int = 100) -> list[dict]:
    """Whole op forward / forward + backward and the gated selection dK/dV kernels per max_queries setting (ms)."""
    from triton.testing import do_bench

    import ssa_kernels
    from ssa_kernels import selection
    from ssa_kernels.launch import overriding

    q, k, v, kc, vc, gate = args
    x = [t.clone().requires_grad_() for t in args]
    scale, do, idx, lse_sel, delta, index = _selection_state(args, layout, topk)

    def fwd():
        return ssa_kernels.spatial_sparse_attention(*x, layout, topk=topk, shift=shift)

    def fwd_bwd():
        torch.autograd.grad(fwd(), x, do)

    def sel_dkdv():
        selection.selection_backward(do, q, k, v, idx, lse_sel, delta, layout, scale, gate=gate,
                                     gate_idx=1, parts=("dkdv",), index=index)

    rows = []
    for mq in max_queries:
        with overriding("selection.DKDV", dict(max_queries=mq)):
            with torch.no_grad():
                t_fwd = do_bench(fwd, warmup=25, rep=rep, return_mode="median")
            t_fb = do_bench(fwd_bwd, warmup=25, rep=rep, return_mode="median")
            t_sel = do_bench(sel_dkdv, warmup=25, rep=rep, return_mode="median")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        rows.append(dict(max_queries=mq, fwd_ms=t_fwd, fwd_bwd_ms=t_fb, bwd_ms=t_fb - t_fwd, sel_dkdv_ms=t_sel,
                         peak_fwd_bwd_gb=peak))
    return rows


def sweep_kernels(args, layout, topk: int, sweeps, rep: int = 100) -> list[dict]:
    """Each selection kernel alone (:data:`SWEEPABLE`) under every configuration of ``sweeps`` (``[(kernel,
    [values, ...])]``, :func:`ssa_kernels.launch.parse_sweep`), ms, and the largest relative difference of its
    outputs from those of the present settings (``rel_diff``: rounding only, for a configuration that computes the
    same function); a configuration that fails is recorded as NaN with its error."""
    from triton.testing import do_bench

    from ssa_kernels import selection
    from ssa_kernels.launch import overriding

    q, k, v, kc, vc, gate = args
    scale, do, idx, lse_sel, delta, index = _selection_state(args, layout, topk)
    run = {
        "selection.FWD": lambda: selection.selection_forward(q, k, v, idx, layout, scale),
        "selection.DQ": lambda: selection.selection_backward(do, q, k, v, idx, lse_sel, delta, layout, scale,
                                                             gate=gate, gate_idx=1, parts=("dq",), index=index),
        "selection.DKDV": lambda: selection.selection_backward(do, q, k, v, idx, lse_sel, delta, layout, scale,
                                                               gate=gate, gate_idx=1, parts=("dkdv",), index=index),
    }
    # the outputs each kernel writes: the backward returns (dq, dk, dv) accumulators, of which a run of one part
    # leaves the other part's uninitialised
    written = {"selection.FWD": slice(None), "selection.DQ": slice(0, 1), "selection.DKDV": slice(1, 3)}

    def outputs(kernel):
        out = run[kernel]()
        out = (out if isinstance(out, tuple) else (out,))[written[kernel]]
        return [t.float() for t in out if t is not None]

    rows = []
    for kernel, combos in sweeps:
        present = outputs(kernel)
        for combo in combos:
            error, diff = None, float("nan")
            with overriding(kernel, combo):
                try:
                    ms = do_bench(run[kernel], warmup=25, rep=rep, return_mode="median")
                    diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                               for a, b in zip(outputs(kernel), present))
                except Exception as exc:  # a configuration that does not compile or fit is a result too
                    ms, error = float("nan"), f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(dict(kernel=kernel, config=dict(combo), ms=ms, rel_diff=diff, error=error))
            print(f"sweep {kernel} {combo}: {ms:.3f} ms, outputs {diff:.1e} from the present settings'", flush=True)
    return rows


#: Most tokens the CPU run takes (its dense float64 reference scoring holds ``N x Hq x Nc`` values).
CPU_MAX_TOKENS = 40_000


def run(shape: str = "shell-1024", blocks=DEFAULT_BLOCKS, max_queries=DEFAULT_MAX_QUERIES, rep: int = 100,
        seed: int = 0, device: str = "cuda", sweeps=()) -> dict:
    """The measurements of the module docstring; on the CPU the spread statistics only (no timings, no sweeps).
    ``sweeps``: ``[(kernel, [values, ...])]`` of :data:`SWEEPABLE` kernels (:func:`sweep_kernels`)."""
    from model.io import provenance
    from ssa_kernels.shapes import SHAPES

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.reports.ssa_inputs on cuda needs a CUDA GPU")
    if dev.type == "cpu" and SHAPES[shape].tokens > CPU_MAX_TOKENS:
        raise ValueError(f"shape {shape!r} has {SHAPES[shape].tokens:,} tokens; the CPU run takes at most "
                         f"{CPU_MAX_TOKENS:,} (shell-512)")
    prov = provenance(dev)
    kept = capture(shape, blocks, seed, device=device)
    timed = dev.type == "cuda"
    doc = dict(shape=shape, tokens=int(kept[0]["args"][0].shape[0]) if kept else 0, blocks=list(blocks),
               max_queries=list(max_queries) if timed else [], device=str(dev), timed=timed,
               **{k: prov[k] for k in ("gpu", "date", "commit", "torch", "triton", "cuda", "python")}, cases=[])
    for i, case in enumerate(kept):
        sets = [(f"DiT block {case['block']}", case["args"])]
        if i == 0:
            sets.append(("benchmark scaled inputs", benchmark_inputs(case["layout"], case["args"], seed)))
        for name, args in sets:
            entry = dict(inputs=name, block=case["block"], shift=case["shift"],
                         spread=choice_spread(args, case["layout"], case["topk"]),
                         timings=time_op(args, case["layout"], case["topk"], case["shift"], max_queries, rep)
                         if timed else [],
                         sweeps=sweep_kernels(args, case["layout"], case["topk"], sweeps, rep)
                         if timed and sweeps else [])
            doc["cases"].append(entry)
            print(json.dumps(entry), flush=True)
    return doc


def markdown(doc: dict) -> str:
    where = (f"{doc['gpu']}, torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}" if doc["timed"] else
             f"CPU, torch {doc['torch']}")
    how = ("one forward under bf16 autocast; the SSA arguments of some blocks kept and the op timed on them (medians "
           "of `triton.testing.do_bench`)" if doc["timed"] else
           "one forward in float32 with the dense reference SSA, stopped after the last block kept; the top-k choice "
           "by the float64 reference; no timings (CPU)")
    lines = [f"# The SSA op on a DiT's own inputs ({doc['shape']}, {doc['tokens']:,} tokens)", "",
             f"{doc['date']}, {where}, commit {doc['commit']}. `python -m model.reports.ssa_inputs`: the "
             f"released_1024 DiT with random weights, {how}.", "",
             "| inputs | queries per bucket, mean | largest | largest / mean | share of the top 1% | "
             "selected keys per query |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in doc["cases"]:
        s = c["spread"]
        lines.append(f"| {c['inputs']} | {s['mean_queries']:,.0f} | {s['max_queries']:,} | "
                     f"{s['max_over_mean']:.1f} | {100 * s['top_share']:.1f}% | {s['selected_keys_per_query']:,.0f} |")
    tiles = [t for t in TILE_TOKENS if all(str(t) in c["spread"].get("blocks_per_token", {}) for c in doc["cases"])]
    if tiles and doc["cases"]:
        lines += ["", "Blocks a query-outer selection kernel visits per token when a tile holds several consecutive "
                  "tokens (the distinct blocks of the tile's choices over its tokens, one kv head):", "",
                  "| inputs | " + " | ".join(f"{t} token{'s' if t > 1 else ''}" for t in tiles) + " |",
                  "| --- |" + " ---: |" * len(tiles)]
        for c in doc["cases"]:
            per = c["spread"]["blocks_per_token"]
            lines.append(f"| {c['inputs']} | " + " | ".join(f"{per[str(t)]:.2f}" for t in tiles) + " |")
    if not doc["timed"]:
        return "\n".join(lines) + "\n"
    lines += ["", "| inputs | selection.DKDV max_queries | fwd ms | bwd ms | fwd+bwd ms | selection dK/dV alone, ms | "
              "peak fwd+bwd GB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in doc["cases"]:
        for t in c["timings"]:
            lines.append(f"| {c['inputs']} | {t['max_queries'] or 'no split'} | {t['fwd_ms']:.2f} | "
                         f"{t['bwd_ms']:.2f} | {t['fwd_bwd_ms']:.2f} | {t['sel_dkdv_ms']:.2f} | "
                         f"{t['peak_fwd_bwd_gb']:.2f} |")
    swept = [c for c in doc["cases"] if c.get("sweeps")]
    if swept:
        lines += ["", "Selection kernels alone under each swept launch configuration (`--sweep`), ms "
                  "(the fastest per kernel and inputs in bold; largest relative difference of a configuration's "
                  "outputs from the present settings' over all inputs in the last column):", "",
                  "| kernel | configuration | " + " | ".join(c["inputs"] for c in swept) + " | outputs' rel. diff. |",
                  "| --- | --- |" + " ---: |" * (len(swept) + 1)]
        best = {}
        for i, c in enumerate(swept):
            for row in c["sweeps"]:
                key = (i, row["kernel"])
                if row["ms"] == row["ms"] and (key not in best or row["ms"] < best[key]):
                    best[key] = row["ms"]
        for j, row in enumerate(swept[0]["sweeps"]):
            cfg = ", ".join(f"{k}={v}" for k, v in row["config"].items())
            cells = []
            for i, c in enumerate(swept):
                ms = c["sweeps"][j]["ms"]
                cell = "failed" if ms != ms else f"{ms:.2f}"
                cells.append(f"**{cell}**" if ms == best.get((i, row["kernel"])) else cell)
            diffs = [c["sweeps"][j].get("rel_diff", float("nan")) for c in swept]
            worst = max((x for x in diffs if x == x), default=float("nan"))
            lines.append(f"| {row['kernel']} | {cfg} | " + " | ".join(cells) + f" | {worst:.1e} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from model.cli.args import add_device, add_out, add_seed, make_parser, non_negative_int, positive_int
    from ssa_kernels.shapes import SHAPES

    p = make_parser("model.reports.ssa_inputs", __doc__)
    add_out(p, "folder for ssa_inputs.json and ssa_inputs.md")
    p.add_argument("--shape", default="shell-1024", choices=sorted(SHAPES),
                   help="benchmark token set (default %(default)s)")
    p.add_argument("--blocks", type=non_negative_int, nargs="+", default=list(DEFAULT_BLOCKS), metavar="I",
                   help=f"DiT blocks whose SSA inputs are kept (default {' '.join(map(str, DEFAULT_BLOCKS))})")
    p.add_argument("--max-queries", type=non_negative_int, nargs="+", default=list(DEFAULT_MAX_QUERIES), metavar="Q",
                   help="selection.DKDV max_queries settings to time, 0: no split (default "
                        f"{' '.join(map(str, DEFAULT_MAX_QUERIES))})")
    p.add_argument("--sweep", default="", metavar="SPEC",
                   help="selection kernels to time alone under several launch configurations, e.g. "
                        "'selection.FWD:rows=16|64,num_warps=1|4;selection.DQ:rows=16|64' (default: none)")
    p.add_argument("--rep", type=positive_int, default=100, metavar="MS",
                   help="do_bench time budget per measurement, ms (default %(default)s)")
    add_device(p)
    add_seed(p)
    return p


def main(argv=None) -> int:
    from model.cli.args import run as run_cli

    return run_cli(build_parser(), _main, argv)


def _main(args) -> int:
    from model.cli.args import UserError, output_folder, resolve_device
    from model.io import atomic_write_json, atomic_write_text

    output_folder("--out", args.out)
    device = resolve_device(args.device)
    bad = [b for b in args.blocks if b >= 24]
    if bad:
        raise UserError(f"--blocks: the released DiT has blocks 0..23, got {bad}")
    from ssa_kernels.launch import parse_sweep

    try:
        sweeps = parse_sweep(args.sweep)
    except ValueError as exc:
        raise UserError(f"--sweep: {exc}") from None
    other = sorted({k for k, _ in sweeps} - set(SWEEPABLE))
    if other:
        raise UserError(f"--sweep: this report times {', '.join(SWEEPABLE)} alone, not {', '.join(other)} "
                        "(python -m bench.kernel_profile sweeps every kernel on the benchmark's inputs)")
    if device.type == "cpu":
        print("no CUDA GPU: the choice statistics only, with the dense reference (no timings"
              + (", no sweeps" if sweeps else "") + ")", file=sys.stderr)
    try:
        doc = run(args.shape, tuple(args.blocks), tuple(args.max_queries), args.rep, args.seed, device=str(device),
                  sweeps=sweeps)
    except ValueError as exc:
        raise UserError(f"--shape: {exc}") from None
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "ssa_inputs.json"), doc)
    md = markdown(doc)
    atomic_write_text(os.path.join(args.out, "ssa_inputs.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
