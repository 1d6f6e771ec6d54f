"""GPU timing (``triton.testing.do_bench`` / CUDA events), peak memory, and how the times reach pytest-benchmark.

How an operation is timed on the GPU (:func:`measure`):

1. one untimed call: compiles and autotunes Triton kernels, builds cuDNN plans, warms caches;
2. one call timed with CUDA events, with the peak memory above what was allocated before it
   (``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` minus ``memory_allocated``);
3. if that call took at most ``slow_ms``: ``triton.testing.do_bench(fn, warmup_ms, rep_ms, return_mode="all")``
   (CUDA events around each repetition, L2 flushed before each); ``rep`` is raised to ``min_samples`` times the
   call's time so that even slow-ish ops get several samples, and lowered to ``max_samples`` times it so that a
   microsecond op does not record tens of thousands;
4. otherwise (dense baselines at 100k+ tokens take seconds, and ``do_bench`` always makes at least eight calls):
   the call of step 2 is the first sample and up to ``slow_max_reps - 1`` more are timed the same way (CUDA
   events, L2 flushed before each), as many as fit in ``slow_budget_ms``.

The recorded figure is the median of those per-repetition GPU times. They are handed to pytest-benchmark by
*replaying* them (:func:`feed_benchmark`): the fixture's clock is replaced by :class:`ReplayClock`, which only
advances by the measured GPU times, and ``benchmark.pedantic`` runs one round per sample; pytest-benchmark's
min/median/mean/stddev/rounds are therefore exactly those of the GPU samples, and nothing is wall-clock around
asynchronous launches. On CPU (``device.type == "cpu"``: the CPU part and the dry run) the op is synchronous,
and each repetition is timed with ``time.perf_counter``.
"""
from __future__ import annotations

import gc
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from model.io import provenance

#: Milliseconds per second.
MS_PER_S = 1e3
#: Bytes per GB (decimal, as in "80 GB").
BYTES_PER_GB = 1e9


@dataclass
class TimingPolicy:
    """Repetition budget. ``warmup_ms`` / ``rep_ms`` go to ``do_bench`` (milliseconds of GPU time); ops slower
    than ``slow_ms`` per call are timed with a fixed, budgeted number of calls instead."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    #: the whole op at shell-1024 takes 30-90 ms per fwd+bwd and its calls spread by a few ms (two streams share
    #: the GPU in the backward): ten calls make its median steady (reports/kernels.md, run 35)
    min_samples: int = 10
    max_samples: int = 1000
    slow_ms: float = 150.0
    slow_budget_ms: float = 4000.0
    slow_max_reps: int = 3
    cpu_reps: int = 3
    cpu_warmup: bool = True

    def __post_init__(self):
        for name in ("warmup_ms", "rep_ms", "slow_ms", "slow_budget_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_samples < self.min_samples:
            raise ValueError(f"max_samples ({self.max_samples}) must be >= min_samples ({self.min_samples})")
        for name in ("min_samples", "max_samples", "slow_max_reps", "cpu_reps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Timing:
    """Per-repetition times of one measurement (milliseconds), how they were taken, and the peak memory."""

    samples_ms: list[float]
    method: str
    device: str
    peak_mem_bytes: int | None = None
    first_call_ms: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    def info(self) -> dict:
        """What goes into ``benchmark.extra_info`` (all JSON-serialisable)."""
        return {
            "median_ms": self.median_ms,
            "min_ms": float(min(self.samples_ms)),
            "samples": len(self.samples_ms),
            "timer": self.method,
            "timed_on": self.device,
            "peak_mem_bytes": self.peak_mem_bytes,
            "first_timed_ms": self.first_call_ms,
            **self.notes,
        }


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _l2_flusher():
    """``flush()`` that clears the L2 cache as ``do_bench`` does (a no-op if Triton's driver cannot)."""
    try:
        import triton

        drv = triton.runtime.driver.active
        cache = drv.get_empty_cache_for_benchmark()
        return lambda: drv.clear_cache(cache)
    except Exception:  # pragma: no cover - depends on the Triton build
        return lambda: None


def _event_ms(fn: Callable[[], object], before: Callable[[], None] | None = None) -> float:
    if before is not None:
        before()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end))


def _measure_cuda(fn, policy: TimingPolicy, measure_memory: bool) -> Timing:
    import triton.testing

    fn()  # warm-up: compile, autotune, plan caches
    torch.cuda.synchronize()
    gc.collect()
    base = None
    if measure_memory:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    first = _event_ms(fn)
    peak = int(torch.cuda.max_memory_allocated() - base) if measure_memory else None
    if first <= policy.slow_ms:
        # at least min_samples samples, at most about max_samples (pytest-benchmark's JSON keeps every sample)
        rep = min(max(policy.rep_ms, policy.min_samples * first), policy.max_samples * first)
        samples = triton.testing.do_bench(fn, warmup=policy.warmup_ms, rep=rep, return_mode="all")
        method = f"triton.testing.do_bench(warmup={policy.warmup_ms:g}ms, rep={rep:g}ms)"
    else:
        reps = max(1, min(policy.slow_max_reps, int(policy.slow_budget_ms // first)))
        flush = _l2_flusher()
        samples = [first] + [_event_ms(fn, before=flush) for _ in range(reps - 1)]
        method = f"cuda-events x{reps} (after 1 warm-up call; slower than {policy.slow_ms:g} ms)"
    return Timing([float(s) for s in samples], method, "cuda", peak, first)


def _measure_cpu(fn, policy: TimingPolicy) -> Timing:
    if policy.cpu_warmup:
        fn()
    samples = []
    for _ in range(policy.cpu_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * MS_PER_S)
    return Timing(samples, f"time.perf_counter x{policy.cpu_reps} (CPU, synchronous)", "cpu", None, None)


def measure(fn: Callable[[], object], device, policy: TimingPolicy | None = None, *, measure_memory=True) -> Timing:
    """Time ``fn`` (no arguments) on ``device`` as the module docstring describes."""
    policy = policy or TimingPolicy()
    if _is_cuda(device):
        return _measure_cuda(fn, policy, measure_memory)
    return _measure_cpu(fn, policy)


class ReplayClock:
    """A pytest-benchmark timer that replays measured durations.

    pytest-benchmark's runner reads the timer, calls the target, reads the timer again; the target here is
    :meth:`tick`, which loads the next sample, and the clock reads 0 before and the sample (in seconds) after.
    """

    def __init__(self, samples_ms: list[float], source: str = "cuda"):
        self.__name__ = f"replayed_{source}_times"  # shows as the timer in pytest-benchmark's JSON
        self._pending = [s / MS_PER_S for s in reversed(samples_ms)]
        self._current = 0.0
        self._reads = 0

    def __call__(self) -> float:
        self._reads += 1
        return 0.0 if self._reads % 2 == 1 else self._current

    def tick(self) -> None:
        self._current = self._pending.pop()


def feed_benchmark(benchmark, timing: Timing, **extra) -> None:
    """Record ``timing`` in the pytest-benchmark fixture: one round per sample, the samples as durations.

    Relies on the fixture reading its timer from the ``_timer`` attribute when a round starts (pytest-benchmark
    3.x to 5.x); refuses to run rather than silently recording wall-clock if that changes.
    """
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError(
            "this pytest-benchmark has no BenchmarkFixture._timer; bench/timing.py cannot replay GPU times into it"
        )
    benchmark.extra_info.update(timing.info())
    benchmark.extra_info.update(extra)
    clock = ReplayClock(timing.samples_ms, "cuda_event" if timing.device == "cuda" else "cpu_perf_counter")
    benchmark._timer = clock
    benchmark.pedantic(clock.tick, rounds=len(timing.samples_ms), iterations=1, warmup_rounds=0)


def environment_info(device) -> dict:
    """The run's provenance (:func:`model.io.provenance`: the commit, ``<sha>`` or ``<sha>-dirty``, None outside a
    git checkout; GPU name, torch / triton / CUDA versions, Python, the date, UTC ISO 8601) with the cuDNN version
    and the GPU memory (GB) on CUDA, the CPU otherwise."""
    prov = provenance(device)
    info = {key: prov[key] for key in ("commit", "dirty", "device", "gpu", "torch", "triton", "cuda")}
    info.update(cudnn=None, python=prov["python"], date=prov["date"])
    if _is_cuda(device) and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu_memory_gb=round(props.total_memory / BYTES_PER_GB, 1), cudnn=torch.backends.cudnn.version())
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def free_memory(device) -> None:
    """Drop garbage and, on CUDA, cached blocks: call between cases so that peaks do not see old tensors."""
    gc.collect()
    if _is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def policy_dict(policy: TimingPolicy) -> dict:
    return asdict(policy)
