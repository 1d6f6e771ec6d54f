"""Small shared helpers for the tests: random token sets in layout order and SSA inputs."""
from __future__ import annotations

import torch

from ssa_kernels.layout import layout_order, num_compression_blocks


def random_coords(sizes, extent, *, compression_block=4, selection_block=8, generator=None, device="cpu"):
    """Several batch elements of given token counts with distinct random voxels in ``[0, extent)^3``,
    packed one after another in layout order. ``sizes`` may contain 0 (an empty batch element)."""
    parts = []
    for b, n in enumerate(sizes):
        if n == 0:
            continue
        if n > extent**3:
            raise ValueError("more tokens than voxels")
        lin = torch.randperm(extent**3, generator=generator)[:n]
        xyz = torch.stack([lin // (extent * extent), (lin // extent) % extent, lin % extent], dim=1)
        parts.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    coords = torch.cat(parts).long()
    perm = layout_order(coords, compression_block=compression_block, selection_block=selection_block)
    return coords[perm].contiguous().to(device)


def compressed_kv(k, v, coords, *, compression_block, selection_block):
    """Stand-in for the learned compression (BENCHMARK.md "scaled" inputs); the one implementation lives in
    :mod:`bench.inputs`."""
    from bench.inputs import compressed_kv as build

    return build(k, v, coords, compression_block=compression_block, selection_block=selection_block)


def random_inputs(coords, hq, hkv, d, *, compression_block, selection_block, dtype=torch.float64, generator=None,
                  requires_grad=False):
    """Standard-normal q, k, v; random (not derived) k_cmp, v_cmp; gates uniform in (0, 1)."""
    n = coords.shape[0]
    nc = num_compression_blocks(coords, compression_block=compression_block, selection_block=selection_block)
    dev = coords.device

    def rnd(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dev, dtype)

    q, k, v = rnd(n, hq, d), rnd(n, hkv, d), rnd(n, hkv, d)
    k_cmp, v_cmp = rnd(nc, hkv, d), rnd(nc, hkv, d)
    gate = torch.rand(n, 3, generator=generator, dtype=torch.float64).to(dev, dtype)
    out = [q, k, v, k_cmp, v_cmp, gate]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def spy_launches(mp, module, names, *settings):
    """Wraps the Triton kernels ``names`` of ``module`` (through the monkeypatch ``mp``) so that every launch appends
    its values of the keyword arguments ``settings`` to the returned list (the value itself when there is one)."""
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                values = tuple(kwargs[name] for name in settings)
                seen.append(values[0] if len(values) == 1 else values)
                return self.kernel[grid](*args, **kwargs)
            return run

    for name in names:
        mp.setattr(module, name, Spy(getattr(module, name)))
    return seen
