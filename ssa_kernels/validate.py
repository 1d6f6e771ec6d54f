"""Input checks shared by the reference, the kernels and the model: bad input gets a ``ValueError`` or
``TypeError`` that names the argument, never a crash deep inside a kernel."""
from __future__ import annotations

import torch


def _tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _positive_int(x, name: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


def check_attention_inputs(q, k, v, k_cmp, v_cmp, gate, *, num_tokens: int | None = None):
    """Check shapes, dtypes and devices of the SSA tensors; return ``(N, Hq, Hkv, D, Nc)``.

    ``q [N, Hq, D]``, ``k, v [N, Hkv, D]``, ``k_cmp, v_cmp [Nc, Hkv, D]``, ``gate [N, 3]``.
    """
    names = ("q", "k", "v", "k_cmp", "v_cmp", "gate")
    tensors = [_tensor(t, n) for t, n in zip((q, k, v, k_cmp, v_cmp, gate), names)]
    for t, n in zip(tensors, names):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{n} must be a floating-point tensor, got {t.dtype}")
    for t, n in zip(tensors[:5], names[:5]):
        if t.dim() != 3:
            raise ValueError(f"{n} must have 3 dimensions [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    dtype, device = q.dtype, q.device
    for t, n in zip(tensors[1:], names[1:]):
        if t.dtype != dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but q has {dtype}; all inputs must share one dtype")
        if t.device != device:
            raise ValueError(f"{n} is on {t.device} but q is on {device}; all inputs must share one device")
    n, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != n:
        raise ValueError(f"k has {k.shape[0]} tokens but q has {n}")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of kv heads ({hkv})")
    if k.shape[2] != d:
        raise ValueError(f"k has head_dim {k.shape[2]} but q has {d}")
    if k_cmp.shape != v_cmp.shape:
        raise ValueError(f"k_cmp and v_cmp must have the same shape, got {tuple(k_cmp.shape)} and {tuple(v_cmp.shape)}")
    if k_cmp.shape[1] != hkv or k_cmp.shape[2] != d:
        raise ValueError(f"k_cmp must have shape [Nc, {hkv}, {d}] to match k, got {tuple(k_cmp.shape)}")
    if gate.shape != (n, 3):
        raise ValueError(f"gate must have shape [{n}, 3] (one gate per branch and token), got {tuple(gate.shape)}")
    if num_tokens is not None and n != num_tokens:
        raise ValueError(f"q has {n} tokens but the coordinates describe {num_tokens}")
    return n, hq, hkv, d, k_cmp.shape[0]


def check_selection_args(topk, window, shift) -> None:
    _positive_int(topk, "topk")
    _positive_int(window, "window")
    if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift < window:
        raise ValueError(f"shift must be an int in [0, window={window}), got {shift!r}")


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)
