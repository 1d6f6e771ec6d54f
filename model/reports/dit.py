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

With the profile (default; ``--no-profile`` skips it): the training step with its memory savings switched on one
after the other (:func:`model.reports.dit_profile.training_variants`: time, peak, memory held after the forward,
loss and gradient differences), the GPU time of a training step and of a forward by kind of kernel, and the
sampling-step variants (``--no-sampling-profile`` skips the sampling part). ``--launch-variant SPEC`` (repeatable)
adds training-step rows with launch settings over the defaults, timed in the same process as the rows before
(:func:`model.reports.dit_profile.parse_launch_variants`: ``"selection.FWD:fma_exp_every=2|4;
cross_attention.forward:fma_exp_every=2"``, one row per combination).

Writes ``DIR/dit.json`` (``ssa_step_ms``, ``full_attention_step_ms``, ``ssa_sample_step_ms``,
``full_attention_sample_step_ms``, ``peak_mem_gb``, ``full_attention_peak_mem_gb``, ``tokens``, ``gpu``, ``date``,
``commit`` and versions (:func:`model.io.provenance`), the configuration, every repetition) and ``DIR/dit.md``.

``--smoke``: the ``tiny`` DiT on a small shell on the CPU (reference SSA unless CUDA is present), for tests.
Needs only torch, triton and numpy (no trimesh, no transformers).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model.io import atomic_write_json, atomic_write_text, commit_label, provenance

__all__ = ["fill_zero_parameters", "main", "markdown", "run_report"]

#: Tokens of the smoke run (a piece of a 16^3 shell, in layout order).
SMOKE_TOKENS = 192
#: Kernels listed per profile in the markdown (the JSON keeps more, model.pipeline.records.PROFILE_TOP), and
#: the characters shown of each name.
MD_KERNELS = 12
MD_NAME_CHARS = 90


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


def fill_zero_parameters(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Non-degenerate random weights for timing: the DiT initialisation zeroes the gates, the output layer and the
    biases, so every all-zero parameter is drawn from ``N(0, std^2)`` instead. Returns ``model``."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=std)
    return model


def run_report(*, smoke: bool = False, reps: int = 3, full_reps: int = 2, warmup: int = 1, skip_full: bool = False,
               shape: str = "shell-1024", device=None, seed: int = 0, profile: bool = True,
               core_variants: bool = False, sampling_profile: bool = True, training_rows: int | None = None,
               launch_variants=()) -> dict:
    """Run the measurements (module docstring) and return the result document."""
    from model.nets.dit import DiTConfig, SparseDiT
    from model.reports.dit_profile import parse_launch_variants

    launch_rows = parse_launch_variants(launch_variants)  # bad specs fail before any GPU work
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
    model = fill_zero_parameters(SparseDiT(cfg).to(dev))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")  # as model.training.dit
    gen = torch.Generator().manual_seed(seed)
    coords = coords.to(dev)
    x0 = SparseTensor(coords, torch.randn(n, cfg.in_channels, generator=gen).to(dev), validate=False)
    cond = torch.randn(1, cond_tokens, cfg.cond_channels, generator=gen).to(dev)
    uncond = torch.zeros_like(cond)
    use_bf16 = dev.type == "cuda"
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    sigmas = FlowMatchEulerScheduler(shift=8.0).sigmas(15)
    xt = x0.replace(torch.randn(n, cfg.in_channels, generator=gen).to(dev))

    def loss_fn():
        with autocast():
            return flow_loss(model, x0, cond, generator=torch.Generator().manual_seed(1))["loss"]

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    @torch.no_grad()
    def sample_step():
        t = torch.full((1,), float(sigmas[0]) * 1000.0, device=dev)
        with autocast():
            v_c = model(xt, t, cond).feats.float()
            v_u = model(xt, t, uncond).feats.float()
        v = v_u + 7.0 * (v_c - v_u)
        return xt.feats.float() + (float(sigmas[1]) - float(sigmas[0])) * v

    prov = provenance(dev)
    result: dict = {"tokens": n, "shape": shape_name,
                    "gpu": prov["gpu"] or f"CPU ({platform.processor() or platform.machine()})",
                    "date": prov["date"], "commit": prov["commit"], "torch": prov["torch"], "triton": prov["triton"],
                    "cuda": prov["cuda"], "python": prov["python"],
                    "smoke": smoke, "config": cfg.to_dict(), "condition_tokens": cond_tokens,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "precision": "bf16 autocast" if use_bf16 else "fp32", "activation_checkpointing": True}
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
    if launch_rows and not (profile and dev.type == "cuda"):
        print(f"[dit report] --launch-variant: {len(launch_rows)} row(s) not timed (the training-step variants run "
              "on CUDA with the profile only)", file=sys.stderr, flush=True)
    if profile and dev.type == "cuda":
        from model.reports.dit_profile import profile_step, sampling_variants, training_variants

        result["training_variants"] = training_variants(model, loss_fn, opt, time_fn=_time, reps=reps,
                                                        warmup=warmup, last=training_rows,
                                                        launch_rows=launch_rows)
        result["profile_train_step"] = profile_step(train_step)
    if profile and sampling_profile and dev.type == "cuda":
        opt.state.clear()  # the sampling measurements below hold no optimizer state
        for p in model.parameters():
            p.grad = None
        torch.cuda.empty_cache()

        def forward():
            with torch.no_grad(), autocast():
                model(xt, torch.full((1,), 700.0, device=dev), cond)
        result["profile_forward"] = profile_step(forward)
        from ssa_kernels.shapes import shape_coords

        small = shape_coords("shell-512", compression_block=cfg.compression_block,
                             selection_block=cfg.selection_block)
        extra: dict = {}
        variants = sampling_variants(model, xt, torch.full((1,), float(sigmas[0]) * 1000.0, device=dev), cond,
                                     guidance=7.0, sigma_step=float(sigmas[1]) - float(sigmas[0]), time_fn=_time,
                                     reps=reps, warmup=warmup, extra_profiles=extra, small_coords=small,
                                     core=core_variants)
        result["sampling_variants"] = variants
        result.update({f"profile_{k}": v for k, v in extra.items()})
        from model.flow import BATCHED_GUIDANCE_MAX_TOKENS

        # the variant the sampler picks for this token count (model.flow.euler_sample, batched_guidance="auto")
        chosen = "one batched forward" if n <= BATCHED_GUIDANCE_MAX_TOKENS else "two forwards"
        fastest = next(v for v in variants if v["name"] == f"bf16 weights, fused norms, shortcut, {chosen}")
        result.update(fast_sample_step_ms=fastest["median_ms"], fast_sample_peak_mem_gb=fastest["peak_gb"],
                      fast_sample_variant=fastest["name"])
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
        f"{r['date']}, {r['gpu']}, torch {r['torch']}, triton {r.get('triton')}, {commit_label(r)}; "
        f"{'SMOKE RUN (tiny model on CPU), not a measurement' if r['smoke'] else 'released_1024 configuration'}.",
        "",
        f"Model: width {cfg['model_channels']}, {cfg['num_blocks']} blocks, {cfg['num_heads']} query heads of "
        f"{cfg['model_channels'] // cfg['num_heads']}, {cfg['num_kv_heads']} kv heads, compression "
        f"{cfg['compression_version']} "
        f"on {cfg['compression_block']}^3 blocks, selection {cfg['selection_block']}^3 top-{cfg['topk']}, window "
        f"{cfg['window']}^3; {r['parameters']:,} parameters. Tokens: {r['tokens']:,} ({r['shape']}); condition: "
        f"{r['condition_tokens']} random tokens. {r['precision']}, activation checkpointing per block, AdamW.",
        "",
        f"| | SSA ({'Triton kernels' if cfg['backend'] == 'kernels' else 'dense reference'}) | full attention |",
        "| --- | ---: | ---: |",
        f"| training step (fwd + bwd + AdamW), ms | {_fmt(r['ssa_step_ms'])} | "
        f"{_fmt(r.get('full_attention_step_ms'))} |",
        f"| peak memory of the training step, GB | {_fmt(r.get('peak_mem_gb'))} | "
        f"{_fmt(r.get('full_attention_peak_mem_gb'))} |",
        f"| guided sampling step (2 forwards + Euler; fp32 weights, bf16 autocast), ms | "
        f"{_fmt(r['ssa_sample_step_ms'])} | {_fmt(r.get('full_attention_sample_step_ms'))} |",
    ]
    if r.get("fast_sample_step_ms") is not None:
        lines.append(f"| guided sampling step as the cascade runs it ({r['fast_sample_variant']}), ms | "
                     f"{_fmt(r['fast_sample_step_ms'])} | |")
        lines.append(f"| peak memory of that sampling step, GB | {_fmt(r.get('fast_sample_peak_mem_gb'))} | |")
    if r.get("speedup_train"):
        lines += ["", f"Speed-up of SSA: {r['speedup_train']:.1f}x per training step, {r['speedup_sample']:.1f}x per "
                      "sampling step."]
    lines += ["", f"Full attention: {r.get('full_attention_backend', 'not run')} over the same q/k/v (GQA by repeating "
                  "the kv heads); medians of the repetitions in dit.json."]
    lines += _profile_markdown(r)
    return "\n".join(lines) + "\n"


def _profile_markdown(r: dict) -> list[str]:
    """The sampling variants and the GPU time breakdowns (:mod:`model.reports.dit_profile`)."""
    lines = []
    if r.get("training_variants"):
        lines += ["", "## The training step, one memory saving after the other (same process, same inputs)", "",
                  "| variant | ms | peak GB | GB held after the forward | loss rel. diff. | gradients rel. diff. |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for v in r["training_variants"]:
            if "error" in v:
                lines.append(f"| {v['name']} | failed: {v['error']} | | | | |")
                continue
            lines.append(f"| {v['name']} | {v['median_ms']:,.1f} | {_fmt(v['peak_gb'])} | "
                         f"{_fmt(v['after_forward_gb'])} | {v['loss_rel_diff']:.2e} | {v['grad_rel_diff']:.2e} |")
        lines += ["", "Forward + loss + backward + AdamW (fused) per row, bf16 autocast, checkpointing per block. Held "
                      "after the forward: weights, AdamW state and the checkpointed block inputs. The differences are "
                      "relative norms of the loss and of all gradients (one vector) against the first row, on the "
                      "same weights before any timed step (`model.reports.dit_profile.training_variants`)."]
    if r.get("sampling_variants"):
        lines += ["", "## The guided sampling step, variant by variant (same process, same inputs)", "",
                  "| variant | ms | peak GB | rel. difference to the first |", "| --- | ---: | ---: | ---: |"]
        for v in r["sampling_variants"]:
            lines.append(f"| {v['name']} | {v['median_ms']:,.1f} | {_fmt(v['peak_gb'])} | {v['rel_diff']:.2e} |")
        lines += ["", "Peak: allocated GPU memory during the step (weights, inputs and activations; no optimizer "
                      "state). The relative difference is the norm of the guided velocity's difference over its norm; "
                      "guidance 7 multiplies the rounding of v_c - v_u by 7, and bf16 weights round the norms' "
                      "affine parameters, biases and the intra-block positional table that autocast keeps in fp32. "
                      "`tests/test_dit_fast_paths.py` (GPU) checks on a small model that the fast path is as close to "
                      "an fp32 run as the plain bf16 two-forward path is. Batched guidance pays at 19k tokens (the "
                      "512 stage), not at 137k: `model.flow.euler_sample` batches below 65,536 tokens."]
    # (the per-range totals of the block parts stay in dit.json only: the profiler adds the kernels of ranges nested
    # inside a range, such as the SSA op's own, to it again, so they do not add up to the forward)
    for key, title in (("profile_forward", "one forward (SSA, bf16 autocast)"),
                       ("profile_forward_bf16_condition", "one forward, bf16 weights, fused norms, with the condition"),
                       ("profile_forward_bf16_zeroed_condition", "one forward, bf16 weights, zeroed condition"),
                       ("profile_train_step", "one training step (forward with checkpointing, backward, AdamW)")):
        prof = r.get(key)
        if not prof:
            continue
        total = prof["total_ms"] or 1.0
        lines += ["", f"## GPU time of {title}: {prof['total_ms']:,.1f} ms of kernels", "",
                  "| kind of kernel | ms | share |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {ms:,.1f} | {100 * ms / total:.0f}% |" for k, ms in prof["kinds"].items()]
        lines += ["", "| largest kernels | ms | calls |", "| --- | ---: | ---: |"]
        lines += [f"| `{name[:MD_NAME_CHARS]}` | {ms:,.1f} | {calls} |"
                  for name, ms, calls in prof["top_kernels"][:MD_KERNELS]]
    return lines


def build_parser() -> argparse.ArgumentParser:
    from model.cli.args import add_device, add_out, add_seed, make_parser, non_negative_int, positive_int
    from ssa_kernels.shapes import SHAPES

    p = make_parser("model.reports.dit", __doc__)
    add_out(p, "folder for dit.json and dit.md")
    p.add_argument("--smoke", action="store_true", help="tiny model on a small shell (CPU test)")
    p.add_argument("--reps", type=positive_int, default=3, metavar="N",
                   help="timed repetitions of the SSA steps (default %(default)s)")
    p.add_argument("--full-reps", type=positive_int, default=2, metavar="N",
                   help="timed repetitions of the full-attention steps (default %(default)s)")
    p.add_argument("--warmup", type=non_negative_int, default=1, metavar="N",
                   help="untimed calls before the timed ones (default %(default)s)")
    p.add_argument("--skip-full", action="store_true", help="do not run the full-attention baseline")
    p.add_argument("--shape", default="shell-1024", choices=sorted(SHAPES),
                   help="benchmark token set (default %(default)s)")
    add_device(p, default=None, shown="cuda when available, else the CPU")
    add_seed(p)
    p.add_argument("--no-profile", action="store_true", help="skip the profiles and the sampling variants")
    p.add_argument("--no-sampling-profile", dest="sampling_profile", action="store_false",
                   help="profile and time the variants of the training step only (not of the sampling step)")
    p.add_argument("--training-rows", type=positive_int, default=None, metavar="N",
                   help="time only the last N rows of the training-step variants (default: all); the first of them "
                        "is then the reference of the differences")
    p.add_argument("--core-variants", action="store_true",
                   help="skip the sampling variants earlier reports found no faster: SDPA backends of the "
                        "cross-attention, torch.compile on the MLPs (default: all variants)")
    p.add_argument("--launch-variant", action="append", default=[], metavar="SPEC",
                   help="an extra training-step row (repeatable) with launch settings over the defaults, e.g. "
                        "'selection.FWD:fma_exp_every=2|4;cross_attention.forward:fma_exp_every=2' (one row per "
                        "combination; the cross-attention kernels are cross_attention.forward/.dq/.dkdv)")
    return p


def main(argv=None) -> int:
    from model.cli.args import run

    return run(build_parser(), _main, argv)


def _main(args) -> int:
    from model.cli.args import UserError, output_folder, resolve_device

    output_folder("--out", args.out)
    if args.device is not None:
        resolve_device(args.device)
    from model.reports.dit_profile import parse_launch_variants

    try:
        parse_launch_variants(args.launch_variant)
    except ValueError as exc:
        raise UserError(f"--launch-variant: {exc}") from None
    try:
        r = run_report(smoke=args.smoke, reps=args.reps, full_reps=args.full_reps, warmup=args.warmup,
                       skip_full=args.skip_full, shape=args.shape, seed=args.seed,
                       device=None if args.device in (None, "auto") else args.device,
                       profile=not args.no_profile, core_variants=args.core_variants, training_rows=args.training_rows,
                       sampling_profile=args.sampling_profile, launch_variants=args.launch_variant)
    except RuntimeError as exc:
        if "needs a CUDA GPU" not in str(exc):
            raise
        raise UserError(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "dit.json", r)
    atomic_write_text(out / "dit.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
