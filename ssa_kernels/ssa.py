"""The whole Spatial Sparse Attention operation and the public per-branch functions, with autograd.

``spatial_sparse_attention(q, k, v, k_cmp, v_cmp, gate, layout, *, topk, shift)`` runs compression attention,
the fused block scoring + top-k, selection attention and window attention, and mixes them with the gates:
``o = gate0 * o_cmp + gate1 * o_sel + gate2 * o_win``. Gradients flow to q, k, v, k_cmp, v_cmp and gate.

The operation is registered as a ``torch.library`` custom op (``ssa_kernels::ssa_forward`` / ``ssa_backward``)
so that ``torch.compile`` traces models that call it; it makes no host synchronisation, so a layer can be
captured in a CUDA graph once its :class:`~ssa_kernels.layout.BlockLayout` exists.
"""
from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import torch

from . import output_stash
from ._common import MAX_TOPK, check_kernel_dtype
from .compression import compression_backward, compression_forward
from .gate import fold_gate, gate_backward, row_dot
from .launch import config
from .layout import BlockLayout
from .scoring import select_blocks_forward
from .selection import block_query_index, selection_backward, selection_forward
from .validate import check_attention_inputs, check_selection_args, resolve_scale
from .window import window_backward, window_forward

# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------


def _check_layout(layout, n: int, device) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout from ssa_kernels.build_layout, got {type(layout).__name__}")
    if layout.num_tokens != n:
        raise ValueError(f"the layout was built for {layout.num_tokens} tokens but q has {n}")
    if layout.device != device:
        raise ValueError(f"the layout is on {layout.device} but q is on {device}")


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pair(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` and ``v`` with unit last stride and the same strides: the kernels address both with ``k``'s strides
    (a strided view such as a slice of a merged projection keeps its strides when ``v`` has the same ones)."""
    k, v = _contig(k), _contig(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def _check_qkv(q, k, v, layout, name_k="k"):
    for t, name in ((q, "q"), (k, name_k), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    check_kernel_dtype(q)
    if k.shape != v.shape:
        raise ValueError(f"{name_k} and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{name_k} has head_dim {k.shape[2]} but q has {q.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the kv heads ({k.shape[1]})")
    _check_layout(layout, q.shape[0], q.device)


# ----------------------------------------------------------------------------------------------------------------
# The fused operation as a custom op
# ----------------------------------------------------------------------------------------------------------------


#: The layout tables the fused op reads, passed to the custom op as one tensor list in this order.
_LAYOUT_TENSORS = ("token_batch", "batch_offsets", "batch_cmp_offsets", "cmp_batch", "batch_sel_offsets",
                   "sel_offsets", "sel_cmp_offsets", "cmp_sel")
_WINDOW_TENSORS = ("perm", "offsets", "tiles", "tile_window")


def _layout_args(layout: BlockLayout, shift: int):
    """``(tensors, num_sel_blocks, max_sel_block_tokens)`` of a layout for the custom op."""
    part = layout.window_partition(shift)
    tensors = [getattr(layout, name) for name in _LAYOUT_TENSORS] + [getattr(part, name) for name in _WINDOW_TENSORS]
    return tensors, layout.num_sel_blocks, layout.max_sel_block_tokens


def _layout_view(tensors, num_sel_blocks, max_sel_block_tokens):
    """A stand-in for :class:`BlockLayout` rebuilt inside the custom op from its tensor list."""
    n_lay = len(_LAYOUT_TENSORS)
    part = SimpleNamespace(**dict(zip(_WINDOW_TENSORS, tensors[n_lay:])))
    return SimpleNamespace(**dict(zip(_LAYOUT_TENSORS, tensors[:n_lay])), num_sel_blocks=num_sel_blocks,
                           one_cmp_per_sel=bool(tensors[_LAYOUT_TENSORS.index("cmp_sel")].shape[0] == num_sel_blocks),
                           max_sel_block_tokens=max_sel_block_tokens, window_partition=lambda shift: part)


@torch.library.custom_op("ssa_kernels::ssa_forward", mutates_args=())
def _ssa_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    gate: torch.Tensor, layout_tensors: list[torch.Tensor], num_sel_blocks: int, max_sel_block_tokens: int,
    topk: int, shift: int, scale: float, given_idx: torch.Tensor, given_sel: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Returns ``(o, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win, idx)``. A non-empty ``given_idx`` is the top-k
    choice of an earlier call on the same inputs (:func:`reusing_selection`): the scoring is skipped; a non-empty
    ``given_sel`` (``[o_sel, lse_sel]`` of such a call, :mod:`ssa_kernels.output_stash`) skips the selection kernel
    (copied: an op's outputs may not alias its inputs)."""
    lay = _layout_view(layout_tensors, num_sel_blocks, max_sel_block_tokens)
    o_cmp, lse_cmp = compression_forward(q, k_cmp, v_cmp, lay, scale)
    idx = select_blocks_forward(q, k_cmp, lse_cmp, lay, topk, scale) if given_idx.numel() == 0 else given_idx.clone()
    if given_sel:
        o_sel, lse_sel = given_sel[0].clone(), given_sel[1].clone()
    else:
        o_sel, lse_sel = selection_forward(q, k, v, idx, lay, scale)
    o_win, lse_win, o = window_forward(q, k, v, lay, shift, scale, mix=(o_cmp, o_sel, gate))
    return o, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win, idx


@_ssa_forward.register_fake
def _(q, k, v, k_cmp, v_cmp, gate, layout_tensors, num_sel_blocks, max_sel_block_tokens, topk, shift, scale,
      given_idx, given_sel):
    n, hq, _ = q.shape
    lse = q.new_empty(n, hq, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q), torch.empty_like(q), lse,
            torch.empty_like(lse), torch.empty_like(lse), q.new_empty(n, k.shape[1], topk, dtype=torch.int32))


# How the backward is launched on the GPU (launch configuration "ssa.BACKWARD", ssa_kernels.launch). Its kernels form
# two chains: the query-outer dQ kernels of the three branches (each adding to the dQ of the one before) and the key-
# outer dK/dV kernels (compression; selection and window adding into the same float32 accumulators). ``streams``: 1 runs
# both chains on the caller's stream, 2 runs the chain named by ``side`` ("dkdv" or "dq") on a second stream with
# priority ``side_priority`` (0 the default, -1 higher) beside the other; ``dq_order`` / ``dkdv_order``: the order of
# the branches within each chain. Each accumulator is written by one stream only, in a fixed order, so the result does
# not depend on the timing. Measured in reports/kernels.md (runs 28-36).

_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device, cfg: dict):
    """The second stream of the backward on ``device`` (None on the CPU or with ``streams=1``)."""
    if device.type != "cuda" or cfg["streams"] < 2:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, cfg["side_priority"])
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=index, priority=key[1])
    return _SIDE_STREAMS[key]


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _branch_order(text: str, name: str) -> list:
    order = text.split("-")
    if sorted(order) != ["cmp", "sel", "win"]:
        raise ValueError(f"ssa.BACKWARD's {name} must order cmp, sel and win, e.g. 'cmp-sel-win', got {text!r}")
    return order


@torch.library.custom_op("ssa_kernels::ssa_backward", mutates_args=())
def _ssa_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    gate: torch.Tensor, o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, lse_cmp: torch.Tensor,
    lse_sel: torch.Tensor, lse_win: torch.Tensor, idx: torch.Tensor, layout_tensors: list[torch.Tensor],
    num_sel_blocks: int, max_sel_block_tokens: int, shift: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, dk_cmp, dv_cmp, dgate)``.

    Two chains of kernels: dQ (compression, selection, window, each adding to the last) and dK/dV (compression;
    selection then window, adding into the same float32 accumulators). On the GPU the second chain runs on a
    side stream (launch configuration ``ssa.BACKWARD``): the selection dQ kernel is bound by L2 reads, the dK/dV
    kernels by the matrix and exponential units, so running them side by side can beat running them in turn.
    """
    lay = _layout_view(layout_tensors, num_sel_blocks, max_sel_block_tokens)
    do = do.contiguous()
    if o_win.numel() == 0 and q.numel():  # not kept by the forward (_ssa_setup_context): the same kernel again
        o_win, _ = window_forward(q, k, v, lay, shift, scale)
    dgate, delta = gate_backward(do, o_cmp, o_sel, o_win, gate)
    del o_win  # a recomputed one is freed before the gradients are allocated
    lses = dict(cmp=lse_cmp, sel=lse_sel, win=lse_win)
    # per branch: (lse2, negative-gate flag, kernel variants), delta, gate column
    grad_rows = {b: (fold_gate(lses[b], gate, i), delta[i], i) for i, b in enumerate(("cmp", "sel", "win"))}
    # dQ collects the three branches in the dtype of q (each kernel adds its part in float32 registers and
    # rounds once): a float32 accumulator would cost 2x the memory of q at the peak of the backward
    dq = torch.empty_like(q)
    f32 = dict(device=k.device, dtype=torch.float32)
    dk, dv = torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
    cfg = config("ssa.BACKWARD", head_dim=q.shape[-1], dtype=q.dtype, device=q.device)
    dq_order = _branch_order(cfg["dq_order"], "dq_order")
    dkdv_order = _branch_order(cfg["dkdv_order"], "dkdv_order")
    main = torch.cuda.current_stream(q.device) if q.device.type == "cuda" else None
    side = _side_stream(q.device, cfg)
    if side is not None:
        side.wait_stream(main)  # everything above (gate backward, folds, zeroed accumulators) comes first
    if cfg["side"] not in ("dkdv", "dq"):
        raise ValueError(f"ssa.BACKWARD's side must be 'dkdv' or 'dq', got {cfg['side']!r}")
    dkdv_stream, dq_stream = (side, None) if cfg["side"] == "dkdv" else (None, side)
    # the block -> queries index of the selection dK/dV kernel is built on the dQ chain's stream, off the dK/dV
    # chain (which waits for it only when it reaches the selection kernel)
    index_ready = None
    with _on(dq_stream):
        index = block_query_index(idx, num_sel_blocks)
        if side is not None:
            index_ready = torch.cuda.Event()
            index_ready.record()
    out = {}

    def run(branch, part, accumulate):
        """One branch's dQ (``part="dq"``) or dK/dV kernels."""
        fold, dl, gate_idx = grad_rows[branch]
        kw = dict(gate=gate, gate_idx=gate_idx, fold=fold, dq_acc=dq, accumulate=accumulate, parts=(part,))
        if branch == "cmp":
            out[part] = compression_backward(do, q, k_cmp, v_cmp, lses[branch], dl, lay, scale, **kw)
        elif branch == "sel":
            if part == "dkdv" and index_ready is not None:
                torch.cuda.current_stream(q.device).wait_event(index_ready)
            selection_backward(do, q, k, v, idx, lses[branch], dl, lay, scale, dk_acc=dk, dv_acc=dv, index=index,
                               **kw)
        else:
            window_backward(do, q, k, v, lses[branch], dl, lay, shift, scale, dk_acc=dk, dv_acc=dv, **kw)

    with _on(dkdv_stream):
        for branch in dkdv_order:  # the dK/dV accumulators start at zero: every kernel adds
            run(branch, "dkdv", accumulate=True)
    with _on(dq_stream):
        for i, branch in enumerate(dq_order):  # the first dQ kernel writes, the others add
            run(branch, "dq", accumulate=i > 0)
    _, dk_cmp, dv_cmp = out["dkdv"]
    if side is not None:
        # tensors made on this stream and read on the side stream are freed after this join in stream order;
        # those made on the side stream and read here are marked as used here
        main.wait_stream(side)
        for t in (dk_cmp, dv_cmp) if dkdv_stream is not None else index:
            t.record_stream(main)
    return (dq, dk.to(k.dtype), dv.to(v.dtype), dk_cmp.to(k_cmp.dtype), dv_cmp.to(v_cmp.dtype), dgate)


@_ssa_backward.register_fake
def _(do, q, k, v, k_cmp, v_cmp, gate, *rest):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(k_cmp),
            torch.empty_like(v_cmp), torch.empty_like(gate))


#: Setting of launch configuration ``ssa.BACKWARD``: the window branch's output is recomputed in the backward (one
#: window forward, the cheapest branch: 0.90 ms of the op's 12.0 ms forward at shell-1024, 3.48 of 115 at shell-2048
#: in reports/benchmark.md) instead of kept, when one ``[N, Hq, D]`` tensor of q's dtype is larger than this many
#: bytes (the launch table's 512 MiB: shell-2048's 1.1 GB tensors, not shell-1024's 0.28 GB). The backward holds the
#: op's output, the three branch outputs (for the gate gradients) and dQ at its peak: recomputing one branch output
#: takes one of those five q-sized tensors off the peak (1.1 GB at shell-2048), and off what the forward leaves
#: allocated; below the size the backward keeps its speed.
RECOMPUTE_WINDOW_SETTING = "recompute_window_bytes"


def _keeps_window_output(q: torch.Tensor) -> bool:
    limit = config("ssa.BACKWARD", head_dim=q.shape[-1], dtype=q.dtype, device=q.device)[RECOMPUTE_WINDOW_SETTING]
    return q.numel() * q.element_size() <= limit


def _ssa_setup_context(ctx, inputs, output):
    q, k, v, k_cmp, v_cmp, gate, layout_tensors, num_sel_blocks, max_sel_block_tokens, topk, shift, scale = inputs[:12]
    _, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win, idx = output
    if not _keeps_window_output(q):
        o_win = o_win.new_empty(0)  # the backward recomputes it (RECOMPUTE_WINDOW_SETTING)
    ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gate, o_cmp, o_sel, o_win, lse_cmp, lse_sel, lse_win, idx,
                          *layout_tensors)
    ctx.args = (num_sel_blocks, max_sel_block_tokens, shift, scale)
    ctx.given_sel = len(inputs[13])  # its gradient: a list of as many Nones
    # only o carries a gradient: without this, autograd would allocate zero gradients for the seven other
    # outputs (three [N, Hq, D] tensors: 3x the memory of q at the peak of the backward)
    ctx.set_materialize_grads(False)


def _ssa_autograd_backward(ctx, do, *unused):
    saved = ctx.saved_tensors
    grads = _ssa_backward(do, *saved[:13], list(saved[13:]), *ctx.args)
    return (*grads, [None] * (len(saved) - 13), None, None, None, None, None, None, [None] * ctx.given_sel)


_ssa_forward.register_autograd(_ssa_autograd_backward, setup_context=_ssa_setup_context)


def spatial_sparse_attention(q, k, v, k_cmp, v_cmp, gate, layout: BlockLayout, *, topk: int, shift: int,
                             scale: float | None = None) -> torch.Tensor:
    """The whole SSA operation (DESIGN.md 2) through the Triton kernels.

    Args:
        q: ``[N, Hq, D]`` queries, tokens in the layout order of ``layout``.
        k, v: ``[N, Hkv, D]`` keys and values (``Hq % Hkv == 0``).
        k_cmp, v_cmp: ``[Nc, Hkv, D]`` one compressed key/value per compression block of ``layout``.
        gate: ``[N, 3]`` gates of the compression, selection and window branches.
        layout: :func:`~ssa_kernels.layout.build_layout` of the tokens' coordinates (built once, reused).
        topk: selection blocks per query and kv head.
        shift: window shift, ``0`` or ``layout.window // 2``.
        scale: softmax scale, ``1/sqrt(D)`` by default.

    Returns ``o [N, Hq, D]`` in the dtype of q. float32 everywhere; float16 and bfloat16 on the GPU.
    """
    n, hq, hkv, dim, nc = check_attention_inputs(q, k, v, k_cmp, v_cmp, gate)
    _check_layout(layout, n, q.device)
    check_kernel_dtype(q)
    check_selection_args(topk, layout.window, shift)
    if nc != layout.num_cmp_blocks:
        raise ValueError(f"k_cmp has {nc} rows but the layout has {layout.num_cmp_blocks} compression blocks")
    scale = resolve_scale(scale, dim)
    q = _contig(q)
    k, v = _pair(k, v)
    k_cmp, v_cmp = _pair(k_cmp, v_cmp)
    gate = gate.contiguous()  # read as [N, 3] rows of 3
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [1, {MAX_TOPK}] for the kernels, got {topk}")
    record = getattr(_SELECTION, "record", None)
    given = record.replay() if record is not None else None
    if given is not None and given.shape != (n, k.shape[1], topk):
        raise RuntimeError(f"reusing_selection: the recorded choice has shape {tuple(given.shape)}, this call needs "
                           f"{(n, k.shape[1], topk)}: the calls are not the recorded ones")
    stash = output_stash.active("selection")
    kept = None if stash is None else stash.take(((n, hq, dim), q.dtype), ((n, hq), torch.float32))
    out = _ssa_forward(q, k, v, k_cmp, v_cmp, gate, *_layout_args(layout, shift), topk, shift, scale,
                       given if given is not None else _no_choice(q.device), [] if kept is None else list(kept))
    if record is not None and given is None:
        record.keep(out[7])
    if stash is not None:
        stash.keep(out[2], out[5])  # the selection branch's output and LSE (a no-op while replaying)
    return out[0]


# ----------------------------------------------------------------------------------------------------------------
# Reusing the top-k choice when activation checkpointing recomputes a forward pass
# ----------------------------------------------------------------------------------------------------------------

_SELECTION = threading.local()


_NO_CHOICE: dict = {}


def _no_choice(device) -> torch.Tensor:
    """The custom op's "no top-k choice given": an empty int32 tensor (one per device)."""
    if device not in _NO_CHOICE:
        _NO_CHOICE[device] = torch.empty(0, 0, 0, dtype=torch.int32, device=device)
    return _NO_CHOICE[device]


class SelectionRecord:
    """The top-k choices of the :func:`spatial_sparse_attention` calls made inside :meth:`recording`, handed back
    in the same order inside :meth:`replaying` (the scoring kernel is then skipped).

    For activation checkpointing: the recomputation of a checkpointed forward makes the same SSA calls on the same
    inputs, so their choice is the one already made (the kernels are deterministic); keeping it costs
    ``N x Hkv x topk`` int32 per call (8.8 MB per call at 137k tokens, Hkv 2, topk 8) and saves one scoring pass.
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=record.contexts)``.
    """

    def __init__(self):
        self._kept: list[torch.Tensor] = []
        self._next = 0
        self._replaying = False

    def keep(self, idx: torch.Tensor) -> None:
        self._kept.append(idx)

    def replay(self) -> torch.Tensor | None:
        if not self._replaying:
            return None
        if self._next >= len(self._kept):
            raise RuntimeError("reusing_selection: more SSA calls in the recomputation than were recorded")
        idx = self._kept[self._next]
        self._next += 1
        return idx

    @contextlib.contextmanager
    def _active(self, replaying: bool):
        previous = getattr(_SELECTION, "record", None)
        _SELECTION.record = self
        self._replaying, self._next = replaying, 0
        try:
            yield
        finally:
            _SELECTION.record = previous

    def recording(self):
        """Context: the calls inside keep their choice."""
        return self._active(False)

    def replaying(self):
        """Context: the calls inside take the kept choices, in order."""
        return self._active(True)

    def contexts(self):
        """``(forward context, recomputation context)`` for ``checkpoint(context_fn=...)``."""
        return self.recording(), self.replaying()


def reusing_selection():
    """A fresh :class:`SelectionRecord`'s :meth:`~SelectionRecord.contexts`: pass as ``context_fn`` to
    ``torch.utils.checkpoint.checkpoint`` (non-reentrant) so that the recomputed forward reuses the top-k choice."""
    return SelectionRecord().contexts()


# ----------------------------------------------------------------------------------------------------------------
# The branches on their own (tests, benchmarks)
# ----------------------------------------------------------------------------------------------------------------


class _CompressionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, layout, scale):
        o, lse = compression_forward(q, k_cmp, v_cmp, layout, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        do = _contig(do)
        delta = row_dot(do, o)
        dq, dk, dv = compression_backward(do, q, k_cmp, v_cmp, lse, delta, ctx.layout, ctx.scale)
        return dq.to(q.dtype), dk.to(k_cmp.dtype), dv.to(v_cmp.dtype), None, None


class _SelectionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, layout, scale):
        o, lse = selection_forward(q, k, v, idx, layout, scale)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        do = _contig(do)
        delta = row_dot(do, o)
        dq, dk, dv = selection_backward(do, q, k, v, idx, lse, delta, ctx.layout, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, shift, scale):
        o, lse = window_forward(q, k, v, layout, shift, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.shift, ctx.scale = layout, shift, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _contig(do)
        delta = row_dot(do, o)
        dq, dk, dv = window_backward(do, q, k, v, lse, delta, ctx.layout, ctx.shift, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def compression_attention(q, k_cmp, v_cmp, layout: BlockLayout, *, scale=None):
    """Compression branch: ``(o [N, Hq, D], lse [N, Hq] float32)``; gradients flow through ``o``."""
    _check_qkv(q, k_cmp, v_cmp, layout, name_k="k_cmp")
    if k_cmp.shape[0] != layout.num_cmp_blocks:
        raise ValueError(f"k_cmp has {k_cmp.shape[0]} rows but the layout has {layout.num_cmp_blocks} "
                         "compression blocks")
    scale = resolve_scale(scale, q.shape[2])
    return _CompressionAttention.apply(_contig(q), *_pair(k_cmp, v_cmp), layout, scale)


@torch.no_grad()
def select_blocks(q, k_cmp, lse, layout: BlockLayout, *, topk: int, scale=None) -> torch.Tensor:
    """Fused block scoring + top-k: ``idx [N, Hkv, topk]`` int32 selection block ids, best first, -1 = none.

    ``lse [N, Hq]`` is the compression branch's log-sum-exp (:func:`compression_attention`)."""
    _check_qkv(q, k_cmp, k_cmp, layout, name_k="k_cmp")
    if not isinstance(lse, torch.Tensor) or lse.shape != q.shape[:2]:
        raise ValueError(f"lse must be a tensor of shape {tuple(q.shape[:2])}")
    check_selection_args(topk, layout.window, 0)
    scale = resolve_scale(scale, q.shape[2])
    return select_blocks_forward(_contig(q), _contig(k_cmp), lse.float().contiguous(), layout, topk, scale)


def selection_attention(q, k, v, idx, layout: BlockLayout, *, scale=None):
    """Selection branch given the choice ``idx [N, Hkv, topk]``: ``o [N, Hq, D]``; gradients to q, k, v."""
    _check_qkv(q, k, v, layout)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3 or idx.shape[:2] != (q.shape[0], k.shape[1]):
        raise ValueError(f"idx must have shape [{q.shape[0]}, {k.shape[1]}, topk]")
    scale = resolve_scale(scale, q.shape[2])
    return _SelectionAttention.apply(_contig(q), *_pair(k, v), idx.int().contiguous(), layout, scale)


def window_attention(q, k, v, layout: BlockLayout, *, shift: int = 0, scale=None):
    """Window branch: ``o [N, Hq, D]``; ``shift`` is 0 or ``layout.window // 2``; gradients to q, k, v."""
    _check_qkv(q, k, v, layout)
    layout.window_partition(shift)
    scale = resolve_scale(scale, q.shape[2])
    return _WindowAttention.apply(_contig(q), *_pair(k, v), layout, shift, scale)
