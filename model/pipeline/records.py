"""Per-stage records of a cascade run: wall time and peak GPU memory of each stage (:class:`StageRecord`), taken by a
:class:`StageRecorder` around each stage of :meth:`model.pipeline.cascade.ImageToMesh.generate`; on CUDA also the
page-locked host memory the stage had to allocate (``pinned_allocs`` / ``pinned_alloc_seconds`` in ``info`` when
there was any: a fresh 1.4 GB block takes about a second, one from PyTorch's pinned-memory cache nothing,
reports/raw/mesh_transfer_d9627ea.txt); optionally a ``torch.profiler`` summary of chosen stages
(``ImageToMesh.profile_stages``: the GPU kernels by time, the GPU's busy time against the wall time)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

__all__ = ["StageRecord", "StageRecorder"]


@dataclass
class StageRecord:
    """One stage of one run: wall ``seconds`` (the device synchronised at both ends), ``peak_bytes`` (largest
    ``torch.cuda.max_memory_allocated`` during the stage; None on the CPU) and ``info`` (token and voxel counts,
    ``step_seconds`` of the sampling stages, ...)."""

    name: str
    seconds: float = 0.0
    peak_bytes: int | None = None
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "peak_bytes": self.peak_bytes, **self.info}


class StageRecorder:
    """Times stages and their peak GPU memory on ``device``: ``with recorder.stage(name) as rec:`` adds a
    :class:`StageRecord` to ``records`` (``{name: record}``, in order) when the block ends, also on an error."""

    def __init__(self, device: torch.device, profile=()):
        self.device = device
        self.profile = set(profile)
        self.records: dict[str, StageRecord] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pinned(self) -> tuple[int, float] | None:
        """(page-locked blocks allocated so far, seconds spent allocating them) of PyTorch's pinned-memory
        allocator, or None off CUDA or where torch does not report them."""
        if self.device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
            return None
        try:
            stats = torch.cuda.host_memory_stats()
        except RuntimeError:
            return None
        return int(stats.get("num_host_alloc", 0)), float(stats.get("host_alloc_time.total", 0)) / 1e6

    @contextlib.contextmanager
    def stage(self, name: str):
        rec = StageRecord(name)
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        prof = _profiler() if name in self.profile else contextlib.nullcontext()
        pinned0 = self._pinned()
        t0 = time.perf_counter()
        try:
            with prof:
                yield rec
                self._sync()
        finally:
            self._sync()
            rec.seconds = time.perf_counter() - t0
            if name in self.profile:
                rec.info["profile"] = summarize_profile(prof)
            if self.device.type == "cuda":
                rec.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            pinned1 = self._pinned()
            if pinned0 is not None and pinned1 is not None and pinned1[0] > pinned0[0]:
                rec.info.update(pinned_allocs=pinned1[0] - pinned0[0], pinned_alloc_seconds=pinned1[1] - pinned0[1])
            self.records[name] = rec


#: Kernels kept per profiled stage (reports list the first few), and the characters kept of each kernel's name
#: (templated CUDA kernel names run to hundreds; the first 90 often leave the operation out).
PROFILE_TOP = 40
PROFILE_NAME_CHARS = 240


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def summarize_profile(prof, top: int = PROFILE_TOP) -> dict:
    """``{"gpu_ms": summed kernel time, "top_kernels": [[name, ms, calls], ...]}`` of a finished profiler."""
    kernels = {}
    for evt in prof.key_averages():
        us = next((float(getattr(evt, a)) for a in ("self_device_time_total", "self_cuda_time_total")
                   if hasattr(evt, a)), 0.0)
        if us > 0 and "cuda" in str(getattr(evt, "device_type", "")).lower():
            ms, calls = kernels.get(evt.key, (0.0, 0))
            kernels[evt.key] = (ms + us / 1e3, calls + evt.count)
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_ms": sum(ms for ms, _ in kernels.values()),
            "top_kernels": [[name[:PROFILE_NAME_CHARS], ms, calls] for name, (ms, calls) in ranked]}
