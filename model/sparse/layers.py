"""Element-wise, normalisation, resampling and position-embedding layers on :class:`SparseTensor`.

Every layer keeps batch elements apart: nothing computed for one batch element reads another's features.

- :class:`SparseLinear`, :class:`SparseSiLU`: per voxel.
- :class:`SparseGroupNorm`: ``nn.GroupNorm`` statistics per batch element over all its voxels (channels of a group
  x voxels form one statistic), computed in at least float32 (RELEASED_MODEL.md B, "Sparse GroupNorm").
- :class:`FP32LayerNorm`: per-token layer norm computed in at least float32 (on plain ``[N, C]`` tensors).
- :class:`SparseDownsample`: pooling of the voxels sharing ``coord // factor`` (the 8 children for factor 2): their
  mean, or the released model's ``sum / (n + 1)`` (:func:`pool_features`, :data:`POOL_MODES`).
- :class:`SparseSubdivide`: every voxel becomes its 8 children ``coord * 2 + {0, 1}^3`` with its features.
- :class:`AbsolutePositionEmbedder`: sin-cos embedding of the (x, y, z) coordinates (RELEASED_MODEL.md D/E.3).
- :class:`FeedForward`: Linear -> GELU(tanh) -> Linear, parameters named ``mlp.{0,2}`` as released.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import gelu_grad_kernel
from .conv import KERNEL_VOLUME, kernel_offsets
from .tensor import NEIGHBOUR_ROWS_KEY, NEIGHBOUR_ROWS_SOURCE_KEY, SparseTensor

__all__ = [
    "CHILD_OFFSETS",
    "AbsolutePositionEmbedder",
    "FP32LayerNorm",
    "FeedForward",
    "POOL_MODES",
    "PoolMap",
    "SparseDownsample",
    "SparseGroupNorm",
    "SparseLinear",
    "SparseSiLU",
    "SparseSubdivide",
    "check_pool_mode",
    "subdivided_neighbour_rows",
    "gated_linear_add",
    "gelu_linear",
    "group_norm_per_batch",
    "pool_coords",
    "pool_features",
    "pool_map",
    "sincos_position_embedding",
    "sparse_downsample",
    "sparse_subdivide",
    "subdivide_map",
]

#: Children per voxel of a subdivision (2^3).
NUM_CHILDREN = 8
#: Offsets of the 8 children, z fastest (the released order: child j has offset (j >> 2 & 1, j >> 1 & 1, j & 1)).
CHILD_OFFSETS = tuple((j >> 2 & 1, j >> 1 & 1, j & 1) for j in range(NUM_CHILDREN))
#: Base of the sin-cos frequencies: f_i = BASE^(-i / F).
POS_EMB_BASE = 10000.0
#: Pooling modes (:func:`pool_features`): ``"mean"`` divides a parent's sum by its ``n`` children; ``"released"``
#: divides by ``n + 1``, as the published ``SparseDownsample`` does (RELEASED_MODEL.md H.1).
POOL_MODES = ("mean", "released")
#: Values per frequency and axis (sin, cos) times the three axes.
_POS_EMB_VALUES_PER_FREQ = 6


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _check_sparse(x, name: str = "x") -> SparseTensor:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{name} must be a SparseTensor, got {type(x).__name__}")
    return x


# ---------------------------------------------------------------------------------------------------------------
# per-voxel layers


class SparseLinear(nn.Linear):
    """``nn.Linear`` on ``x.feats [N, Cin] -> [N, Cout]`` (parameters ``weight [Cout, Cin]``, ``bias [Cout]``)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return _check_sparse(x).replace(super().forward(x.feats))


class SparseSiLU(nn.Module):
    """SiLU of ``x.feats``."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return _check_sparse(x).replace(F.silu(x.feats))


class FP32LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` on a plain ``[..., C]`` tensor, computed in at least float32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(x.dtype)
        w = self.weight.to(cdt) if self.weight is not None else None
        b = self.bias.to(cdt) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(cdt), self.normalized_shape, w, b, self.eps).to(x.dtype)


class FeedForward(nn.Module):
    """MLP ``channels -> ratio * channels -> channels`` with GELU (tanh approximation); ``[N, C] -> [N, C]``.

    Parameters ``mlp.0.{weight,bias}`` and ``mlp.2.{weight,bias}`` (the released names).
    """

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.mlp[0], self.mlp[2]
        if x.dim() == 2 and torch.is_grad_enabled() and RECOMPUTE_HIDDEN:
            return _RecomputedMLP.apply(x, first.weight, first.bias, second.weight, second.bias, _operand_dtype(x),
                                        None, None)
        if (not torch.is_grad_enabled() and x.is_cuda and x.dim() >= 2 and x.dtype == first.weight.dtype
                and not torch.is_autocast_enabled()):  # [..., C] (the dense DiT's [B, N, C]) as [rows, C]
            rows = x.reshape(-1, x.shape[-1])
            return second(gelu_linear(rows, first.weight, first.bias)).view(*x.shape[:-1], second.out_features)
        return self.mlp(x)

    def gated_residual(self, x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, *,
                       compute_output: bool = True) -> torch.Tensor:
        """``h + gate * self(x)`` for ``x, h [N, C]`` and one gate row (``[1, C]`` or ``[C]``); under autograd
        through :class:`_RecomputedMLP`, which keeps neither the hidden layer nor the MLP's output.

        ``compute_output=False`` (under autograd only): record the branch for the backward pass but return an
        uninitialised placeholder of the output's shape and dtype (one element, expanded), skipping both products.
        For the recomputed forward of activation checkpointing, where only what the backward pass keeps is used and
        this branch's output is read by nothing (the last branch of a DiT block:
        :func:`model.nets.dit_block.recomputing`)."""
        if x.dim() == 2 and torch.is_grad_enabled() and RECOMPUTE_HIDDEN:
            first, second = self.mlp[0], self.mlp[2]
            return _RecomputedMLP.apply(x, first.weight, first.bias, second.weight, second.bias, _operand_dtype(x),
                                        h, gate.reshape(-1), compute_output)
        return torch.addcmul(h, gate.reshape(-1), self(x))


def _operand_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the matrix products' operands for ``x``: the autocast dtype under autocast, else ``x``'s."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


#: Switch for :class:`_RecomputedMLP` under autograd (off: the plain modules, which keep the hidden layer twice).
RECOMPUTE_HIDDEN = True
#: Switch for the GELU step of :class:`_RecomputedMLP`'s backward pass as one kernel
#: (:mod:`model.sparse.gelu_grad_kernel`; off, or where it does not apply: PyTorch's three kernels).
FUSED_GELU_GRAD = True
#: Token rows per chunk of :class:`_RecomputedMLP`: the hidden layers of one chunk (pre-activation, activation and
#: their gradients, ``4 x rows x 4C`` values) are the transient memory of the MLP's forward and backward; 16,384 rows
#: at C = 1024 are ~0.5 GB in bf16, against ~2.2 GB that autograd keeps for 137k tokens through the plain modules.
RECOMPUTE_CHUNK_ROWS = 16384


class _RecomputedMLP(torch.autograd.Function):
    """``Linear2(GELU_tanh(Linear1(x)))`` on ``x [N, C]`` that saves only ``x`` for the backward pass; with a
    residual stream ``h [N, C]`` and a gate ``[C]``: ``h + gate * MLP(x)`` (the DiT block's gated residual branch).

    Through the plain modules autograd keeps the 4x-wide hidden layer twice (the GELU's input and the second
    product's input): 2.2 GB per DiT block at 137k tokens in bf16, the largest activation of a training step. Here
    the backward recomputes the first product and the GELU chunk by chunk (:data:`RECOMPUTE_CHUNK_ROWS` rows): one
    extra ``[N, C] x [C, 4C]`` product per backward for ~2 GB less at the peak. The gated form keeps no copy of the
    branch output either (:func:`_gated_grads`). ``dtype``: the compute dtype (the autocast dtype under autocast,
    else x's); the weights are cast to it, products accumulate in float32 and the weight gradients are summed over
    chunks in float32 and returned in the parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype, h=None, gate=None, compute_output=True):
        ctx.save_for_backward(x, w1, b1, w2, b2, gate)
        ctx.dtype = dtype
        out_dtype = dtype if h is None else torch.promote_types(h.dtype, dtype)
        if not compute_output:  # FeedForward.gated_residual: what is saved above is all the caller uses
            return x.new_empty((), dtype=out_dtype).expand(x.shape[0], w2.shape[0])  # no [N, C] allocation
        out = torch.empty(x.shape[0], w2.shape[0], device=x.device, dtype=out_dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            w1c, b1c, w2c, b2c = (t.to(dtype) for t in (w1, b1, w2, b2))
            for rows in _row_chunks(x.shape[0]):
                act = gelu_linear(x[rows].to(dtype), w1c, b1c)
                if h is None:
                    torch.addmm(b2c, act, w2c.t(), out=out[rows])
                else:  # written into the chunk's rows of out (a contiguous view), not copied there afterwards
                    torch.addcmul(h[rows], gate.to(dtype), F.linear(act, w2c, b2c), out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, b2, gate = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            w1c, b1c = w1.to(dtype), b1.to(dtype)
            grad_in, dout = grad, grad.to(dtype)
            # the gradient reaching the GELU is (dout * gate) @ w2 = dout @ (gate[:, None] * w2): the gate scales
            # the rows of the small weight, not a pass over the [N, C] gradient
            w2g = (w2 if gate is None else w2 * gate.to(w2.dtype)[:, None]).to(dtype)
            dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            acc = torch.promote_types(dtype, torch.float32)
            dw1 = torch.zeros(w1.shape, device=x.device, dtype=acc)
            dw2 = torch.zeros(w2.shape, device=x.device, dtype=acc)
            db1 = torch.zeros(b1.shape, device=x.device, dtype=acc)
            for rows in _row_chunks(x.shape[0]):
                u, g = x[rows].to(dtype), dout[rows]
                pre = F.linear(u, w1c, b1c)
                dact = g.mm(w2g)
                if FUSED_GELU_GRAD and gelu_grad_kernel.supports(pre, dact):
                    db1.add_(gelu_grad_kernel.gelu_grad_(pre, dact))  # in place: pre -> act, dact -> dpre
                    act, dpre = pre, dact
                else:
                    act = F.gelu(pre, approximate="tanh")
                    dpre = torch.ops.aten.gelu_backward(dact, pre, approximate="tanh")
                    db1.add_(dpre.sum(0, dtype=acc))
                del pre, dact
                # gated: dout^T act (the gate applied once to the sum, see _gated_grads)
                dw2.add_(g.t().mm(act))
                del act
                dw1.add_(dpre.t().mm(u))
                if dx is not None and dx.dtype == dpre.dtype:
                    torch.mm(dpre, w1c, out=dx[rows])  # into the chunk's rows, not copied there afterwards
                elif dx is not None:
                    dx[rows] = dpre.mm(w1c)
            db2 = dout.sum(0, dtype=acc)
            dgate = None
            if gate is not None:
                dw2, db2, dgate = _gated_grads(dw2, db2, w2, b2, gate)
        return (dx, dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype), None,
                grad_in if ctx.needs_input_grad[6] else None, dgate, None)


def _gated_grads(m, s, w, b, gate):
    """Parameter and gate gradients of ``h + gate * (x @ w^T + b)`` from ``m = dout^T x [C, Cin]`` and ``s =
    dout.sum(0) [C]`` (float32): ``dw = gate[:, None] * m``, ``db = gate * s`` and ``dgate = rowsum(m * w) + b * s``
    (``dgate_c = sum_n dout[n, c] * y[n, c]`` with ``y = x w^T + b``), so the branch output ``y`` never needs to be
    kept for the backward pass. Returns ``(dw, db, dgate)``, dgate in gate's dtype."""
    g = gate.reshape(-1).to(m.dtype)
    dgate = (m * w.to(m.dtype)).sum(1)
    if b is not None:
        dgate = dgate + b.to(m.dtype) * s
    return m * g[:, None], (None if s is None else s * g), dgate.to(gate.dtype).reshape(gate.shape)


class _GatedLinearAdd(torch.autograd.Function):
    """``h + gate * (x @ w^T)`` for ``h, x [N, C]``, ``w [C, C]`` (no bias) and one gate row ``[C]``, keeping
    only ``x`` (and the parameters) for the backward pass: the plain ``addcmul(h, gate, linear(x))`` also keeps the
    product ``[N, C]`` to form the gate's gradient (:func:`_gated_grads` forms it from ``dout^T x`` instead, which
    the weight gradient needs anyway). ``dtype``: the compute dtype of the product."""

    @staticmethod
    def forward(ctx, h, x, w, gate, dtype):
        ctx.save_for_backward(x, w, gate)
        ctx.dtype = dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.addcmul(h, gate.to(dtype), F.linear(x.to(dtype), w.to(dtype)))

    @staticmethod
    def backward(ctx, grad):
        x, w, gate = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            dout = grad.to(dtype)
            acc = torch.promote_types(dtype, torch.float32)
            # (dout * gate) @ w as dout @ (gate[:, None] * w): the gate scales the weight's rows, not the gradient
            dx = (dout.mm((w * gate.to(w.dtype)[:, None]).to(dtype)).to(x.dtype) if ctx.needs_input_grad[1]
                  else None)
            dw, _, dgate = _gated_grads(dout.t().mm(x.to(dtype)).to(acc), None, w, None, gate)
        return grad if ctx.needs_input_grad[0] else None, dx, dw.to(w.dtype), dgate, None


def gated_linear_add(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``h + gate * (x @ weight^T)`` (``gate``: one row ``[1, C]`` or ``[C]``) for autograd without keeping the
    product (:class:`_GatedLinearAdd`); the compute dtype is the autocast dtype under autocast, else x's."""
    return _GatedLinearAdd.apply(h, x, weight, gate.reshape(-1), _operand_dtype(x))


def _row_chunks(n: int):
    """Slices of :data:`RECOMPUTE_CHUNK_ROWS` rows covering ``range(n)``."""
    return (slice(start, min(n, start + RECOMPUTE_CHUNK_ROWS)) for start in range(0, n, RECOMPUTE_CHUNK_ROWS))


def gelu_linear(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GELU_tanh(u @ weight^T + bias)`` without autograd. On CUDA in half precision the bias and the GELU run in
    the matrix product's epilogue (cuBLASLt): the 4x-wide hidden layer of an MLP is written once instead of written,
    read and written again by a separate GELU kernel."""
    if u.is_cuda and u.dtype in (torch.float16, torch.bfloat16):
        return torch._addmm_activation(bias, u, weight.t(), use_gelu=True)
    return F.gelu(F.linear(u, weight, bias), approximate="tanh")


# ---------------------------------------------------------------------------------------------------------------
# group norm per batch element


def group_norm_per_batch(
    feats: torch.Tensor,
    batch_index: torch.Tensor,
    batch_size: int,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm of ``feats [N, C]`` with statistics per (batch element, group); returns ``[N, C]``, input dtype.

    Equal to ``nn.GroupNorm`` applied to each batch element's ``feats.T[None]`` (``[1, C, n_b]``). Two-pass
    (mean, then centred variance), in at least float32. ``batch_index [N]`` int64, ``weight, bias [C]``.
    """
    n, c = feats.shape
    if c % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of channels ({c})")
    cdt = _compute_dtype(feats.dtype)
    per_group = c // num_groups
    with torch.autocast(device_type=feats.device.type, enabled=False):
        x = feats.to(cdt).view(n, num_groups, per_group)
        count = torch.bincount(batch_index, minlength=batch_size).to(cdt).clamp_min(1) * per_group  # [B]
        mean = x.new_zeros(batch_size, num_groups).index_add_(0, batch_index, x.sum(-1)) / count[:, None]
        centred = x - mean.index_select(0, batch_index).unsqueeze(-1)
        var = x.new_zeros(batch_size, num_groups).index_add_(0, batch_index, centred.square().sum(-1)) / count[:, None]
        y = (centred * torch.rsqrt(var + eps).index_select(0, batch_index).unsqueeze(-1)).view(n, c)
        if weight is not None:
            y = y * weight.to(cdt)
        if bias is not None:
            y = y + bias.to(cdt)
    return y.to(feats.dtype)


class SparseGroupNorm(nn.Module):
    """GroupNorm per batch element over all its voxels; parameters ``weight, bias [C]`` as ``nn.GroupNorm``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if not isinstance(num_groups, int) or num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_groups ({num_groups!r}) must be a positive int dividing num_channels "
                             f"({num_channels})")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        _check_sparse(x)
        if x.num_channels != self.num_channels:
            raise ValueError(f"x has {x.num_channels} channels but the norm expects {self.num_channels}")
        return x.replace(group_norm_per_batch(x.feats, x.batch_index, x.batch_size, self.num_groups,
                                              self.weight, self.bias, self.eps))

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------------------------
# resampling


@dataclass(frozen=True)
class PoolMap:
    """Children -> parents of one pooling.

    ``coords [M, 4]`` int32 parent voxels (batch, x, y, z) in raster order (batch, x, y, z ascending, z fastest);
    ``inverse [N]`` int64 parent row of every child row; ``counts [M]`` children per parent; ``cache``: the
    coordinate cache shared by every tensor on the parent voxels.
    """

    coords: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    cache: dict


def pool_map(x: SparseTensor, factor: int = 2) -> PoolMap:
    """The pooling map ``coord -> coord // factor`` of ``x``'s coordinates (cached in ``x.cache``)."""
    _check_sparse(x)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    key = ("pool", factor)
    if key not in x.cache:
        parent = x.coords.clone()
        parent[:, 1:] = torch.div(parent[:, 1:], factor, rounding_mode="floor")
        if parent.shape[0]:
            uniq, inverse, counts = torch.unique(parent, dim=0, return_inverse=True, return_counts=True)
        else:
            uniq, inverse, counts = parent, parent.new_zeros(0).long(), parent.new_zeros(0).long()
        x.cache[key] = PoolMap(uniq.to(torch.int32).contiguous(), inverse.long(), counts, {})
    return x.cache[key]


def pool_coords(x: SparseTensor, factor: int = 2) -> SparseTensor:
    """A feature-less (``[M, 0]``) tensor on the pooled voxels of ``x`` (shares the parent cache)."""
    pm = pool_map(x, factor)
    res = None if x.resolution is None else -(-x.resolution // factor)
    return SparseTensor(pm.coords, x.feats.new_zeros(pm.coords.shape[0], 0), batch_size=x.batch_size,
                        resolution=res, cache=pm.cache, validate=False)


def check_pool_mode(mode) -> str:
    """``mode`` if it is one of :data:`POOL_MODES`, else a ``ValueError`` naming the choices."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {mode!r}")
    return mode


def pool_features(feats: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool child rows into parent rows: ``feats [N, C]``, parent row ``inverse [N]`` (int64) of every child and
    children per parent ``counts [M]`` -> ``[M, C]`` in ``feats.dtype``; sums accumulate in at least float32.

    ``mode="mean"``: ``sum / n``. ``mode="released"``: ``sum / (n + 1)``: the published ``SparseDownsample`` pools
    with ``torch.scatter_reduce(zeros, ..., reduce="mean")`` and the default ``include_self=True``, so the zero it
    starts from counts as one more element (a single child gives half its value, a full 8^3 block 512/513 of the
    mean). The released weights were trained through it, so released configurations use it (RELEASED_MODEL.md H.1).
    Parents with no child (``n = 0``) get zeros in both modes.
    """
    check_pool_mode(mode)
    cdt = _compute_dtype(feats.dtype)
    with torch.autocast(device_type=feats.device.type, enabled=False):
        total = feats.new_zeros(counts.shape[0], feats.shape[1], dtype=cdt).index_add(0, inverse, feats.to(cdt))
        denom = counts.to(cdt) + (1 if mode == "released" else 0)
        return (total / denom.clamp_min(1).unsqueeze(1)).to(feats.dtype)


def sparse_downsample(x: SparseTensor, factor: int = 2, mode: str = "mean") -> SparseTensor:
    """Pooling by ``factor``: parent voxel ``coord // factor`` gets the pooled features of its children
    (:func:`pool_features`: their mean, or ``sum / (n + 1)`` with ``mode="released"``).

    ``x.feats [N, C] -> [M, C]``, parents in raster order (:class:`PoolMap`); sums accumulate in at least float32
    (the released SparseDownsample uses float64; the difference is rounding only). Resolution ``ceil(R / factor)``.
    """
    check_pool_mode(mode)
    pm = pool_map(x, factor)
    pooled = pool_features(x.feats, pm.inverse, pm.counts, mode)
    res = None if x.resolution is None else -(-x.resolution // factor)
    return SparseTensor(pm.coords, pooled, batch_size=x.batch_size, resolution=res, cache=pm.cache, validate=False)


def subdivide_map(x: SparseTensor) -> tuple[torch.Tensor, dict]:
    """Children ``coords [8 N, 4]`` int32 of ``x`` (parent-major, child offsets :data:`CHILD_OFFSETS`) and their
    shared coordinate cache; cached in ``x.cache``."""
    _check_sparse(x)
    if "subdivide" not in x.cache:
        offsets = torch.tensor(CHILD_OFFSETS, dtype=torch.int32, device=x.device)  # [8, 3]
        children = x.coords.unsqueeze(1).repeat(1, NUM_CHILDREN, 1)  # [N, 8, 4]
        children[:, :, 1:] = children[:, :, 1:] * 2 + offsets
        x.cache["subdivide"] = (children.view(-1, 4).contiguous(), {})
    return x.cache["subdivide"]


@functools.lru_cache(maxsize=None)
def _child_taps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For child ``j`` and tap ``t`` (offset ``o``, :func:`model.sparse.conv.kernel_offsets`): the neighbour
    ``2 parent + child_offset_j + o`` is child ``j'`` of the parent's neighbour at tap ``t'``. Returns
    ``(t' [8 * 27] int64, j' [8, 27] int32)``."""
    child = torch.tensor(CHILD_OFFSETS, dtype=torch.long)  # [8, 3]
    step = child[:, None, :] + kernel_offsets()[None]  # [8, 27, 3], each in -1..2
    parent = torch.div(step, 2, rounding_mode="floor")  # -1..1: the parent's neighbour offset
    sub = step - 2 * parent  # 0..1: the child offset under that parent
    parent_tap = (parent[..., 0] + 1) + 3 * (parent[..., 1] + 1) + 9 * (parent[..., 2] + 1)
    child_index = (sub[..., 0] << 2) | (sub[..., 1] << 1) | sub[..., 2]
    return parent_tap.reshape(-1).to(device), child_index.to(torch.int32).to(device)


def subdivided_neighbour_rows(table: torch.Tensor) -> torch.Tensor:
    """The neighbour table ``[8 N, 27]`` int32 of :func:`sparse_subdivide`'s output from its input's ``table
    [N, 27]`` (:func:`model.sparse.conv.neighbour_rows`): every parent keeps all 8 children, so a child's neighbour
    is child ``j'`` of one of the parent's neighbours (or of the parent itself), at row ``8 q + j'`` where ``q`` is
    that neighbour's row, and absent where it is. The same table as a lookup in the children's coordinate hash,
    from one gather and three element-wise passes."""
    n = table.shape[0]
    if NUM_CHILDREN * n >= 2**31:
        raise ValueError(f"{NUM_CHILDREN * n} voxels do not fit the int32 neighbour rows")
    parent_tap, child_index = _child_taps(table.device)
    rows = table.index_select(1, parent_tap).view(n, NUM_CHILDREN, KERNEL_VOLUME)
    # an absent neighbour (-1) gives 8 * -1 + j' in [-8, -1]: clamped back to -1
    return rows.mul_(NUM_CHILDREN).add_(child_index).clamp_(min=-1).view(n * NUM_CHILDREN, KERNEL_VOLUME)


def sparse_subdivide(x: SparseTensor) -> SparseTensor:
    """Each voxel -> its 8 children at ``coord * 2 + {0, 1}^3``, with the parent's features.

    ``x.feats [N, C] -> [8 N, C]``: row ``8 p + j`` is child ``j`` (:data:`CHILD_OFFSETS`) of parent row ``p``, so
    batch order is kept. Resolution doubles. When ``x`` holds the convolution's neighbour table, the children's is
    derived from it on first use (:func:`subdivided_neighbour_rows`).
    """
    coords, cache = subdivide_map(x)
    table = x.cache.get(NEIGHBOUR_ROWS_KEY)
    if table is not None and NEIGHBOUR_ROWS_KEY not in cache:
        cache[NEIGHBOUR_ROWS_SOURCE_KEY] = functools.partial(subdivided_neighbour_rows, table)
    res = None if x.resolution is None else 2 * x.resolution
    return SparseTensor(coords, x.feats.repeat_interleave(NUM_CHILDREN, dim=0), batch_size=x.batch_size,
                        resolution=res, cache=cache, validate=False)


class SparseDownsample(nn.Module):
    """Module form of :func:`sparse_downsample` (pooling by ``factor``; ``mode`` in :data:`POOL_MODES`)."""

    def __init__(self, factor: int = 2, mode: str = "mean"):
        super().__init__()
        self.factor, self.mode = factor, check_pool_mode(mode)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_downsample(x, self.factor, self.mode)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, mode={self.mode!r}"


class SparseSubdivide(nn.Module):
    """Module form of :func:`sparse_subdivide`."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_subdivide(x)


# ---------------------------------------------------------------------------------------------------------------
# position embedding


def sincos_position_embedding(xyz: torch.Tensor, channels: int, factor: float = 1.0,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Absolute sin-cos embedding ``[N, channels]`` of positions ``xyz [N, 3]`` (RELEASED_MODEL.md D, E.3).

    With ``F = channels // 6`` frequencies ``f_i = 10000^(-i / F)`` and ``p = xyz * factor``: for each axis in
    the order x, y, z the ``2 F`` values ``[sin(p f_0 .. p f_{F-1}), cos(p f_0 .. p f_{F-1})]``, concatenated,
    then ``channels - 6 F`` zeros (width 512: 85 frequencies, 510 values + 2 zeros). Computed in ``dtype``.
    """
    if not isinstance(channels, int) or channels < _POS_EMB_VALUES_PER_FREQ:
        raise ValueError(f"channels must be an int >= {_POS_EMB_VALUES_PER_FREQ}, got {channels!r}")
    if xyz.dim() != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape [N, 3], got {tuple(xyz.shape)}")
    num_freqs = channels // _POS_EMB_VALUES_PER_FREQ
    freqs = 1.0 / POS_EMB_BASE ** (torch.arange(num_freqs, dtype=dtype, device=xyz.device) / num_freqs)
    angles = (xyz.to(dtype) * factor).unsqueeze(-1) * freqs  # [N, 3, F]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(xyz.shape[0], -1)  # [N, 6F]
    return F.pad(emb, (0, channels - emb.shape[1]))


class AbsolutePositionEmbedder(nn.Module):
    """Sin-cos embedding of a :class:`SparseTensor`'s coordinates (no parameters).

    ``forward(x) -> [N, channels]`` in ``x.dtype`` (computed in at least float32). Without autograd it is cached in
    ``x.cache`` (a sampling loop embeds one coordinate set at every step); while a gradient is recorded it is not:
    a training step embeds its coordinates once, and the cache would hold the ``[N, C]`` table through the whole
    backward pass (562 MB at 137k tokens x 1024 channels in float32, at the step's memory peak).
    """

    def __init__(self, channels: int, factor: float = 1.0):
        super().__init__()
        self.channels, self.factor = channels, factor

    def forward(self, x: SparseTensor) -> torch.Tensor:
        _check_sparse(x)
        key = ("pos_emb", self.channels, self.factor, x.dtype)
        emb = x.cache.get(key)
        if emb is None:
            emb = sincos_position_embedding(x.coords[:, 1:], self.channels, self.factor,
                                            _compute_dtype(x.dtype)).to(x.dtype)
            if not torch.is_grad_enabled():
                x.cache[key] = emb
        return emb

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}"
