"""Weights kept on the CPU and lent to the GPU one stage at a time (``ImageToMesh(offload=True)``).

``module.to("cuda")`` before a stage and ``module.to("cpu")`` after it copies every weight twice through pageable
memory: for the 1 GB of a released sparse DiT that is about a second per stage, and the copy back is pure waste (the
weights never change at inference). :class:`Offloader` pins each weight once (page-locked host memory, so the copy
to the GPU runs at the bus's speed and without blocking the host), and a stage borrows the modules: each parameter
and buffer gets a GPU copy for the block and its pinned CPU tensor back afterwards, with no copy on the way back.
"""
from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

__all__ = ["Offloader"]


def _tensors(modules):
    """Every parameter and buffer of ``modules``, each once (shared weights appear in several modules)."""
    seen = set()
    for t in itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


class Offloader:
    """Pins the CPU weights of ``modules`` once; :meth:`lend` puts some of them on ``device`` for a block."""

    def __init__(self, device: torch.device, modules):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"offloading lends weights to a CUDA device, got {self.device}")
        for t in _tensors(modules):
            if t.device.type != "cpu":
                raise ValueError("offloaded modules must sit on the CPU")
            t.data = t.data.pin_memory()

    @contextlib.contextmanager
    def lend(self, *modules: nn.Module):
        """Inside the block the modules' weights are on the device; afterwards they are their pinned CPU tensors
        again (the GPU copies are dropped, nothing is copied back)."""
        saved = []
        try:
            for t in _tensors(modules):
                saved.append((t, t.data))
                t.data = t.data.to(self.device, non_blocking=True)
            yield
        finally:
            for t, cpu in saved:
                t.data = cpu
            del saved
            torch.cuda.empty_cache()
