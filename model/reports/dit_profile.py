"""Where a sparse DiT step spends its GPU time, and the sampling-step variants side by side (for ``model.reports.dit``).

- :func:`profile_step`: ``torch.profiler`` over one call; GPU kernel time per kind of kernel (SSA kernels, matrix
  products, attention (SDPA, or the cross-attention kernel ``_cross_attention_kernel``), layer norm, element-wise,
  index/copy, other) and the largest kernels. The ``record_function`` ranges of
  :class:`model.nets.dit.SparseDiTBlock` (``dit.norm``, ``dit.self_attn``, ``dit.cross_attn``, ``dit.mlp``,
  ``dit.residual``) are recorded too, but the profiler adds the kernels of ranges nested inside one (the SSA op's
  own) to it again, so their totals are upper bounds (kept in the JSON only); they cover the forward only.
- :func:`sampling_variants`: one guided Euler step (condition + zeroed condition, guidance, update) timed in the
  same process for each way of running it, with its peak memory and its relative difference from the first
  (unoptimised) one: fp32 weights under bf16 autocast with the unfused ops and two plain forwards (the path of
  earlier reports), then the fused norms with the zeroed-condition shortcut, then bf16 weights with the plain
  blocks (``INFERENCE_PATH`` and the merged projection off), then bf16 weights on the inference blocks
  (:meth:`model.nets.dit.SparseDiTBlock.forward_inference`), two forwards or one batched forward.
- :func:`training_variants`: the training step with its memory savings switched on one after the other
  (:data:`TRAINING_VARIANTS`), each with its time, its peak memory, the memory held after the forward (weights,
  optimizer state and the checkpointed block inputs) and the relative difference of its loss and of all its
  gradients from the first variant's, on the same weights.
"""
from __future__ import annotations

import contextlib
import sys
from contextlib import nullcontext

import torch

from model.pipeline.records import PROFILE_NAME_CHARS, PROFILE_TOP  # the cascade's profiles keep as many
from ssa_kernels.launch import config as _launch_config

__all__ = ["KERNEL_KINDS", "RANGES", "TRAINING_VARIANTS", "kernel_kind", "parse_launch_variants", "profile_step",
           "sampling_variants", "training_switches", "training_variants"]

#: ``record_function`` ranges of the DiT block (model.nets.dit).
RANGES = ("dit.norm", "dit.self_attn", "dit.cross_attn", "dit.mlp", "dit.residual")
#: Kernel kinds by name fragments, first match wins (names as the CUDA runtime reports them).
KERNEL_KINDS = (
    ("SSA kernels", ("_cmp_", "_sel_", "_win_", "_score_topk", "_gate_bwd", "_fold_gate", "_row_dot")),
    ("layer norm (fused)", ("_layer_norm_modulate",)),
    ("attention (SDPA / cross-attention kernel)", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("matrix products", ("gemm", "xmma", "cutlass", "nvjet", "gemv", "splitk", "cublas")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("index / copy / sort", ("index", "gather", "scatter", "copy", "cat", "radix", "sort", "memcpy", "memset",
                             "fill")),
    ("element-wise / reduction", ("elementwise", "vectorized", "unrolled", "reduce", "gelu", "silu", "sigmoid",
                                  "mul", "add")),
)


def kernel_kind(name: str) -> str:
    """The :data:`KERNEL_KINDS` entry of a kernel name ("other" when none matches)."""
    low = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(f.lower() in low for f in fragments):
            return kind
    return "other"


def _device_time_us(evt, total: bool) -> float:
    for attr in (("device_time_total", "cuda_time_total") if total else ("self_device_time_total",
                                                                         "self_cuda_time_total")):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def profile_step(fn, *, top: int = PROFILE_TOP) -> dict:
    """Run ``fn()`` once under ``torch.profiler`` (CUDA activity) and break its GPU time down (module docstring).

    Returns ``{"total_ms", "ranges": {range: ms}, "kinds": {kind: ms}, "top_kernels": [[name, ms, calls], ...]}``.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, ranges = {}, {r: 0.0 for r in RANGES}
    for evt in prof.key_averages():
        if evt.key in ranges:
            ranges[evt.key] += _device_time_us(evt, total=True) / 1e3
            continue
        self_ms = _device_time_us(evt, total=False) / 1e3
        if self_ms > 0 and evt.device_type is not None and "cuda" in str(evt.device_type).lower():
            name = evt.key
            prev = kernels.get(name, (0.0, 0))
            kernels[name] = (prev[0] + self_ms, prev[1] + evt.count)
    kinds: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    total = sum(ms for ms, _ in kernels.values())
    top_k = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"total_ms": total, "ranges": ranges, "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": [[name[:PROFILE_NAME_CHARS], ms, calls] for name, (ms, calls) in top_k]}


def _compiled_mlp_variant(model, record, fn, out: list) -> None:
    """Time ``fn`` with ``torch.compile`` on each block's MLP (a failure becomes a row saying why), then restore the
    plain MLPs."""
    try:
        for block in model.blocks:
            block.mlp = torch.compile(block.mlp, dynamic=False)
        record("bf16 weights, fused norms, shortcut, two forwards, torch.compile on each MLP", fn)
    except Exception as exc:
        out.append({"name": f"torch.compile on each MLP: {type(exc).__name__}: {str(exc)[:120]}",
                    "median_ms": float("nan"), "reps_ms": [], "peak_gb": None, "rel_diff": float("nan")})
    finally:
        for block in model.blocks:
            block.mlp = getattr(block.mlp, "_orig_mod", block.mlp)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def sampling_variants(model, xt, t, cond_tokens, *, guidance: float, sigma_step: float, time_fn,
                      reps: int, warmup: int, extra_profiles: dict | None = None,
                      small_coords: torch.Tensor | None = None, core: bool = False) -> list[dict]:
    """Time one guided Euler step for every variant (module docstring); ``model`` holds fp32 weights and is
    converted to bf16 in place for the last variants. ``time_fn(fn, reps=, warmup=, device=)`` returns
    ``(times_ms, peak_gb)``. Each record: ``name``, ``median_ms``, ``reps_ms``, ``peak_gb``, ``rel_diff`` (relative
    norm of the guided velocity against the first variant's; the rows of ``small_coords`` compare with their own
    first row). ``extra_profiles``: filled with kernel profiles of the bf16 forward, conditioned and zeroed.
    ``core``: skip the variants that earlier reports found no faster (cross-attention on each SDPA backend,
    ``torch.compile`` on the MLPs)."""
    import model.nets.dit as dit_module
    import model.nets.fused as fused
    import model.nets.ssa_layer as ssa_layer
    from model.nets.dit import Condition

    dev = xt.device
    autocast = lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)  # noqa: E731
    out = []
    reference = {}

    def step(v_fn, ctx):
        def run():
            with torch.no_grad(), ctx():
                v = v_fn()
            reference["last"] = v
            return xt.feats.float() + sigma_step * v
        return run

    def plain():
        v_c = model(xt, t, cond_tokens).feats.float()
        v_u = model(xt, t, torch.zeros_like(cond_tokens)).feats.float()
        return v_u + guidance * (v_c - v_u)

    def guided(batched, cond):
        return lambda: model.guided_velocity(xt, t, cond, guidance, batched=batched).feats

    def record(name, fn, *, unfused=False, plain_blocks=False):
        fused.ENABLED = not unfused
        dit_module.INFERENCE_PATH = ssa_layer.MERGED_PROJECTION = not plain_blocks
        try:
            times, peak = time_fn(fn, reps=reps, warmup=warmup, device=dev)
            fn()  # the velocity of this variant for the comparison
        finally:
            fused.ENABLED = True
            dit_module.INFERENCE_PATH = ssa_layer.MERGED_PROJECTION = True
        v = reference["last"].float()
        base = reference.setdefault("base", v)
        out.append({"name": name, "median_ms": sorted(times)[len(times) // 2], "reps_ms": times, "peak_gb": peak,
                    "rel_diff": _rel(v, base)})

    record("fp32 weights + bf16 autocast, unfused, two forwards (earlier reports)", step(plain, autocast),
           unfused=True, plain_blocks=True)
    cond = Condition(cond_tokens)
    record("fp32 weights + bf16 autocast, fused norms, zeroed-condition shortcut, two forwards",
           step(guided(False, cond), autocast))
    model.to(torch.bfloat16)
    xt_bf16 = xt.replace(xt.feats.to(torch.bfloat16))
    cond16 = Condition(cond_tokens.to(torch.bfloat16))

    def guided16(batched):
        return lambda: model.guided_velocity(xt_bf16, t, cond16, guidance, batched=batched).feats

    record("bf16 weights, fused norms, shortcut, two forwards, plain blocks (before the inference blocks)",
           step(guided16(False), nullcontext), plain_blocks=True)
    record("bf16 weights, fused norms, shortcut, two forwards", step(guided16(False), nullcontext))
    record("bf16 weights, fused norms, shortcut, one batched forward", step(guided16(True), nullcontext))
    for backend in () if core else ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = (lambda b=backend: sdpa_kernel(getattr(SDPBackend, b)))
            record(f"bf16 weights, fused norms, shortcut, two forwards, cross-attention on {backend}",
                   step(guided16(False), ctx))
        except Exception as exc:  # a backend that does not take the shape
            out.append({"name": f"cross-attention on {backend}: {type(exc).__name__}: {str(exc)[:120]}",
                        "median_ms": float("nan"), "reps_ms": [], "peak_gb": None, "rel_diff": float("nan")})
    if extra_profiles is not None:
        def forward(c):
            with torch.no_grad():
                model(xt_bf16, t, c)
        extra_profiles["forward_bf16_condition"] = profile_step(lambda: forward(cond16))
        extra_profiles["forward_bf16_zeroed_condition"] = profile_step(lambda: forward(cond16.zeros_like()))
    if not core:
        _compiled_mlp_variant(model, record, step(guided16(False), nullcontext), out)
    if small_coords is not None:
        from model.sparse.tensor import SparseTensor

        n = small_coords.shape[0]
        gen = torch.Generator().manual_seed(5)
        xs = SparseTensor(small_coords.to(dev), torch.randn(n, xt.num_channels, generator=gen).to(dev, torch.bfloat16),
                          validate=False)
        base_small = {}
        for batched in (False, True):
            def small_step(b=batched):
                with torch.no_grad():
                    return model.guided_velocity(xs, t, cond16, guidance, batched=b).feats
            times, peak = time_fn(small_step, reps=reps, warmup=warmup, device=dev)
            v = small_step()
            base = base_small.setdefault("v", v)
            out.append({"name": f"{n:,} tokens: bf16 weights, fused norms, shortcut, "
                                f"{'one batched forward' if batched else 'two forwards'}",
                        "median_ms": sorted(times)[len(times) // 2], "reps_ms": times, "peak_gb": peak,
                        "rel_diff": _rel(v, base)})
    return out


#: Training-step variants, each switching on one more saving: (name, switches). The switches: ``half_stream``
#: (:class:`model.nets.dit.DiTConfig`), ``fused_norms`` under autograd (:func:`model.nets.fused.norm_modulate`),
#: ``recompute_hidden`` (the MLP's hidden layer, :class:`model.sparse.layers.FeedForward`), ``gated_residual``
#: (:data:`model.nets.dit_block.GATED_RESIDUAL`), ``norm_projection`` (the norms folded into the projections that
#: follow them, :data:`model.nets.dit_block.NORM_PROJECTION`), ``reuse_selection`` (the recomputed forward of a
#: checkpointed block reuses the top-k choice, :data:`model.nets.dit.REUSE_SELECTION`) and ``split_queries``
#: (the ``selection.DKDV`` launch setting ``max_queries``: 0 never splits a block's queries, None: the table's
#: value); then ``one_concatenation`` (:data:`model.nets.ssa_layer.SPLIT_FUNCTION`), ``lean_recompute``
#: (:data:`model.nets.dit.LEAN_RECOMPUTE`), ``gelu_kernel`` (:data:`model.sparse.layers.FUSED_GELU_GRAD`) and
#: ``cross_kernel`` (:data:`model.nets.cross_attention_kernel.TRAINABLE`: the cross-attention under autograd through
#: the Triton kernels, on CUDA with one batch element and no key mask); ``query_view`` (q handed to the SSA op as a
#: view of the merged product, :data:`model.nets.ssa_layer.QUERY_VIEW`) and ``residual_in_norms`` (the residual
#: stream's gradient added in the norms' backward kernel, :data:`model.nets.dit_block.RESIDUAL_GRAD_IN_NORMS`);
#: ``stash_cross`` (the cross-attention's output kept on the host for the recomputation,
#: :data:`model.nets.dit.STASH_CROSS_ATTENTION`); ``stash_selection`` (the SSA op's selection-branch output kept the
#: same way, :data:`model.nets.dit.STASH_SELECTION`, off by default: ``_ALL_ON`` holds the defaults).
#: The launch table's ``max_queries`` (the last variant's; the ones before it split nothing).
_TABLE_SPLIT = _launch_config("selection.DKDV")["max_queries"]
_ALL_ON = dict(half_stream=True, fused_norms=True, recompute_hidden=True, gated_residual=True, norm_projection=True,
               reuse_selection=True, split_queries=None, one_concatenation=True, lean_recompute=True,
               gelu_kernel=True, cross_kernel=True, query_view=True, residual_in_norms=True, stash_cross=True,
               stash_selection=False)
#: The switches of the rows before ``one_concatenation``.
_EARLIER = dict(_ALL_ON, one_concatenation=False, lean_recompute=False, gelu_kernel=False, cross_kernel=False,
                query_view=False, residual_in_norms=False, stash_cross=False)
TRAINING_VARIANTS = (
    ("float32 stream, PyTorch norms, plain MLP (before)",
     dict(_EARLIER, half_stream=False, fused_norms=False, recompute_hidden=False, gated_residual=False,
          norm_projection=False, reuse_selection=False, split_queries=0)),
    ("+ bf16 residual stream", dict(_EARLIER, fused_norms=False, recompute_hidden=False, gated_residual=False,
                                    norm_projection=False, reuse_selection=False, split_queries=0)),
    ("+ fused norms with their backward kernel", dict(_EARLIER, recompute_hidden=False, gated_residual=False,
                                                      norm_projection=False, reuse_selection=False, split_queries=0)),
    ("+ MLP hidden layer recomputed in the backward pass",
     dict(_EARLIER, gated_residual=False, norm_projection=False, reuse_selection=False, split_queries=0)),
    ("+ gated residual products that keep no branch output",
     dict(_EARLIER, norm_projection=False, reuse_selection=False, split_queries=0)),
    ("+ norms folded into the projections after them (merged q/k/v/gate)",
     dict(_EARLIER, reuse_selection=False, split_queries=0)),
    ("+ the recomputed forward reuses the top-k choice", dict(_EARLIER, split_queries=0)),
    (f"+ selection dK/dV split into chunks of at most {_TABLE_SPLIT:,} queries (the launch table's max_queries)",
     dict(_EARLIER)),
    ("+ the gradient of the merged q/k/v/gate product in one concatenation",
     dict(_EARLIER, one_concatenation=True)),
    ("+ the recomputed forward records the MLP branch without computing it (its output is read by nothing)",
     dict(_EARLIER, one_concatenation=True, lean_recompute=True)),
    ("+ the GELU step of the MLP's backward pass in one kernel (activation, its gradient, the bias gradient)",
     dict(_ALL_ON, cross_kernel=False, query_view=False, residual_in_norms=False, stash_cross=False)),
    ("+ the cross-attention under autograd through the Triton kernels (forward with the LSE, dQ and dK/dV kernels) "
     "instead of SDPA", dict(_ALL_ON, query_view=False, residual_in_norms=False, stash_cross=False)),
    ("+ q as a view of the merged q/k/v/gate product (rows padded to 128 bytes) instead of a contiguous copy",
     dict(_ALL_ON, residual_in_norms=False, stash_cross=False)),
    ("+ the residual stream's gradient added inside the norms' backward kernel (three [N, C] additions fewer per "
     "block)", dict(_ALL_ON, stash_cross=False)),
    ("+ the cross-attention's output and LSE kept in pinned host memory for the recomputed forward (not computed "
     "twice)", dict(_ALL_ON)),
    ("+ the selection branch's output and LSE kept in pinned host memory too (the selection kernel once per block)",
     dict(_ALL_ON, stash_selection=True)),
)


#: Prefix of the cross-attention kernels in a launch variant (:func:`parse_launch_variants`):
#: ``cross_attention.forward``, ``.dq``, ``.dkdv`` (:func:`model.nets.cross_attention_kernel.overriding`).
CROSS_PREFIX = "cross_attention."


def parse_launch_variants(specs) -> list[tuple[str, dict]]:
    """Extra training-step rows from launch settings (``--launch-variant`` of ``model.reports.dit``). Each spec is
    written as :func:`ssa_kernels.launch.parse_sweep` takes it, the SSA kernels by their table names and the
    cross-attention kernels as ``cross_attention.forward`` / ``.dq`` / ``.dkdv``, e.g.
    ``"selection.FWD:fma_exp_every=2|4;cross_attention.forward:fma_exp_every=2"``; every combination of the listed
    values is one row (all savings on, the settings over the defaults). Returns ``[(row name, {kernel: values})]``;
    ValueError names a bad spec (unknown kernel or setting, an item without a value)."""
    import itertools

    import model.nets.cross_attention_kernel as ck
    from ssa_kernels.launch import parse_sweep

    def check_cross(kernel, values):
        if kernel[len(CROSS_PREFIX):] not in ck.PARTS:
            raise ValueError(f"unknown kernel {kernel!r}; the cross-attention's: "
                             f"{', '.join(CROSS_PREFIX + part for part in ck.PARTS)}")
        ck.check_launch_settings(kernel[len(CROSS_PREFIX):], values)

    rows = []
    for spec in specs or ():
        items = [item for item in (spec.split(";") if isinstance(spec, str) else []) if item.strip()]
        if not items:
            raise ValueError(f"--launch-variant: expected KERNEL:setting=value[|value...][;...], got {spec!r}")
        cross = ";".join(i for i in items if i.startswith(CROSS_PREFIX))
        kernels = (parse_sweep(";".join(i for i in items if not i.startswith(CROSS_PREFIX)))
                   + parse_sweep(cross, check=check_cross))
        for combo in itertools.product(*(values for _, values in kernels)):
            launch = {kernel: values for (kernel, _), values in zip(kernels, combo)}
            name = "; ".join(f"{k} " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in launch.items())
            rows.append((f"+ launch: {name}", launch))
    return rows


@contextlib.contextmanager
def _launch_overrides(launch: dict | None):
    import model.nets.cross_attention_kernel as ck
    from ssa_kernels.launch import overriding

    with contextlib.ExitStack() as stack:
        for kernel, values in (launch or {}).items():
            if kernel.startswith(CROSS_PREFIX):
                stack.enter_context(ck.overriding(kernel[len(CROSS_PREFIX):], values))
            else:
                stack.enter_context(overriding(kernel, values))
        yield


@contextlib.contextmanager
def training_switches(model, *, half_stream: bool, fused_norms: bool, recompute_hidden: bool, gated_residual: bool,
                      norm_projection: bool, reuse_selection: bool, split_queries: int | None,
                      one_concatenation: bool, lean_recompute: bool, gelu_kernel: bool, cross_kernel: bool,
                      query_view: bool, residual_in_norms: bool, stash_cross: bool = True,
                      stash_selection: bool = False, launch: dict | None = None):
    """The switches of one training variant (:data:`TRAINING_VARIANTS`) set for the block inside, and the launch
    settings ``launch`` (``{kernel: values}``, :func:`parse_launch_variants`); afterwards all savings are on again
    and the launch tables are the tables'. Launch settings go through :func:`ssa_kernels.launch.overriding` and
    :func:`model.nets.cross_attention_kernel.overriding`, never by editing the tables."""
    import model.nets.cross_attention_kernel as cross_attention_kernel
    import model.nets.dit as dit
    import model.nets.dit_block as dit_block
    import model.nets.fused as fused
    import model.nets.ssa_layer as ssa_layer
    import model.sparse.layers as layers
    from ssa_kernels.launch import overriding

    def apply(half_stream, fused_norms, recompute_hidden, gated_residual, norm_projection, reuse_selection,
              one_concatenation, lean_recompute, gelu_kernel, cross_kernel, query_view, residual_in_norms,
              stash_cross, stash_selection, **_):
        model.config = model.config.replace(half_stream=half_stream)
        ssa_layer.SPLIT_FUNCTION, layers.FUSED_GELU_GRAD = one_concatenation, gelu_kernel
        ssa_layer.QUERY_VIEW = query_view
        fused.ENABLED, layers.RECOMPUTE_HIDDEN = fused_norms, recompute_hidden
        dit_block.GATED_RESIDUAL, dit_block.NORM_PROJECTION = gated_residual, norm_projection
        dit_block.RESIDUAL_GRAD_IN_NORMS = residual_in_norms
        dit.REUSE_SELECTION, dit.LEAN_RECOMPUTE = reuse_selection, lean_recompute
        dit.STASH_CROSS_ATTENTION, dit.STASH_SELECTION = stash_cross, stash_selection
        cross_attention_kernel.TRAINABLE = cross_kernel

    apply(half_stream, fused_norms, recompute_hidden, gated_residual, norm_projection, reuse_selection,
          one_concatenation, lean_recompute, gelu_kernel, cross_kernel, query_view, residual_in_norms, stash_cross,
          stash_selection)
    try:
        with (overriding("selection.DKDV", dict(max_queries=split_queries)) if split_queries is not None
              else nullcontext()), _launch_overrides(launch):
            yield
    finally:
        apply(**_ALL_ON)


def training_variants(model, loss_fn, optimizer, *, time_fn, reps: int, warmup: int,
                      last: int | None = None, launch_rows=()) -> list[dict]:
    """Time the training step ``loss_fn().backward(); optimizer.step()`` for each of :data:`TRAINING_VARIANTS` (with
    ``last``: its last ``last`` rows only), then for each of ``launch_rows`` (:func:`parse_launch_variants`: all
    savings on, launch settings over the defaults; the record gets ``launch``).

    First, on the unchanged weights, each variant's loss and gradients (no optimizer step) against the first
    variant's (relative norms over all parameters); then the timed steps, with the memory allocated after the
    forward of one extra step. Records: ``name``, ``median_ms``, ``reps_ms``, ``peak_gb``, ``after_forward_gb``,
    ``loss_rel_diff``, ``grad_rel_diff``; a launch row whose step raises (a setting this GPU cannot compile or run)
    gets ``error`` instead and is not timed. The switches are restored afterwards (all savings on)."""
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    variants = TRAINING_VARIANTS if last is None else TRAINING_VARIANTS[-last:]
    variants = (*variants, *((name, dict(_ALL_ON, launch=launch)) for name, launch in launch_rows))
    out = []
    base = {}
    for name, flags in variants:
        try:
            with training_switches(model, **flags):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn()
                loss.backward()
                grads = torch.cat([p.grad.reshape(-1).float() for p in params])
                optimizer.zero_grad(set_to_none=True)
        except Exception as exc:  # a launch setting this GPU cannot run (e.g. out of shared memory): that row only
            if "launch" not in flags:
                raise
            optimizer.zero_grad(set_to_none=True)
            out.append({"name": name, "launch": flags["launch"], "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"[dit report] {name}: {out[-1]['error']}", file=sys.stderr, flush=True)
            continue
        ref_loss, ref_grads = base.setdefault("loss", loss.detach()), base.setdefault("grads", grads)
        out.append({"name": name, "loss_rel_diff": _rel(loss.detach(), ref_loss),
                    "grad_rel_diff": _rel(grads, ref_grads), **({"launch": flags["launch"]} if "launch" in flags
                                                                 else {})})
        del grads
    # nothing of the comparison may stay alive into the timed steps (the gradient vector is 4 bytes per
    # parameter: 2 GB for the released size)
    del loss, ref_loss, ref_grads
    base.clear()
    for record, (name, flags) in zip(out, variants):
        if "error" in record:
            continue
        with training_switches(model, **flags):
            times, peak = time_fn(step, reps=reps, warmup=warmup, device=dev)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            after_forward = None
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                after_forward = torch.cuda.memory_allocated(dev) / 1e9
            loss.backward()
            optimizer.step()
        record.update(median_ms=sorted(times)[len(times) // 2], reps_ms=times, peak_gb=peak,
                      after_forward_gb=after_forward)
    return out
