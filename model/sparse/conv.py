"""Submanifold sparse convolution (3^3) and pointwise convolution (1^3) on :class:`SparseTensor`.

One module, :class:`SparseConv3d`, whose weights are stored in the released (torchsparse 2.1) layout, so released
checkpoints load one to one (RELEASED_MODEL.md section B):

- ``conv.kernel``: ``[27, Cin, Cout]`` for a 3^3 kernel, ``[Cin, Cout]`` for a 1^3 kernel; ``conv.bias``: ``[Cout]``.
- Tap ``k`` in ``0..26`` is the neighbour offset ``(dx, dy, dz) = (k % 3 - 1, (k // 3) % 3 - 1, k // 9 - 1)``:
  **x varies fastest** (torchsparse's order, RELEASED_MODEL.md B), see :func:`kernel_offsets`.
- ``y[p] = bias + sum_k x[p + offset_k] @ kernel[k]`` over the neighbours present (a correlation, not flipped).
  Submanifold: outputs exist exactly at the input voxels, in the input row order. The equivalent dense
  ``torch.nn.functional.conv3d`` weight over a grid indexed [x, y, z] (padding 1) is
  ``W[co, ci, a, b, c] = kernel[a + 3 b + 9 c, ci, co]`` (:func:`kernel_to_dense_weight`).

Backends (``backend=`` of the module):

- ``"torch"``: gather-GEMM-scatter in plain PyTorch. The neighbour map (for each of the 26 off-centre taps, the
  pairs (input row, output row)) is found with the coordinate hash (:class:`~model.sparse.tensor.CoordIndex`) and
  cached on the tensor's ``cache``, so it is built once per coordinate set. Any dtype (float64 included), CPU
  and GPU, autograd through ``index_select`` / ``index_add_``.
- ``"spconv"``: ``spconv.pytorch.SubMConv3d`` (spconv 2.3) with our kernel re-laid out; CUDA tensors in
  float16/float32 only. **Opt-in only**: spconv is installed neither on the development machines nor in CI, and
  the GPU test ``tests/test_sparse_layers.py::test_spconv_backend_matches_torch_backend`` runs only where it is
  present; until that test runs with the GPU suite and spconv is measured faster on the model's convolutions,
  nothing selects it by itself.
- ``"triton"``: one Triton kernel over a neighbour table (:mod:`model.sparse.conv_kernel`), no autograd; CUDA
  tensors (CPU ones under the Triton interpreter, for the tests).
- ``"auto"`` (default): ``"triton"`` for CUDA features of a supported dtype when no gradient is recorded
  (sampling, decoding), the torch backend otherwise (training, the CPU). Tested against each other on fresh random
  inputs (``tests/test_sparse_layers.py``).
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .tensor import NEIGHBOUR_ROWS_KEY, NEIGHBOUR_ROWS_SOURCE_KEY, SparseTensor

__all__ = [
    "BACKENDS",
    "CENTER_TAP",
    "KERNEL_VOLUME",
    "ConvKernel",
    "NeighbourMap",
    "SparseConv3d",
    "kernel_offsets",
    "kernel_to_dense_weight",
    "neighbour_map",
    "neighbour_rows",
    "spconv_available",
    "submanifold_conv3d",
]

#: Side of the 3-D kernel of the submanifold convolution.
KERNEL_SIZE = 3
#: Number of taps of the 3^3 kernel.
KERNEL_VOLUME = KERNEL_SIZE**3
#: Tap of offset (0, 0, 0).
CENTER_TAP = KERNEL_VOLUME // 2
#: Accepted values of ``backend``.
BACKENDS = ("auto", "torch", "spconv", "triton")
#: Feature dtypes spconv 2.3 runs.
_SPCONV_DTYPES = (torch.float16, torch.float32)
#: Neighbours (of 27) a voxel of a thin surface band typically has: the initialisation keeps the activation scale
#: for that many present taps.
TYPICAL_NEIGHBOURS = 9
#: Derive the neighbour table of a subset or a subdivision from the table it came from (:func:`neighbour_rows`);
#: False looks every coordinate set up in its hash (reports switch it off to time the lookup).
DERIVE_NEIGHBOUR_ROWS = True
#: Cache key of the torch backend's neighbour map.
_NMAP_CACHE_KEY = "conv3_neighbour_map"
#: Cache key of spconv's indice dictionary.
_SPCONV_CACHE_KEY = "spconv_indice_dict"


def kernel_offsets(device: torch.device | str | None = None) -> torch.Tensor:
    """``[27, 3]`` int64 offset (dx, dy, dz) of each tap: ``(k % 3 - 1, (k // 3) % 3 - 1, k // 9 - 1)``."""
    k = torch.arange(KERNEL_VOLUME, device=device)
    return torch.stack([k % KERNEL_SIZE, (k // KERNEL_SIZE) % KERNEL_SIZE, k // KERNEL_SIZE**2], dim=1) - 1


def kernel_to_dense_weight(kernel: torch.Tensor) -> torch.Tensor:
    """Released ``kernel [27, Cin, Cout]`` -> ``nn.Conv3d`` weight ``[Cout, Cin, 3, 3, 3]`` over [x, y, z]."""
    cin, cout = kernel.shape[1:]
    # tap = a + 3 b + 9 c: viewed as [c, b, a, Cin, Cout]
    return kernel.reshape(KERNEL_SIZE, KERNEL_SIZE, KERNEL_SIZE, cin, cout).permute(4, 3, 2, 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# torch backend


@dataclass(frozen=True)
class NeighbourMap:
    """Pairs of the 26 off-centre taps of one coordinate set (the centre tap is the identity).

    ``pairs``: one ``(tap, in_rows [P], out_rows [P])`` per tap with at least one pair; ``out_rows`` increase and
    never repeat within a tap, so each ``index_add_`` is free of collisions (deterministic on GPU too).
    """

    num_voxels: int
    pairs: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]


def neighbour_rows(x: SparseTensor) -> torch.Tensor:
    """``[N, 27]`` int32: the input row of each tap's neighbour of every voxel of ``x`` (-1 where absent; the centre
    tap is the row itself), found once per coordinate set and cached in ``x.cache``. Both backends read it: the
    Triton kernel directly, the torch backend through :func:`neighbour_map`.

    A coordinate set made by :meth:`SparseTensor.subset` or :func:`model.sparse.layers.sparse_subdivide` from one
    whose table exists derives its table from that one with a few gathers (:data:`DERIVE_NEIGHBOUR_ROWS`; the same
    table); any other set looks its voxels' 27 neighbours up in the coordinate hash (a sort, then a binary search
    per neighbour, some thirty element-wise passes over ``[27 N]`` int64 values: about 0.65 of the 0.91 s of GPU
    kernels of the cascade's profiled 1024 decode, reports/generate_history.md run 30)."""
    if NEIGHBOUR_ROWS_KEY in x.cache:
        return x.cache[NEIGHBOUR_ROWS_KEY]
    source = x.cache.pop(NEIGHBOUR_ROWS_SOURCE_KEY, None)
    n = x.coords.shape[0]
    if n >= 2**31:
        raise ValueError(f"{n} voxels do not fit the int32 neighbour rows")
    if source is not None and DERIVE_NEIGHBOUR_ROWS:
        rows = source()
        x.cache[NEIGHBOUR_ROWS_KEY] = rows
        return rows
    coords = x.coords.long()
    rows = torch.full((n, KERNEL_VOLUME), -1, dtype=torch.int32, device=coords.device)
    if n:
        query = coords.unsqueeze(1).repeat(1, KERNEL_VOLUME, 1)  # [N, 27, 4]
        query[:, :, 1:] += kernel_offsets(coords.device).unsqueeze(0)
        rows = x.coord_index().lookup(query.reshape(-1, 4)).view(n, KERNEL_VOLUME).to(torch.int32)
    x.cache[NEIGHBOUR_ROWS_KEY] = rows
    return rows


def neighbour_map(x: SparseTensor) -> NeighbourMap:
    """The 3^3 neighbour map of ``x``'s coordinates (pairs per off-centre tap, from :func:`neighbour_rows`), built
    once and cached in ``x.cache``."""
    if _NMAP_CACHE_KEY in x.cache:
        return x.cache[_NMAP_CACHE_KEY]
    n = x.coords.shape[0]
    pairs = []
    if n:
        taps = [t for t in range(KERNEL_VOLUME) if t != CENTER_TAP]
        src = neighbour_rows(x)[:, taps].t().long()  # [26, N] input row of each output row
        found = src >= 0
        counts = found.sum(1).tolist()
        tap_pos, out_rows = torch.nonzero(found, as_tuple=True)  # ordered by tap, then output row
        in_rows = src[tap_pos, out_rows]
        for t, o, i in zip(taps, out_rows.split(counts), in_rows.split(counts)):
            if o.numel():
                pairs.append((t, i, o))
    nmap = NeighbourMap(num_voxels=n, pairs=tuple(pairs))
    x.cache[_NMAP_CACHE_KEY] = nmap
    return nmap


def _conv3_torch(feats: torch.Tensor, nmap: NeighbourMap, kernel: torch.Tensor, bias: torch.Tensor | None):
    """Gather-GEMM-scatter: ``feats [N, Cin]``, ``kernel [27, Cin, Cout]`` -> ``[N, Cout]``."""
    taps = kernel.unbind(0)  # one backward node for all taps
    out = feats @ taps[CENTER_TAP]
    for tap, in_rows, out_rows in nmap.pairs:
        out.index_add_(0, out_rows, feats.index_select(0, in_rows) @ taps[tap])
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# spconv backend (optional; see the module docstring)


@functools.lru_cache(maxsize=1)
def _spconv():
    """``spconv.pytorch`` or ``None`` when it cannot be imported."""
    try:
        return importlib.import_module("spconv.pytorch")
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None


def spconv_available() -> bool:
    """Whether ``spconv.pytorch`` can be imported."""
    return _spconv() is not None


def _spconv_usable(feats: torch.Tensor) -> str | None:
    """``None`` when spconv can run on ``feats``, else the reason it cannot."""
    if _spconv() is None:
        return "spconv.pytorch cannot be imported"
    if not feats.is_cuda:
        return f"spconv runs CUDA tensors only, feats are on {feats.device}"
    if feats.dtype not in _SPCONV_DTYPES:
        return f"spconv runs float16/float32 only, feats are {feats.dtype}"
    if feats.shape[0] == 0:
        return "spconv needs at least one voxel"
    return None


def _spconv_weight_layout(module) -> str:
    """The layout of ``module.weight``: 'KRSC' ([Cout, 3, 3, 3, Cin], spconv 2.3 default), 'RSKC' or 'RSCK'."""
    spconv = _spconv()
    try:
        constants = importlib.import_module("spconv.constants")
        all_krsc = bool(getattr(constants, "ALL_WEIGHT_IS_KRSC", True))
    except Exception:
        all_krsc = True
    native = getattr(spconv, "ConvAlgo", None)
    is_native = native is not None and getattr(module, "algo", None) == native.Native
    if all_krsc or not is_native:
        return "KRSC"
    conv_mod = importlib.import_module("spconv.pytorch.conv")
    return "RSCK" if getattr(conv_mod, "FILTER_HWIO", False) else "RSKC"


def _kernel_to_spconv(kernel: torch.Tensor, layout: str) -> torch.Tensor:
    """Released ``[27, Cin, Cout]`` -> spconv's weight; spatial axes in the order of the index columns (x, y, z)."""
    dense = kernel_to_dense_weight(kernel)  # [Cout, Cin, a(x), b(y), c(z)]
    if layout == "KRSC":
        return dense.permute(0, 2, 3, 4, 1).contiguous()  # [Cout, x, y, z, Cin]
    if layout == "RSKC":
        return dense.permute(2, 3, 4, 0, 1).contiguous()  # [x, y, z, Cout, Cin]
    return dense.permute(2, 3, 4, 1, 0).contiguous()  # RSCK: [x, y, z, Cin, Cout]


@functools.lru_cache(maxsize=None)
def _spconv_module(cin: int, cout: int):
    """A parameter-free stand-in ``SubMConv3d`` (weights are passed at call time with ``functional_call``)."""
    spconv = _spconv()
    try:
        return spconv.SubMConv3d(cin, cout, KERNEL_SIZE, bias=True, device="meta")
    except TypeError:  # older signature without device=
        return spconv.SubMConv3d(cin, cout, KERNEL_SIZE, bias=True)


def _conv3_spconv(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor | None, training: bool):
    """``spconv.pytorch.SubMConv3d`` on ``x`` with our kernel; pairs cached in ``x.cache`` per train/eval mode."""
    spconv = _spconv()
    cin, cout = kernel.shape[1:]
    module = _spconv_module(cin, cout)
    module.train(training)
    # spconv builds backward pairs only in training mode: keep the two kinds apart
    module.indice_key = f"subm3_{'train' if training else 'eval'}"
    feats = x.feats.contiguous()
    weight = _kernel_to_spconv(kernel, _spconv_weight_layout(module)).to(feats.dtype)
    b = bias.to(feats.dtype) if bias is not None else torch.zeros(cout, dtype=feats.dtype, device=feats.device)
    extent = x.resolution or int(x.coords[:, 1:].max()) + 1
    store = x.cache.setdefault(_SPCONV_CACHE_KEY, {})
    sp_in = spconv.SparseConvTensor(feats, x.coords, [extent] * 3, x.batch_size, indice_dict=dict(store))
    sp_out = torch.func.functional_call(module, {"weight": weight, "bias": b}, (sp_in,))
    store.update(sp_out.indice_dict)
    return sp_out.features


# ---------------------------------------------------------------------------------------------------------------
# the interface


def submanifold_conv3d(
    x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto",
    training: bool = False,
) -> torch.Tensor:
    """3^3 submanifold convolution: ``x.feats [N, Cin]``, ``kernel [27, Cin, Cout]`` -> ``[N, Cout]``.

    ``training`` matters to spconv only (it builds backward pairs in training mode).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if kernel.dim() != 3 or kernel.shape[0] != KERNEL_VOLUME or kernel.shape[1] != x.num_channels:
        raise ValueError(f"kernel must have shape [27, {x.num_channels}, Cout], got {tuple(kernel.shape)}")
    if backend == "spconv":  # opt-in only (module docstring): "auto" never picks it
        reason = _spconv_usable(x.feats)
        if reason is not None:
            raise RuntimeError(f"backend='spconv' was requested but {reason}")
        return _conv3_spconv(x, kernel, bias, training)
    if backend == "triton" or (backend == "auto" and _triton_usable(x.feats, kernel, bias)):
        return _conv3_triton(x, kernel, bias)
    return _conv3_torch(x.feats, neighbour_map(x), kernel, bias)


def _triton_usable(feats: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``"auto"`` takes the Triton kernel: CUDA features of a kernel dtype, no gradient to record."""
    from .conv_kernel import KERNEL_DTYPES

    grad = torch.is_grad_enabled() and (feats.requires_grad or kernel.requires_grad or
                                        (bias is not None and bias.requires_grad))
    return feats.is_cuda and feats.dtype in KERNEL_DTYPES and not grad


def _conv3_triton(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The Triton kernel on ``x``'s neighbour rows (:func:`neighbour_rows`)."""
    from .conv_kernel import conv3_kernel

    if torch.is_grad_enabled() and (x.feats.requires_grad or kernel.requires_grad):
        raise RuntimeError("backend='triton' has no backward; use backend='torch' (or 'auto') to train")
    return conv3_kernel(x.feats, neighbour_rows(x), kernel, bias)


class ConvKernel(nn.Module):
    """The weights of one sparse convolution in the released layout: ``kernel`` and ``bias``.

    ``kernel``: ``[27, Cin, Cout]`` (3^3) or ``[Cin, Cout]`` (1^3); ``bias``: ``[Cout]`` or absent.
    Our initialisation (released weights replace it): ``kernel`` uniform in ``+-sqrt(3 / (Cin * n))`` with
    ``n = min(kernel volume, TYPICAL_NEIGHBOURS)``, which keeps the output variance equal to the input's for a voxel
    with ``n`` neighbours present. ``nn.Conv3d``'s default bound ``1/sqrt(Cin * 27)`` shrinks activations about 3x
    per convolution on surface-like voxel sets (only ~9 of 27 taps present), which stalls small models.
    ``bias`` uniform in ``+-1/sqrt(Cin * kernel volume)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        volume = kernel_size**3
        shape = (in_channels, out_channels) if volume == 1 else (volume, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = math.sqrt(3.0 / (in_channels * min(volume, TYPICAL_NEIGHBOURS)))
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            bias_bound = 1.0 / math.sqrt(in_channels * volume)
            nn.init.uniform_(self.bias, -bias_bound, bias_bound)


class SparseConv3d(nn.Module):
    """Sparse convolution with stride 1 on a :class:`SparseTensor` (submanifold for 3^3, pointwise for 1^3).

    Args:
        in_channels, out_channels: ``Cin``, ``Cout``.
        kernel_size: 3 (submanifold, 27 taps) or 1 (pointwise, ``y = x @ kernel + bias``).
        bias: learn a bias ``[Cout]``.
        backend: ``"auto"``, ``"torch"``, ``"spconv"`` or ``"triton"`` (module docstring); 1^3 kernels are a
            matrix product.

    Parameters live in ``self.conv`` (``conv.kernel``, ``conv.bias``), the released names.
    ``forward(x: SparseTensor [N, Cin]) -> SparseTensor [N, Cout]``, same coordinates and cache.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = KERNEL_SIZE, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_size not in (1, KERNEL_SIZE):
            raise ValueError(f"kernel_size must be 1 or {KERNEL_SIZE}, got {kernel_size!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.backend = backend
        self.conv = ConvKernel(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if not isinstance(x, SparseTensor):
            raise TypeError(f"x must be a SparseTensor, got {type(x).__name__}")
        if x.num_channels != self.in_channels:
            raise ValueError(f"x has {x.num_channels} channels but the convolution expects {self.in_channels}")
        if self.kernel_size == 1:
            out = x.feats @ self.conv.kernel
            if self.conv.bias is not None:
                out = out + self.conv.bias.to(out.dtype)
            return x.replace(out)
        return x.replace(submanifold_conv3d(x, self.conv.kernel, self.conv.bias, backend=self.backend,
                                            training=self.training))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"bias={self.conv.bias is not None}, backend={self.backend!r}")
