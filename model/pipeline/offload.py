"""Weights kept on the CPU and lent to the GPU one stage at a time (``ImageToMesh(offload=True)``).

``module.to("cuda")`` before a stage and ``module.to("cpu")`` after it copies every weight twice through pageable
memory: for the 1 GB of a released sparse DiT that is about a second per stage, and the copy back is pure waste (the
weights never change at inference). :class:`Offloader` pins each weight once (page-locked host memory, so the copy
to the GPU runs at the bus's speed and without blocking the host), and a stage borrows the modules: each parameter
and buffer gets a GPU copy for the block and its pinned CPU tensor back afterwards, with no copy on the way back.
While a stage runs, the next stage's weights can already travel (:meth:`Offloader.prefetch`, off until timed): their
copy then overlaps the stage's kernels instead of delaying the next stage's first ones.
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

    #: Give the allocator's cached blocks back to the driver when a lend ends (``torch.cuda.empty_cache``).
    release_cache = True
    #: :meth:`prefetch` copies anything (else it returns at once). Off until the cascade has been timed with it on a
    #: GPU (``reports/generate_history.md``); its GPU test sets it on an instance.
    prefetch_weights = False

    def __init__(self, device: torch.device, modules):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"offloading lends weights to a CUDA device, got {self.device}")
        for t in _tensors(modules):
            if t.device.type != "cpu":
                raise ValueError("offloaded modules must sit on the CPU")
            t.data = t.data.pin_memory()
        self._stream = None  # side stream of the prefetch copies
        self._ahead = {}  # id(weight) -> (its device copy, the lend during which the copy was started)
        self._ready = None  # event after the last prefetch copy
        self._lends = 0

    def prefetch(self, *modules: nn.Module) -> None:
        """Start copying the weights of ``modules`` to the device on a side stream, behind everything queued on the
        current stream so far (the weights of the stage now running); the next :meth:`lend` of them takes these
        copies. Copies that the lend after the current one does not take are dropped when it ends. Does nothing
        unless :attr:`prefetch_weights`."""
        if not self.prefetch_weights:
            return
        main = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            for t in _tensors(modules):
                if id(t) not in self._ahead:
                    self._ahead[id(t)] = (t.data.to(self.device, non_blocking=True), self._lends)
            self._ready = torch.cuda.Event()
            self._ready.record(self._stream)

    @contextlib.contextmanager
    def lend(self, *modules: nn.Module):
        """Inside the block the modules' weights are on the device; afterwards they are their pinned CPU tensors
        again (the GPU copies are dropped, nothing is copied back)."""
        self._lends += 1
        lend_id = self._lends
        main = torch.cuda.current_stream(self.device)
        saved = []
        try:
            waited = False
            for t in _tensors(modules):
                saved.append((t, t.data))
                ahead = self._ahead.pop(id(t), None)
                if ahead is None:
                    t.data = t.data.to(self.device, non_blocking=True)
                    continue
                if not waited:
                    main.wait_event(self._ready)
                    waited = True
                ahead[0].record_stream(main)  # made on the side stream, used (and freed) on this one
                t.data = ahead[0]
            yield
        finally:
            for t, cpu in saved:
                t.data = cpu
            del saved
            # copies started before this lend that it did not take: no stage will (stages run in order)
            self._ahead = {k: v for k, v in self._ahead.items() if v[1] >= lend_id}
            if self.release_cache:
                torch.cuda.empty_cache()
