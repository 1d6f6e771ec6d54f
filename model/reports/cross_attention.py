"""Time the sparse DiTs' cross-attention (32 heads of 32 over 1,374 condition keys) through SDPA and the Triton kernel.

``python -m model.reports.cross_attention --out reports`` (one CUDA GPU; under a minute on an H100) times one
cross-attention call at the token counts of the cascade's sampling stages (27,314 rows: the 512 stage's conditioned
half; 110,656: the 1024 stage; 137,124: the DiT report's shell-1024) with bf16 queries, keys and values in the
DiT's layouts (views of the projections): PyTorch's ``scaled_dot_product_attention`` as the DiT calls it with its
default backend choice, then restricted to each backend (FLASH, cuDNN, memory-efficient), then
model.nets.cross_attention_kernel with its default launch and, with ``--sweep``, every launch of the sweep grid.
Per variant: the median of ``--reps`` calls timed with CUDA events after ``--warmup`` calls, the throughput
(4 x rows x keys x heads x head dim FLOP per call) and the relative error of the first rows' output against a
float64 reference. Writes ``OUT/cross_attention.json`` and ``OUT/cross_attention.md`` with the GPU, the versions and
the commit.

``--training`` times the call under autograd instead: forward and backward (``torch.autograd.grad`` of q, k and v
for a random output gradient) through each SDPA backend and through the kernel's forward (with the LSE) and its dQ
and dK/dV kernels; ``--sweep-backward`` adds the backward launches of :data:`BACKWARD_SWEEP` at the largest shape,
one kernel's launch varied at a time; ``--sweep-fma`` adds the default launches with every k-th tile's
exponentials on the FMA units (:data:`FMA_SWEEP`), in the forward alone, or with ``--training`` in dQ, in dK/dV and
in all three kernels. Rel. error there: dq of the first rows against float64, and dk / dv against
the default SDPA row's.

Without CUDA (or with ``--device cpu``) it says so and runs a tiny smoke shape on the CPU instead (the kernel only
under TRITON_INTERPRET=1), labelled SMOKE RUN, and exits 0.
"""
from __future__ import annotations

import itertools
import sys

import torch

from model.io import commit_label, provenance
from model.reports.common import time_calls, write_report

__all__ = ["BACKWARD_SWEEP", "FMA_SWEEP", "SHAPES", "SWEEP", "main", "markdown", "run_report"]

#: (label, query rows) of the timed shapes.
SHAPES = (("sparse_512 stage, conditioned rows", 27_314), ("sparse_1024 stage", 110_656),
          ("DiT report, shell-1024", 137_124))
#: The released sparse DiTs' cross-attention: heads, head dim, condition tokens (RELEASED_MODEL.md D, step 5: 32 heads
#: of 32; the first report, at 3cf6773, timed 16 heads of 64, the dense DiT's heads, by mistake).
HEADS, HEAD_DIM, KEYS = 32, 32, 1374
#: The smoke shape on the CPU: (label, rows), heads, head dim, keys.
SMOKE_SHAPES, SMOKE_HEADS, SMOKE_DIM, SMOKE_KEYS = (("smoke", 300),), 2, 32, 50
#: Launch grid of ``--sweep``: block_m x block_n x warps x stages.
SWEEP = dict(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
#: Backward launch grid of ``--sweep-backward``, per kernel (the other kernel keeps its default launch).
BACKWARD_SWEEP = dict(dq=dict(block_m=(64, 128), block_n=(32, 64), num_warps=(4, 8), num_stages=(2, 3)),
                      dkdv=dict(block_m=(32, 64, 128), block_n=(64, 128), num_warps=(4, 8), num_stages=(2,),
                                chunk_rows=(4096, 16384, 65536)))
#: ``fma_exp_every`` settings of ``--sweep-fma`` (model.nets.cross_attention_kernel: every k-th tile's exponentials
#: on the FMA units), each on the default launches. At head dim 32 a score costs one exponential (4 per clock and
#: scheduler) and about 6 FP32 operations (32 per clock); the cubic adds about 7 FP32 operations where it replaces
#: the exponential, so the two units even out near every 7th-8th tile (about -13% at best) and every 2nd tile
#: overloads the FP32 side: the sweep brackets that point.
FMA_SWEEP = (2, 4, 8, 16)
#: Rows compared with the float64 reference.
CHECK_ROWS = 2048
#: SDPA backends timed one by one.
BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def _inputs(rows: int, heads: int, dim: int, keys: int, dtype, device, seed: int):
    """``q [rows, H, D]`` (a view of ``[rows, H * D]``), ``k, v [keys, H, D]`` (views of ``[keys, 2, H, D]``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads * dim, generator=gen).to(device=device, dtype=dtype).view(rows, heads, dim)
    kv = torch.randn(keys, 2, heads, dim, generator=gen).to(device=device, dtype=dtype)
    return q, kv[:, 0], kv[:, 1]


def _sdpa(q, k, v):
    """SDPA as :func:`model.nets.ssa_layer.dense_attention` calls it for one batch element: ``[N, H, D]``."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None])[0].transpose(0, 1)


def _reference(q, k, v, rows: int) -> torch.Tensor:
    q, k, v = q[:rows].double().cpu(), k.double().cpu(), v.double().cpu()
    s = torch.einsum("nhd,lhd->hnl", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("hnl,lhd->nhd", s.softmax(-1), v)


def _variants(device, sweep: bool, head_dim: int, sweep_fma: bool = False) -> list[tuple[str, dict | None, object]]:
    """(name, launch or None, callable(q, k, v)) of every timed variant."""
    from model.nets import cross_attention_kernel as ck

    out = [("SDPA (default backend)", None, _sdpa)]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name in BACKENDS:
            def run(q, k, v, b=getattr(SDPBackend, name)):
                with sdpa_kernel(b):
                    return _sdpa(q, k, v)
            out.append((f"SDPA {name}", None, run))
    if device.type == "cuda" or ck._interpreting():
        out.append(("Triton kernel, default launch", ck.launch_for(head_dim), ck.cross_attention))
        if sweep:
            for values in itertools.product(*SWEEP.values()):
                launch = dict(zip(SWEEP, values))
                if launch == ck.launch_for(head_dim):
                    continue
                out.append(("Triton kernel", launch, lambda q, k, v, kw=launch: ck.cross_attention(q, k, v, **kw)))
        if sweep_fma:
            for every in FMA_SWEEP:
                launch = dict(ck.launch_for(head_dim), fma_exp_every=every)
                out.append((f"Triton kernel, fma_exp_every={every}", launch,
                            lambda q, k, v, kw=launch: ck.cross_attention(q, k, v, **kw)))
    return out


def _training_variants(device, sweep: bool, head_dim: int,
                       sweep_fma: bool = False) -> list[tuple[str, dict | None, object]]:
    """(name, backward launch or None, callable(q, k, v)) of every variant timed under autograd."""
    from model.nets import cross_attention_kernel as ck

    out = [v for v in _variants(device, False, head_dim) if not v[0].startswith("Triton")]
    if device.type == "cuda" or ck._interpreting():
        out.append(("Triton kernels, default launches", ck.backward_launch_for(head_dim), ck.cross_attention))
        if sweep:
            default = ck.backward_launch_for(head_dim)
            for kernel, grid in BACKWARD_SWEEP.items():
                for values in itertools.product(*grid.values()):
                    launch = dict(default, **{kernel: dict(default[kernel], **dict(zip(grid, values)))})
                    if launch == default:
                        continue
                    out.append((f"Triton kernels, {kernel} swept", launch,
                                lambda q, k, v, b=launch: ck.cross_attention(q, k, v, backward=b)))
        if sweep_fma:
            default = ck.backward_launch_for(head_dim)
            for every in FMA_SWEEP:
                for kernels in (("dq",), ("dkdv",), ("forward", "dq", "dkdv")):
                    launch = {name: dict(entry, fma_exp_every=every) if name in kernels else entry
                              for name, entry in default.items()}
                    forward = every if "forward" in kernels else None
                    out.append((f"Triton kernels, fma_exp_every={every} in {' + '.join(kernels)}", launch,
                                lambda q, k, v, b=launch, f=forward: ck.cross_attention(q, k, v, backward=b,
                                                                                        fma_exp_every=f)))
    return out


def _reference_dq(q, k, v, do, rows: int) -> torch.Tensor:
    """float64 dq of the first ``rows`` rows (each row's gradient depends on its own row and all keys only)."""
    q = q[:rows].detach().double().cpu().requires_grad_()
    o = _reference(q, k.detach(), v.detach(), rows)
    o.backward(do[:rows].double().cpu())
    return q.grad


def _time_variant(entry: dict, fn, args, *, reps: int, warmup: int, device, grad: bool):
    """Time ``fn(*args)`` into ``entry`` (``error`` when the variant does not take the shape); its output."""
    try:
        if grad:
            timing = time_calls(lambda: fn(*args), reps=reps, warmup=warmup, device=device)
        else:
            with torch.no_grad():
                timing = time_calls(lambda: fn(*args), reps=reps, warmup=warmup, device=device)
    except Exception as exc:  # a backend or launch that does not take the shape
        entry.update(error=f"{type(exc).__name__}: {str(exc)[:160]}")
        return None
    entry.update(median_ms=timing["median_ms"], reps_ms=timing["reps_ms"])
    return timing["output"]


def run_report(*, device, reps: int = 20, warmup: int = 3, sweep: bool = False, seed: int = 0,
               training: bool = False, sweep_backward: bool = False, sweep_fma: bool = False) -> dict:
    smoke = device.type != "cuda"
    shapes = SMOKE_SHAPES if smoke else SHAPES
    heads, dim, keys = (SMOKE_HEADS, SMOKE_DIM, SMOKE_KEYS) if smoke else (HEADS, HEAD_DIM, KEYS)
    dtype = torch.float32 if smoke else torch.bfloat16
    rows_out = []
    for index, (label, rows) in enumerate(shapes):
        q, k, v = _inputs(rows, heads, dim, keys, dtype, device, seed)
        check = min(rows, CHECK_ROWS)
        if not training:
            ref = _reference(q, k, v, check)
            for name, launch, fn in _variants(device, sweep, dim, sweep_fma):
                entry = dict(shape=label, rows=rows, variant=name, launch=launch)
                rows_out.append(entry)
                out = _time_variant(entry, fn, (q, k, v), reps=reps, warmup=warmup, device=device, grad=False)
                if out is not None:
                    got = out[:check].double().cpu()
                    entry.update(tflops=4.0 * rows * keys * heads * dim / entry["median_ms"] / 1e9,
                                 rel_err=float((got - ref).norm() / ref.norm()))
            continue
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
        ref = _reference_dq(q, k, v, do, check)
        base = None

        def step(fn):
            o = fn(q, k, v)
            return torch.autograd.grad(o, (q, k, v), do)

        last = index == len(shapes) - 1
        variants = _training_variants(device, sweep_backward and last, dim, sweep_fma and last)
        for name, launch, fn in variants:
            entry = dict(shape=label, rows=rows, variant=name, launch=launch, training=True)
            rows_out.append(entry)
            out = _time_variant(entry, step, (fn,), reps=reps, warmup=warmup, device=device, grad=True)
            if out is None:
                continue
            dq, dk, dv = (t.double().cpu() for t in out)
            base = (dk, dv) if base is None else base
            entry.update(tflops=14.0 * rows * keys * heads * dim / entry["median_ms"] / 1e9,
                         rel_err=float((dq[:check] - ref).norm() / ref.norm()),
                         dkv_rel_diff=float(((dk - base[0]).norm() ** 2 + (dv - base[1]).norm() ** 2).sqrt()
                                            / (base[0].norm() ** 2 + base[1].norm() ** 2).sqrt()))
    return dict(provenance(device), smoke=smoke, heads=heads, head_dim=dim, keys=keys, dtype=str(dtype),
                reps=reps, warmup=warmup, sweep=sweep, training=training, sweep_backward=sweep_backward,
                sweep_fma=sweep_fma, results=rows_out)


def _launch(launch: dict | None) -> str:
    if not launch:
        return ""
    if "dq" in launch:
        q, kv = launch["dq"], launch["dkdv"]
        return (f"dq {_launch(q)}; dkdv {kv['block_n']} keys x {kv['block_m']} rows, {kv['num_warps']} warps, "
                f"{kv['num_stages']} stages, {kv['chunk_rows']:,}-row chunks{_fma(kv)}")
    return (f"{launch['block_m']} x {launch['block_n']}, {launch['num_warps']} warps, {launch['num_stages']} "
            f"stages{_fma(launch)}")


def _fma(launch: dict) -> str:
    every = launch.get("fma_exp_every", 0)
    return f", FMA exp every {every}" if every else ""


def markdown(r: dict) -> str:
    training = r.get("training", False)
    what = "forward and backward" if training else "SDPA against the Triton kernel"
    lines = [f"# Cross-attention of the sparse DiTs: {what}", ""]
    if r["smoke"]:
        lines += ["**SMOKE RUN** on the CPU (no CUDA GPU): tiny shapes, not a measurement.", ""]
    flags = "".join(f" --{f.replace('_', '-')}" for f in ("sweep", "training", "sweep_backward", "sweep_fma")
                    if r.get(f))
    lines += [f"{r['date']}, {r.get('gpu') or 'CPU'}, torch {r['torch']}, triton {r['triton']}, "
              f"{commit_label(r)}. `python -m model.reports.cross_attention{flags}`.", ""]
    if training:
        lines += [f"One call under autograd (forward, then `torch.autograd.grad` of q, k, v) of {r['heads']} heads x "
                  f"{r['head_dim']} over {r['keys']:,} keys, {r['dtype']}, q/k/v in the DiT's layouts; median of "
                  f"{r['reps']} calls after {r['warmup']} (CUDA events). TFLOP/s: 14 x rows x keys x heads x head "
                  f"dim per call (the backward recomputes the scores). Rel. error: dq of the first {CHECK_ROWS:,} "
                  "rows against float64; dk/dv diff: against the first row's dk and dv.", ""]
    else:
        lines += [f"One call of {r['heads']} heads x {r['head_dim']} over {r['keys']:,} keys, {r['dtype']}, q/k/v "
                  f"in the DiT's layouts; median of {r['reps']} calls after {r['warmup']} (CUDA events). Rel. "
                  f"error: the first {CHECK_ROWS:,} rows against float64.", ""]
    head = "| variant | launch | ms | TFLOP/s | rel. error |" + (" dk/dv diff |" if training else "")
    rule = "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if training else "")
    for label in dict.fromkeys(e["shape"] for e in r["results"]):
        entries = [e for e in r["results"] if e["shape"] == label]
        timed = [e for e in entries if "median_ms" in e]
        best = min(timed, key=lambda e: e["median_ms"]) if timed else None
        lines += [f"## {label}: {entries[0]['rows']:,} rows", "", head, rule]
        for e in sorted(timed, key=lambda e: e["median_ms"])[:12] + [e for e in entries if "error" in e]:
            if "error" in e:
                lines.append(f"| {e['variant']} | {_launch(e['launch'])} | {e['error']} | | |" + (" |" * training))
                continue
            name = f"**{e['variant']}**" if e is best else e["variant"]
            extra = f" {e['dkv_rel_diff']:.2e} |" if training else ""
            lines.append(f"| {name} | {_launch(e['launch'])} | {e['median_ms']:.3f} | {e['tflops']:.0f} | "
                         f"{e['rel_err']:.2e} |{extra}")
        hidden = len(timed) - min(len(timed), 12)
        if hidden:
            lines.append(f"\n({hidden} slower launches in the JSON.)")
        lines.append("")
    return "\n".join(lines)


def build_parser():
    from model.cli.args import add_device, add_out, add_seed, make_parser, positive_int

    p = make_parser("model.reports.cross_attention", __doc__)
    add_out(p, "folder for cross_attention.md and cross_attention.json", default="reports")
    p.add_argument("--reps", type=positive_int, default=20, metavar="N",
                   help="timed calls per variant, their median is reported (default %(default)s)")
    p.add_argument("--warmup", type=positive_int, default=3, metavar="N",
                   help="untimed calls per variant before the timed ones (default %(default)s)")
    p.add_argument("--sweep", action="store_true",
                   help="also time the kernel at every launch of the sweep grid (default: off)")
    p.add_argument("--training", action="store_true",
                   help="time forward + backward under autograd instead of the forward alone (default: off)")
    p.add_argument("--sweep-fma", action="store_true",
                   help="also the default launches with every k-th tile's exponentials on the FMA units (k in "
                        "FMA_SWEEP; forward, and with --training the backward kernels at the largest shape) "
                        "(default: off)")
    p.add_argument("--sweep-backward", action="store_true",
                   help="with --training: also every backward launch of BACKWARD_SWEEP at the largest shape "
                        "(default: off)")
    add_device(p, default=None, shown="cuda when available, else a CPU smoke run")
    add_seed(p)
    return p


def main(argv=None) -> int:
    from model.cli.args import run

    return run(build_parser(), _main, argv)


def _main(args) -> int:
    from model.cli.args import output_folder, resolve_device

    out = output_folder("--out", args.out)
    dev = resolve_device(args.device)
    if dev.type != "cuda":
        print("model.reports.cross_attention: no CUDA GPU here; a smoke run of tiny shapes on the CPU instead "
              "(not a measurement)")
    if args.sweep_backward and not args.training:
        raise ValueError("--sweep-backward needs --training")
    r = run_report(device=dev, reps=args.reps, warmup=args.warmup, sweep=args.sweep, seed=args.seed,
                   training=args.training, sweep_backward=args.sweep_backward, sweep_fma=args.sweep_fma)
    name = "cross_attention_training" if args.training else "cross_attention"
    write_report(out, name, r, markdown(r))
    print(f"wrote {out / (name + '.md')} and {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
