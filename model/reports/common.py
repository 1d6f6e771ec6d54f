"""What the GPU report scripts share: timing a call (:func:`time_calls`) and writing a report's two files
(:func:`write_report`)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from model.io import atomic_write_json, atomic_write_text

__all__ = ["time_calls", "write_report"]


def sync(device) -> None:
    """Wait for ``device``'s queued work (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, *, reps: int, warmup: int, device) -> dict:
    """``fn()`` ``warmup`` times (the first one timed on the wall clock), then ``reps`` times with CUDA events (wall
    clock on the CPU): times in ms, peaks in GB (None on the CPU) and the last output."""
    cuda = device.type == "cuda"
    gb = 1e-9
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    first_ms = None
    for i in range(warmup):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        if i == 0:
            first_ms = (time.perf_counter() - t0) * 1e3
        del out
    first_peak = torch.cuda.max_memory_allocated(device) * gb if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    for _ in range(reps):
        out = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) * gb if cuda else None
    return {"reps_ms": times, "median_ms": statistics.median(times), "first_call_ms": first_ms,
            "first_call_peak_gb": first_peak, "peak_gb": peak, "output": out}


def write_report(out, name: str, doc: dict, text: str, **json_options) -> None:
    """``OUT/NAME.json`` (``doc``) and ``OUT/NAME.md`` (``text``), each written atomically, the folder made when
    missing; then ``text`` printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", doc, **json_options)
    atomic_write_text(out / f"{name}.md", text)
    print(text)
