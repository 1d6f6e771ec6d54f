"""The two refiners of the released cascade (RELEASED_MODEL.md E.4-E.6), with the released parameter names and shapes
(``statedict-refiner.txt``, ``statedict-refiner_1024.txt``), so ``model_refiner.ckpt["refiner"]`` and
``model_refiner_1024.ckpt["refiner"]`` load with strict key matching (:mod:`model.pipeline.pretrained`).

Shared network (``unet3d1``, :class:`UNet3D`): block widths ``(8, 32, 128, 512)``, GroupNorm (4 groups, eps 1e-5,
float32) + SiLU; ``conv_in`` 3^3; 4 down blocks of ``layers_per_block`` residual blocks (``resnets``; 1^3
``conv_shortcut`` where the width changes), each but the last followed by a Conv3d kernel 2 stride 2
(``downsamplers.0.conv``); a middle of ``layers_mid_block + 1`` residual blocks (``mid_block.resnets``); 4 up blocks
of ``layers_per_block + 1`` residual blocks, each fed the running features concatenated with one skip tensor popped
from the down path (in the order the down path pushed them: ``conv_in``'s output, then every residual block's and
downsampler's), each but the last followed by a ConvTranspose3d kernel 2 stride 2 (``upsamplers.0.conv``);
``conv_norm_out`` GroupNorm + SiLU; no output conv (returns ``block_channels[0]`` channels).

512 refiner (:class:`VoxelRefiner`, released ``Voxel_RefinerXL``), per 192^3 patch: ``conv_in`` Conv3d(1 -> 8) on
the SDF, ``latent_mlp.net`` (Linear 32 -> 32 -> 32 -> 32 -> 8 with ReLU between) on the decoder's 32 features,
concatenated (SDF branch first) -> UNet (16 -> 8) -> adaptive block 1 -> ``mid_conv`` -> adaptive block 2 ->
``conv_out`` (8 -> 1) -> adaptive block 3 (filter predicted from the features entering ``conv_out``) -> tanh.
Adaptive block ``i``: ``adaptive_conv{i}`` (3^3 conv 8 -> 8, ReLU, 3^3 conv 8 -> 27 without bias) predicts 27
weights per voxel, L1-normalised over the 27; they form a spatially varying 3^3 filter shared by all channels
(tap ``9 a + 3 b + c`` reads the zero-padded input at offset ``(a - 1, b - 1, c - 1)`` along the three spatial
axes), applied 3 times. :func:`refine_512` runs it over the 512^3 grid in 27 overlapping patches (offsets 0, 160,
320) blended linearly over the 32-voxel overlaps.

1024 sign refiner (:class:`SignRefiner`, released ``Voxel_RefinerXL_sign``): ``conv_in`` Conv3d(1 -> 8) -> UNet
(8 -> 8) -> ``conv_out`` Conv3d(8 -> 1) -> logits; :func:`sign_refine_1024` pools the decoded 1024^3 sparse SDF by 2
(the released ``sum / (n + 1)``, :class:`RefinerConfig`), densifies it at 512^3 (empty = 1), predicts
``sigmoid >= 0.5 -> +1 else -1`` in 27 patches of 256^3 (offsets 0, 128, 256; later patches overwrite overlaps),
repeats each sign 2x2x2, and returns ``|SDF| * sign`` with the decoded values written back at the decoded voxels
(:func:`predict_sign` gives the sign grid alone).

Assumptions where RELEASED_MODEL.md leaves a choice open (the parameter layout does not depend on them):
the UNet concatenates ``[running features, skip]`` (the diffusers convention its parameter names come from); the 512
refiner concatenates ``[SDF branch, feature branch]``; no activation between the adaptive blocks, ``mid_conv`` and
``conv_out``; the third adaptive block's filter is predicted from the output of adaptive block 2; the L1
normalisation divides by ``max(sum |w|, 1e-12)``; the 1-D blending ramps are ``linspace(0, 1, overlap)``.

Inference paths (the same numbers as the plain ones, up to float rounding; ``tests/test_refiner_fast.py``):

- **empty patches run once**: a patch holding no decoded voxel reads SDF 1 and features 0 everywhere (the sign
  refiner: pooled SDF 1), so every such patch has the same output; :func:`refine_512` and :func:`predict_sign` run
  the network on the first one and reuse its output for the others (bitwise the same result), and report
  ``patches`` / ``run`` / ``reused`` / ``empty`` in an optional ``stats`` dict.
- **group norm**: on CUDA :class:`GroupNorm32` runs the chunked kernels of
  :func:`model.nets.group_norm_kernel.group_norm` (PyTorch's own reduces each of the 4 group rows of a patch in one
  thread block and took 73-86% of a patch).
- **memory layout**: ``channels_last=True`` runs the patches in ``torch.channels_last_3d`` (NDHWC); off by default,
  as it was 5-7% slower for both refiners on an H100 while every group norm copied to NCDHW and back (the weights
  are converted for the call and back afterwards). ``channels_last="wide"`` runs only the UNet's levels below full
  resolution in NDHWC (:func:`model.nets.refiner_layout.set_layout`); not yet timed.
  ``cudnn_benchmark`` sets ``torch.backends.cudnn.benchmark`` for the call. ``python -m model.reports.refiner``
  times the variants on a GPU.
- **element-wise traffic**: :func:`adaptive_filter` accumulates its 27 taps in place into one buffer; the residual
  blocks apply SiLU and the shortcut in place when autograd is off; with :data:`SHORTCUT_KERNEL` on CUDA a block's
  1^3 shortcut of at most 8 output channels (full resolution) and the residual sum are one Triton pass
  (:mod:`model.nets.conv1x1_kernel`) instead of cuDNN's layout transposes, its GEMM, the bias and the sum.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.nets.refiner_layout import layout_of, patch_format, running_as
from model.nets.refiner_layout import is_channels_last as _is_channels_last
from model.sparse.layers import check_pool_mode, pool_features

__all__ = [
    "RefinerConfig",
    "SignRefiner",
    "UNet3D",
    "VoxelRefiner",
    "adaptive_filter",
    "patch_offsets",
    "predict_sign",
    "refine_512",
    "sign_refine_1024",
]

#: Taps of the adaptive 3^3 filter.
ADAPTIVE_TAPS = 27
#: Times each adaptive filter is applied.
ADAPTIVE_ITERATIONS = 3
#: Threshold of the sign refiner on ``sigmoid(logit)``.
SIGN_THRESHOLD = 0.5


@dataclass(frozen=True)
class RefinerConfig:
    """Sizes of the refiners. ``block_channels``: UNet widths (the first is also the width of ``conv_in``, the
    feature MLP's output and the adaptive blocks); ``layers_per_block`` / ``layers_mid_block``: the released params
    (up blocks get ``layers_per_block + 1`` residual blocks, the middle ``layers_mid_block + 1``);
    ``feature_channels``: decoder features the 512 refiner reads (the sparse VAE's last width, 32);
    ``resolution``: side of the grid the network runs on (512 for both: the sign refiner runs on the 1024 field
    pooled to 512); ``patch_size``/``patch_stride``: patch tiling (offsets ``0, stride, ..``, ending flush with the
    grid); ``pool_mode``: how the sign refiner pools the 1024^3 SDF by 2, ``"released"`` (``sum / (n + 1)`` over a
    parent's ``n`` decoded children, as the published SparseDownsample: the ``released_*`` presets and
    :mod:`model.pipeline.pretrained` loading) or ``"mean"`` (:func:`model.sparse.layers.pool_features`)."""

    in_channels: int = 1
    out_channels: int = 1
    block_channels: tuple[int, ...] = (8, 32, 128, 512)
    layers_per_block: int = 2
    layers_mid_block: int = 2
    norm_groups: int = 4
    norm_eps: float = 1e-5
    feature_channels: int = 32
    resolution: int = 512
    patch_size: int = 192
    patch_stride: int = 160
    pool_mode: str = "mean"

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_groups", "feature_channels",
                     "resolution", "patch_size", "patch_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.layers_mid_block, int) or self.layers_mid_block < 0:
            raise ValueError(f"layers_mid_block must be a non-negative int, got {self.layers_mid_block!r}")
        if self.in_channels != 1 or self.out_channels != 1:
            raise ValueError("the refiners read and write one SDF channel (in_channels = out_channels = 1)")
        if not isinstance(self.block_channels, tuple) or len(self.block_channels) < 1 or \
                any(not isinstance(c, int) or c < 1 or c % self.norm_groups for c in self.block_channels):
            raise ValueError(f"block_channels must be positive ints divisible by norm_groups ({self.norm_groups}), "
                             f"got {self.block_channels!r}")
        factor = 2 ** (len(self.block_channels) - 1)
        if self.patch_size % factor:
            raise ValueError(f"patch_size {self.patch_size} must be divisible by {factor} (UNet levels)")
        patch_offsets(self.resolution, self.patch_size, self.patch_stride)  # validates the tiling
        check_pool_mode(self.pool_mode)

    def replace(self, **overrides) -> RefinerConfig:
        return dataclasses.replace(self, **overrides)

    @property
    def overlap(self) -> int:
        return max(self.patch_size - self.patch_stride, 0)

    @classmethod
    def released_512(cls, **overrides) -> RefinerConfig:
        """The released ``refiner`` (Voxel_RefinerXL, patch 192): 27 patches at offsets 0, 160, 320."""
        return cls(**{"pool_mode": "released", **overrides})

    @classmethod
    def released_1024(cls, **overrides) -> RefinerConfig:
        """The released ``refiner_1024`` (Voxel_RefinerXL_sign, patch 256 on the pooled 512^3 grid)."""
        return cls(**{"patch_size": 256, "patch_stride": 128, "pool_mode": "released", **overrides})

    @classmethod
    def tiny(cls, **overrides) -> RefinerConfig:
        """Small refiners for tests: widths (8, 8, 16, 16), 8 decoder features, 16^3 grid in 8^3 patches."""
        sizes = {"block_channels": (8, 8, 16, 16), "layers_per_block": 1, "layers_mid_block": 1,
                 "feature_channels": 8, "resolution": 16, "patch_size": 8, "patch_stride": 4}
        return cls(**{**sizes, **overrides})


def patch_offsets(resolution: int, patch: int, stride: int) -> list[int]:
    """Offsets ``0, stride, ..`` of the patches along one axis; the last one must end at ``resolution`` and
    neighbouring patches may overlap by at most ``stride`` (only neighbours overlap)."""
    if patch > resolution:
        raise ValueError(f"patch_size {patch} exceeds the grid side {resolution}")
    if (resolution - patch) % stride:
        raise ValueError(f"patches of {patch} every {stride} do not end flush with the grid side {resolution}")
    if patch > 2 * stride:
        raise ValueError(f"patches of {patch} every {stride} overlap more than their neighbours")
    return list(range(0, resolution - patch + 1, stride))


# ---------------------------------------------------------------------------------------------------------------
# UNet


class GroupNorm32(nn.GroupNorm):
    """``nn.GroupNorm`` with float32 statistics, returned in the input's dtype and memory layout. Two paths, equal up
    to float rounding:

    - **CUDA without autograd** (fp16/bf16/fp32 input): :func:`model.nets.group_norm_kernel.group_norm`, statistics in
      float32 chunks merged in float64 and one rounding of ``(x - mean) * rstd * weight + bias`` to the input dtype.
      PyTorch's CUDA group norm reduces each (batch element, group) row in a single thread block, 4 blocks for a whole
      patch: 17 ms a call on a 256^3 patch, 73-86% of a refiner's time on an H100 (reports/refiner.md); the chunked
      kernels read the volume twice at full bandwidth. A channels-last input is read and written channels-last by the
      kernels' channels-last twins (no copy to NCDHW and back).
    - **everywhere else** (the CPU, autograd, float64): upcast to float32, ``F.group_norm``, cast back (the released
      ``GroupNorm32``).

    :attr:`cuda_native` = False forces the float32 path everywhere (the previous behaviour, for comparisons).
    ``forward(x, silu=True)`` returns ``SiLU(norm(x))``: on the CUDA path the kernel applies it before its one
    rounding (no second pass over the volume); elsewhere :func:`_silu` runs on the rounded norm output, as the
    released ``nn.SiLU`` after ``GroupNorm32`` does."""

    #: Use the chunked kernels on CUDA (class docstring).
    cuda_native: bool = True

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        from model.nets.fused import FUSED_DTYPES
        from model.nets.group_norm_kernel import group_norm

        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.cuda_native and x.is_cuda and x.dtype in FUSED_DTYPES and not torch.is_grad_enabled():
                y = group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)
                return y.contiguous(memory_format=torch.channels_last_3d) if _is_channels_last(x) else y
            cdt = torch.promote_types(x.dtype, torch.float32)
            y = F.group_norm(x.to(cdt), self.num_groups, self.weight.to(cdt), self.bias.to(cdt), self.eps).to(x.dtype)
            y = y.contiguous(memory_format=torch.channels_last_3d) if _is_channels_last(x) else y
            return _silu(y) if silu else y


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when autograd is off (``x`` is always a fresh norm output here)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


#: Inference kernels of the refiners (Triton, CUDA, no autograd); reports switch them off to time the PyTorch path.
#: ``ADAPTIVE_KERNEL``: :func:`model.nets.adaptive_kernel.adaptive_filter_kernel` for :func:`adaptive_filter`;
#: ``CONV_KERNEL``: :func:`model.nets.conv3d_kernel.conv3d_small` for the 3^3 convolutions of few channels
#: (:class:`Conv3x3`; as one matrix product the 1^3 shortcuts were slower than cuDNN, reports/refiner.md, so they
#: have their own kernel below).
ADAPTIVE_KERNEL = True
CONV_KERNEL = True
#: ``SHORTCUT_KERNEL``: :func:`model.nets.conv1x1_kernel.conv1x1_residual` for the residual blocks' 1^3 shortcuts
#: with at most :data:`SHORTCUT_MAX_COUT` output channels, fused with the residual sum (cuDNN transposes the whole
#: concatenated input around such a convolution, and the bias and the residual sum are two more passes). Measured
#: (``python -m model.reports.refiner --sweep-conv``, one H100, reports/refiner.md): 40 -> 8 at 256^3 1.25 -> 1.15
#: ms, 16 -> 8 0.98 -> 0.59 ms against cuDNN + add; the 32-output shortcuts one level down are slower in the kernel
#: (160 -> 32 at 128^3 0.63 -> 2.06 ms), so they stay with cuDNN.
SHORTCUT_KERNEL = True
SHORTCUT_MAX_COUT = 8
#: ``BIAS_KERNEL``: the cuDNN convolutions (the wider levels, the resamplers) run without their bias, and
#: :func:`model.nets.bias_add_kernel.bias_add_` adds it in one contiguous pass, with the residual block's sum where one
#: follows (PyTorch adds a cuDNN convolution's bias with its generic broadcast kernel: 212 ms of refine_1024's kernels).
#: Off until ``python -m model.reports.refiner`` times it on a GPU.
BIAS_KERNEL = False
#: A 3^3 convolution takes the Triton kernel when ``Cin * Cout`` is at most this (every full-resolution convolution
#: of both refiners: 1 -> 8, 8 -> 8, 16 -> 8, 8 -> 27, 8 -> 1); wider ones stay with cuDNN's implicit GEMMs.
SMALL_CONV_WORK = 16 * 27
#: ... and at most this many input channels: the 40 -> 8 convolution of the last up block stays with cuDNN until
#: ``python -m model.reports.refiner --sweep-conv`` measures a kernel launch faster for it.
SMALL_CONV_MAX_CIN = 32


class Conv3x3(nn.Conv3d):
    """``nn.Conv3d(cin, cout, 3, padding=1)`` (same parameters and names). On CUDA without autograd, for a
    contiguous NCDHW input with ``Cin * Cout <= SMALL_CONV_WORK``, the Triton kernel
    :func:`model.nets.conv3d_kernel.conv3d_small`: cuDNN runs these few-channel convolutions as implicit GEMMs in
    NDHWC and transposes every input and output around them (the transposes alone took 30 of the 162 ms of kernels
    of a 256^3 sign-refiner patch), while the kernel reads NCDHW directly. ``forward(x, relu=False)``: ``relu``
    applies ReLU (fused into the kernel's store)."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``relu``: ReLU of the output; ``residual``: a tensor of the output's shape added to it (not with
        ``relu``; in place of the output when autograd is off, and on the cuDNN path with :data:`BIAS_KERNEL` in
        the bias's pass)."""
        if relu and residual is not None:
            raise ValueError("relu and residual are not taken together")
        if (CONV_KERNEL and x.is_cuda and not torch.is_grad_enabled()
                and self.in_channels * self.out_channels <= SMALL_CONV_WORK
                and self.in_channels <= SMALL_CONV_MAX_CIN and x.is_contiguous()):
            from model.nets.conv3d_kernel import supports

            if supports(x, self.weight):
                from model.nets.conv3d_kernel import conv3d_small

                y = conv3d_small(x, self.weight, self.bias, relu=relu)
                return y if residual is None else y.add_(residual)
        y = _conv_with_bias(self, x, residual)
        return F.relu(y, inplace=not torch.is_grad_enabled()) if relu else y


def _conv_with_bias(conv: nn.Conv3d | nn.ConvTranspose3d, x: torch.Tensor,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` (+ ``residual``) through PyTorch's convolution (cuDNN on CUDA). On CUDA without autograd and with
    :data:`BIAS_KERNEL`, the convolution runs without its bias and :func:`model.nets.bias_add_kernel.bias_add_` adds
    the bias and the residual in one pass; elsewhere PyTorch adds the bias and the residual is added after (in place
    when autograd is off)."""
    if BIAS_KERNEL and conv.bias is not None and x.is_cuda and not torch.is_grad_enabled():
        from model.nets.bias_add_kernel import bias_add_, supports

        if isinstance(conv, nn.ConvTranspose3d):
            y = F.conv_transpose3d(x, conv.weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups,
                                   conv.dilation)
        else:
            y = conv._conv_forward(x, conv.weight, None)
        if supports(y, residual):
            return bias_add_(y, conv.bias, residual)
        y.add_(conv.bias.view(1, -1, *([1] * (y.dim() - 2))))
    else:
        y = conv(x) if not isinstance(conv, Conv3x3) else nn.Conv3d.forward(conv, x)
    if residual is None:
        return y
    return y + residual if torch.is_grad_enabled() else y.add_(residual)


def _conv3(cin: int, cout: int, bias: bool = True) -> Conv3x3:
    return Conv3x3(cin, cout, bias=bias)


class ResnetBlock3D(nn.Module):
    """``shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``; ``conv_shortcut`` (1^3) when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.conv2 = _conv3(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv1(self.norm1(x, silu=True)), silu=True)
        if self.conv_shortcut is None:
            return x + self.conv2(h) if torch.is_grad_enabled() else self.conv2(h, residual=x)
        if SHORTCUT_KERNEL and x.is_cuda and not torch.is_grad_enabled():
            from model.nets.conv1x1_kernel import conv1x1_residual, supports

            h = self.conv2(h)
            weight = self.conv_shortcut.weight
            if weight.shape[0] <= SHORTCUT_MAX_COUT and supports(x, weight, h):  # h + shortcut(x) in one pass, into h
                return conv1x1_residual(x, weight, self.conv_shortcut.bias, h, out=h)
            return h.add_(_conv_with_bias(self.conv_shortcut, x))
        if torch.is_grad_enabled():
            return self.conv_shortcut(x) + self.conv2(h)
        return self.conv2(h, residual=_conv_with_bias(self.conv_shortcut, x))


class _Resample(nn.Module):
    """Holds ``conv`` (the released name): Conv3d or ConvTranspose3d, kernel 2, stride 2."""

    def __init__(self, channels: int, transpose: bool):
        super().__init__()
        cls = nn.ConvTranspose3d if transpose else nn.Conv3d
        self.conv = cls(channels, channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_with_bias(self.conv, x)


class DownBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, downsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(cin if i == 0 else cout, cout, groups, eps) for i in range(layers))
        self.downsamplers = nn.ModuleList([_Resample(cout, transpose=False)]) if downsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, in_channels: list[int], cout: int, upsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(c, cout, groups, eps) for c in in_channels)
        self.upsamplers = nn.ModuleList([_Resample(cout, transpose=True)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1))
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, layers: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(channels, channels, groups, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class UNet3D(nn.Module):
    """The refiners' UNet (module docstring): ``[B, in_channels, P, P, P] -> [B, block_channels[0], P, P, P]``."""

    def __init__(self, in_channels: int, config: RefinerConfig):
        super().__init__()
        widths, g, eps = config.block_channels, config.norm_groups, config.norm_eps
        last = len(widths) - 1
        self.conv_in = _conv3(in_channels, widths[0])
        skip_widths = [widths[0]]
        down = []
        for i, w in enumerate(widths):
            down.append(DownBlock3D(widths[max(i - 1, 0)], w, config.layers_per_block, i < last, g, eps))
            skip_widths += [w] * (config.layers_per_block + (1 if i < last else 0))
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = MidBlock3D(widths[-1], config.layers_mid_block + 1, g, eps)
        up, prev = [], widths[-1]
        for i, w in enumerate(reversed(widths)):
            ins = []
            for j in range(config.layers_per_block + 1):
                ins.append((prev if j == 0 else w) + skip_widths.pop())
            up.append(UpBlock3D(ins, w, i < last, g, eps))
            prev = w
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = GroupNorm32(g, widths[0], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, skips)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h, skips)
        return self.conv_norm_out(h, silu=True)


# ---------------------------------------------------------------------------------------------------------------
# adaptive filter


def adaptive_filter(x: torch.Tensor, logits: torch.Tensor, iterations: int = ADAPTIVE_ITERATIONS) -> torch.Tensor:
    """Apply the per-voxel 3^3 filter ``logits [B, 27, D, H, W]`` (L1-normalised over the 27 taps) ``iterations``
    times to every channel of ``x [B, C, D, H, W]``; tap ``9 a + 3 b + c`` reads the zero-padded input at offset
    ``(a - 1, b - 1, c - 1)``.

    The weights are normalised in float32 and stored once in ``x``'s dtype (NCDHW, so each tap is one dense plane);
    each iteration copies its input into the inside of one zero-bordered buffer and accumulates the 27 taps into one
    output buffer in place (``addcmul_``), in ``x``'s memory layout: no new tensor per tap. On CUDA without autograd
    (:data:`ADAPTIVE_KERNEL`) one Triton kernel per iteration does the same (:mod:`model.nets.adaptive_kernel`:
    the 27 taps read from the cache in one pass instead of 27 passes over the volume, float32 sums)."""
    if ADAPTIVE_KERNEL and x.is_cuda and not torch.is_grad_enabled():
        from model.nets.adaptive_kernel import KERNEL_DTYPES, adaptive_filter_kernel

        if x.dtype in KERNEL_DTYPES:
            y = adaptive_filter_kernel(x, logits, iterations)
            return y.contiguous(memory_format=torch.channels_last_3d) if _is_channels_last(x) else y
    b, c, d, h, wd = x.shape
    denom = torch.linalg.vector_norm(logits, ord=1, dim=1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12)
    w = torch.empty(logits.shape, dtype=x.dtype, device=x.device)
    torch.div(logits, denom, out=w)  # float32 division, rounded once to x's dtype
    del denom
    fmt = torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format
    padded = torch.empty((b, c, d + 2, h + 2, wd + 2), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
    inside = padded[:, :, 1:d + 1, 1:h + 1, 1:wd + 1]
    out = None
    for _ in range(iterations):
        inside.copy_(x)  # x's values now live in padded: out may overwrite x from the second iteration on
        if out is None:
            out = torch.empty((b, c, d, h, wd), dtype=x.dtype, device=x.device, memory_format=fmt)
        for tap in range(ADAPTIVE_TAPS):
            ta, tb, tc = tap // 9, (tap // 3) % 3, tap % 3
            shifted = padded[:, :, ta:ta + d, tb:tb + h, tc:tc + wd]
            if tap == 0:
                torch.mul(w[:, :1], shifted, out=out)
            else:
                out.addcmul_(w[:, tap:tap + 1], shifted)
        x = out
    return x


class AdaptiveConv(nn.Sequential):
    """``adaptive_conv{i}`` (released names ``0`` and ``2``): 3^3 conv C -> C, ReLU, 3^3 conv C -> 27 without bias;
    the ReLU is fused into the first convolution's kernel where that runs (:class:`Conv3x3`)."""

    def __init__(self, channels: int):
        super().__init__(_conv3(channels, channels), nn.ReLU(), _conv3(channels, ADAPTIVE_TAPS, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[2](self[0](x, relu=True))


class LatentMLP(nn.Module):
    """Per-voxel MLP ``net`` = Linear(F, F), ReLU, Linear(F, F), ReLU, Linear(F, F), ReLU, Linear(F, out)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        f = in_channels
        self.net = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, f), nn.ReLU(), nn.Linear(f, f), nn.ReLU(),
                                 nn.Linear(f, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F, D, H, W] -> [B, out, D, H, W]``."""
        return self.net(x.movedim(1, -1)).movedim(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# the refiners


class VoxelRefiner(nn.Module):
    """The 512 refiner (module docstring): ``forward(sdf [B, 1, P, P, P], feats [B, F, P, P, P]) -> [B, 1, P, P, P]``
    (tanh)."""

    def __init__(self, config: RefinerConfig | None = None):
        super().__init__()
        self.config = config = config or RefinerConfig.released_512()
        w = config.block_channels[0]
        self.unet3d1 = UNet3D(2 * w, config)
        self.conv_in = _conv3(config.in_channels, w)
        self.latent_mlp = LatentMLP(config.feature_channels, w)
        self.adaptive_conv1 = AdaptiveConv(w)
        self.adaptive_conv2 = AdaptiveConv(w)
        self.adaptive_conv3 = AdaptiveConv(w)
        self.mid_conv = _conv3(w, w)
        self.conv_out = _conv3(w, config.out_channels)

    def forward(self, sdf: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.conv_in(sdf), self.latent_mlp(feats.to(sdf.dtype))], dim=1)
        if _is_channels_last(feats):  # keep the patch's layout (cat falls back to NCDHW when its inputs differ)
            h = h.contiguous(memory_format=torch.channels_last_3d)
        h = self.unet3d1(h)
        h = adaptive_filter(h, self.adaptive_conv1(h))
        h = self.mid_conv(h)
        h = adaptive_filter(h, self.adaptive_conv2(h))
        out = self.conv_out(h)
        out = adaptive_filter(out, self.adaptive_conv3(h))
        return torch.tanh(out)


class SignRefiner(nn.Module):
    """The 1024 sign refiner (module docstring): ``forward(sdf [B, 1, P, P, P]) -> logits [B, 1, P, P, P]``."""

    def __init__(self, config: RefinerConfig | None = None):
        super().__init__()
        self.config = config = config or RefinerConfig.released_1024()
        w = config.block_channels[0]
        self.unet3d1 = UNet3D(w, config)
        self.conv_in = _conv3(config.in_channels, w)
        self.conv_out = _conv3(w, config.out_channels)

    def forward(self, sdf: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.unet3d1(self.conv_in(sdf)))


# ---------------------------------------------------------------------------------------------------------------
# whole-grid helpers


def _patch_members(coords: torch.Tensor, lo: tuple[int, int, int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded voxels inside the patch ``[lo, lo + size)^3``: their patch-relative coordinates ``[M, 3]`` and
    their rows ``[M]`` of ``coords [N, 3]`` (int64)."""
    rel = coords - torch.tensor(lo, device=coords.device, dtype=coords.dtype)
    rows = ((rel >= 0) & (rel < size)).all(1).nonzero().squeeze(1)
    return rel[rows], rows


def _densify(rel: torch.Tensor, values: torch.Tensor, size: int, fill: float,
             memory_format: torch.memory_format) -> torch.Tensor:
    """``[1, C, size, size, size]`` in ``memory_format``: ``fill`` everywhere, ``values [M, C]`` at ``rel [M, 3]``."""
    out = torch.empty((1, values.shape[1], size, size, size), dtype=values.dtype, device=values.device,
                      memory_format=memory_format).fill_(fill)
    out[0, :, rel[:, 0], rel[:, 1], rel[:, 2]] = values.T
    return out


class _PatchCounter:
    """Counts the patches run and reused, and fills the caller's ``stats`` dict (``patches``, ``run``, ``reused``,
    ``empty``) as it goes."""

    def __init__(self, total: int, stats: dict | None):
        self.stats = stats if stats is not None else {}
        self.stats.update(patches=total, run=0, reused=0, empty=0)

    def count(self, empty: bool, reused: bool) -> None:
        self.stats["empty"] += int(empty)
        self.stats["reused" if reused else "run"] += 1


def _ramp_weights(offsets: list[int], size: int, overlap: int, device, dtype) -> list[torch.Tensor]:
    """1-D blending weights per patch: rising over the overlap with the previous patch, falling over the next."""
    out = []
    ramp = torch.linspace(0.0, 1.0, overlap, device=device, dtype=dtype) if overlap else None
    for i in range(len(offsets)):
        w = torch.ones(size, device=device, dtype=dtype)
        if overlap and i > 0:
            w[:overlap] = ramp
        if overlap and i + 1 < len(offsets):
            w[size - overlap:] = 1.0 - ramp
        out.append(w)
    return out


def _patch_bar(total: int, desc: str, progress: bool):
    """A tqdm bar over ``total`` patches, or a stand-in that does nothing."""
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="patch", leave=False)

    class _Quiet:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Quiet()


@torch.no_grad()
def refine_512(refiner: VoxelRefiner, coords: torch.Tensor, sdf: torch.Tensor, feats: torch.Tensor, *,
               dtype: torch.dtype | None = None, progress: bool = False, channels_last: bool | None = None,
               cudnn_benchmark: bool | None = None, reuse_empty: bool = True,
               stats: dict | None = None) -> torch.Tensor:
    """The 512 refiner over the whole grid: decoded voxels ``coords [N, 3]`` (x, y, z on the refiner's grid),
    ``sdf [N]`` and ``feats [N, F]`` -> refined dense field ``[R, R, R]`` (float32), from overlapping patches blended
    linearly over their overlaps. Empty voxels read SDF 1 and features 0. ``progress``: a tqdm bar over the
    patches.

    ``channels_last``: True runs the patches in ``torch.channels_last_3d``, ``"wide"`` the UNet's levels below full
    resolution only (:func:`model.nets.refiner_layout.set_layout`), False NCDHW throughout; None (the default) takes
    :data:`model.nets.refiner_layout.DEFAULT_LAYOUT` (NCDHW); ``cudnn_benchmark``: the value of
    ``torch.backends.cudnn.benchmark`` during the call (None: unchanged); ``reuse_empty``: run the network once for
    all the patches without a decoded voxel (their inputs are identical) and reuse its output (False: run every
    patch); ``stats``: a dict filled with ``patches``, ``run``, ``reused`` and ``empty`` (patch counts)."""
    cfg = refiner.config
    p, r = cfg.patch_size, cfg.resolution
    offs = patch_offsets(r, p, cfg.patch_stride)
    dev = coords.device
    dtype = dtype or next(refiner.parameters()).dtype
    layout = layout_of(channels_last)
    fmt = patch_format(layout)
    ramps = _ramp_weights(offs, p, cfg.overlap, dev, torch.float32)
    out = torch.zeros(r, r, r, device=dev)
    coords = coords.long()
    sdf, feats = sdf.reshape(-1, 1).to(dtype), feats.to(dtype)
    counter = _PatchCounter(len(offs) ** 3, stats)
    empty_pred = None
    bar = _patch_bar(len(offs) ** 3, "refine 512", progress)
    with running_as(refiner, layout, cudnn_benchmark):
        for i, ox in enumerate(offs):
            for j, oy in enumerate(offs):
                for k, oz in enumerate(offs):
                    bar.update()
                    rel, rows = _patch_members(coords, (ox, oy, oz), p)
                    empty = rows.numel() == 0
                    reuse = reuse_empty and empty and empty_pred is not None
                    if reuse:
                        pred = empty_pred
                    else:
                        s = _densify(rel, sdf[rows], p, 1.0, fmt)
                        f = _densify(rel, feats[rows], p, 0.0, fmt)
                        pred = refiner(s, f)[0, 0].float()
                        del s, f
                        if reuse_empty and empty:
                            empty_pred = pred
                    counter.count(empty, reuse)
                    weight = ramps[i][:, None, None] * ramps[j][None, :, None] * ramps[k][None, None, :]
                    out[ox:ox + p, oy:oy + p, oz:oz + p] += weight * pred
    bar.close()
    return out


def _patches_near(points: torch.Tensor, offsets: list[int], size: int, resolution: int,
                  margin: int) -> torch.Tensor:
    """``[n, n, n]`` bool (``n = len(offsets)``): whether patch ``(i, j, k)`` has the last word (no later patch
    overwrites it) on some grid voxel within ``margin`` voxels (per axis) of one of ``points [K, 3]``. Along an axis
    the patch that has the last word on a voxel is the last one covering it, a non-decreasing function of the
    coordinate, so the voxels around a point give a range of patch indices per axis."""
    n = len(offsets)
    last = torch.zeros(resolution, dtype=torch.long, device=points.device)
    for i, off in enumerate(offsets):
        last[off:off + size] = i
    lo = last[(points - margin).clamp(0, resolution - 1)]  # [K, 3]
    hi = last[(points + margin).clamp(0, resolution - 1)]
    idx = torch.arange(n, device=points.device)
    within = (lo[:, :, None] <= idx) & (idx <= hi[:, :, None])  # [K, 3, n]: patch index i on axis a is in range
    near = torch.zeros(n, n, n, dtype=torch.bool, device=points.device)
    for i in range(n):
        for j in range(n):
            both = within[:, 0, i] & within[:, 1, j]
            near[i, j] = (both[:, None] & within[:, 2]).any(0)
    return near


@torch.no_grad()
def predict_sign(refiner: SignRefiner, coords: torch.Tensor, sdf: torch.Tensor, resolution: int = 1024, *,
                 dtype: torch.dtype | None = None, progress: bool = False, channels_last: bool | None = None,
                 cudnn_benchmark: bool | None = None, reuse_empty: bool = True, stats: dict | None = None,
                 near: int | None = None) -> torch.Tensor:
    """The sign refiner's inside/outside grid on its own grid (half the field's side): decoded voxels ``coords
    [N, 3]`` on the ``resolution^3`` grid, ``sdf [N]`` -> ``[resolution / 2]^3`` float32 of ``+1`` (outside) / ``-1``
    (inside). The sparse SDF is pooled by 2 (``config.pool_mode``; the published decoder's duplicate rows at its
    chunk seams, which count twice there, do not exist in ours) and densified (empty = 1) patch by patch; later
    patches overwrite overlaps. Each value stands for the 2^3 field voxels under it (:func:`sign_refine_1024`).
    ``progress``: a tqdm bar over the patches; ``channels_last``, ``cudnn_benchmark``, ``reuse_empty`` and
    ``stats``: as in :func:`refine_512` (a patch is empty when no pooled voxel falls in it).

    ``near``: only the values within ``near`` voxels (per axis, on the refiner's grid) of a pooled decoded voxel
    are wanted (the cascade's extraction reads the grid only at corners of cells that hold a decoded voxel, and its
    CPU path whole bricks around them): patches that have the last word on none of those voxels are not run (their
    share of the grid keeps ``+1``, ``stats["skipped"]`` counts them). The wanted values are the same bits as
    without it. None runs every patch (the whole grid is right)."""
    cfg = refiner.config
    if resolution != 2 * cfg.resolution:
        raise ValueError(f"the sign refiner runs at {cfg.resolution}^3, so the field must be "
                         f"{2 * cfg.resolution}^3, got {resolution}")
    dev = coords.device
    dtype = dtype or next(refiner.parameters()).dtype
    layout = layout_of(channels_last)
    fmt = patch_format(layout)
    # pool the sparse SDF by 2 onto the refiner's grid (cfg.pool_mode: the released model's sum / (n + 1)); the
    # parent keys are built column by column and nothing of the decoded voxels' size outlives the pooling (an int64
    # copy of the coordinates, 24 bytes a voxel, had been held through every patch: 1.4 GB at 57M voxels)
    r = cfg.resolution
    key = torch.div(coords[:, 0], 2, rounding_mode="floor").long()
    for axis in (1, 2):
        key = key.mul_(r).add_(torch.div(coords[:, axis], 2, rounding_mode="floor"))
    uniq, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    del key
    pooled = pool_features(sdf.reshape(-1, 1).float(), inverse, counts, cfg.pool_mode).to(dtype)
    del inverse, counts
    pooled_coords = torch.stack([uniq // (r * r), (uniq // r) % r, uniq % r], dim=1)
    p = cfg.patch_size
    offs = patch_offsets(r, p, cfg.patch_stride)
    sign = torch.ones(r, r, r, device=dev)
    counter = _PatchCounter(len(offs) ** 3, stats)
    counter.stats["skipped"] = 0
    wanted = None
    if near is not None:
        if isinstance(near, bool) or not isinstance(near, int) or near < 0:
            raise ValueError(f"near must be a non-negative int or None, got {near!r}")
        wanted = _patches_near(pooled_coords, offs, p, r, near).tolist()
    empty_sign = None
    bar = _patch_bar(len(offs) ** 3, "refine 1024", progress)
    with running_as(refiner, layout, cudnn_benchmark):
        for i, ox in enumerate(offs):
            for j, oy in enumerate(offs):
                for k, oz in enumerate(offs):
                    bar.update()
                    if wanted is not None and not wanted[i][j][k]:
                        counter.stats["skipped"] += 1
                        continue
                    rel, rows = _patch_members(pooled_coords, (ox, oy, oz), p)
                    empty = rows.numel() == 0
                    reuse = reuse_empty and empty and empty_sign is not None
                    if reuse:
                        patch_sign = empty_sign
                    else:
                        s = _densify(rel, pooled[rows], p, 1.0, fmt)
                        prob = torch.sigmoid(refiner(s)[0, 0].float())
                        del s
                        patch_sign = torch.where(prob >= SIGN_THRESHOLD, 1.0, -1.0)
                        if reuse_empty and empty:
                            empty_sign = patch_sign
                    counter.count(empty, reuse)
                    sign[ox:ox + p, oy:oy + p, oz:oz + p] = patch_sign
    bar.close()
    return sign


@torch.no_grad()
def sign_refine_1024(refiner: SignRefiner, coords: torch.Tensor, sdf: torch.Tensor, resolution: int = 1024, *,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """The sign refiner over the whole grid: decoded voxels ``coords [N, 3]`` on the ``resolution^3`` grid (twice
    the refiner's), ``sdf [N]`` -> dense field ``[resolution]^3`` = ``|SDF| * sign`` (empty voxels ``|1|``), with
    the decoded values written back at the decoded voxels. (A dense 1024^3 field is 4.3 GB in float32: the cascade
    keeps :func:`predict_sign`'s grid instead and fills the empty voxels from it during extraction.)"""
    sign = predict_sign(refiner, coords, sdf, resolution, dtype=dtype)
    c = coords.long()
    field = sign.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    field[c[:, 0], c[:, 1], c[:, 2]] = sdf.reshape(-1).float()
    return field
