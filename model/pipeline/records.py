"""Per-stage records of a cascade run: wall time and peak GPU memory of each stage (:class:`StageRecord`), taken by a
:class:`StageRecorder` around each stage of :meth:`model.pipeline.cascade.ImageToMesh.generate`."""
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

    def __init__(self, device: torch.device):
        self.device = device
        self.records: dict[str, StageRecord] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        rec = StageRecord(name)
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            self._sync()
            rec.seconds = time.perf_counter() - t0
            if self.device.type == "cuda":
                rec.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.records[name] = rec
