"""The oracle's own input checks: bad input gets a ``ValueError`` (or ``TypeError`` for a wrong type) naming the
argument. Independent of :mod:`ssa_kernels.validate` so that the reference does not depend on what it checks."""
from __future__ import annotations

import torch

__all__ = ["check_inputs", "check_args", "resolve_scale"]

_NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "gate")


def check_inputs(q, k, v, k_cmp, v_cmp, gate, *, num_tokens: int) -> None:
    """``q [N, Hq, D]``, ``k, v [N, Hkv, D]`` with ``Hq % Hkv == 0``, ``k_cmp, v_cmp [Nc, Hkv, D]``, ``gate [N, 3]``:
    floating point, one dtype and one device; ``N == num_tokens`` (the coordinates' count)."""
    tensors = (q, k, v, k_cmp, v_cmp, gate)
    for t, name in zip(tensors, _NAMES):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")
    for t, name in zip(tensors[:5], _NAMES[:5]):
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    n, hq, d = q.shape
    hkv = k.shape[1]
    if n != num_tokens:
        raise ValueError(f"q has {n} tokens but the coordinates describe {num_tokens}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != n:
        raise ValueError(f"k has {k.shape[0]} tokens but q has {n}")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of kv heads ({hkv})")
    if k.shape[2] != d:
        raise ValueError(f"k has head_dim {k.shape[2]} but q has {d}")
    if k_cmp.shape != v_cmp.shape:
        raise ValueError(f"k_cmp and v_cmp must have the same shape, got {tuple(k_cmp.shape)} and {tuple(v_cmp.shape)}")
    if k_cmp.shape[1:] != (hkv, d):
        raise ValueError(f"k_cmp must have shape [Nc, {hkv}, {d}] to match k, got {tuple(k_cmp.shape)}")
    if gate.shape != (n, 3):
        raise ValueError(f"gate must have shape [{n}, 3] (one gate per branch and token), got {tuple(gate.shape)}")


def _positive_int(x, name: str) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")


def check_args(topk, window, shift) -> None:
    """``topk`` and ``window`` positive ints, ``shift`` an int in ``[0, window)``."""
    _positive_int(topk, "topk")
    _positive_int(window, "window")
    if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift < window:
        raise ValueError(f"shift must be an int in [0, window={window}), got {shift!r}")


def resolve_scale(scale, head_dim: int) -> float:
    """``1 / sqrt(head_dim)`` when ``scale`` is None, else ``scale`` (a positive number)."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)
