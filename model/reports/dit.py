"""Time one training step and one guided sampling step of the sparse DiT, SSA against full attention.

``python -m model.reports.dit --out DIR`` (one CUDA GPU): the ``released_1024`` DiT (width 1024, 24 blocks, 32 query
heads of 32, 2 kv heads, v1.1 compression) on the ``shell-1024`` token set of the benchmark (137,124 latent tokens,
:func:`ssa_kernels.shapes.shape_coords`) with random latent features and a random 1374-token condition:

- **training step**: forward + rectified-flow loss + backward + AdamW step, bf16 autocast, activation checkpointing
  per block; time (CUDA events around synchronised repetitions, after warm-up) and peak allocated memory;
- **sampling step**: one guided Euler step, i.e. two forwards (condition, zeroed condition) and the update, no grad;
- both with SSA through the Triton kernels, and with the same model switched to **full attention** (the
  ``attention="full"`` baseline of :class:`model.nets.ssa_layer.SpatialSparseAttention`: the same q/k/v, one softmax
  over all tokens) through ``scaled_dot_product_attention`` restricted to the FLASH_ATTENTION backend (PyTorch's
  FlashAttention-2 kernels). The full-attention step takes seconds at 137k tokens: it runs ``--full-reps`` times.

Writes ``DIR/dit.json`` (``ssa_step_ms``, ``full_attention_step_ms``, ``ssa_sample_step_ms``,
``full_attention_sample_step_ms``, ``peak_mem_gb``, ``full_attention_peak_mem_gb``, ``tokens``, ``gpu``, ``date``,
versions, the configuration, every repetition) and ``DIR/dit.md``.

``--smoke``: the ``tiny`` DiT on a small shell on the CPU (reference SSA unless CUDA is present), for tests.
Needs only torch, triton and numpy (no trimesh, no transformers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

__all__ = ["main", "markdown", "run_report"]

#: Tokens of the smoke run (a piece of a 16^3 shell, in layout order).
SMOKE_TOKENS = 192


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, *, reps: int, warmup: int, device) -> tuple[list[float], float | None]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` calls; peak memory (GB) over the timed
    calls (None on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return times, peak


def _median(xs):
    s = sorted(xs)
    n = len(s)
    return None if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def _flash_context(device):
    """``sdpa_kernel(FLASH_ATTENTION)`` (PyTorch's FlashAttention-2), or the default backends when unavailable."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION), "FLASH_ATTENTION (torch sdpa)"
    except Exception as exc:  # pragma: no cover - old torch
        return nullcontext(), f"default sdpa backends ({type(exc).__name__})"


def run_report(*, smoke: bool = False, reps: int = 3, full_reps: int = 2, warmup: int = 1, skip_full: bool = False,
               shape: str = "shell-1024", device=None, seed: int = 0) -> dict:
    """Run the measurements (module docstring) and return the result document."""
    from model.nets.dit import DiTConfig, SparseDiT
    from model.flow import FlowMatchEulerScheduler, flow_loss
    from model.sparse.tensor import SparseTensor

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not smoke and dev.type != "cuda":
        raise RuntimeError("the full report needs a CUDA GPU; use --smoke on a CPU")
    torch.manual_seed(seed)
    if smoke:
        from ssa_kernels.shapes import shell_coords
        from ssa_kernels.layout import layout_order

        cfg = DiTConfig.tiny(backend="kernels" if dev.type == "cuda" else "reference", use_checkpoint=True)
        coords = shell_coords(16, 1.0)
        coords = coords[layout_order(coords, compression_block=cfg.compression_block,
                                     selection_block=cfg.selection_block)][:SMOKE_TOKENS]
        cond_tokens = 21
        shape_name = "shell-16 (smoke)"
    else:
        from ssa_kernels.shapes import shape_coords

        cfg = DiTConfig.released_1024(backend="kernels", use_checkpoint=True)
        coords = shape_coords(shape, compression_block=cfg.compression_block, selection_block=cfg.selection_block)
        cond_tokens = 1374
        shape_name = shape
    n = coords.shape[0]
    model = SparseDiT(cfg).to(dev)
    for p in model.parameters():  # non-degenerate weights (the DiT initialisation zeroes the gates and output)
        if p.dim() >= 2 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    coords = coords.to(dev)
    x0 = SparseTensor(coords, torch.randn(n, cfg.in_channels, generator=gen).to(dev), validate=False)
    cond = torch.randn(1, cond_tokens, cfg.cond_channels, generator=gen).to(dev)
    uncond = torch.zeros_like(cond)
    use_bf16 = dev.type == "cuda"
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    sigmas = FlowMatchEulerScheduler(shift=8.0).sigmas(15)
    xt = x0.replace(torch.randn(n, cfg.in_channels, generator=gen).to(dev))

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = flow_loss(model, x0, cond, generator=torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample_step():
        t = torch.full((1,), float(sigmas[0]) * 1000.0, device=dev)
        with autocast():
            v_c = model(xt, t, cond).feats.float()
            v_u = model(xt, t, uncond).feats.float()
        v = v_u + 7.0 * (v_c - v_u)
        return xt.feats.float() + (float(sigmas[1]) - float(sigmas[0])) * v

    result: dict = {"tokens": n, "shape": shape_name, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                    else f"CPU ({platform.processor() or platform.machine()})",
                    "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                    "smoke": smoke, "config": cfg.to_dict(), "condition_tokens": cond_tokens,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "precision": "bf16 autocast" if use_bf16 else "fp32", "activation_checkpointing": True}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        result["triton"] = None
    model.set_mode(attention="ssa")
    t_train, peak = _time(train_step, reps=reps, warmup=warmup, device=dev)
    t_sample, peak_s = _time(sample_step, reps=reps, warmup=warmup, device=dev)
    result.update(ssa_step_ms=_median(t_train), ssa_step_reps_ms=t_train, peak_mem_gb=peak,
                  ssa_sample_step_ms=_median(t_sample), ssa_sample_step_reps_ms=t_sample, ssa_sample_peak_mem_gb=peak_s)
    if not skip_full:
        model.set_mode(attention="full")
        ctx, backend = _flash_context(dev)
        with ctx:
            f_train, f_peak = _time(train_step, reps=full_reps, warmup=warmup, device=dev)
            f_sample, f_peak_s = _time(sample_step, reps=full_reps, warmup=warmup, device=dev)
        model.set_mode(attention="ssa")
        result.update(full_attention_backend=backend, full_attention_step_ms=_median(f_train),
                      full_attention_step_reps_ms=f_train, full_attention_peak_mem_gb=f_peak,
                      full_attention_sample_step_ms=_median(f_sample), full_attention_sample_step_reps_ms=f_sample,
                      full_attention_sample_peak_mem_gb=f_peak_s)
        if result["ssa_step_ms"]:
            result["speedup_train"] = result["full_attention_step_ms"] / result["ssa_step_ms"]
            result["speedup_sample"] = result["full_attention_sample_step_ms"] / result["ssa_sample_step_ms"]
    else:
        result.update(full_attention_step_ms=None, full_attention_sample_step_ms=None)
    return result


def _fmt(v, unit=""):
    if v is None:
        return "n/a"
    return f"{v:,.1f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def markdown(r: dict) -> str:
    cfg = r["config"]
    lines = [
        "# Sparse DiT: SSA against full attention",
        "",
        f"{r['date']}, {r['gpu']}, torch {r['torch']}, triton {r.get('triton')}; "
        f"{'SMOKE RUN (tiny model on CPU), not a measurement' if r['smoke'] else 'released_1024 configuration'}.",
        "",
        f"Model: width {cfg['model_channels']}, {cfg['num_blocks']} blocks, {cfg['num_heads']} query heads of "
        f"{cfg['model_channels'] // cfg['num_heads']}, {cfg['num_kv_heads']} kv heads, compression {cfg['compression_version']} "
        f"on {cfg['compression_block']}^3 blocks, selection {cfg['selection_block']}^3 top-{cfg['topk']}, window "
        f"{cfg['window']}^3; {r['parameters']:,} parameters. Tokens: {r['tokens']:,} ({r['shape']}); condition: "
        f"{r['condition_tokens']} random tokens. {r['precision']}, activation checkpointing per block, AdamW.",
        "",
        f"| | SSA ({'Triton kernels' if cfg['backend'] == 'kernels' else 'dense reference'}) | full attention |",
        "| --- | ---: | ---: |",
        f"| training step (fwd + bwd + AdamW), ms | {_fmt(r['ssa_step_ms'])} | {_fmt(r.get('full_attention_step_ms'))} |",
        f"| peak memory of the training step, GB | {_fmt(r.get('peak_mem_gb'))} | "
        f"{_fmt(r.get('full_attention_peak_mem_gb'))} |",
        f"| guided sampling step (2 forwards + Euler), ms | {_fmt(r['ssa_sample_step_ms'])} | "
        f"{_fmt(r.get('full_attention_sample_step_ms'))} |",
    ]
    if r.get("speedup_train"):
        lines += ["", f"Speed-up of SSA: {r['speedup_train']:.1f}x per training step, {r['speedup_sample']:.1f}x per "
                      "sampling step."]
    lines += ["", f"Full attention: {r.get('full_attention_backend', 'not run')} over the same q/k/v (GQA by repeating "
                  "the kv heads); medians of the repetitions in dit.json."]
    return "\n".join(lines) + "\n"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.reports.dit", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for dit.json and dit.md")
    p.add_argument("--smoke", action="store_true", help="tiny model on a small shell (CPU test)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of the SSA steps (default 3)")
    p.add_argument("--full-reps", type=int, default=2, help="timed repetitions of the full-attention steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-full", action="store_true", help="do not run the full-attention baseline")
    p.add_argument("--shape", default="shell-1024", help="benchmark token set (default shell-1024)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    r = run_report(smoke=args.smoke, reps=args.reps, full_reps=args.full_reps, warmup=args.warmup,
                   skip_full=args.skip_full, shape=args.shape, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "dit.json", json.dumps(r, indent=1))
    _atomic_text(out / "dit.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
