"""Headless rendering of conditioning views: RGBA images of a mesh from cameras orbiting it (alpha = object mask).

Two backends with one camera model (perspective, ``yfov`` vertical field of view, camera looking at the origin,
y up, the OpenGL camera convention: it looks down its own -z):

- ``"pyrender"``: pyrender offscreen through EGL (``PYOPENGL_PLATFORM=egl`` is set here unless already set; on the
  CPU machines Mesa's EGL works, DESIGN.md 6). Lambertian material under a camera-mounted directional light plus
  ambient light; transparent background.
- ``"numpy"``: a small z-buffer rasteriser in numpy (flat Lambert shading from the camera direction plus ambient).
  Slow for large meshes and images, exact enough for tests and for machines without EGL.
- ``"auto"``: pyrender when it imports and renders, else numpy (with a warning).

The mesh is normalised like the training data (centred on its bounding-box centre, largest side ``margin`` = 0.95 of
the unit cube; :func:`model.data.sdf.normalize_mesh`'s convention), so views and latents of one mesh agree.
Views are spaced evenly in azimuth around the y axis (starting at ``azimuth_offset`` degrees) at ``elevation``
degrees; the camera distance keeps the whole bounding sphere in view.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np

from model.io import atomic_write

__all__ = ["BACKENDS", "camera_poses", "normalized_vertices", "render_views", "save_rgba"]

#: ``backend=`` values.
BACKENDS = ("auto", "pyrender", "numpy")
#: Largest side of the normalised mesh in the unit cube (as the data pipeline).
DEFAULT_MARGIN = 0.95
#: Ambient light level of both backends.
_AMBIENT = 0.25
#: Base colour of the object.
_COLOR = (0.62, 0.62, 0.66)


def _as_mesh(mesh):
    """``(vertices [V, 3] float64, faces [F, 3] int64)`` of a path, trimesh object or (vertices, faces) pair."""
    if isinstance(mesh, tuple) and len(mesh) == 2:
        v, f = (np.asarray(a) for a in mesh)
    else:
        import trimesh

        if isinstance(mesh, (str, os.PathLike)):
            if not os.path.isfile(mesh):
                raise FileNotFoundError(f"mesh file {os.fspath(mesh)} does not exist")
            mesh = trimesh.load(os.fspath(mesh), force="mesh")
        if isinstance(mesh, trimesh.Scene):
            mesh = mesh.to_geometry() if hasattr(mesh, "to_geometry") else mesh.dump(concatenate=True)
        if not isinstance(mesh, trimesh.Trimesh):
            raise TypeError(f"mesh must be a path, a trimesh.Trimesh/Scene or (vertices, faces), got "
                            f"{type(mesh).__name__}")
        v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    v = v.astype(np.float64)
    f = f.astype(np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError("mesh must have vertices [V, 3] and at least one triangle face [F, 3]")
    return v, f


def normalized_vertices(vertices: np.ndarray, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Centre on the bounding-box centre and scale so the largest side is ``margin``."""
    lo, hi = vertices.min(0), vertices.max(0)
    extent = float((hi - lo).max())
    scale = margin / extent if extent > 0 else 1.0
    return (vertices - (lo + hi) / 2) * scale


def camera_poses(num_views: int, *, elevation: float = 20.0, distance: float = 2.5,
                 azimuth_offset: float = 0.0) -> np.ndarray:
    """``[num_views, 4, 4]`` camera-to-world matrices looking at the origin (OpenGL convention, y up)."""
    if not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be a positive int, got {num_views!r}")
    poses = []
    el = math.radians(elevation)
    for i in range(num_views):
        az = math.radians(azimuth_offset + 360.0 * i / num_views)
        eye = distance * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
        forward = -eye / np.linalg.norm(eye)  # camera -z
        right = np.cross(forward, [0.0, 1.0, 0.0])
        if np.linalg.norm(right) < 1e-8:
            right = np.array([1.0, 0.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        pose = np.eye(4)
        pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, -forward, eye
        poses.append(pose)
    return np.stack(poses)


def _render_pyrender(v, f, poses, size, yfov):
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import pyrender
    import trimesh

    tm = trimesh.Trimesh(v, f, process=False)
    material = pyrender.MetallicRoughnessMaterial(baseColorFactor=(*_COLOR, 1.0), metallicFactor=0.0,
                                                  roughnessFactor=1.0)
    scene = pyrender.Scene(bg_color=(0.0, 0.0, 0.0, 0.0), ambient_light=(_AMBIENT,) * 3)
    scene.add(pyrender.Mesh.from_trimesh(tm, material=material, smooth=False))
    camera = scene.add(pyrender.PerspectiveCamera(yfov=yfov, aspectRatio=1.0))
    light = scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=2.5))
    renderer = pyrender.OffscreenRenderer(size, size)
    try:
        out = []
        for pose in poses:
            scene.set_pose(camera, pose)
            scene.set_pose(light, pose)
            color, _ = renderer.render(scene, flags=pyrender.RenderFlags.RGBA)
            out.append(np.ascontiguousarray(color[..., :4], dtype=np.uint8))
        return out
    finally:
        renderer.delete()


def _render_numpy(v, f, poses, size, yfov):
    focal = 1.0 / math.tan(yfov / 2)
    tri_world = v[f]  # [F, 3, 3]
    normals = np.cross(tri_world[:, 1] - tri_world[:, 0], tri_world[:, 2] - tri_world[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    ys, xs = np.mgrid[0:size, 0:size]
    px, py = xs + 0.5, ys + 0.5
    out = []
    for pose in poses:
        rot, eye = pose[:3, :3], pose[:3, 3]
        cam = (v - eye) @ rot  # camera coordinates
        depth = -cam[:, 2]
        u = (focal * cam[:, 0] / np.maximum(depth, 1e-9) + 1) * size / 2
        w = (1 - focal * cam[:, 1] / np.maximum(depth, 1e-9)) * size / 2
        view_dir = -pose[:3, 2]
        shade = np.abs(normals @ view_dir)  # two-sided Lambert, light at the camera
        zbuf = np.full((size, size), np.inf)
        img = np.zeros((size, size, 4), dtype=np.float64)
        for fi, (a, b, c) in enumerate(f):
            if min(depth[a], depth[b], depth[c]) <= 1e-6:
                continue
            x0, x1 = int(max(0, math.floor(min(u[a], u[b], u[c])))), int(min(size - 1, math.ceil(max(u[a], u[b], u[c]))))
            y0, y1 = int(max(0, math.floor(min(w[a], w[b], w[c])))), int(min(size - 1, math.ceil(max(w[a], w[b], w[c]))))
            if x0 > x1 or y0 > y1:
                continue
            sx, sy = px[y0:y1 + 1, x0:x1 + 1], py[y0:y1 + 1, x0:x1 + 1]
            den = (w[b] - w[c]) * (u[a] - u[c]) + (u[c] - u[b]) * (w[a] - w[c])
            if abs(den) < 1e-12:
                continue
            l0 = ((w[b] - w[c]) * (sx - u[c]) + (u[c] - u[b]) * (sy - w[c])) / den
            l1 = ((w[c] - w[a]) * (sx - u[c]) + (u[a] - u[c]) * (sy - w[c])) / den
            l2 = 1 - l0 - l1
            inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
            if not inside.any():
                continue
            z = l0 * depth[a] + l1 * depth[b] + l2 * depth[c]
            region = zbuf[y0:y1 + 1, x0:x1 + 1]
            closer = inside & (z < region)
            region[closer] = z[closer]
            level = _AMBIENT + (1 - _AMBIENT) * shade[fi]
            img[y0:y1 + 1, x0:x1 + 1][closer] = (*(np.array(_COLOR) * level), 1.0)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def render_views(mesh, *, num_views: int = 4, size: int = 518, elevation: float = 20.0,
                 azimuth_offset: float = 30.0, yfov_deg: float = 40.0, normalize: bool = True,
                 margin: float = DEFAULT_MARGIN, backend: str = "auto") -> list[np.ndarray]:
    """RGBA views ``[size, size, 4] uint8`` of ``mesh`` (a path, trimesh object or (vertices, faces)); alpha 255 on
    the object, 0 elsewhere. See the module docstring for the cameras and backends."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not 1.0 <= yfov_deg < 170.0:
        raise ValueError(f"yfov_deg must be in [1, 170), got {yfov_deg!r}")
    v, f = _as_mesh(mesh)
    if normalize:
        v = normalized_vertices(v, margin)
    yfov = math.radians(yfov_deg)
    radius = float(np.linalg.norm(v, axis=1).max())
    distance = 1.15 * max(radius, 1e-6) / math.sin(yfov / 2)
    poses = camera_poses(num_views, elevation=elevation, distance=distance, azimuth_offset=azimuth_offset)
    if backend in ("auto", "pyrender"):
        try:
            return _render_pyrender(v, f, poses, size, yfov)
        except Exception as exc:  # ImportError, no EGL display, ...
            if backend == "pyrender":
                raise RuntimeError(f"pyrender could not render ({type(exc).__name__}: {exc}); install pyrender and "
                                   "run with PYOPENGL_PLATFORM=egl, or use backend='numpy'") from exc
            warnings.warn(f"pyrender unavailable ({type(exc).__name__}: {exc}); using the numpy rasteriser",
                          RuntimeWarning, stacklevel=2)
    return _render_numpy(v, f, poses, size, yfov)


def save_rgba(path, rgba: np.ndarray) -> None:
    """Write ``rgba [H, W, 4] uint8`` as a PNG atomically (:func:`model.io.atomic_write`)."""
    from PIL import Image

    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"rgba must be a [H, W, 4] uint8 array, got {rgba.shape} {rgba.dtype}")
    image = Image.fromarray(rgba, "RGBA")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
