"""Turn a pytest-benchmark JSON of ``pytest bench`` into ``reports/benchmark.md``, ``benchmark.json`` and plots.

    pytest bench --benchmark-only --benchmark-json=reports/raw/benchmark-raw.json
    python -m bench.report [--json reports/raw/benchmark-raw.json] [--out reports]

Each benchmark item measured one pass: ``fwd`` or ``fwdbwd``. Here the backward is derived as the difference
of the two medians (BENCHMARK.md), speedups are baseline time / our time for the same (shape, configuration,
pass) from the same run, useful TFLOP/s come from bench/flops.py's FLOPs recorded with each item, and the
efficiency is against the bf16 matrix-product ceiling measured in the same run.

``benchmark.json`` holds one record per (shape, config, implementation, pass, input set) with at least
``shape, config, impl, pass, ms, speedup_vs_fa2, peak_mem_gb, gpu, date, inputs, tokens,
selected_keys_per_query, tflops``. ``pass`` is ``fwd`` or ``bwd`` (``build`` for the layout build). From a run
without a GPU the report says that its figures are CPU figures and leaves the GPU-only columns out. Both files name
the commit the benchmark ran on (``<sha>``, ``<sha>-dirty`` with uncommitted changes to tracked files; recorded by
:func:`bench.timing.environment_info`, else taken from pytest-benchmark's ``commit_info``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from bench.timing import BYTES_PER_GB, MS_PER_S
from model.io import DIRTY_SUFFIX, atomic_write_json, atomic_write_text, commit_label

DEFAULT_RAW = Path("reports/raw/benchmark-raw.json")
DEFAULT_OUT = Path("reports")
MD_NAME = "benchmark.md"
JSON_NAME = "benchmark.json"
PLOT_TIME = "time_vs_tokens.png"
PLOT_SPEEDUP = "speedup_vs_tokens.png"
PLOT_MEMORY = "memory_vs_tokens.png"
#: Dense baselines, in column order; "fa2" is the reference of ``speedup_vs_fa2``.
BASELINES = ("fa2", "cudnn", "fa3", "fa4", "flex")
BASELINE_NAMES = {"fa2": "FA2", "cudnn": "cuDNN", "fa3": "FA3", "fa4": "FA4", "flex": "Flex"}
#: Row order of the SSA implementations in a table.
SSA_ROW_ORDER = ("ssa", "ssa-compression", "ssa-scoring_topk", "ssa-selection", "ssa-window", "flex-selection")
PASS_FWD, PASS_BWD, PASS_BUILD = "fwd", "bwd", "build"
#: The component name of the whole SSA op (the others are its branches).
WHOLE_OP = "op"
#: Section order of the configurations (the headline first).
CONFIG_ORDER = ("v1.1", "v1.0", "d64", "d128")
MEASURED_FWD, MEASURED_FWDBWD = "fwd", "fwdbwd"
PLOT_DPI = 120
PLOT_SIZE = (11, 4.5)
PERCENT = 100.0


# ------------------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------------------


def _median_ms(bench: dict) -> float:
    """The median of the recorded samples, in ms (pytest-benchmark stores seconds)."""
    stats = bench.get("stats") or {}
    if stats.get("median") is not None:
        return float(stats["median"]) * MS_PER_S
    return float(bench["extra_info"]["median_ms"])


def _gb(nbytes):
    return None if nbytes is None else nbytes / BYTES_PER_GB


def _is_gpu(info: dict) -> bool:
    return info.get("device") == "cuda"


def load_raw(path: Path) -> dict:
    with open(path) as f:
        raw = json.load(f)
    if "benchmarks" not in raw:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks')")
    return raw


def _commit(env: dict, raw: dict) -> str | None:
    """The commit of the run: :func:`model.io.provenance`'s (``<sha>`` or ``<sha>-dirty``) when the run recorded
    it, else pytest-benchmark's ``commit_info`` (``id`` and ``dirty``), else None."""
    if env.get("commit"):
        return env["commit"]
    info = raw.get("commit_info") or {}
    if info.get("id"):
        return info["id"] + (DIRTY_SUFFIX if info.get("dirty") else "")
    return None


def run_meta(raw: dict) -> dict:
    """GPU, versions, commit, date, settings and the bf16 ceiling of the run."""
    extra = raw.get("ssa_bench") or {}
    env = dict(extra.get("env") or raw.get("machine_info", {}).get("ssa_bench_env") or {})
    benches = raw["benchmarks"]
    ceilings = [b["extra_info"].get("tflops") for b in benches
                if b["extra_info"].get("kind") == "ceiling" and _is_gpu(b["extra_info"])]
    ceilings = [c for c in ceilings if c]
    fa2 = sorted({b["extra_info"].get("impl_detail") for b in benches
                  if b["extra_info"].get("kind") == "dense" and b["extra_info"].get("impl") == "fa2"} - {None})
    gpu_run = any(_is_gpu(b["extra_info"]) for b in benches)
    dry = any(b["extra_info"].get("dry_run") for b in benches)
    return {
        "gpu_run": gpu_run,
        "dry_run": dry,
        "gpu": env.get("gpu") if gpu_run else None,
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "cuda": env.get("cuda"),
        "cudnn": env.get("cudnn"),
        "python": env.get("python"),
        "date": raw.get("datetime") or env.get("date"),
        "commit": _commit(env, raw),
        "ceiling_tflops": max(ceilings) if ceilings else None,
        "fa2_impl": fa2,
        "settings": extra.get("settings") or {},
        "skipped": extra.get("skipped") or [],
        "elapsed_s": extra.get("elapsed_s"),
    }


def _group_key(info: dict) -> tuple:
    kind = info.get("kind")
    scope = info.get("heads") if kind == "dense" else info.get("config")
    return (kind, info.get("shape"), scope, info.get("inputs"), info.get("impl"), info.get("device"),
            info.get("tokens"), info.get("hq"), info.get("d"))


def _record(info: dict, meta: dict, *, passname: str, ms: float, config, peak_bytes, flops, extra=None) -> dict:
    gpu = _is_gpu(info)
    tf = flops / (ms / MS_PER_S) / 1e12 if (flops and ms and ms > 0) else None
    rec = {
        "shape": info.get("shape"),
        "config": config,
        "impl": info.get("impl"),
        "pass": passname,
        "ms": ms,
        "speedup_vs_fa2": None,
        "speedups": {},
        "peak_mem_gb": _gb(peak_bytes) if gpu else None,
        "gpu": meta["gpu"] if gpu else None,
        "device": info.get("device"),
        "date": meta["date"],
        "inputs": info.get("inputs"),
        "tokens": info.get("tokens"),
        "selected_keys_per_query": info.get("selected_keys_per_query"),
        "tflops": tf if gpu else None,
        "efficiency": (tf / meta["ceiling_tflops"]) if (gpu and tf and meta["ceiling_tflops"]) else None,
        "kind": info.get("kind"),
        "component": info.get("component"),
        "impl_detail": info.get("impl_detail"),
        "heads": {"hq": info.get("hq"), "hkv": info.get("hkv"), "d": info.get("d")},
        "shape_desc": info.get("shape_desc"),
        "compression_blocks": info.get("compression_blocks"),
        "selection_blocks": info.get("selection_blocks"),
        "dtype": info.get("dtype"),
        "dry_run": bool(info.get("dry_run")),
        "set": info.get("set"),
        "timer": info.get("timer"),
        "samples": info.get("samples"),
        "flops": flops,
    }
    if extra:
        rec.update(extra)
    return rec


def build_records(raw: dict, meta: dict | None = None) -> list[dict]:
    """One record per (shape, config, impl, inputs, pass); see the module docstring."""
    meta = meta or run_meta(raw)
    groups: dict[tuple, dict] = defaultdict(dict)
    infos: dict[tuple, dict] = {}
    for b in raw["benchmarks"]:
        info = b.get("extra_info") or {}
        kind = info.get("kind")
        if kind in (None, "ceiling"):
            continue
        key = _group_key(info)
        groups[key][info.get("measured_pass")] = (_median_ms(b), info, b.get("name"))
        infos[key] = info
    records = []
    for key, passes in groups.items():
        info = infos[key]
        kind = info.get("kind")
        configs = info.get("configs") if kind == "dense" else [info.get("config")]
        for config in configs or [None]:
            if PASS_BUILD in passes:
                ms, inf, _ = passes[PASS_BUILD]
                records.append(_record(inf, meta, passname=PASS_BUILD, ms=ms, config=config,
                                       peak_bytes=inf.get("peak_mem_bytes"), flops=None))
            fwd = passes.get(MEASURED_FWD)
            both = passes.get(MEASURED_FWDBWD)
            if fwd:
                ms, inf, _ = fwd
                records.append(_record(inf, meta, passname=PASS_FWD, ms=ms, config=config,
                                       peak_bytes=inf.get("peak_mem_bytes"), flops=inf.get("flops_fwd")))
            if fwd and both:
                ms_both, inf_both, _ = both
                records.append(_record(
                    inf_both, meta, passname=PASS_BWD, ms=ms_both - fwd[0], config=config,
                    peak_bytes=inf_both.get("peak_mem_bytes"), flops=inf_both.get("flops_bwd"),
                    extra={"fwd_bwd_ms": ms_both, "peak_mem_is": "fwd+bwd"}))
    _add_speedups(records)
    records.sort(key=_sort_key)
    return records


def _add_speedups(records: list[dict]) -> None:
    base = {}
    for r in records:
        if r["kind"] == "dense" and r["device"] == "cuda":
            base[(r["shape"], r["config"], r["pass"], r["impl"])] = r["ms"]
    for r in records:
        if r["device"] != "cuda" or r["pass"] not in (PASS_FWD, PASS_BWD) or not r["ms"] or r["ms"] <= 0:
            continue
        if not (r["kind"] == "dense" or (r["kind"] == "ssa" and r["component"] == WHOLE_OP)):
            continue  # a branch against full attention is no like-for-like comparison
        for b in BASELINES:
            ms_b = base.get((r["shape"], r["config"], r["pass"], b))
            if ms_b is not None and b != r["impl"]:
                r["speedups"][b] = ms_b / r["ms"]
        r["speedup_vs_fa2"] = 1.0 if r["impl"] == "fa2" and r["kind"] == "dense" else r["speedups"].get("fa2")


def _impl_rank(r):
    impl = r["impl"] or ""
    if impl in SSA_ROW_ORDER:
        return (0, SSA_ROW_ORDER.index(impl))
    if impl.startswith("ssa") or impl.startswith("reference"):
        return (0, len(SSA_ROW_ORDER))
    if impl in BASELINES:
        return (1, BASELINES.index(impl))
    return (2, 0)


def _sort_key(r):
    pass_rank = {PASS_FWD: 0, PASS_BWD: 1, PASS_BUILD: 2}.get(r["pass"], 3)
    return (r["tokens"] or 0, r["shape"] or "", r["config"] or "", _impl_rank(r), r["impl"] or "",
            r["inputs"] or "", pass_rank)


# ------------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------------


def _fmt_ms(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _fmt(x, fmt="{:.1f}", none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _pair(a, b, fmt):
    if a is None and b is None:
        return "-"
    return f"{_fmt(a, fmt)} / {_fmt(b, fmt)}"


def _config_rank(config):
    return CONFIG_ORDER.index(config) if config in CONFIG_ORDER else len(CONFIG_ORDER)


def _rows_by_case(records):
    """``{(shape, config): rows}`` ordered by tokens, then configuration (headline first)."""
    cases = defaultdict(list)
    for r in records:
        cases[(r["shape"], r["config"])].append(r)
    order = sorted(cases, key=lambda k: (min(r["tokens"] or 0 for r in cases[k]), k[0] or "", _config_rank(k[1]),
                                         k[1] or ""))
    return {k: cases[k] for k in order}


def _present_baselines(records):
    return [b for b in BASELINES if any(r["impl"] == b and r["kind"] == "dense" for r in records)]


def _gpu_table(rows: list[dict], baselines: list[str]) -> list[str]:
    head = ["implementation", "inputs", "keys / query", "fwd ms", "bwd ms"]
    head += [f"x {BASELINE_NAMES[b]} fwd / bwd" for b in baselines]
    head += ["peak mem fwd / fwd+bwd GB", "TFLOP/s fwd / bwd", "% of ceiling fwd / bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by_impl = defaultdict(dict)
    for r in rows:
        if r["pass"] in (PASS_FWD, PASS_BWD):
            by_impl[(r["impl"], r["inputs"])][r["pass"]] = r
    for (impl, inputs), pr in sorted(by_impl.items(), key=lambda kv: (_impl_rank(next(iter(kv[1].values()))),
                                                                         kv[0][1] or "")):
        f, b = pr.get(PASS_FWD), pr.get(PASS_BWD)
        any_r = f or b
        keys = any_r.get("selected_keys_per_query")
        cells = [f"`{impl}`", inputs or ("-" if any_r["kind"] != "dense" else "q,k,v normal"),
                 _fmt(keys, "{:,.0f}"), _fmt_ms(f and f["ms"]), _fmt_ms(b and b["ms"])]
        for base in baselines:
            sf = f and f["speedups"].get(base)
            sb = b and b["speedups"].get(base)
            cells.append(_pair(sf, sb, "{:.2f}x") if impl != base else "-")
        cells.append(_pair(f and f["peak_mem_gb"], b and b["peak_mem_gb"], "{:.2f}"))
        cells.append(_pair(f and f["tflops"], b and b["tflops"], "{:.0f}"))
        eff_f = f and f["efficiency"] and f["efficiency"] * PERCENT
        eff_b = b and b["efficiency"] and b["efficiency"] * PERCENT
        cells.append(_pair(eff_f, eff_b, "{:.0f}%"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _cpu_table(rows: list[dict], *, with_shape: bool = False) -> list[str]:
    head = (["shape", "config"] if with_shape else []) + ["implementation", "inputs", "device", "tokens",
                                                          "heads (Hq, Hkv, D)", "fwd ms", "bwd ms", "build ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by_impl = defaultdict(dict)
    for r in rows:
        by_impl[(r["shape"], r["config"], r["impl"], r["inputs"], r["device"], r["tokens"])][r["pass"]] = r

    def order(kv):
        shape, config, impl, inputs, _, tokens = kv[0]
        return (tokens or 0, shape or "", config or "", _impl_rank(next(iter(kv[1].values()))), impl or "",
                inputs or "")

    for (shape, config, impl, inputs, device, _), pr in sorted(by_impl.items(), key=order):
        any_r = next(iter(pr.values()))
        h = any_r["heads"]
        heads = "-" if h.get("hq") is None else f"{h['hq']}, {h['hkv']}, {h['d']}"
        cells = ([shape or "-", config or "-"] if with_shape else [])
        cells += [f"`{impl}`", inputs or "-", device or "cpu", _fmt(any_r["tokens"], "{:,}"), heads,
                 _fmt_ms(pr.get(PASS_FWD, {}).get("ms")), _fmt_ms(pr.get(PASS_BWD, {}).get("ms")),
                 _fmt_ms(pr.get(PASS_BUILD, {}).get("ms"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _header(meta: dict) -> list[str]:
    lines = ["# SSA benchmark", ""]
    if meta["gpu_run"]:
        lines += [f"**GPU figures.** GPU: **{meta['gpu']}**; torch {meta['torch']}, triton {meta['triton']}, "
                  f"CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, Python {meta['python']}; date {meta['date']}; "
                  f"{commit_label(meta['commit'])}.", ""]
        if meta["ceiling_tflops"]:
            lines += [f"bf16 matrix-product ceiling measured in this run: **{meta['ceiling_tflops']:.0f} TFLOP/s** "
                      "(the reference of the efficiency columns).", ""]
        if meta["fa2_impl"]:
            lines += [f"FlashAttention-2 baseline: {', '.join(meta['fa2_impl'])}.", ""]
    else:
        what = "a dry run of the GPU code paths on CPU (tiny inputs, Triton interpreter)" if meta["dry_run"] else \
            "the CPU part of the benchmark"
        lines += ["**CPU figures, not kernel speed.** This run had no CUDA GPU: GPU timings need a GPU. The figures "
                  f"below come from {what}; speedups, peak GPU memory and efficiency are GPU-only and left out.",
                  "", f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; date {meta['date']}; "
                  f"{commit_label(meta['commit'])}.", ""]
    s = meta["settings"]
    pol = s.get("policy") or {}
    if s:
        text = f"Set: {s.get('set', '?')}; dtype {s.get('dtype', '?')}."
        if meta["gpu_run"] and all(pol.get(k) is not None for k in ("warmup_ms", "rep_ms", "min_samples", "slow_ms",
                                                                     "slow_max_reps", "slow_budget_ms")):
            text += (f" Timing: one warm-up call, one timed call; then do_bench (warm-up {pol['warmup_ms']:g} ms, "
                     f"rep {pol['rep_ms']:g} ms, at least {pol['min_samples']} samples), or for ops slower than "
                     f"{pol['slow_ms']:g} ms up to {pol['slow_max_reps']} timed calls within "
                     f"{pol['slow_budget_ms']:g} ms.")
        if meta["elapsed_s"] is not None:
            text += f" The run took {meta['elapsed_s']:.0f} s."
        lines += [text, ""]
    how = ("How to read: `fwd` = the forward (inputs requiring grad, as in training); `bwd` = median(fwd+bwd) - "
           "median(fwd); ")
    if meta["gpu_run"]:
        how += ("times are medians of per-repetition CUDA-event times. Speedup `x B` = time of baseline B / time "
                "of the row, same shape, configuration and pass, same process. Peak memory: above the inputs, of "
                "the forward / of forward + backward. Throughput: useful FLOPs (BENCHMARK.md) per second, and as a "
                "share of the ceiling. `keys / query`: mean tokens in the selected blocks per (query, kv head). ")
    else:
        how += "times are CPU medians (wall-clock of synchronous calls). "
    how += "Inputs `scaled`: k_cmp = mean(k) * sqrt(count) (headline); `plain-mean`: k_cmp = mean(k)."
    lines += [how, ""]
    return lines


def _headline(records) -> list[str]:
    want = ("shell-1024", "v1.1")
    f = [r for r in records if (r["shape"], r["config"]) == want and r["impl"] == "ssa" and r["inputs"] == "scaled"
         and r["device"] == "cuda"]
    by = {r["pass"]: r for r in f}
    if not by:
        return []
    parts = []
    for p in (PASS_FWD, PASS_BWD):
        r = by.get(p)
        if r:
            sp = r["speedup_vs_fa2"]
            parts.append(f"{p} {_fmt_ms(r['ms'])} ms" + (f" ({sp:.1f}x FA2)" if sp else ""))
    mem = by.get(PASS_BWD, {}).get("peak_mem_gb")
    keys = next(iter(by.values()))["selected_keys_per_query"]
    return ["## Headline: shell-1024 / v1.1 / scaled", "",
            f"SSA whole op: {', '.join(parts)}; peak memory fwd+bwd {_fmt(mem, '{:.2f}')} GB; "
            f"{_fmt(keys, '{:,.0f}')} selected keys per query.", ""]


def _sweep_section(records) -> list[str]:
    ssa = {(r["shape"], r["pass"]): r for r in records if r["impl"] == "ssa" and r["config"] == "v1.1"
           and r["inputs"] == "scaled" and r["device"] == "cuda"}
    fa2 = {(r["shape"], r["pass"]): r for r in records if r["impl"] == "fa2" and r["config"] == "v1.1"
           and r["device"] == "cuda"}
    shapes = sorted({s for s, _ in ssa}, key=lambda s: ssa.get((s, PASS_FWD), ssa.get((s, PASS_BWD)))["tokens"])
    if not any(s.startswith("sweep-") for s in shapes):
        return []
    lines = ["## Scaling sweep (v1.1, scaled inputs)", "",
             "Shells at tau = 1.8 of other resolutions (`sweep-R<R>`), with shell-1024 (R = 128) and shell-2048 "
             "(R = 256) as the sweep's points at those resolutions.", "",
             "| shape | tokens | SSA fwd / bwd ms | FA2 fwd / bwd ms | x FA2 fwd / bwd | SSA peak mem fwd+bwd GB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in shapes:
        f, b = ssa.get((s, PASS_FWD)), ssa.get((s, PASS_BWD))
        af, ab = fa2.get((s, PASS_FWD)), fa2.get((s, PASS_BWD))
        tokens = (f or b)["tokens"]
        lines.append(f"| {s} | {tokens:,} | {_fmt_ms(f and f['ms'])} / {_fmt_ms(b and b['ms'])} | "
                     f"{_fmt_ms(af and af['ms'])} / {_fmt_ms(ab and ab['ms'])} | "
                     f"{_pair(f and f['speedup_vs_fa2'], b and b['speedup_vs_fa2'], '{:.2f}x')} | "
                     f"{_fmt(b and b['peak_mem_gb'], '{:.2f}')} |")
    return lines + [""]


def _skipped_section(meta) -> list[str]:
    """One row per skip reason: which items (components or baselines), on which shapes, how many."""
    if not meta["skipped"]:
        return []
    by_reason = defaultdict(list)
    for s in meta["skipped"]:
        by_reason[s["reason"]].append(s)
    lines = ["## Not measured", "", "| reason | items | shapes |", "| --- | --- | --- |"]
    for reason, skips in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        labels = sorted({s.get("what") or s.get("kind") or "item" for s in skips})
        shapes = sorted({s.get("shape") for s in skips if s.get("shape")})
        lines.append(f"| {reason.replace('|', '/')} | {', '.join(labels)} ({len(skips)}) | "
                     f"{', '.join(shapes) or '-'} |")
    return lines + [""]


def render_markdown(records: list[dict], meta: dict, plots: list[str]) -> str:
    lines = _header(meta)
    if meta["gpu_run"]:
        lines += _headline(records)
    gpu_rows = [r for r in records if r["device"] == "cuda"]
    cpu_rows = [r for r in records if r["device"] != "cuda"]
    baselines = _present_baselines(gpu_rows)
    for (shape, config), rows in _rows_by_case(gpu_rows).items():
        any_r = rows[0]
        layout = [r for r in rows if r["pass"] == PASS_BUILD]
        ssa_any = next((r for r in rows if r["kind"] == "ssa"), any_r)
        desc = [f"{any_r['tokens']:,} tokens" if any_r["tokens"] else None, any_r.get("shape_desc"),
                f"{ssa_any['compression_blocks']:,} compression blocks" if ssa_any.get("compression_blocks") else None,
                f"{ssa_any['selection_blocks']:,} selection blocks" if ssa_any.get("selection_blocks") else None,
                f"layout build {_fmt_ms(layout[0]['ms'])} ms" if layout else None]
        lines += [f"## {shape} / {config}", "", "; ".join(d for d in desc if d) + ".", ""]
        lines += _gpu_table(rows, baselines) + [""]
    if meta["gpu_run"]:
        lines += _sweep_section(records)
    dry_rows = [r for r in cpu_rows if r["dry_run"]]
    part_rows = [r for r in cpu_rows if not r["dry_run"]]
    if dry_rows:
        lines += ["## Dry run of the GPU items on CPU (checks the code paths; not kernel speed)", ""]
        for (shape, config), rows in _rows_by_case(dry_rows).items():
            lines += [f"### {shape} / {config or '-'}", ""] + _cpu_table(rows) + [""]
    if part_rows:
        lines += ["## CPU part (CPU wall-clock; interpreter and reference times are not kernel speed)", "",
                  "All CPU-part items in one table: the layout order and build on the full token sets, the float32 "
                  "reference on 1,000 tokens, and reference vs kernels under the Triton interpreter.", ""]
        lines += _cpu_table(part_rows, with_shape=True) + [""]
    lines += _skipped_section(meta)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    else:
        lines += ["No plots: no record of this run has the data they need.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------------


def _series(records, pred, value):
    """``{label: [(tokens, value), ...]}`` sorted by tokens."""
    out = defaultdict(list)
    for r in records:
        label = pred(r)
        v = value(r)
        if label and v is not None and r["tokens"]:
            out[label].append((r["tokens"], v))
    return {k: sorted(set(v)) for k, v in out.items()}  # a baseline shared by two configurations: one point


def _label(r, gpu_only=True):
    if gpu_only and r["device"] != "cuda":
        return None
    if r["kind"] == "ssa" and r["impl"] == "ssa" and r["inputs"] in (None, "scaled"):
        return f"SSA {r['config']}"
    if r["kind"] == "dense":
        h = r["heads"]
        return f"{BASELINE_NAMES.get(r['impl'], r['impl'])} (Hq {h['hq']}, D {h['d']})"
    return None


def _cpu_label(r):
    if r["device"] == "cuda":
        return None
    hq = r["heads"].get("hq")
    return f"{r['impl']} [{r['device']}" + (f", Hq {hq}]" if hq else "]")


def _plot_passes(path, series_by_pass, ylabel, title, *, logy=True, hline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series_by_pass), figsize=PLOT_SIZE, squeeze=False)
    for ax, (pname, series) in zip(axes[0], series_by_pass.items()):
        for label, pts in sorted(series.items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {pname}")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def write_plots(records: list[dict], meta: dict, out: Path) -> list[str]:
    """Write the PNGs that have data; return their file names."""
    written = []
    if meta["gpu_run"]:
        time_s = {p: _series([r for r in records if r["pass"] == p], _label, lambda r: r["ms"])
                  for p in (PASS_FWD, PASS_BWD)}
        if any(time_s.values()):
            _plot_passes(out / PLOT_TIME, time_s, "ms (median)", "time", logy=True)
            written.append(PLOT_TIME)

        def sp_label(r):
            return _label(r) if r["kind"] == "ssa" else None

        sp = {}
        for p in (PASS_FWD, PASS_BWD):
            series = {}
            for b in _present_baselines(records):
                s = _series([r for r in records if r["pass"] == p], sp_label, lambda r, b=b: r["speedups"].get(b))
                series.update({f"{k} vs {BASELINE_NAMES[b]}": v for k, v in s.items()})
            sp[p] = series
        if any(sp.values()):
            _plot_passes(out / PLOT_SPEEDUP, sp, "speedup (baseline time / SSA time)", "speedup", logy=True, hline=1)
            written.append(PLOT_SPEEDUP)
        mem = {"fwd+bwd": _series([r for r in records if r["pass"] == PASS_BWD], _label, lambda r: r["peak_mem_gb"])}
        if any(mem.values()):
            _plot_passes(out / PLOT_MEMORY, mem, "peak memory above inputs (GB)", "memory", logy=True)
            written.append(PLOT_MEMORY)
    else:
        part = [r for r in records if not r["dry_run"]]
        rows = part or records  # the CPU part when it ran, else the dry run's items
        series = {p: _series([r for r in rows if r["pass"] == p], _cpu_label, lambda r: r["ms"])
                  for p in (PASS_FWD, PASS_BWD, PASS_BUILD)}
        series = {k: v for k, v in series.items() if v}
        if series:
            _plot_passes(out / PLOT_TIME, series, "ms (CPU)", "CPU time", logy=True)
            written.append(PLOT_TIME)
    return written


# ------------------------------------------------------------------------------------------------------------------
# Summary and entry point
# ------------------------------------------------------------------------------------------------------------------


def summary_table(records: list[dict]) -> str:
    """A short plain-text table of the whole op against FA2, one line per (shape, config, inputs)."""
    rows = defaultdict(dict)
    for r in records:
        if r["impl"] in ("ssa", "fa2") and r["pass"] in (PASS_FWD, PASS_BWD):
            key = (r["tokens"] or 0, r["shape"], r["config"], r["inputs"] if r["impl"] == "ssa" else None)
            rows[key][(r["impl"], r["pass"])] = r
    head = f"{'shape':<16}{'config':<7}{'inputs':<11}{'tokens':>9}{'keys/q':>8}{'SSA fwd':>10}{'SSA bwd':>10}" \
           f"{'FA2 fwd':>10}{'FA2 bwd':>10}{'x fwd':>8}{'x bwd':>8}{'mem GB':>8}"
    lines = [head, "-" * len(head)]
    ordered = sorted(rows.items(), key=lambda kv: tuple("" if x is None else x for x in kv[0]))
    for (tokens, shape, config, inputs), d in ordered:
        if inputs is None:
            continue
        fa = rows.get((tokens, shape, config, None), {})
        f, b = d.get(("ssa", PASS_FWD)), d.get(("ssa", PASS_BWD))
        af, ab = fa.get(("fa2", PASS_FWD)), fa.get(("fa2", PASS_BWD))
        keys = (f or b or {}).get("selected_keys_per_query")
        lines.append(
            f"{shape:<16}{config:<7}{inputs:<11}{tokens:>9,}{_fmt(keys, '{:.0f}'):>8}"
            f"{_fmt_ms(f and f['ms']):>10}{_fmt_ms(b and b['ms']):>10}{_fmt_ms(af and af['ms']):>10}"
            f"{_fmt_ms(ab and ab['ms']):>10}{_fmt(f and f['speedup_vs_fa2'], '{:.1f}'):>8}"
            f"{_fmt(b and b['speedup_vs_fa2'], '{:.1f}'):>8}{_fmt(b and b['peak_mem_gb'], '{:.2f}'):>8}")
    if len(lines) == 2:
        lines.append("(no whole-op SSA records in this run)")
    return "\n".join(lines)


def make_report(raw_path: Path, out: Path) -> dict:
    """Write benchmark.md, benchmark.json and the plots under ``out``; return paths, records and meta."""
    raw = load_raw(raw_path)
    meta = run_meta(raw)
    records = build_records(raw, meta)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(records, meta, out)
    md = render_markdown(records, meta, plots)
    atomic_write_text(out / MD_NAME, md)
    doc = {"gpu": meta["gpu"], "date": meta["date"], "commit": meta["commit"], "gpu_run": meta["gpu_run"], "dry_run": meta["dry_run"],
           "versions": {k: meta[k] for k in ("torch", "triton", "cuda", "cudnn", "python")},
           "ceiling_tflops": meta["ceiling_tflops"], "fa2_impl": meta["fa2_impl"], "settings": meta["settings"],
           "source": str(raw_path), "records": records, "skipped": meta["skipped"]}
    atomic_write_json(out / JSON_NAME, doc)
    return {"markdown": out / MD_NAME, "json": out / JSON_NAME, "plots": [out / p for p in plots],
            "records": records, "meta": meta}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_RAW, help=f"pytest-benchmark JSON (default {DEFAULT_RAW})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if not args.json.exists():
        print(f"no such file: {args.json}. Make it with: pytest bench --benchmark-only "
              f"--benchmark-json={DEFAULT_RAW}", file=sys.stderr)
        return 2
    res = make_report(args.json, args.out)
    print(f"wrote {res['markdown']}, {res['json']}" + "".join(f", {p}" for p in res["plots"]))
    if not res["meta"]["gpu_run"]:
        print("CPU figures (no GPU in this run): not kernel speed.")
    print(summary_table(res["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
