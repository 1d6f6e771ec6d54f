"""Memory layouts of the refiners' patches (:mod:`model.nets.refiner`): NCDHW, channels-last (NDHWC) throughout,
or channels-last below full resolution only; the weights laid out for a call and restored afterwards.

cuDNN lays a convolution's output out as its input or its weights are (channels-last when either is), so the weights'
layout decides the layout of every level; the refiners' group norm and adaptive filter keep their input's layout
(:func:`model.nets.group_norm_kernel.group_norm`), and the few-channel Triton convolutions at full resolution read
NCDHW.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["DEFAULT_LAYOUT", "LAYOUTS", "is_channels_last", "layout_of", "patch_format", "running_as", "set_layout",
           "wide_modules"]


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether the 5-D ``x`` is laid out channels-last (NDHWC) and not also contiguous (one channel: ambiguous)."""
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


#: Layouts a refiner runs in (:func:`set_layout`): ``"contiguous"`` (NCDHW throughout), ``"channels_last"`` (NDHWC
#: throughout) and ``"wide"``: NDHWC from the first downsampler to the last upsampler (the UNet's levels of 32 to
#: 1,024 channels, where cuDNN runs every convolution in NDHWC and transposes NCDHW tensors around it), NCDHW at
#: full resolution, where the few-channel Triton convolutions read NCDHW.
LAYOUTS = ("contiguous", "channels_last", "wide")
#: The layout of :func:`model.nets.refiner.refine_512` and :func:`model.nets.refiner.predict_sign` when their
#: ``channels_last`` is None (the cascade's calls); reports set it to time the others in the cascade.
DEFAULT_LAYOUT = "contiguous"


def layout_of(channels_last) -> str:
    """The :data:`LAYOUTS` entry of the ``channels_last`` argument: None (:data:`DEFAULT_LAYOUT`), False, True or
    ``"wide"``."""
    if channels_last is None:
        if DEFAULT_LAYOUT not in LAYOUTS:
            raise ValueError(f"DEFAULT_LAYOUT must be one of {LAYOUTS}, got {DEFAULT_LAYOUT!r}")
        return DEFAULT_LAYOUT
    if channels_last is False:
        return "contiguous"
    if channels_last is True:
        return "channels_last"
    if channels_last == "wide":
        return "wide"
    raise ValueError(f"channels_last must be None, False, True or 'wide', got {channels_last!r}")


def patch_format(layout: str) -> torch.memory_format:
    """The memory layout the patches' inputs come in for ``layout`` (:data:`LAYOUTS`): channels-last only for
    ``"channels_last"`` (NCDHW by default: channels-last throughout was 5-7% slower on an H100 for both refiners,
    reports/refiner.md)."""
    return torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format


def wide_modules(module: nn.Module) -> list[nn.Module]:
    """The modules of ``module``'s UNet below full resolution (``"wide"`` layout): the first downsampler, the other
    down blocks, the middle and every up block but the last."""
    unet = getattr(module, "unet3d1", module)
    mods = [unet.down_blocks[0].downsamplers] if unet.down_blocks[0].downsamplers is not None else []
    return mods + [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]


def set_layout(module: nn.Module, layout: str) -> nn.Module:
    """Lay ``module``'s (a refiner's or a UNet3D's) 5-D weights out for ``layout`` (:data:`LAYOUTS`), in place;
    cuDNN then picks the matching layout for each convolution's output. Returns ``module``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    module.to(memory_format=torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format)
    if layout == "wide":
        for part in wide_modules(module):
            part.to(memory_format=torch.channels_last_3d)
    return module


@contextlib.contextmanager
def running_as(module: nn.Module, layout: str, cudnn_benchmark: bool | None):
    """``module``'s 5-D weights laid out for ``layout`` (:func:`set_layout`) and ``torch.backends.cudnn.benchmark``
    = ``cudnn_benchmark`` (None: unchanged) while the block runs; both restored afterwards (each weight's layout as
    it was)."""
    before = [(p, torch.channels_last_3d if is_channels_last(p) else torch.contiguous_format)
              for p in module.parameters() if p.dim() == 5]
    benchmark = torch.backends.cudnn.benchmark
    set_layout(module, layout)
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        for param, fmt in before:
            if not param.is_contiguous(memory_format=fmt):
                param.data = param.data.contiguous(memory_format=fmt)
