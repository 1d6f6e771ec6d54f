"""Small previews of meshes without a graphics stack: point-splat rendering in numpy, figures with matplotlib (Agg).

:func:`render_mesh` samples points uniformly on the surface (several per pixel), projects them orthographically from
a fixed viewpoint, keeps the nearest point per pixel (a z-buffer by sorting), shades it by the face normal (two-sided
Lambert plus ambient), drops pixels whose point lies far behind a neighbour's (no front point reached them) and
fills isolated empty pixels from their neighbours. That is enough for thumbnails of meshes with millions of faces
(matplotlib's ``plot_trisurf`` is unusable beyond a few thousand) and needs no OpenGL, so it runs on the headless GPU
machine too. :func:`comparison_figure` puts rows of (input, reconstruction) thumbnails into one PNG.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import trimesh

__all__ = ["comparison_figure", "render_mesh"]

#: Default viewpoint (degrees): elevation above the x-y plane, azimuth around z.
DEFAULT_ELEVATION, DEFAULT_AZIMUTH = 25.0, 40.0
#: Background grey level and the ambient share of the shading.
_BACKGROUND, _AMBIENT = 1.0, 0.22


def _camera(elevation: float, azimuth: float):
    """Unit vectors (towards the camera, screen right, screen up); z is the world's up axis."""
    el, az = math.radians(elevation), math.radians(azimuth)
    to_cam = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = -to_cam
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return to_cam, right, up


def render_mesh(mesh: trimesh.Trimesh, *, size: int = 256, extent: float = 0.5, elevation: float = DEFAULT_ELEVATION,
                azimuth: float = DEFAULT_AZIMUTH, samples_per_pixel: float = 6.0, seed: int = 0) -> np.ndarray:
    """Grey image ``[size, size]`` float32 in [0, 1] (1 = background) of ``mesh`` seen orthographically.

    ``extent``: half-width of the square window around the origin, in mesh units (0.5 frames the unit cube's
    inscribed sphere; pass the same value for images that are compared). Points: ``samples_per_pixel * size^2``,
    spread uniformly by area over the whole surface (hidden parts included).
    """
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"mesh must be a trimesh.Trimesh, got {type(mesh).__name__}")
    if not (isinstance(size, int) and size >= 8):
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not extent > 0:
        raise ValueError(f"extent must be positive, got {extent!r}")
    image = np.full((size, size), _BACKGROUND, np.float32)
    if len(mesh.faces) == 0 or mesh.area <= 0:
        return image
    n = int(samples_per_pixel * size * size)
    points, face = trimesh.sample.sample_surface(mesh, n, seed=np.random.default_rng(seed))
    normals = np.asarray(mesh.face_normals, dtype=np.float64)[face]
    to_cam, right, up = _camera(elevation, azimuth)
    u = ((points @ right) / extent * 0.5 + 0.5) * size
    v = (0.5 - (points @ up) / extent * 0.5) * size
    depth = points @ to_cam
    inside = (u >= 0) & (u < size) & (v >= 0) & (v < size)
    u, v, depth, normals = u[inside].astype(np.int64), v[inside].astype(np.int64), depth[inside], normals[inside]
    pix = v * size + u
    order = np.lexsort((-depth, pix))  # per pixel, nearest point first
    pix_sorted = pix[order]
    first = order[np.r_[True, pix_sorted[1:] != pix_sorted[:-1]]]
    nrm = normals[first]
    nrm *= np.where(nrm @ to_cam < 0, -1.0, 1.0)[:, None]  # two-sided
    light = to_cam + 0.4 * up - 0.3 * right
    light /= np.linalg.norm(light)
    shade = _AMBIENT + (1 - _AMBIENT) * np.clip(nrm @ light, 0, 1)
    flat = image.reshape(-1)
    flat[pix[first]] = 0.92 * shade  # keep the brightest surface just below the background
    zbuf = np.full(size * size, -np.inf)
    zbuf[pix[first]] = depth[first]
    zbuf = zbuf.reshape(size, size)
    # a pixel that no front point reached shows a surface behind: far behind its neighbours' nearest surface
    from scipy.ndimage import maximum_filter

    pixel = 2.0 * extent / size
    see_through = np.isfinite(zbuf) & (zbuf < maximum_filter(zbuf, size=3, mode="constant", cval=-np.inf) - 4 * pixel)
    filled = np.isfinite(zbuf) & ~see_through
    image[see_through] = _BACKGROUND
    _close_holes(image, filled)
    return image


def _close_holes(image: np.ndarray, filled: np.ndarray) -> None:
    """Empty pixels with at least 4 filled neighbours (of 8) take their neighbours' mean, in place."""
    from scipy.ndimage import uniform_filter

    count = uniform_filter(filled.astype(np.float32), size=3, mode="constant") * 9
    total = uniform_filter(np.where(filled, image, 0).astype(np.float32), size=3, mode="constant") * 9
    holes = ~filled & (count >= 4)
    image[holes] = total[holes] / count[holes]


def framing_extent(mesh: trimesh.Trimesh, margin: float = 1.05, empty: float = 0.5) -> float:
    """The ``extent`` of :func:`render_mesh` that frames ``mesh``: its largest vertex radius times ``margin``
    (``empty`` for a mesh without vertices)."""
    if not len(mesh.vertices):
        return empty
    return margin * float(np.linalg.norm(np.asarray(mesh.vertices), axis=1).max())


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure to ``path`` (folders made as needed, 100 dpi) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_figure(rows: Sequence[tuple[str, trimesh.Trimesh, trimesh.Trimesh, str]], path, *,
                      size: int = 256, column_titles: tuple[str, str] = ("input", "reconstruction"),
                      title: str = "") -> Path:
    """One PNG with a row per ``(name, input mesh, reconstructed mesh, caption)``; both meshes of a row are framed
    alike (the input's bounding sphere around the origin). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows must hold at least one (name, input, reconstruction, caption) tuple")
    fig, axes = plt.subplots(len(rows), 2, figsize=(5.0, 2.5 * len(rows) + (0.4 if title else 0)), squeeze=False)
    for r, (name, gt, pred, caption) in enumerate(rows):
        extent = framing_extent(gt)
        for c, mesh in enumerate((gt, pred)):
            ax = axes[r, c]
            ax.imshow(render_mesh(mesh, size=size, extent=extent), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
        axes[r, 0].set_ylabel(name, fontsize=8)
        axes[r, 1].set_xlabel(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
