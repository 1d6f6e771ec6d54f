"""The benchmark's token sets ("shell" shapes, BENCHMARK.md) and the configurations it runs.

A shape at latent resolution ``R`` is the set of voxels whose centre lies within ``tau`` of the surface of
the union of a sphere, a torus and a box. Coordinates come back in layout order for the requested block
sizes, so they can be fed to the reference and the kernels directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import layout_order


@dataclass(frozen=True)
class ShellShape:
    name: str
    resolution: int
    tau: float
    tokens: int  # expected token count (a check of the coordinate convention)


@dataclass(frozen=True)
class SSAConfig:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    compression_block: int
    selection_block: int
    topk: int
    window: int


SHAPES = {
    s.name: s
    for s in (
        ShellShape("shell-512", 64, 1.0, 19_000),
        ShellShape("shell-1024-thin", 128, 1.0, 75_788),
        ShellShape("shell-1024", 128, 1.8, 137_124),
        ShellShape("shell-2048-thin", 256, 1.0, 305_800),
        ShellShape("shell-2048", 256, 1.8, 549_768),
    )
}

CONFIGS = {
    c.name: c
    for c in (
        SSAConfig("v1.1", 32, 2, 32, 8, 8, 8, 8),
        SSAConfig("v1.0", 32, 2, 32, 4, 8, 8, 8),
        SSAConfig("d64", 16, 2, 64, 4, 8, 8, 8),
        SSAConfig("d128", 8, 2, 128, 4, 8, 8, 8),
    )
}


def shell_sdf(resolution: int, xs: torch.Tensor, ys: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """Signed distance (float32) of the sphere/torus/box union at voxel centres ``(i + 0.5, j + 0.5, l + 0.5)``."""
    r = float(resolution)
    c = r / 2
    x, y, z = xs.float() + 0.5, ys.float() + 0.5, zs.float() + 0.5
    sphere = torch.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2) - 0.42 * r
    a = torch.sqrt((x - c) ** 2 + (z - c) ** 2) - 0.3 * r
    torus = torch.sqrt(a**2 + (y - 0.3 * r) ** 2) - 0.08 * r
    box = torch.maximum(
        torch.maximum((x - c).abs() - 0.2 * r, (y - 0.7 * r).abs() - 0.1 * r), (z - c).abs() - 0.35 * r
    )
    return torch.minimum(torch.minimum(sphere, torus), box)


def shell_coords(resolution: int, tau: float, *, batch: int = 0) -> torch.Tensor:
    """Voxels ``[N, 4]`` int32 (batch, x, y, z) of the shell at ``resolution`` with ``|sdf| < tau``, raster order."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    ar = torch.arange(resolution)
    out = []
    for i in range(resolution):  # one x-slice at a time: never a dense R^3 array
        yy, zz = torch.meshgrid(ar, ar, indexing="ij")
        xx = torch.full_like(yy, i)
        keep = shell_sdf(resolution, xx, yy, zz).abs() < tau
        out.append(torch.stack([xx[keep], yy[keep], zz[keep]], dim=1))
    xyz = torch.cat(out)
    b = torch.full((xyz.shape[0], 1), batch, dtype=xyz.dtype)
    return torch.cat([b, xyz], dim=1).int()


def shape_coords(name: str, *, compression_block: int = 8, selection_block: int = 8, batch: int = 0) -> torch.Tensor:
    """Coordinates of a named benchmark shape, in layout order for the given block sizes."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    s = SHAPES[name]
    coords = shell_coords(s.resolution, s.tau, batch=batch)
    perm = layout_order(coords, compression_block=compression_block, selection_block=selection_block)
    return coords[perm].contiguous()
