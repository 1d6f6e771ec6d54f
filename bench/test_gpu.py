"""The GPU benchmark: SSA (whole op and each branch), the layout build, dense baselines, the matmul ceiling.

Every item measures one pass (``fwd`` or ``fwdbwd``); ``python -m bench.report`` derives the backward as
(fwd+bwd) - fwd. Times are GPU medians (bench/timing.py) replayed into pytest-benchmark; each record's
``extra_info`` holds what the report needs (shape, configuration, inputs, tokens, selected keys per query, FLOPs,
peak memory, implementation). Items parametrised by bench/conftest.py (headline set, or ``--full``).
"""
from __future__ import annotations

import time

import pytest
import torch

from bench.cases import COMPONENT_FLEX_SELECTION, COMPONENT_OP, case_coords, shape_description
from bench.flops import BACKWARD_FACTOR, dense_flops, matmul_flops, tflops
from bench.harness import IMPL_SSA, Skip
from bench.timing import feed_benchmark, measure

#: Record kinds (``extra_info["kind"]``), read by bench/report.py.
KIND_SSA, KIND_LAYOUT, KIND_DENSE, KIND_CEILING = "ssa", "layout", "dense", "ceiling"


def _common(bench, item) -> dict:
    return {"dry_run": bench.dry_run, "device": bench.timed_on, "dtype": str(bench.dtype).replace("torch.", ""),
            "set": "full" if item.full_only else "headline", "date": bench.env()["date"]}


def _run(bench, benchmark, item, tokens, op_fn, info: dict) -> None:
    """Budget check, measure, feed pytest-benchmark, book the cost. OOM becomes a skip with the reason."""
    bench.check_budget(item, tokens)
    t0 = time.monotonic()
    try:
        timing = measure(op_fn, bench.device, bench.policy)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"CUDA out of memory: {str(exc).splitlines()[0]}")
    finally:
        bench.record_cost(item, tokens, time.monotonic() - t0)
    feed_benchmark(benchmark, timing, **info)


def test_matmul_ceiling(benchmark, bench, ceiling_item):
    """The bf16 matrix-product ceiling of this GPU, measured in the same run as everything else."""
    bench.require_gpu()
    size = bench.matmul_size
    gen = torch.Generator(device=bench.device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=bench.device).to(bench.dtype)
    b = torch.randn(size, size, generator=gen, device=bench.device).to(bench.dtype)
    flops = matmul_flops(size, size, size)
    benchmark.group = "matmul ceiling"
    timing = measure(lambda: a @ b, bench.device, bench.policy, measure_memory=False)
    feed_benchmark(benchmark, timing, kind=KIND_CEILING, impl="torch.matmul", m=size, n=size, k=size, flops=flops,
                   tflops=tflops(flops, timing.median_ms), **_common(bench, ceiling_item))


def test_ssa(benchmark, bench, ssa_item):
    """One SSA component (whole op or a branch), one measured pass, on one case."""
    bench.require_gpu()
    case, comp, passname = ssa_item.case, ssa_item.what, ssa_item.passname
    if comp == COMPONENT_FLEX_SELECTION:
        if "flex" not in bench.baselines:
            pytest.skip("FlexAttention not among --baselines")
    try:
        ctx = bench.ssa_context(case)
        if comp == COMPONENT_FLEX_SELECTION and ctx.num_tokens > bench.flex_max_tokens:
            pytest.skip(f"FlexAttention selection mask: {ctx.num_tokens} tokens > --flex-max-tokens "
                        f"{bench.flex_max_tokens}")
        op = ctx.op(comp)
        fn = op.closure(passname)
    except Skip as exc:
        pytest.skip(str(exc))
    except Exception as exc:
        if comp != COMPONENT_FLEX_SELECTION:
            raise
        pytest.skip(_foreign_reason("FlexAttention selection block mask", exc))
    cfg, work = case.cfg, ctx.work
    impl = "flex-selection" if comp == COMPONENT_FLEX_SELECTION else (
        op.impl if comp == COMPONENT_OP else f"{op.impl}-{comp}")
    benchmark.group = f"{case.shape} / {case.config} / {case.inputs}"
    info = dict(
        kind=KIND_SSA, shape=case.shape, shape_desc=shape_description(case.shape), config=case.config,
        inputs=case.inputs, component=comp, impl=impl, impl_detail=op.impl, measured_pass=passname,
        tokens=ctx.num_tokens, compression_blocks=work.compression_blocks, selection_blocks=work.selection_blocks,
        hq=ctx.heads[0], hkv=ctx.heads[1], d=ctx.heads[2], m_cmp=cfg.compression_block,
        m_slc=cfg.selection_block, topk=cfg.topk, m_win=cfg.window,
        selected_keys_per_query=work.selected_keys_per_query, window_keys_per_query=work.window_keys_per_query,
        flops_fwd=work.forward(comp), flops_bwd=work.backward(comp), kernels_are_ours=op.impl == IMPL_SSA,
        **op.notes, **_common(bench, ssa_item),
    )
    if comp == COMPONENT_FLEX_SELECTION:
        _run_foreign(bench, benchmark, ssa_item, ctx.num_tokens, fn, info, op.impl)
    else:
        _run(bench, benchmark, ssa_item, ctx.num_tokens, fn, info)


def test_layout_build(benchmark, bench, layout_item):
    """``build_layout`` from coordinates already on the device (host syncs included: it reads sizes back)."""
    bench.require_gpu()
    case = layout_item.case
    cfg = case.cfg
    coords = case_coords(case.shape, compression_block=cfg.compression_block, selection_block=cfg.selection_block,
                         max_tokens=bench.max_tokens).to(bench.device)
    build = bench.api().build_layout
    layout = build(coords, compression_block=cfg.compression_block, selection_block=cfg.selection_block,
                   window=cfg.window)
    benchmark.group = f"{case.shape} / {case.config} / layout"
    info = dict(kind=KIND_LAYOUT, shape=case.shape, shape_desc=shape_description(case.shape), config=case.config,
                impl="layout-build", measured_pass="build", tokens=layout.num_tokens,
                compression_blocks=layout.num_cmp_blocks, selection_blocks=layout.num_sel_blocks,
                windows={str(s): p.num_windows for s, p in layout.windows.items()},
                **_common(bench, layout_item))
    _run(bench, benchmark, layout_item, layout.num_tokens,
         lambda: build(coords, compression_block=cfg.compression_block, selection_block=cfg.selection_block,
                       window=cfg.window), info)


def test_dense(benchmark, bench, dense_item):
    """A dense full-attention baseline on the same tokens and heads (fwd or fwd+bwd)."""
    bench.require_gpu()
    dcase, impl, passname = dense_item.dcase, dense_item.what, dense_item.passname
    limit = bench.flex_max_tokens if impl == "flex" else bench.dense_max_tokens
    ctx = bench.dense_context(dcase)
    if ctx.num_tokens > limit:
        opt = "--flex-max-tokens" if impl == "flex" else "--dense-max-tokens"
        pytest.skip(f"{impl}: {ctx.num_tokens} tokens > {opt} {limit}")
    try:
        op = ctx.op(impl, dry_run=bench.dry_run)
        fn = op.closure(passname)
    except Skip as exc:
        pytest.skip(str(exc))
    except Exception as exc:
        pytest.skip(_foreign_reason(impl, exc))
    hq, hkv, d = ctx.heads
    flops = dense_flops(ctx.num_tokens, hq, d)
    benchmark.group = f"{dcase.shape} / {dcase.heads} / dense"
    info = dict(kind=KIND_DENSE, shape=dcase.shape, shape_desc=shape_description(dcase.shape), heads=dcase.heads,
                configs=list(dcase.configs), hq=hq, hkv=hkv, d=d,
                impl=impl, impl_detail=op.impl, measured_pass=passname, tokens=ctx.num_tokens, flops_fwd=flops,
                flops_bwd=BACKWARD_FACTOR * flops, **op.notes, **_common(bench, dense_item))
    _run_foreign(bench, benchmark, dense_item, ctx.num_tokens, fn, info, f"{impl} ({op.impl})")


def _run_foreign(bench, benchmark, item, tokens, fn, info, label) -> None:
    """:func:`_run` for code that is not ours (baselines, FlexAttention): an exception it raises (a backend that
    refuses these inputs, a compiler failure) is a finding recorded as a skip with the reason, not a crash."""
    try:
        _run(bench, benchmark, item, tokens, fn, info)
    except Exception as exc:
        pytest.skip(_foreign_reason(label, exc))


#: Longest skip reason kept from a foreign exception's message.
MAX_REASON_CHARS = 500


def _foreign_reason(label: str, exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{label} raised {type(exc).__name__}: {first}"[:MAX_REASON_CHARS]

