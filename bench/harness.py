"""What the GPU benchmark runs for each case: the kernel API, per-case inputs, and the timed closures.

The kernels are looked up by name in ``ssa_kernels`` (the public API); a missing function makes the components
that need it skip with the reason. In the dry run (``--dry-run``, CPU, tiny inputs) ``--ssa-standin`` replaces
missing functions by thin wrappers over the dense reference with the kernels' signatures, only to exercise the
benchmark's own code paths; their figures are labelled ``reference-standin`` and mean nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bench import baselines
from bench.cases import (
    COMPONENT_COMPRESSION,
    COMPONENT_FLEX_SELECTION,
    COMPONENT_OP,
    COMPONENT_SCORING,
    COMPONENT_SELECTION,
    COMPONENT_WINDOW,
    PASS_FWD,
    Case,
    DenseCase,
    case_coords,
)
from bench.flops import SSAWork, ssa_work
from bench.inputs import DenseInputs, SSAInputs, make_dense_inputs, make_ssa_inputs
from bench.timing import MS_PER_S

#: The window shift of the timed op (the first block of the model is unshifted).
SHIFT = 0
#: The kernel functions the benchmark calls, by name (the public API of ``ssa_kernels``).
KERNEL_FUNCTIONS = (
    "spatial_sparse_attention",
    "compression_attention",
    "select_blocks",
    "selection_attention",
    "window_attention",
)
#: What each component calls; the choice (``idx``) needs compression_attention (for lse) and select_blocks.
_CHOICE = ("compression_attention", "select_blocks")
COMPONENT_NEEDS = {
    COMPONENT_OP: ("spatial_sparse_attention",),
    COMPONENT_COMPRESSION: ("compression_attention",),
    COMPONENT_SCORING: _CHOICE,
    COMPONENT_SELECTION: _CHOICE + ("selection_attention",),
    COMPONENT_WINDOW: ("window_attention",),
    COMPONENT_FLEX_SELECTION: _CHOICE,
}
#: Block size used to fetch (cached) coordinates when only the token count matters (dense baselines).
DENSE_COORDS_BLOCK = 8
#: Implementation label of our kernels in the records.
IMPL_SSA = "ssa"
IMPL_STANDIN = "reference-standin"


class Skip(Exception):
    """This item cannot run here; the message is the skip reason."""


# ------------------------------------------------------------------------------------------------------------------
# The kernel API (or the dry run's stand-in)
# ------------------------------------------------------------------------------------------------------------------


class ReferenceStandIn:
    """The kernels' signatures on top of ``reference`` (dense, slow): for the CPU dry run of the benchmark only."""

    @staticmethod
    def spatial_sparse_attention(q, k, v, k_cmp, v_cmp, gate, layout, topk=8, shift=0, scale=None):
        import reference

        return reference.spatial_sparse_attention(
            q, k, v, k_cmp, v_cmp, gate, layout.coords, compression_block=layout.compression_block,
            selection_block=layout.selection_block, topk=topk, window=layout.window, shift=shift, scale=scale,
        )

    @staticmethod
    def compression_attention(q, k_cmp, v_cmp, layout, scale=None):
        import reference

        return reference.compression_attention(q, k_cmp, v_cmp, layout.coords,
                                               compression_block=layout.compression_block, scale=scale)

    @staticmethod
    def select_blocks(q, k_cmp, lse, layout, topk=8, scale=None):
        import reference

        scores = reference.block_scores(q, k_cmp, lse, layout.coords, compression_block=layout.compression_block,
                                        selection_block=layout.selection_block, scale=scale)
        return reference.select_blocks(scores, topk).to(torch.int32)

    @staticmethod
    def selection_attention(q, k, v, idx, layout, scale=None):
        import reference

        return reference.selection_attention(q, k, v, idx, layout.coords, selection_block=layout.selection_block,
                                             scale=scale)

    @staticmethod
    def window_attention(q, k, v, layout, shift=0, scale=None):
        import reference

        return reference.window_attention(q, k, v, layout.coords, window=layout.window, shift=shift, scale=scale)


@dataclass
class KernelAPI:
    """The functions found (name -> callable), why the others are missing, and the implementation label."""

    functions: dict
    missing: dict
    impl: str
    build_layout: Callable

    def require(self, component: str) -> None:
        gone = [f"ssa_kernels.{n}: {self.missing[n]}" for n in COMPONENT_NEEDS[component] if n in self.missing]
        if gone:
            raise Skip("SSA kernel API not available yet (" + "; ".join(gone) + ")")

    def __getattr__(self, name):
        fns = self.__dict__.get("functions", {})
        if name in fns:
            return fns[name]
        raise AttributeError(name)


def load_kernel_api(*, standin: bool = False) -> KernelAPI:
    """Look the kernel functions up in ``ssa_kernels``; with ``standin`` fill the gaps with the reference."""
    from ssa_kernels.layout import build_layout as layout_builder

    functions, missing = {}, {}
    try:
        import ssa_kernels
    except Exception as exc:  # the package is mid-edit: report it, do not crash collection
        ssa_kernels = None
        import_error = f"import ssa_kernels failed: {type(exc).__name__}: {exc}"
    for name in KERNEL_FUNCTIONS:
        fn = getattr(ssa_kernels, name, None) if ssa_kernels is not None else None
        if callable(fn):
            functions[name] = fn
        else:
            missing[name] = import_error if ssa_kernels is None else "not defined (yet) in ssa_kernels"
    impl = IMPL_SSA
    if standin and missing:
        for name in list(missing):
            functions[name] = getattr(ReferenceStandIn, name)
        missing = {}
        impl = IMPL_STANDIN
    builder = getattr(ssa_kernels, "build_layout", None) if ssa_kernels is not None else None
    return KernelAPI(functions, missing, impl, builder if callable(builder) else layout_builder)


# ------------------------------------------------------------------------------------------------------------------
# Timed operations
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class TimedOp:
    """``out()`` -> output tensor; ``grad_inputs`` the leaves a backward differentiates (empty: forward only)."""

    out: Callable[[], torch.Tensor]
    grad_inputs: list
    dout: torch.Tensor | None
    impl: str
    notes: dict = field(default_factory=dict)
    no_backward_reason: str = "forward only: no gradient flows through this component"

    @property
    def has_backward(self) -> bool:
        return bool(self.grad_inputs)

    def closure(self, passname: str) -> Callable[[], None]:
        """``fwd``: the forward (autograd recording, as inside fwd+bwd); ``fwdbwd``: forward then backward."""
        if passname == PASS_FWD:
            def fwd():
                self.out()
            return fwd
        if not self.has_backward:
            raise Skip(self.no_backward_reason)

        def fwdbwd():
            torch.autograd.grad(self.out(), self.grad_inputs, self.dout)
        return fwdbwd


def _first(x):
    return x[0] if isinstance(x, tuple) else x


class SSAContext:
    """Layout, inputs and (lazily) the top-k choice of one case on one device."""

    def __init__(self, case: Case, api: KernelAPI, *, device, dtype, max_tokens: int | None,
                 heads: tuple[int, int, int] | None = None):
        cfg = case.cfg
        self.case, self.cfg, self.api, self.device = case, cfg, api, torch.device(device)
        #: (Hq, Hkv, D) actually used: the configuration's, or smaller ones in the dry run.
        self.heads = heads or (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim)
        coords = case_coords(case.shape, compression_block=cfg.compression_block,
                             selection_block=cfg.selection_block, max_tokens=max_tokens)
        self.coords = coords.to(self.device)
        self.layout = api.build_layout(self.coords, compression_block=cfg.compression_block,
                                       selection_block=cfg.selection_block, window=cfg.window)
        self.inputs: SSAInputs = make_ssa_inputs(self.layout, *self.heads, mode=case.inputs, dtype=dtype)
        self._idx = None
        self._lse = None
        self._work = None

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    def _choice(self):
        if self._idx is None:
            self.api.require(COMPONENT_SCORING)
            x = self.inputs
            with torch.no_grad():
                _, lse = self.api.compression_attention(x.q, x.k_cmp, x.v_cmp, self.layout)
                self._lse = lse.detach()
                self._idx = self.api.select_blocks(x.q, x.k_cmp, self._lse, self.layout, topk=self.cfg.topk)
        return self._lse, self._idx

    @property
    def work(self) -> SSAWork:
        """FLOPs and key counts; the selection part is None when the choice cannot be computed here."""
        if self._work is None:
            try:
                _, idx = self._choice()
            except Skip:
                idx = None
            self._work = ssa_work(self.layout, self.heads[0], self.heads[2], idx=idx, shift=SHIFT)
        return self._work

    def op(self, component: str) -> TimedOp:
        """The timed closure of a component (raises :class:`Skip` when the API for it is missing)."""
        self.api.require(component)
        x, lay, cfg, api = self.inputs, self.layout, self.cfg, self.api
        if component == COMPONENT_OP:
            return TimedOp(
                lambda: api.spatial_sparse_attention(x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gate, lay, topk=cfg.topk,
                                                     shift=SHIFT),
                [x.q, x.k, x.v, x.k_cmp, x.v_cmp, x.gate], x.dout, api.impl)
        if component == COMPONENT_COMPRESSION:
            return TimedOp(lambda: _first(api.compression_attention(x.q, x.k_cmp, x.v_cmp, lay)),
                           [x.q, x.k_cmp, x.v_cmp], x.dout, api.impl)
        if component == COMPONENT_SCORING:
            lse, _ = self._choice()

            def score():
                with torch.no_grad():
                    return api.select_blocks(x.q, x.k_cmp, lse, lay, topk=cfg.topk)
            return TimedOp(score, [], None, api.impl)
        if component == COMPONENT_SELECTION:
            _, idx = self._choice()
            return TimedOp(lambda: api.selection_attention(x.q, x.k, x.v, idx, lay), [x.q, x.k, x.v], x.dout,
                           api.impl)
        if component == COMPONENT_WINDOW:
            return TimedOp(lambda: api.window_attention(x.q, x.k, x.v, lay, shift=SHIFT), [x.q, x.k, x.v], x.dout,
                           api.impl)
        if component == COMPONENT_FLEX_SELECTION:
            return self._flex_selection()
        raise ValueError(f"unknown component {component!r}")

    def _flex_selection(self) -> TimedOp:
        _, idx = self._choice()
        flex, impl = baselines.flex_function(self.device)
        x, lay = self.inputs, self.layout
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mask, density = baselines.flex_selection_block_mask(idx, lay.token_sel, lay.sel_offsets, self.heads[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        build_ms = (time.perf_counter() - t0) * MS_PER_S
        cpu = self.device.type != "cuda"
        # FlexAttention refuses CPU inputs that require grad, even under no_grad: give the dry run detached ones.
        q4, k4, v4 = (t.detach() if cpu else t for t in (x.q, x.k, x.v))
        q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q4, k4, v4))
        dout4 = x.dout.unsqueeze(0).transpose(1, 2)
        notes = {"block_mask_build_ms": build_ms, "block_mask_tile_density": density}
        if cpu:
            return _cpu_flex_forward(lambda: flex(q4, k4, v4, block_mask=mask, enable_gqa=True),
                                     f"{impl} + selection block mask", notes)
        return TimedOp(lambda: flex(q4, k4, v4, block_mask=mask, enable_gqa=True), [x.q, x.k, x.v], dout4,
                       f"{impl} + selection block mask", notes)


class DenseContext:
    """Inputs of the dense baselines for one (shape, heads)."""

    def __init__(self, dcase: DenseCase, *, device, dtype, max_tokens: int | None,
                 heads: tuple[int, int, int] | None = None):
        coords = case_coords(dcase.shape, compression_block=DENSE_COORDS_BLOCK, selection_block=DENSE_COORDS_BLOCK,
                             max_tokens=max_tokens)
        self.dcase = dcase
        self.device = torch.device(device)
        self.num_tokens = int(coords.shape[0])
        self.heads = heads or (dcase.num_q_heads, dcase.num_kv_heads, dcase.head_dim)
        self.inputs: DenseInputs = make_dense_inputs(self.num_tokens, *self.heads, device=self.device, dtype=dtype)

    def op(self, impl: str, *, dry_run: bool) -> TimedOp:
        inputs = self.inputs
        if impl == "flex" and self.device.type != "cuda":
            # FlexAttention refuses CPU inputs that require grad, even under no_grad: detached ones for the dry run.
            inputs = DenseInputs(*(t.detach() for t in (inputs.q, inputs.k, inputs.v)), inputs.dout)
        try:
            d = baselines.prepare(impl, inputs, dry_run=dry_run)
        except baselines.Unavailable as exc:
            raise Skip(str(exc)) from exc
        if impl == "flex" and self.device.type != "cuda":
            return _cpu_flex_forward(d.out, d.impl, {"gqa": d.gqa})
        return TimedOp(d.out, d.grad_inputs, d.dout, d.impl, {"gqa": d.gqa})


def _cpu_flex_forward(out, impl, notes) -> TimedOp:
    """FlexAttention on CPU (dry run): forward only, without autograd (it has no CPU backward)."""
    def fwd():
        with torch.no_grad():
            return out()
    return TimedOp(fwd, [], None, impl, notes, no_backward_reason="FlexAttention has no backward on CPU (dry run)")
