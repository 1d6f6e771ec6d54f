"""Argument checks and defaults shared by the pipeline modules: positive ints, guidance-like numbers, and where and in
which dtype the cascade runs by default."""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["default_device", "default_dtype", "nonnegative_number", "positive_int"]


def positive_int(name: str, value) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is an int (not a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def nonnegative_number(name: str, value):
    """``value`` unchanged; ``ValueError`` naming ``name`` unless it is a finite number >= 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def default_device(device) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU; anything else as ``torch.device`` (``ValueError``
    for CUDA without CUDA)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return dev


#: The refiners' dtype on CUDA when the pipeline runs in a 16-bit float: float16, as released (``use_fp16``; the
#: refiner report measured it faster than bfloat16 with the Triton kernels: 87.9 / 119.1 against 88.3 / 123.7 ms
#: per 512 / sign-refiner patch on an H100, reports/refiner.md).
REFINER_DTYPE = torch.float16


def part_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the cascade runs part ``name`` in: :data:`REFINER_DTYPE` for the refiners (``refiner``,
    ``refiner_1024``) on CUDA when ``dtype`` is float16 or bfloat16, else ``dtype``."""
    if name.startswith("refiner") and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return REFINER_DTYPE
    return dtype


def default_dtype(dtype, device: torch.device) -> torch.dtype:
    """``None``: float16 on CUDA (as released), float32 elsewhere; else ``dtype`` (``TypeError`` unless a floating
    ``torch.dtype``)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype
