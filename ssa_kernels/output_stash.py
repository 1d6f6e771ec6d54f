"""Outputs of a checkpointed forward kept for its recomputation, on the host, instead of computed twice.

Activation checkpointing runs each block's forward twice: once in the forward pass (its saved tensors dropped) and
once more in the backward pass to rebuild them. Some calls of a block are costly to recompute yet cheap to keep
elsewhere: the DiT's cross-attention kernel (2.8 ms per block on an H100 at 137k tokens, 32 heads of 32) produces a
``[N, C]`` output and a ``[N, H]`` log-sum-exp, 298 MB per block in bf16. Keeping them on the GPU would add that to
the training step's peak for every block; here they go to pinned host memory while the forward pass runs, and come
back while the backward pass recomputes the block's earlier layers (the self-attention, about 10 ms of work before
the cross-attention is reached), on a copy stream of their own beside the kernels. On an H100 (55 GB/s each way
over its host link, 5.6 ms per block) the released-size DiT's training step went 2,056 -> 1,986 ms at the same
17.9 GB peak (reports/dit_history.md).

What pays this way is an output needed late enough in the recomputation for its copy to arrive first. The SSA
op's selection branch (``kind`` ``"selection"``: its output and LSE, the same 298 MB, 5.3 ms of kernel per block) is
needed a few milliseconds into a block's recomputation, about when its copy arrives (estimated, not timed); it is
kept only when asked for (the DiT's ``STASH_SELECTION``, off until timed). Copying earlier (during the next block's
backward pass) would add the outputs to the step's peak.

``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False, context_fn=OutputStash(kinds).contexts)``: the
calls of the kinds named (``"cross_attention"``: :mod:`model.nets.cross_attention_kernel`; ``"selection"``:
:func:`ssa_kernels.spatial_sparse_attention`) consult :func:`active`, keep their outputs while the first forward
runs (:meth:`OutputStash.keep`) and take them back, in the same order, while the recomputation runs
(:meth:`OutputStash.take`); the copies back to the GPU all start when the recomputation starts. The results are
those of computing again (the kernels are deterministic); calls whose shapes differ from the kept ones raise a
``RuntimeError``.

Why not ``torch.autograd.graph.save_on_cpu``: it moves every saved tensor of the block (gigabytes per block) and
copies them back synchronously when the backward pass unpacks each one; here only the chosen outputs move, and the
forward work that produced them is skipped.

On the CPU (or with ``offload=False``) the outputs are kept as they are (no copy): for the tests, and for callers
that have the memory.
"""
from __future__ import annotations

import threading
import warnings

import torch

__all__ = ["KINDS", "OutputStash", "active"]

_ACTIVE = threading.local()
#: The copy stream per CUDA device (index), made on first use.
_COPY_STREAMS: dict[int, torch.cuda.Stream] = {}


#: The kinds of calls that consult a stash.
KINDS = ("cross_attention", "selection")


def active(kind: str | None = None) -> "OutputStash | None":
    """The stash whose recording or replaying context the current thread is in (None: none), or with ``kind``
    only one that keeps that kind of call."""
    stash = getattr(_ACTIVE, "stash", None)
    return stash if stash is None or kind is None or kind in stash.kinds else None


def _warn_once(message: str) -> None:
    if not getattr(_warn_once, "done", False):
        _warn_once.done = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COPY_STREAMS:
        _COPY_STREAMS[index] = torch.cuda.Stream(device=index)
    return _COPY_STREAMS[index]


class _Kept:
    """One call's outputs: on the host (``host``, with the device to return to) or as they are (``tensors``)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], offload: bool):
        self.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        self.event = None
        if offload and tensors and all(t.is_cuda for t in tensors):
            main = torch.cuda.current_stream(tensors[0].device)
            copy = _copy_stream(tensors[0].device)
            copy.wait_stream(main)  # the outputs are written before they are read
            try:
                self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            except RuntimeError as exc:  # no pinned host memory left: kept on the GPU (more memory, no speed lost)
                _warn_once(f"OutputStash: pinned host memory unavailable ({exc}); keeping outputs on the GPU")
                self.host, self.tensors = None, tuple(t.detach() for t in tensors)
                return
            with torch.cuda.stream(copy):
                for h, t in zip(self.host, tensors):
                    h.copy_(t, non_blocking=True)
                    t.record_stream(copy)  # not reused by the main stream before the copy has read it
            self.tensors = None
        else:
            self.host = None
            self.tensors = tuple(t.detach() for t in tensors)

    def prefetch(self) -> None:
        """Start the copies back to the GPU (on the copy stream, after the main stream's work so far)."""
        if self.host is None or self.tensors is not None:
            return
        device = self.shapes[0][2]
        main = torch.cuda.current_stream(device)
        copy = _copy_stream(device)
        # allocated on the main stream, which uses them (after waiting for the event) and frees them
        tensors = tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype, _ in self.shapes)
        copy.wait_stream(main)
        with torch.cuda.stream(copy):
            for t, h in zip(tensors, self.host):
                t.copy_(h, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(copy)
        self.tensors, self.host = tensors, None

    def get(self) -> tuple[torch.Tensor, ...]:
        self.prefetch()  # no-op when already started
        if self.event is not None:
            torch.cuda.current_stream(self.shapes[0][2]).wait_event(self.event)
        return self.tensors


class OutputStash:
    """The kept outputs of one checkpointed forward (module docstring): of the calls of ``kinds`` (names of
    :data:`KINDS`). ``offload``: keep CUDA outputs in pinned host memory (default); False keeps them where they
    are."""

    def __init__(self, kinds=("cross_attention",), offload: bool = True):
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"kinds: unknown {unknown}; known: {KINDS}")
        self.kinds = frozenset(kinds)
        self.offload = bool(offload)
        self._kept: list[_Kept] = []
        self._next = 0
        self.replaying = False

    def keep(self, *tensors: torch.Tensor) -> None:
        """While recording: keep ``tensors`` (one call's outputs) for the replay; a no-op while replaying."""
        if not self.replaying:
            self._kept.append(_Kept(tensors, self.offload))

    def take(self, *like: tuple) -> tuple[torch.Tensor, ...] | None:
        """While replaying: the next call's kept outputs on their device (None while recording, and when an earlier
        recomputation took them: a second backward pass through the graph computes them again). ``like``: the
        ``(shape, dtype)`` of each output the caller would compute; a ``RuntimeError`` when they differ from the
        kept ones or when more calls take than kept."""
        if not self.replaying:
            return None
        if self._next >= len(self._kept):
            raise RuntimeError("OutputStash: more calls in the recomputation than were recorded")
        kept = self._kept[self._next]
        if kept is None:  # taken by an earlier recomputation (backward with retain_graph=True, then again)
            self._next += 1
            return None
        want = [(tuple(shape), dtype) for shape, dtype in like]
        have = [(tuple(shape), dtype) for shape, dtype, _ in kept.shapes]
        if want != have:
            raise RuntimeError(f"OutputStash: the recomputed call wants outputs {want}, the recorded one kept {have}: "
                               "the calls are not the recorded ones")
        self._kept[self._next] = None  # dropped here: the caller holds them from now on
        self._next += 1
        return kept.get()

    def recording(self):
        """Context: the calls inside keep their outputs."""
        return _Active(self, False)

    def replaying_context(self):
        """Context: the calls inside take the kept outputs, in order (their copies back start on entry). It may be
        entered again (a second backward pass through the graph recomputes once more)."""
        return _Active(self, True)

    def contexts(self):
        """``(forward context, recomputation context)`` for ``checkpoint(context_fn=...)``."""
        return self.recording(), self.replaying_context()


class _Active:
    """The context of :meth:`OutputStash.recording` / :meth:`OutputStash.replaying_context`; re-enterable, as
    ``checkpoint`` enters the recomputation context once per recomputation."""

    def __init__(self, stash: OutputStash, replaying: bool):
        self.stash, self.replaying, self._previous = stash, replaying, []

    def __enter__(self):
        self._previous.append(active())
        _ACTIVE.stash = self.stash
        self.stash.replaying, self.stash._next = self.replaying, 0
        if self.replaying:
            for kept in self.stash._kept:
                if kept is not None:
                    kept.prefetch()
        return self.stash

    def __exit__(self, *exc) -> None:
        _ACTIVE.stash = self._previous.pop()
