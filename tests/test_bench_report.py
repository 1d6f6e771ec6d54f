"""CPU tests of the benchmark's plumbing: compressed k/v as specified, FLOP counting, GPU times replayed into
pytest-benchmark unchanged, the set definitions, and the report (md / json / png) from synthetic runs."""
from __future__ import annotations

import json
import pathlib
import math

import pytest
import torch

from bench import report
from bench.cases import (
    INPUTS_PLAIN,
    INPUTS_SCALED,
    SWEEP_RESOLUTIONS,
    build_items,
    case_coords,
)
from bench.flops import BACKWARD_FACTOR, selected_keys, ssa_work, window_tokens_per_query
from bench.inputs import compressed_kv, compressed_kv_for_layout, compressed_kv_from_blocks, make_ssa_inputs
from ssa_kernels.shapes import CONFIGS, SHAPES
from bench.timing import ReplayClock, Timing, feed_benchmark
from ssa_kernels.layout import build_layout, compression_block_index, selection_block_index
from tests.helpers import random_coords

GPU_NAME = "NVIDIA H100 80GB HBM3"
DATE = "2026-11-25T10:00:00+00:00"
CEILING_TFLOPS = 800.0
MB = 1e6


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------


def _brute_force_kv(k, v, coords, mc, ms, mode):
    """Loop over compression blocks: the spec of BENCHMARK.md, written as plainly as possible (float64)."""
    cid = compression_block_index(coords, compression_block=mc, selection_block=ms)
    rows_k, rows_v = [], []
    for j in range(int(cid.max()) + 1):
        members = [t for t in range(coords.shape[0]) if int(cid[t]) == j]
        kk = torch.stack([k[t].double() for t in members])
        vv = torch.stack([v[t].double() for t in members])
        mean_k = kk.sum(0) / len(members)
        rows_k.append(mean_k * math.sqrt(len(members)) if mode == INPUTS_SCALED else mean_k)
        rows_v.append(vv.sum(0) / len(members))
    return torch.stack(rows_k), torch.stack(rows_v)


@pytest.mark.parametrize("mode", [INPUTS_SCALED, INPUTS_PLAIN])
@pytest.mark.parametrize("mc", [4, 8])
def test_compressed_kv_matches_a_loop_over_blocks(mode, mc):
    gen = torch.Generator().manual_seed(mc)
    coords = random_coords((150, 90), 16, compression_block=mc, selection_block=8, generator=gen)
    k = torch.randn(coords.shape[0], 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(coords.shape[0], 2, 8, generator=gen, dtype=torch.float64)
    k_cmp, v_cmp = compressed_kv(k, v, coords, compression_block=mc, selection_block=8, mode=mode)
    ref_k, ref_v = _brute_force_kv(k, v, coords, mc, 8, mode)
    torch.testing.assert_close(k_cmp, ref_k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_cmp, ref_v, rtol=1e-12, atol=1e-12)
    layout = build_layout(coords, compression_block=mc, selection_block=8, window=8)
    k2, v2 = compressed_kv_for_layout(k, v, layout, mode=mode)
    assert torch.equal(k2, k_cmp) and torch.equal(v2, v_cmp)


def test_benchmark_inputs_are_as_specified_in_bfloat16():
    """make_ssa_inputs: bf16 normal q/k/v, gates in [0, 1), and k_cmp/v_cmp = the block means of those very k/v
    (scaled by sqrt(count)), rounded once to bf16."""
    cfg = CONFIGS["v1.0"]
    coords = case_coords("shell-512", compression_block=cfg.compression_block, selection_block=cfg.selection_block,
                         max_tokens=700)
    layout = build_layout(coords, compression_block=cfg.compression_block, selection_block=cfg.selection_block,
                          window=cfg.window)
    x = make_ssa_inputs(layout, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, mode=INPUTS_SCALED)
    assert x.q.dtype == x.k_cmp.dtype == torch.bfloat16 and x.q.requires_grad and x.k_cmp.requires_grad
    assert x.k_cmp.shape == (layout.num_cmp_blocks, cfg.num_kv_heads, cfg.head_dim)
    assert float(x.gate.min()) > 0 and float(x.gate.max()) < 1
    assert abs(float(x.q.float().mean())) < 0.05 and abs(float(x.q.float().std()) - 1) < 0.05
    ref_k, ref_v = _brute_force_kv(x.k.detach(), x.v.detach(), coords, cfg.compression_block, cfg.selection_block,
                                   INPUTS_SCALED)
    bf16_ulp = 2.0**-7  # relative spacing of bfloat16 (8 significant bits): one rounding of each side
    torch.testing.assert_close(x.k_cmp.detach().double(), ref_k, rtol=bf16_ulp, atol=1e-6)
    torch.testing.assert_close(x.v_cmp.detach().double(), ref_v, rtol=bf16_ulp, atol=1e-6)
    y = make_ssa_inputs(layout, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, mode=INPUTS_SCALED)
    assert torch.equal(x.q, y.q)  # fixed seed


def test_compressed_kv_rejects_bad_input():
    k = torch.zeros(3, 1, 4)
    blocks = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="mode"):
        compressed_kv_from_blocks(k, k, blocks, 2, mode="median")
    with pytest.raises(ValueError, match="at least one token"):
        compressed_kv_from_blocks(k, k, blocks, 3)


# ------------------------------------------------------------------------------------------------------------------
# FLOPs, key counts
# ------------------------------------------------------------------------------------------------------------------


def test_selected_keys_and_window_sizes_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    coords = random_coords((200, 60), 20, compression_block=4, selection_block=8, generator=gen)
    layout = build_layout(coords, compression_block=4, selection_block=8, window=8)
    sid = selection_block_index(coords, compression_block=4, selection_block=8)
    n, hkv, topk = coords.shape[0], 2, 3
    # distinct blocks per (query, kv head), some entries -1 (fewer blocks than topk)
    idx = torch.stack([torch.randperm(layout.num_sel_blocks, generator=gen)[:topk] for _ in range(n * hkv)])
    idx = idx.view(n, hkv, topk).int()
    idx[torch.rand(n, hkv, topk, generator=gen) < 0.2] = -1
    keys = selected_keys(idx, layout.sel_offsets)
    for t in range(n):
        for g in range(hkv):
            chosen = [int(b) for b in idx[t, g] if b >= 0]
            assert int(keys[t, g]) == sum(int((sid == b).sum()) for b in chosen)
    # window: every query's window size, counted directly from the coordinates
    w = (coords[:, 1:] // 8).tolist()
    b = coords[:, 0].tolist()
    direct = sorted(sum(1 for s in range(n) if b[s] == b[t] and w[s] == w[t]) for t in range(n))
    assert sorted(window_tokens_per_query(layout, 0).tolist()) == direct
    work = ssa_work(layout, 4, 16, idx=idx)
    assert work.selected_keys_per_query == pytest.approx(float(keys.double().mean()))
    assert work.backward("op") == pytest.approx(BACKWARD_FACTOR * (work.compression + work.selection + work.window))
    assert work.backward("scoring_topk") is None


# ------------------------------------------------------------------------------------------------------------------
# Timing: the GPU samples reach pytest-benchmark unchanged
# ------------------------------------------------------------------------------------------------------------------


def test_replay_clock_gives_back_each_sample():
    clock = ReplayClock([3.0, 1.0, 2.0])
    got = []
    for _ in range(3):
        start = clock()
        clock.tick()
        got.append(clock() - start)
    assert got == [0.003, 0.001, 0.002]


def test_feed_benchmark_records_the_gpu_samples(benchmark):
    samples = [5.0, 4.0, 7.0, 6.0, 4.5]
    timing = Timing(samples, "triton.testing.do_bench", "cuda", peak_mem_bytes=123)
    feed_benchmark(benchmark, timing, kind="test")
    stats = benchmark.stats.stats
    assert stats.rounds == len(samples)
    assert stats.median == pytest.approx(5.0e-3) and stats.min == pytest.approx(4.0e-3)
    assert benchmark.extra_info["median_ms"] == 5.0 and benchmark.extra_info["peak_mem_bytes"] == 123


# ------------------------------------------------------------------------------------------------------------------
# Sets
# ------------------------------------------------------------------------------------------------------------------


def test_headline_and_full_sets():
    head = build_items(False, ("fa2", "cudnn"))
    ids = {it.id for it in head["ssa_item"]}
    for case in ("shell-1024-v1.1-scaled", "shell-1024-v1.0-scaled", "shell-1024-d64-scaled",
                 "shell-1024-d128-scaled", "shell-512-v1.1-scaled", "shell-2048-v1.1-scaled"):
        for comp in ("op", "compression", "selection", "window"):
            assert {f"{case}-{comp}-fwd", f"{case}-{comp}-fwdbwd"} <= ids
        assert f"{case}-scoring_topk-fwd" in ids and f"{case}-scoring_topk-fwdbwd" not in ids
    dense = {it.id for it in head["dense_item"]}
    # 3 shapes x d32 heads, plus shell-1024's d64 and d128 heads; 2 baselines x fwd / fwdbwd; v1.0 shares v1.1's
    assert "shell-1024-h32kv2d32-fa2-fwdbwd" in dense and "shell-1024-h8kv2d128-cudnn-fwd" in dense
    assert len(dense) == 5 * 2 * 2
    assert all(not it.full_only for v in head.values() for it in v)
    full = build_items(True, ("fa2",))
    cases = {(it.case.shape, it.case.config, it.case.inputs) for it in full["ssa_item"]}
    for shape in SHAPES:
        for config in CONFIGS:
            assert {(shape, config, INPUTS_SCALED), (shape, config, INPUTS_PLAIN)} <= cases
    sweep = {it.case.shape for it in full["ssa_item"] if it.case.shape.startswith("sweep-")}
    assert len(sweep) == len(SWEEP_RESOLUTIONS) - 2  # R = 128, 256 are shell-1024 / shell-2048
    # headline items run before full-only ones
    tiers = [(it.full_only, it.tier) for it in full["ssa_item"]]
    assert max(t for f, t in tiers if not f) < min(t for f, t in tiers if f)


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def _bench(name, ms_samples, **info):
    s = sorted(x / 1e3 for x in ms_samples)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return {"name": name, "fullname": f"bench/test_gpu.py::{name}", "group": None, "params": {},
            "extra_info": {"median_ms": median * 1e3, "samples": len(s), "timer": "synthetic", **info},
            "stats": {"min": s[0], "max": s[-1], "median": median, "mean": sum(s) / len(s), "rounds": len(s)}}


def _ssa(shape, config, inputs, impl, component, mp, ms, tokens, *, keys, peak, ffwd, fbwd, device="cuda"):
    return _bench(f"test_ssa[{shape}-{config}-{inputs}-{component}-{mp}]", [ms * 0.99, ms, ms * 1.02],
                  kind="ssa", shape=shape, config=config, inputs=inputs, impl=impl, component=component,
                  measured_pass=mp, tokens=tokens, hq=32, hkv=2, d=32, selected_keys_per_query=keys,
                  peak_mem_bytes=peak, flops_fwd=ffwd, flops_bwd=fbwd, device=device, dry_run=device != "cuda",
                  compression_blocks=992, selection_blocks=992, shape_desc="shell")


def _dense(shape, impl, mp, ms, tokens, configs, peak, device="cuda"):
    flops = 4.0 * tokens * tokens * 32 * 32
    return _bench(f"test_dense[{shape}-h32kv2d32-{impl}-{mp}]", [ms, ms * 1.01], kind="dense", shape=shape,
                  heads="h32kv2d32", configs=configs, hq=32, hkv=2, d=32, impl=impl, impl_detail=f"{impl} impl",
                  measured_pass=mp, tokens=tokens, peak_mem_bytes=peak, flops_fwd=flops,
                  flops_bwd=BACKWARD_FACTOR * flops, device=device, dry_run=device != "cuda")


def _gpu_raw():
    n1, n2 = 137_124, 549_768
    f1 = 1.0e12
    b = [
        _bench("test_matmul_ceiling[ceiling-matmul]", [1.375], kind="ceiling", tflops=CEILING_TFLOPS, device="cuda"),
        _ssa("shell-1024", "v1.1", "scaled", "ssa", "op", "fwd", 20.0, n1, keys=1100, peak=1e9, ffwd=f1, fbwd=2 * f1),
        _ssa("shell-1024", "v1.1", "scaled", "ssa", "op", "fwdbwd", 50.0, n1, keys=1100, peak=4e9, ffwd=f1,
             fbwd=2 * f1),
        _ssa("shell-1024", "v1.1", "scaled", "ssa-selection", "selection", "fwd", 8.0, n1, keys=1100, peak=5e8,
             ffwd=f1 / 2, fbwd=f1),
        _ssa("shell-1024", "v1.1", "scaled", "ssa-selection", "selection", "fwdbwd", 20.0, n1, keys=1100,
             peak=2e9, ffwd=f1 / 2, fbwd=f1),
        _ssa("shell-1024", "v1.1", "scaled", "ssa-scoring_topk", "scoring_topk", "fwd", 3.0, n1, keys=1100,
             peak=MB, ffwd=f1 / 10, fbwd=None),
        _ssa("shell-1024", "v1.0", "scaled", "ssa", "op", "fwd", 40.0, n1, keys=2035, peak=2e9, ffwd=f1, fbwd=f1),
        _ssa("shell-1024", "v1.0", "scaled", "ssa", "op", "fwdbwd", 100.0, n1, keys=2035, peak=8e9, ffwd=f1,
             fbwd=f1),
        _dense("shell-1024", "fa2", "fwd", 350.0, n1, ["v1.1", "v1.0"], 1e8),
        _dense("shell-1024", "fa2", "fwdbwd", 1350.0, n1, ["v1.1", "v1.0"], 3e9),
        _dense("shell-1024", "cudnn", "fwd", 360.0, n1, ["v1.1", "v1.0"], 1e8),
        _dense("shell-1024", "cudnn", "fwdbwd", 1200.0, n1, ["v1.1", "v1.0"], 3e9),
        _ssa("shell-2048", "v1.1", "scaled", "ssa", "op", "fwd", 90.0, n2, keys=1082, peak=4e9, ffwd=f1, fbwd=f1),
        _ssa("shell-2048", "v1.1", "scaled", "ssa", "op", "fwdbwd", 230.0, n2, keys=1082, peak=16e9, ffwd=f1,
             fbwd=f1),
        _dense("shell-2048", "fa2", "fwd", 5600.0, n2, ["v1.1"], 4e8),
        _dense("shell-2048", "fa2", "fwdbwd", 21600.0, n2, ["v1.1"], 1.2e10),
        _bench("test_layout_build[shell-1024-v1.1-scaled-build]", [2.0, 2.2], kind="layout", shape="shell-1024",
               config="v1.1", impl="layout-build", measured_pass="build", tokens=n1, device="cuda"),
    ]
    return {"machine_info": {}, "commit_info": {}, "datetime": DATE, "version": "5.3.1", "benchmarks": b,
            "ssa_bench": {"env": {"device": "cuda", "gpu": GPU_NAME, "torch": "2.11.0", "triton": "3.6.0",
                                  "cuda": "13.0", "cudnn": 91000, "python": "3.12.3", "date": DATE},
                          "settings": {"set": "headline", "dtype": "bfloat16", "policy": {"warmup_ms": 25}},
                          "skipped": [{"nodeid": "x", "reason": "FlashAttention-3 not importable", "kind": "dense",
                                       "shape": "shell-1024", "what": "fa3", "measured_pass": "fwd"}],
                          "elapsed_s": 300.0}}


def _find(records, **kw):
    hits = [r for r in records if all(r.get(k) == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, hits)
    return hits[0]


def test_report_from_a_gpu_run(tmp_path):
    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(_gpu_raw()))
    out = tmp_path / "reports"
    res = report.make_report(raw_path, out)
    for name in (report.MD_NAME, report.JSON_NAME, report.PLOT_TIME, report.PLOT_SPEEDUP, report.PLOT_MEMORY):
        assert (out / name).exists(), name
    for png in res["plots"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / report.JSON_NAME).read_text())
    recs = doc["records"]
    required = {"shape", "config", "impl", "pass", "ms", "speedup_vs_fa2", "peak_mem_gb", "gpu", "date", "inputs",
                "tokens", "selected_keys_per_query", "tflops"}
    assert all(required <= set(r) for r in recs)
    assert {r["pass"] for r in recs} == {"fwd", "bwd", "build"}
    fwd = _find(recs, shape="shell-1024", config="v1.1", impl="ssa", **{"pass": "fwd"})
    bwd = _find(recs, shape="shell-1024", config="v1.1", impl="ssa", **{"pass": "bwd"})
    assert fwd["ms"] == pytest.approx(20.0) and bwd["ms"] == pytest.approx(30.0)  # (fwd+bwd) - fwd
    assert fwd["speedup_vs_fa2"] == pytest.approx(350.0 * 1.005 / 20.0)  # fa2 median of two samples
    assert bwd["speedup_vs_fa2"] == pytest.approx((1350.0 - 350.0) * 1.005 / 30.0)
    assert bwd["speedups"]["cudnn"] == pytest.approx((1200.0 - 360.0) * 1.005 / 30.0)
    assert fwd["peak_mem_gb"] == pytest.approx(1.0) and bwd["peak_mem_gb"] == pytest.approx(4.0)
    assert fwd["tflops"] == pytest.approx(1e12 / 20e-3 / 1e12) and fwd["selected_keys_per_query"] == 1100
    assert fwd["efficiency"] == pytest.approx(fwd["tflops"] / CEILING_TFLOPS)
    assert fwd["gpu"] == GPU_NAME and fwd["date"] == DATE and fwd["inputs"] == "scaled"
    # the dense baseline is expanded to every configuration sharing its heads
    assert _find(recs, shape="shell-1024", config="v1.0", impl="fa2", **{"pass": "fwd"})["speedup_vs_fa2"] == 1.0
    assert _find(recs, shape="shell-1024", config="v1.0", impl="ssa", **{"pass": "bwd"})["ms"] == pytest.approx(60)
    scoring = _find(recs, shape="shell-1024", impl="ssa-scoring_topk", **{"pass": "fwd"})
    assert not [r for r in recs if r["impl"] == "ssa-scoring_topk" and r["pass"] == "bwd"]
    assert scoring["tflops"] == pytest.approx(0.1e12 / 3e-3 / 1e12)
    md = (out / report.MD_NAME).read_text()
    assert GPU_NAME in md and "torch 2.11.0" in md and "triton 3.6.0" in md and "CUDA 13.0" in md and DATE in md
    assert "## shell-1024 / v1.1" in md and "## shell-2048 / v1.1" in md and "## Headline" in md
    for col in ("fwd ms", "bwd ms", "x FA2 fwd / bwd", "x cuDNN fwd / bwd", "peak mem", "TFLOP/s", "% of ceiling"):
        assert col in md
    assert f"{350.0 * 1.005 / 20.0:.2f}x" in md and "FlashAttention-3 not importable" in md
    assert "layout build 2.10 ms" in md
    assert "CPU figures" not in md
    assert "shell-1024" in report.summary_table(res["records"])


def test_report_from_a_cpu_run(tmp_path):
    raw = {"machine_info": {}, "datetime": DATE, "benchmarks": [
        _bench("test_cpu_layout_build[shell-512]", [12.0, 13.0, 14.0], kind="cpu", device="cpu", shape="shell-512",
               config="v1.1", impl="layout-build", measured_pass="build", tokens=19000),
        _bench("test_cpu_interpreter_vs_reference[kernels-interpreter-fwd]", [3000.0], kind="cpu", device="cpu",
               shape="shell-512", config="v1.1", impl="kernels-interpreter", measured_pass="fwd", tokens=128, hq=4,
               hkv=2, d=16),
        _bench("test_cpu_interpreter_vs_reference[kernels-interpreter-fwdbwd]", [7000.0], kind="cpu", device="cpu",
               shape="shell-512", config="v1.1", impl="kernels-interpreter", measured_pass="fwdbwd", tokens=128,
               hq=4, hkv=2, d=16),
    ], "ssa_bench": {"env": {"device": "cpu", "gpu": None, "torch": "2.13.0+cpu", "triton": "3.6.0"},
                     "settings": {}, "skipped": [{"nodeid": "y", "reason": "GPU timings need a CUDA GPU"}]}}
    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(raw))
    res = report.make_report(raw_path, tmp_path / "out")
    md = res["markdown"].read_text()
    assert "CPU figures, not kernel speed" in md and "GPU timings need a GPU" in md
    for gpu_col in ("x FA2", "peak mem", "TFLOP/s", "% of ceiling"):
        assert gpu_col not in md
    recs = json.loads(res["json"].read_text())["records"]
    bwd = _find(recs, impl="kernels-interpreter", **{"pass": "bwd"})
    assert bwd["ms"] == pytest.approx(4000.0)
    assert all(r["speedup_vs_fa2"] is None and r["peak_mem_gb"] is None and r["tflops"] is None and r["gpu"] is None
               for r in recs)
    assert [p.name for p in res["plots"]] == [report.PLOT_TIME]


def test_gpu_timing_control_flow_with_a_fake_cuda(monkeypatch):
    """bench.timing's CUDA path (do_bench for fast ops, a budgeted fixed count for slow ones, peak memory) run
    against stand-ins for the CUDA calls: this machine has no GPU, and the path must not first fail on the H100."""
    import triton.testing

    from bench import timing

    now = {"ms": 0.0}
    op_ms = {"value": 2.0}

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = now["ms"]

        def elapsed_time(self, other):
            return other.t - self.t

    def op():
        now["ms"] += op_ms["value"]

    calls = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 5000)
    monkeypatch.setattr(timing, "_l2_flusher", lambda: (lambda: None))

    def fake_do_bench(fn, warmup, rep, return_mode):
        calls.append((warmup, rep, return_mode))
        return [op_ms["value"]] * 7

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    policy = timing.TimingPolicy(warmup_ms=25, rep_ms=100, min_samples=5, slow_ms=150, slow_budget_ms=4000,
                                 slow_max_reps=3)
    fast = timing.measure(op, "cuda", policy)
    assert fast.samples_ms == [2.0] * 7 and fast.peak_mem_bytes == 4000 and "do_bench" in fast.method
    assert calls == [(25, 100, "all")]
    op_ms["value"] = 100.0  # rep raised to min_samples x the call
    timing.measure(op, "cuda", policy)
    assert calls[-1][1] == 500.0
    op_ms["value"] = 1500.0  # slow: the timed call + 1 more within the 4 s budget
    slow = timing.measure(op, "cuda", policy)
    assert slow.samples_ms == [1500.0, 1500.0] and "cuda-events x2" in slow.method
    op_ms["value"] = 20_000.0  # slower than the budget: one sample
    assert timing.measure(op, "cuda", policy, measure_memory=False).samples_ms == [20_000.0]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_selection_block_mask_is_the_selection_branch():
    """FlexAttention with the block mask built from a top-k choice equals the reference selection branch."""
    from torch.nn.attention.flex_attention import flex_attention

    from bench.baselines import flex_selection_block_mask
    from bench.harness import ReferenceStandIn

    coords = case_coords("shell-512", compression_block=4, selection_block=8, max_tokens=600)
    layout = build_layout(coords, compression_block=4, selection_block=8, window=8)
    x = make_ssa_inputs(layout, 4, 2, 16, dtype=torch.float64, requires_grad=False)
    _, lse = ReferenceStandIn.compression_attention(x.q, x.k_cmp, x.v_cmp, layout)
    idx = ReferenceStandIn.select_blocks(x.q, x.k_cmp, lse, layout, topk=3)
    ref = ReferenceStandIn.selection_attention(x.q, x.k, x.v, idx, layout)
    mask, density = flex_selection_block_mask(idx, layout.token_sel, layout.sel_offsets, 4)
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (x.q, x.k, x.v))
    out = flex_attention(q4, k4, v4, block_mask=mask, enable_gqa=True).transpose(1, 2)[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert 0 < density <= 1


def test_kernel_profile_times_a_baseline_copy_of_the_kernels(tmp_path):
    """``kernel_profile --baseline DIR`` imports another ``ssa_kernels`` copy beside the current one (its custom ops
    renamed so both register); the copy computes the same op, and a folder without a package is refused."""
    import shutil

    import ssa_kernels
    from bench.kernel_profile import load_baseline

    src = tmp_path / "copy" / "ssa_kernels"
    shutil.copytree(pathlib.Path(ssa_kernels.__file__).parent, src, ignore=shutil.ignore_patterns("__pycache__"))
    base = load_baseline(str(src))
    assert base.__name__ == "ssa_kernels_baseline" and base.spatial_sparse_attention is not \
        ssa_kernels.spatial_sparse_attention
    gen = torch.Generator().manual_seed(0)
    coords = random_coords((50,), 10, compression_block=4, selection_block=8, generator=gen)
    from tests.helpers import random_inputs

    x = [t.requires_grad_() for t in random_inputs(coords, 4, 2, 16, compression_block=4, selection_block=8,
                                                     generator=gen, dtype=torch.float32)]
    outs = []
    for mod in (ssa_kernels, base):
        layout = mod.build_layout(coords, compression_block=4, selection_block=8, window=8)
        o = mod.spatial_sparse_attention(*x, layout, topk=2, shift=0)
        outs.append([o, *torch.autograd.grad(o.square().sum(), x)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="baseline"):
        load_baseline(str(tmp_path))


def test_kernel_profile_launch_holds_one_configuration_per_kernel(capsys):
    """``kernel_profile --launch`` holds one value per setting for the whole run; several values, or a setting the
    kernel lacks, are refused with the option named before any GPU work."""
    from bench.kernel_profile import launch_overrides, main

    assert launch_overrides("selection.FWD:key_outer=1,ko_rows=64;selection.DQ:key_outer=1") == [
        ("selection.FWD", dict(key_outer=1, ko_rows=64)), ("selection.DQ", dict(key_outer=1))]
    assert launch_overrides("") == []
    for bad, said in (("selection.FWD:key_outer=0|1", "2 configurations"), ("selection.FWD:keyy=1", "keyy")):
        with pytest.raises(SystemExit):
            main(["--launch", bad])
        err = capsys.readouterr().err
        assert "--launch" in err and said in err


def test_kernel_timeline_from_a_chrome_trace(tmp_path):
    """``kernel_profile --trace`` turns the profiler's chrome trace into per-stream kernel rows and a plot: only GPU
    kernels, times in ms from the first kernel, in start order, the stream kept."""
    from bench.kernel_profile import kernel_timeline, plot_timeline

    trace = {"traceEvents": [
        {"cat": "cpu_op", "name": "aten::empty", "ts": 5.0, "dur": 1.0},
        {"cat": "kernel", "name": "_sel_bwd_dq_kernel", "ts": 1500.0, "dur": 250.0, "args": {"stream": 7}},
        {"cat": "kernel", "name": "_cmp_bwd_dkdv_kernel", "ts": 1000.0, "dur": 2000.0, "args": {"stream": 13}},
        {"cat": "kernel", "name": "elementwise", "ts": 3500.0, "dur": 10.0, "args": {"stream": 7}},
        {"cat": "kernel", "name": "no duration", "ts": 900.0},
    ]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    rows = kernel_timeline(str(path))
    assert [r["name"] for r in rows] == ["_cmp_bwd_dkdv_kernel", "_sel_bwd_dq_kernel", "elementwise"]
    assert [r["stream"] for r in rows] == [13, 7, 7]
    assert rows[0]["start_ms"] == 0.0 and rows[1]["start_ms"] == pytest.approx(0.5)
    assert rows[0]["ms"] == pytest.approx(2.0)
    png = tmp_path / "timeline.png"
    plot_timeline(rows, str(png), "test")
    assert png.stat().st_size > 1000

