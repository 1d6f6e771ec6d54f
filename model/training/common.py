"""Training infrastructure shared by the trainers in :mod:`model` (the VAE's :mod:`model.training.vae`, later the DiT's).

* **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`, :func:`restore_rng`) and
  :func:`resolve_device` live in :mod:`model.io` (the library loads checkpoints without importing training) and are
  re-exported here for the trainers: one safetensors file with the model, optimizer and RNG states and a JSON
  document, written atomically.
* **Metrics**: :class:`MetricsLog` appends one JSON object per line (flushed per line); on resume it drops the lines
  logged after the checkpoint's step. :func:`plot_metrics` draws the loss curves (matplotlib, Agg backend) to a PNG.
* **Runs**: :func:`seed_everything`, :func:`resolve_device`, :class:`Distributed` (torchrun: process group, DDP
  wrapping, rank-0-only side effects, sums and gathers over the ranks), :class:`TimeLimit`, :func:`lr_factor`
  (linear warm-up then constant or cosine), :func:`load_config_file` (JSON or YAML).
* **Several ranks** (``torchrun``): every rank builds the same *global* batch of a step and takes its share of it,
  cut by :func:`partition_by_tokens` (balanced by token count, not by sample count, so that no rank waits on
  another); losses are normalised by the global counts (:meth:`Distributed.sum`), which makes DDP's mean over the
  ranks of the gradients equal to the gradient of the one-process loss on the whole global batch; randomness is
  keyed by the sample's position in the global batch, not by the rank; checkpoints hold plain (unwrapped) state
  and load on any number of ranks; :meth:`Distributed.rank_stats` gathers each rank's step time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from model.io import (  # re-exported: the trainers' checkpoints and devices (their home is model.io)
    CHECKPOINT_FORMAT,
    WRAPPER_PREFIXES,
    Checkpoint,
    atomic_write,
    atomic_write_text,
    load_checkpoint,
    read_checkpoint_metadata,
    resolve_device,
    restore_rng,
    save_checkpoint,
    strip_wrapper_prefixes,
    unwrap_model,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "WRAPPER_PREFIXES",
    "Checkpoint",
    "Distributed",
    "MetricsLog",
    "TimeLimit",
    "load_checkpoint",
    "load_config_file",
    "lr_factor",
    "partition_by_tokens",
    "plot_metrics",
    "read_checkpoint_metadata",
    "read_jsonl",
    "resolve_device",
    "restore_rng",
    "save_checkpoint",
    "seed_everything",
    "strip_wrapper_prefixes",
    "unwrap_model",
]

#: Learning-rate schedules of :func:`lr_factor`.
SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------------------------------------------------------
# seeds


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def read_jsonl(path) -> list[dict]:
    """All records of a JSON-lines file (a missing file reads as no records; a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a crash mid-write leaves at most one torn line
    return out


class MetricsLog:
    """Append-only JSON-lines metrics file; each :meth:`log` writes one flushed line.

    ``resume_step``: when given, records with ``step > resume_step`` (logged after the checkpoint being resumed) are
    dropped first, so the file reads as one uninterrupted run. ``enabled=False`` (non-zero ranks) makes it a no-op.
    """

    def __init__(self, path, *, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")
            fh.flush()

    def records(self) -> list[dict]:
        return read_jsonl(self.path)


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value


def plot_metrics(records: Iterable[Mapping[str, Any]], path, *, loss_keys: Iterable[str] = ("loss",),
                 val_keys: Iterable[str] = (), title: str = "") -> Path | None:
    """Loss curves (log scale, training records: those without ``kind`` or ``kind == "train"``) and, on a second
    panel, validation curves (``kind == "val"``) against ``step``; saved as a PNG at ``path``. Returns the path, or
    None when there is nothing to plot or matplotlib is not installed (a warning says so; training goes on)."""
    try:
        import matplotlib
    except ImportError:
        import warnings

        warnings.warn(f"matplotlib is not installed: {path} not written", RuntimeWarning, stacklevel=2)
        return None

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = list(records)
    train = [r for r in records if r.get("kind", "train") == "train" and "step" in r]
    val = [r for r in records if r.get("kind") == "val" and "step" in r]
    loss_keys = [k for k in loss_keys if any(isinstance(r.get(k), (int, float)) for r in train)]
    val_keys = [k for k in val_keys if any(isinstance(r.get(k), (int, float)) for r in val)]
    if not loss_keys and not val_keys:
        return None
    panels = 1 + bool(val_keys)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    for key in loss_keys:
        pts = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if val_keys:
        ax = axes[0, 1]
        for key in val_keys:
            pts = [(r["step"], r[key]) for r in val if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("validation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# schedules and limits


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_ratio: float = 0.0, progress: float | None = None) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based): linear warm-up from
    ``1 / (warmup_steps + 1)`` over ``warmup_steps`` steps, then 1 (``"constant"``) or a cosine from 1 down to
    ``min_ratio`` at ``total_steps`` (``"cosine"``). ``progress`` in [0, 1], when given, replaces
    ``step / total_steps`` as the cosine's position (e.g. the elapsed fraction of a time limit)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if progress is None:
        span = max(1, total_steps - warmup_steps)
        progress = (step - warmup_steps) / span
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TimeLimit:
    """Wall-clock budget: ``minutes`` (None = unlimited), counted from :meth:`start` (or construction)."""

    def __init__(self, minutes: float | None):
        if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
            raise ValueError(f"time limit must be a positive number of minutes or None, got {minutes!r}")
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.start()

    def start(self) -> None:
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def fraction(self) -> float | None:
        """Elapsed fraction of the budget (None when unlimited)."""
        return None if self.seconds is None else min(1.0, self.elapsed / self.seconds)

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed >= self.seconds


# ---------------------------------------------------------------------------------------------------------------
# distributed (torchrun)


def partition_by_tokens(tokens: Iterable[int], parts: int) -> list[list[int]]:
    """Cut the items of one global batch into ``parts`` groups of near-equal token sums (one group per rank).

    The rule (deterministic greedy, "longest processing time first"): visit the items by decreasing token count
    (equal counts: lower position first) and put each into the group with the smallest token sum so far (ties: the
    group with fewer items, then the lower group number); every group lists its positions in increasing order.
    The result depends only on the token counts, so every rank computes the same partition without talking to the
    others. With at least ``parts`` items of positive size no group is empty (the first ``parts`` items go to
    distinct empty groups); the largest group sum exceeds the mean by less than the largest item, and is at most
    4/3 of the best possible (Graham's bound for this greedy rule).

    Returns ``parts`` lists of positions into ``tokens``.
    """
    tokens = [int(t) for t in tokens]
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive int, got {parts!r}")
    if any(t < 0 for t in tokens):
        raise ValueError("token counts must be non-negative")
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for pos in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        g = min(range(parts), key=lambda j: (loads[j], len(groups[j]), j))
        groups[g].append(pos)
        loads[g] += tokens[pos]
    return [sorted(g) for g in groups]


class Distributed:
    """Process-group setup for ``torchrun``: with ``WORLD_SIZE > 1`` in the environment (or a default process group
    already initialised by the caller), initialises the default group (NCCL on CUDA, gloo on CPU), picks
    ``cuda:LOCAL_RANK`` on CUDA, and wraps models in DDP; with one process it does nothing, every rank-0 check is
    true and the collectives below return their input.

    ``rank``, ``world_size``, ``local_rank``, ``device``, ``is_main`` (rank 0: logging, progress, validation,
    checkpoints). :meth:`shard` is this rank's share of a global batch (:func:`partition_by_tokens`); :meth:`sum`
    adds tensors over the ranks (global counts for the loss normalisation); :meth:`rank_stats` gathers per-rank
    timings (min, max, spread).
    """

    def __init__(self, device: str | torch.device | None = "auto"):
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device)
        self.initialized_here = False
        external = dist.is_available() and dist.is_initialized()
        if self.world_size > 1 or (external and dist.get_world_size() > 1):
            if dev.type == "cuda":
                dev = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(dev)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
                self.initialized_here = True
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = dev

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap ``model`` (already on :attr:`device`) when distributed, else return it unchanged. DDP starts
        every rank from rank 0's parameters and averages the gradients over the ranks in ``backward``."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, tokens: Iterable[int]) -> list[int]:
        """This rank's positions in a global batch whose items have ``tokens`` tokens (:func:`partition_by_tokens`;
        all positions with one process)."""
        return partition_by_tokens(tokens, self.world_size)[self.rank]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (one all-reduce; no-op with one process)."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks, as a new tensor (one all-reduce; the input itself
        with one process). Not differentiable: for counts and logged values."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (one all-reduce; unchanged with one process)."""
        if not self.enabled or not values:
            return dict(values)
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def gather(self, values: Mapping[str, float]) -> dict[str, list[float]]:
        """Every rank's ``values`` (the same keys on every rank): ``{key: [value of rank 0, rank 1, ...]}`` (one
        all-gather; one-element lists with one process)."""
        keys = sorted(values)
        if not self.enabled:
            return {k: [float(values[k])] for k in keys}
        import torch.distributed as dist

        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        rows = torch.stack(out).cpu().tolist()
        return {k: [row[i] for row in rows] for i, k in enumerate(keys)}

    def rank_stats(self, values: Mapping[str, float], prefix: str = "rank_") -> dict[str, float]:
        """Per-rank figures of one step (e.g. ``{"step_s": ..., "fwd_s": ..., "tokens": ...}``) gathered over the
        ranks (:meth:`gather`): ``{prefix + key + "_min"/"_max": ..., prefix + key + "_spread": (max - min) / max}``
        (spread 0 when max is 0)."""
        out: dict[str, float] = {}
        for key, vals in self.gather(values).items():
            lo, hi = min(vals), max(vals)
            out[f"{prefix}{key}_min"], out[f"{prefix}{key}_max"] = lo, hi
            out[f"{prefix}{key}_spread"] = (hi - lo) / hi if hi > 0 else 0.0
        return out

    def synchronize(self) -> None:
        """Wait for this rank's queued CUDA work (for timings; no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this object created it. Drop the DDP model first: a wrapper still alive
        (DDP sits in reference cycles, hence the garbage collection here) keeps the group's threads, which can abort
        the process at exit."""
        if self.initialized_here:
            import gc

            import torch.distributed as dist

            gc.collect()
            dist.destroy_process_group()
            self.initialized_here = False


# ---------------------------------------------------------------------------------------------------------------
# configs


def load_config_file(path) -> dict:
    """A JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) mapping from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use JSON") from exc
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of option names to values")
    return data
