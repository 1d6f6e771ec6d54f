"""Time and peak GPU memory of every stage of the image-to-mesh cascade at 1024, with random weights of the released
sizes (:class:`model.pipeline.cascade.ImageToMesh`).

``python -m model.reports.generate --out reports [--mesh MESH] [--steps-dense N --steps-512 N --steps-1024 N]``
(one CUDA GPU; about 2 minutes on an H100, 20 s of it building the random models) writes ``reports/generate.md`` and
``reports/generate.json``. Needs torch, triton, transformers, trimesh, scikit-image, scipy and matplotlib.

What runs: the whole cascade at resolution 1024 with every part at its released size (dense VAE and DiT, sparse VAEs
and DiTs 512 and 1024 at width 1024 / 24 blocks, both refiners, a DINOv2 ViT-L/14-with-registers encoder), random
weights, bf16 by default, parts offloaded to the CPU between their stages by default (``--no-offload`` keeps them all
on the GPU). Random weights give a random structure, so the dense stage runs and is timed but the sparse stages get
the latent voxels of a mesh instead (``--mesh``; default ``shell``, the benchmark's shell surface as a mesh
(:func:`shell_mesh`, 110,656 latent tokens at 1024, a realistic size); ``cache``: the first mesh under
``data_cache/meshes``, else one of the meshes installed packages ship, else a torus; the report says which): its 64^3
cells for the 512 stage and, for the 1024 stage, the revoxelisation
(:func:`model.pipeline.geometry.mesh_to_latent_coords`, timed as the ``revoxelise`` stage) of the mesh subdivided to
edges of 1.5 voxels of the 512 grid (the density of the 512 stage's marching-cubes mesh). The conditioning image is a
render of that mesh.

Few sampling steps per stage by default (4 / 4 / 3): the first step of a stage includes the Triton compilation, so
the report takes the median of the later steps as the time per step and estimates each stage at the released step
counts (50 / 30 / 15) as ``time without the steps + time per step x released steps``. The sparse 1024 stage's time
is split into spatial sparse attention (CUDA events around every call of the SSA kernels, and around every
self-attention module up to its output projection: q/k/v/gate projection, compression and kernels) and the rest.

``--profile STAGE ...`` runs those stages under ``torch.profiler`` (:attr:`ImageToMesh.profile_stages`) and lists
their largest GPU kernels (profiled stages run slower). ``--simplify-ratio`` adds the released decimation.

Without CUDA it prints a message and exits 0, unless ``--dry-run``: the tiny random cascade on the CPU (reference SSA,
labelled DRY RUN everywhere), which the test suite runs to exercise this path.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from model.io import atomic_write_json, atomic_write_text, commit_label, provenance
from model.nets import cross_attention_kernel
from model.nets import refiner as refiner_module
from model.nets import refiner_layout
from model.pipeline import marching_cubes as torch_marching_cubes
from model.sparse import conv as sparse_conv

__all__ = ["AttentionTimer", "choose_mesh", "main", "markdown", "run_report"]

#: Published GPU memory needs of the released pipeline (Direct3D-S2 README), in GB.
PUBLISHED_MEMORY_GB = {"512": 10.0, "1024": 24.0}
#: Our target peak at 1024, GB.
TARGET_PEAK_GB = 12.0
#: Per-stage targets in seconds at the released step counts (stages sharing a target are summed): the image-to-mesh
#: issue's budget of 25 s at 1024 on one H100.
STAGE_TARGETS = {("dense",): 1.0, ("sparse_512",): 3.0, ("decode_512", "refine_512"): 2.5, ("revoxelise",): 0.5,
                 ("sparse_1024",): 12.0, ("decode_1024", "refine_1024"): 3.0, ("extract", "simplify"): 3.0}
#: Target of the whole cascade at the released step counts, seconds.
TARGET_TOTAL_SECONDS = 25.0
#: Kernels listed per profiled stage in the markdown (the JSON keeps more, model.pipeline.records.PROFILE_TOP),
#: and the characters shown of each name.
MD_KERNELS = 15
MD_NAME_CHARS = 90
#: Default sampling steps of the report per stage (the released ones are in model.pipeline.cascade.RELEASED_STEPS).
REPORT_STEPS = {"dense": 4, "512": 4, "1024": 3}
#: Subdivision of the stand-in for the 512 mesh: longest edge in voxels of the 512 stage's grid.
STANDIN_EDGE_VOXELS = 1.5
#: Side of the conditioning render.
RENDER_SIZE = 384


# ---------------------------------------------------------------------------------------------------------------
# inputs


#: Grid of the marching cubes that turns the benchmark's shell into the report's default mesh.
SHELL_MESH_GRID = 192


def shell_mesh():
    """The benchmark's shell surface (sphere, torus and box: :func:`ssa_kernels.shapes.shell_sdf`) as a watertight
    mesh in the unit cube: marching cubes of its SDF on a :data:`SHELL_MESH_GRID`^3 grid (247,340 faces). Its 1024
    revoxelisation has 110,656 latent tokens, the size of a detailed real shape (the released model's 1024 stage
    sees 100k+ tokens on typical objects)."""
    import trimesh
    from skimage.measure import marching_cubes

    from ssa_kernels.shapes import shell_sdf

    r = SHELL_MESH_GRID
    ar = torch.arange(r)
    xx, yy, zz = torch.meshgrid(ar, ar, ar, indexing="ij")
    verts, faces, _, _ = marching_cubes(shell_sdf(r, xx, yy, zz).numpy(), 0.0)
    return trimesh.Trimesh((verts + 0.5) / r - 0.5, faces)


#: Most nested copies of ``--mesh shells:K`` and the scale step between them.
MAX_SHELLS = 4
SHELL_SCALE_STEP = 0.2


def nested_shells(copies: int):
    """:func:`shell_mesh` and ``copies - 1`` copies of it scaled by ``1 - 0.2 i`` about the centre, as one mesh: about
    ``sum (1 - 0.2 i)^2`` times the shell's surface and latent tokens (2.0x for 3 copies), to measure how memory grows
    with the token count."""
    import trimesh

    if isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= MAX_SHELLS:
        raise ValueError(f"shells: the number of copies must be an int in 1..{MAX_SHELLS}, got {copies!r}")
    base = shell_mesh()
    parts = []
    for i in range(copies):
        part = base.copy()
        part.apply_scale(1.0 - SHELL_SCALE_STEP * i)
        parts.append(part)
    return trimesh.util.concatenate(parts)


def choose_mesh(path=None):
    """``(trimesh.Trimesh, description)``: ``path`` (``"shell"``, the default: :func:`shell_mesh`), ``"shells:K"``
    (:func:`nested_shells`), ``"cache"`` (the first mesh under ``data_cache/meshes``, else the first mesh installed
    packages ship, else a torus), or a mesh file."""
    import trimesh

    from model.data.meshes import available_meshes, find_meshes
    from model.data.sdf import load_mesh

    if path is None or path == "shell":
        return shell_mesh(), (f"the benchmark's shell surface (marching cubes of ssa_kernels.shapes.shell_sdf at "
                              f"{SHELL_MESH_GRID}^3; default, --mesh shell)")
    if isinstance(path, str) and path.startswith("shells:"):
        count = path.split(":", 1)[1]
        if not count.isdigit() or not 1 <= int(count) <= MAX_SHELLS:
            raise ValueError(f"--mesh {path}: shells:K takes an int K in 1..{MAX_SHELLS}")
        k = int(count)
        return nested_shells(k), (f"{k} nested copies of the benchmark's shell surface, scaled by 1, 0.8, .. about "
                                  f"the centre (--mesh {path})")
    if path != "cache":
        if not os.path.isfile(path):
            raise ValueError(f"--mesh: file {os.fspath(path)!r} does not exist")
        return load_mesh(path), f"{os.fspath(path)} (--mesh)"
    cache = Path("data_cache/meshes")
    candidates = []
    if cache.is_dir():
        candidates = find_meshes(cache)
    where = "data_cache/meshes"
    if not candidates:
        candidates, where = available_meshes(), "an installed package's examples"
    for candidate in candidates:
        try:
            return load_mesh(candidate), f"{candidate} (first mesh of {where})"
        except ValueError:
            continue
    return trimesh.creation.torus(major_radius=0.3, minor_radius=0.12), \
        "built-in torus (trimesh.creation.torus, radii 0.3 / 0.12; no mesh found on disk)"


def _standin_512_mesh(mesh, grid: int, margin: float):
    """The mesh normalised as the cascade normalises the 512 mesh and subdivided to the edge lengths of a
    marching-cubes mesh on a ``grid^3`` grid."""
    import trimesh
    from trimesh.remesh import subdivide_to_size

    from model.data.sdf import normalize_mesh

    norm = normalize_mesh(mesh, margin)[0]
    v, f = subdivide_to_size(norm.vertices, norm.faces, max_edge=STANDIN_EDGE_VOXELS / grid, max_iter=30)
    return trimesh.Trimesh(v, f, process=False)


# ---------------------------------------------------------------------------------------------------------------
# attention timing


class AttentionTimer:
    """Times the self-attention of one sparse DiT while it runs: every call of the SSA operation
    (``ssa_kernels.spatial_sparse_attention``, or the dense reference on the CPU) and every self-attention module's
    :meth:`~model.nets.ssa_layer.SpatialSparseAttention.attend` (q/k/v/gate projection, compression and the SSA
    operation; the output projection is part of the block's residual product), with CUDA events on a GPU
    (``time.perf_counter`` on the CPU). Only calls made inside the DiT's forward count. ``totals()`` -> seconds and call
    counts. It also counts the block calls by path: :meth:`~model.nets.dit_block.SparseDiTBlock.forward_inference`
    (the sampling path) against ``forward`` (the autograd path)."""

    def __init__(self, dit: torch.nn.Module, device: torch.device):
        self.dit, self.device = dit, device
        self.active = False
        self.kernel: list = []
        self.module: list = []
        self.block_calls = {"forward_inference": 0, "forward": 0}
        self._handles: list = []
        self._patched: list = []
        self._attend_patched: list = []
        self._blocks_patched: list = []

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self) -> "AttentionTimer":
        import reference
        import ssa_kernels

        def dit_pre(module, args):
            self.active = True

        def dit_post(module, args, output):
            self.active = False

        self._handles.append(self.dit.register_forward_pre_hook(dit_pre))
        self._handles.append(self.dit.register_forward_hook(dit_post))
        guided = getattr(self.dit, "guided_velocity", None)
        if guided is not None:  # a batched guided step runs the blocks without calling forward

            def guided_timed(*args, **kwargs):
                self.active = True
                try:
                    return guided(*args, **kwargs)
                finally:
                    self.active = False

            self.dit.guided_velocity = guided_timed
            self._instance_patched = True
        for block in self.dit.blocks:  # attend(): the module's work up to its output projection, on both paths
            attention = block.self_attn
            attention.attend = self._timed(attention.attend, self.module)
            self._attend_patched.append(attention)
            for path in self.block_calls:
                setattr(block, path, self._counted(getattr(block, path), path))
            self._blocks_patched.append(block)
        for owner in (ssa_kernels, reference):
            original = owner.spatial_sparse_attention
            owner.spatial_sparse_attention = self._timed(original, self.kernel)
            self._patched.append((owner, original))
        return self

    def _timed(self, original, pairs: list):
        """``original`` wrapped: while the DiT runs, each call's start and end marks go to ``pairs``."""

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            start = self._mark()
            out = original(*args, **kwargs)
            pairs.append((start, self._mark()))
            return out

        return timed

    def _counted(self, original, path: str):
        """``original`` wrapped: while the DiT runs, each call adds one to ``block_calls[path]``."""

        def counted(*args, **kwargs):
            if self.active:
                self.block_calls[path] += 1
            return original(*args, **kwargs)

        return counted

    def __exit__(self, *exc) -> None:
        if getattr(self, "_instance_patched", False):
            del self.dit.guided_velocity  # the class's method again
            self._instance_patched = False
        for attention in self._attend_patched:
            del attention.attend  # the class's method again
        self._attend_patched = []
        for block in self._blocks_patched:
            for path in self.block_calls:
                delattr(block, path)  # the class's methods again
        self._blocks_patched = []
        for handle in self._handles:
            handle.remove()
        for owner, original in self._patched:
            owner.spatial_sparse_attention = original
        self._handles, self._patched = [], []

    def _seconds(self, pairs) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        return sum(b - a for a, b in pairs)

    def totals(self) -> dict:
        return {"ssa_op_seconds": self._seconds(self.kernel), "ssa_op_calls": len(self.kernel),
                "self_attention_seconds": self._seconds(self.module), "self_attention_calls": len(self.module),
                "inference_block_calls": self.block_calls["forward_inference"],
                "autograd_block_calls": self.block_calls["forward"]}


# ---------------------------------------------------------------------------------------------------------------
# the run


def _versions(prov: dict) -> dict:
    """torch, Python, triton and CUDA from the provenance ``prov`` (:func:`model.io.provenance`), and the versions of
    the other packages the cascade uses (None when not installed)."""
    out = {key: prov[key] for key in ("torch", "python", "triton", "cuda")}
    for name in ("transformers", "trimesh", "skimage"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _estimate(rec: dict, released_steps: int) -> dict:
    """Time per step (median of the steps after the first, which compiles) and the stage at the released steps."""
    times = rec.get("step_seconds") or []
    if not times:
        return {}
    per_step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    rest = max(rec["seconds"] - sum(times), 0.0)
    return {"seconds_per_step": per_step, "released_steps": released_steps,
            "estimated_seconds_at_released_steps": rest + per_step * released_steps}


def run_report(*, mesh_path=None, steps=None, dry_run: bool = False, device=None, dtype: torch.dtype | None = None,
               offload: bool = True, seed: int = 0, progress: bool = True,
               simplify_ratio: float | None = None, profile=(), warmup: bool = False,
               decode_chunks: dict | None = None, command: str | None = None, glb=None) -> dict:
    """Run the cascade as the module docstring says and return the result document. ``warmup``: run the whole
    cascade once first, one step per sampling stage, untimed (its wall time is recorded apart), so that the timed
    run finds every kernel compiled and every library initialised, as a second image in the same process does.
    ``decode_chunks``: ``{"512": n, "1024": n}`` spatial chunks per axis of the VAE decodes, replacing the
    cascade's (:class:`model.pipeline.cascade.CascadeConfig`). ``command``: the command line to record (the module's
    name when None). ``glb``: a path to write the output mesh to as GLB after the timed run (its seconds and bytes
    are recorded, not counted in the total)."""
    from model.pipeline.cascade import RELEASED_STEPS, ImageToMesh
    from model.pipeline.geometry import mesh_to_latent_coords
    from model.data.render import render_views

    steps = {**REPORT_STEPS, **(steps or {})}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dry_run and dev.type != "cuda":
        raise RuntimeError("the report needs a CUDA GPU (use --dry-run for the tiny CPU version)")
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    mesh, mesh_source = choose_mesh(mesh_path if mesh_path is not None or not dry_run else "cache")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warnings: the report says so itself
        pipe = ImageToMesh.random("tiny" if dry_run else "released", seed=seed, device=dev, dtype=dtype,
                                  offload=offload,
                                  config={f"decode_chunks_{k}": n for k, n in (decode_chunks or {}).items()})
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    build_seconds = time.perf_counter() - t0
    pipe.profile_stages = set(profile)
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in pipe.parts.items()}
    parts["encoder"] = sum(p.numel() for p in pipe.encoder.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for m in [*pipe.parts.values(), pipe.encoder]
                       for p in m.parameters())
    p = pipe.parts
    side_512 = p["sparse_dit_512"].config.resolution * p["sparse_vae_512"].config.downsample_factor
    side_1024 = p["sparse_dit_1024"].config.resolution * p["sparse_vae_1024"].config.downsample_factor
    cfg = pipe.config
    render = render_views(mesh, num_views=1, size=RENDER_SIZE if not dry_run else 96, backend="numpy")[0]
    coords_512 = mesh_to_latent_coords(mesh, resolution=side_512, factor=p["sparse_vae_512"].config.downsample_factor,
                                       band=cfg.token_band, margin=cfg.mesh_margin, spacing=cfg.sample_spacing,
                                       device=dev)
    standin = _standin_512_mesh(mesh, side_512, cfg.mesh_margin)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    coords_1024 = mesh_to_latent_coords(standin, resolution=side_1024,
                                        factor=p["sparse_vae_1024"].config.downsample_factor, band=cfg.token_band,
                                        margin=cfg.mesh_margin, spacing=cfg.sample_spacing, normalize=False,
                                        device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    revox = {"seconds": time.perf_counter() - t0,
             "peak_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
             "tokens": int(coords_1024.shape[0]), "mesh_faces": int(len(standin.faces)),
             "input": "the report's mesh subdivided to 512-mesh edge lengths (stand-in for the 512 mesh)"}
    warmup_seconds = None
    if warmup:
        t0 = time.perf_counter()
        pipe.generate(render, resolution=1024, steps={k: 1 for k in steps}, seed=seed, coords_512=coords_512,
                      coords_1024=coords_1024, run_dense=True, progress=False, simplify_ratio=simplify_ratio)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        warmup_seconds = time.perf_counter() - t0
    with AttentionTimer(p["sparse_dit_1024"], dev) as timer:
        result = pipe.generate(render, resolution=1024, steps=steps, seed=seed, coords_512=coords_512,
                               coords_1024=coords_1024, run_dense=True, progress=progress,
                               simplify_ratio=simplify_ratio)
    attention = timer.totals()
    stages = {}
    for name, rec in result.stage_table().items():
        if name == "sparse_1024":  # the revoxelisation runs just before this stage in the cascade
            stages["revoxelise"] = revox
        stages[name] = rec
    released = {"dense": RELEASED_STEPS["dense"], "sparse_512": RELEASED_STEPS["512"],
                "sparse_1024": RELEASED_STEPS["1024"]}
    for name, n in released.items():
        if name in stages:
            stages[name].update(_estimate(stages[name], n))
    s1024 = stages["sparse_1024"]["seconds"]
    attention.update(stage_seconds=s1024,
                     ssa_op_share=attention["ssa_op_seconds"] / s1024 if s1024 else None,
                     self_attention_share=attention["self_attention_seconds"] / s1024 if s1024 else None)
    peaks = [r["peak_bytes"] for r in stages.values() if r.get("peak_bytes") is not None]
    total = sum(r["seconds"] for r in stages.values())
    estimate = sum(r.get("estimated_seconds_at_released_steps", r["seconds"]) for r in stages.values())
    prov = provenance(dev)
    return {
        "dry_run": dry_run,
        "gpu": prov["gpu"] or f"CPU ({platform.machine()})",
        "date": prov["date"],
        "commit": prov["commit"],
        "versions": _versions(prov),
        "sizes": "tiny" if dry_run else "released",
        "dtype": str(dtype).replace("torch.", ""),
        "refiner_dtype": result.settings["refiner_dtype"],
        "offload": pipe.offload,
        "command": command or "python -m model.reports.generate",
        "backend": pipe.backend,
        "cross_attention": "kernel" if cross_attention_kernel.ENABLED else "sdpa",
        "staged_transfer": torch_marching_cubes.STAGED_TRANSFER,
        "neighbour_tables": "derived" if sparse_conv.DERIVE_NEIGHBOUR_ROWS else "lookup",
        "refiner_layout": refiner_layout.DEFAULT_LAYOUT,
        "refiner_bias_kernel": refiner_module.BIAS_KERNEL,
        "parameters": parts,
        "weight_bytes": weight_bytes,
        "build_seconds": build_seconds,
        "warmup_seconds": warmup_seconds,
        "mesh": mesh_source,
        "mesh_faces": int(len(mesh.faces)),
        "steps": steps,
        "released_steps": dict(RELEASED_STEPS),
        "settings": result.settings,
        "stages": stages,
        "attention_1024": attention,
        "total_seconds": total,
        "estimated_total_seconds_at_released_steps": estimate,
        "peak_bytes": max(peaks) if peaks else None,
        "published_memory_gb": PUBLISHED_MEMORY_GB,
        "target_peak_gb": TARGET_PEAK_GB,
        "output_faces": int(len(result.mesh.faces)),
        "output_glb": _write_glb(result.mesh, glb) if glb is not None else None,
    }


def _write_glb(mesh, path) -> dict:
    """Export ``mesh`` to ``path`` as GLB (atomically): ``{"path", "bytes", "seconds"}``."""
    from model.io import atomic_write_bytes

    t0 = time.perf_counter()
    atomic_write_bytes(path, mesh.export(file_type="glb"))
    return {"path": str(path), "bytes": Path(path).stat().st_size, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
# writing


def _gb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e9:.2f}"


def _placement(r: dict) -> str:
    if r["offload"]:
        return "parts offloaded to the CPU between their stages (each on the GPU only while its stage runs)"
    return "all parts resident on the GPU" if "CPU" not in r["gpu"] else "on the CPU"


def _notes(name: str, rec: dict) -> str:
    keys = {"dense": ("occupied_voxels",), "sparse_512": ("tokens",), "sparse_1024": ("tokens",),
            "decode_512": ("voxels", "chunks"), "decode_1024": ("voxels", "chunks"), "refine_512": ("faces",),
            "revoxelise": ("mesh_faces", "tokens"), "extract": ("kept_voxels", "faces"),
            "simplify": ("faces_before", "faces"),
            "condition": ("condition_tokens",)}.get(name, ())
    out = [f"{k.replace('_', ' ')} {rec[k]:,}" for k in keys if isinstance(rec.get(k), int)]
    if "seconds_per_step" in rec:
        out.append(f"{rec['steps']} steps, {rec['seconds_per_step']:.3f} s/step")
    if isinstance(rec.get("backend"), str):
        out.append(f"{rec['backend']} marching cubes")
    if rec.get("replaced_by_given_coords"):
        out.append("voxels replaced by the mesh's")
    if rec.get("pinned_allocs"):
        out.append(f"{rec['pinned_allocs']} page-locked host allocations, {rec['pinned_alloc_seconds']:.2f} s")
    return "; ".join(out)


def _target(name: str, stages: dict) -> str:
    """The target cell of stage ``name``: its target, met or not; for stages sharing one, on the last of them."""
    for group, seconds in STAGE_TARGETS.items():
        if name in group:
            present = [g for g in group if g in stages]
            if name != present[-1]:
                return f"with {present[-1]}"
            used = sum(stages[g].get("estimated_seconds_at_released_steps", stages[g]["seconds"]) for g in present)
            return f"<= {seconds:g} ({'met' if used <= seconds else 'not met'}: {used:.1f})" if len(present) > 1 \
                else f"<= {seconds:g} ({'met' if used <= seconds else 'not met'})"
    return ""


def markdown(r: dict) -> str:
    dry = r["dry_run"]
    v = r["versions"]
    label = "DRY RUN: tiny random cascade on the CPU, NOT a measurement. " if dry else ""
    peak = r["peak_bytes"]
    lines = [
        "# Image to mesh: time and GPU memory per stage at 1024" + (" (DRY RUN)" if dry else ""),
        "",
        f"{label}{r['date']}, {r['gpu']}, torch {v['torch']}, triton {v.get('triton')}, transformers "
        f"{v.get('transformers')}, {commit_label(r)}. `{r.get('command', 'python -m model.reports.generate')}`.",
        "",
        f"Random weights of the {r['sizes']} sizes ({sum(r['parameters'].values()) / 1e6:,.1f} M parameters, "
        f"{r['weight_bytes'] / 1e9:.2f} GB of weights), {r['dtype']} (the refiners {r.get('refiner_dtype', r['dtype'])}"
        f"), SSA backend `{r['backend']}`, "
        + (f"cross-attention through {_CROSS[r['cross_attention']]}, " if "cross_attention" in r else "")
        + ("the mesh brought to the host through page-locked arrays of its size (`--mesh-transfer pinned`), "
           if r.get("staged_transfer") is False else "")
        + (f"the refiners' patches laid out `{r['refiner_layout']}` (`--refiner-layout`), "
           if r.get("refiner_layout", "contiguous") != "contiguous" else "")
        + ("the refiners' cuDNN biases added by the bias kernel (`--refiner-bias-kernel`), "
           if r.get("refiner_bias_kernel") else "")
        + ("every sparse convolution's neighbour table looked up in the coordinate hash (`--neighbour-tables lookup`), "
           if r.get("neighbour_tables") == "lookup" else "")
        + f"{_placement(r)}; "
        f"built in {r['build_seconds']:.1f} s (not counted). "
        + (f"**Warm process**: a first run of the whole cascade with one step per sampling stage took "
           f"{r['warmup_seconds']:.1f} s before the timed one (`--warmup`, not counted), so no stage below compiles "
           "a kernel or initialises a library, as for a second image in one process. "
           if r.get("warmup_seconds") is not None else
           "Cold process: each stage's first use of a kernel includes its compilation. ")
        + "Sparse stages on the latent voxels of "
        f"{r['mesh']} ({r['mesh_faces']:,} faces); the conditioning image is a render of it. Random weights give "
        "noise fields, so the marching-cubes stages (refine_512's mesh, extract) see more surface than a trained "
        "model's output would.",
        "",
        "| stage | seconds | at released steps | target | peak GPU memory, GB | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, rec in r["stages"].items():
        est = rec.get("estimated_seconds_at_released_steps", rec["seconds"])
        lines.append(f"| {name} | {rec['seconds']:.2f} | {est:.2f} | {_target(name, r['stages'])} | "
                     f"{_gb(rec.get('peak_bytes'))} | {_notes(name, rec)} |")
    lines += [f"| **total** | **{r['total_seconds']:.2f}** | **{r['estimated_total_seconds_at_released_steps']:.1f}**"
              f" | **<= {TARGET_TOTAL_SECONDS:.0f}** | **{_gb(peak)}** (target <= {r['target_peak_gb']:.0f}) | |", ""]
    steps, rel = r["steps"], r["released_steps"]
    lines += [
        f"Steps run: dense {steps['dense']}, 512 {steps['512']}, 1024 {steps['1024']} (released: {rel['dense']}, "
        f"{rel['512']}, {rel['1024']}). Time per step = median of a stage's steps after the first (which includes "
        "the Triton compilation); at the released step counts the sampling stages would take "
        + ", ".join(f"{n} {rec['estimated_seconds_at_released_steps']:.1f} s" for n, rec in r["stages"].items()
                    if "estimated_seconds_at_released_steps" in rec)
        + f", the whole cascade about {r['estimated_total_seconds_at_released_steps']:.0f} s.",
        "",
    ]
    for name, rec in r["stages"].items():
        prof = rec.get("profile")
        if prof:
            lines += [f"Stage {name} under torch.profiler: GPU kernels {prof['gpu_ms']:,.0f} ms of "
                      f"{1e3 * rec['seconds']:,.0f} ms wall (the profiler slows the host side).", "",
                      "| kernel | ms | calls |", "| --- | ---: | ---: |"]
            lines += [f"| `{k[:MD_NAME_CHARS]}` | {ms:,.1f} | {calls} |"
                      for k, ms, calls in prof["top_kernels"][:MD_KERNELS]]
            lines.append("")
    a = r["attention_1024"]
    if a.get("stage_seconds"):
        lines += [
            "Sparse 1024 stage, attention against the rest "
            f"({'CUDA events' if not dry else 'wall clock'} around every call):",
            "",
            "| | seconds | share of the stage |",
            "| --- | ---: | ---: |",
            f"| SSA operation (`spatial_sparse_attention`, {a['ssa_op_calls']} calls) | {a['ssa_op_seconds']:.2f} | "
            f"{100 * a['ssa_op_share']:.0f}% |",
            "| self-attention modules up to the output projection (q/k/v/gate projection, compression, SSA) | "
            f"{a['self_attention_seconds']:.2f} | "
            f"{100 * a['self_attention_share']:.0f}% |",
            f"| rest of the stage (cross-attention, MLPs, norms, sampler) | "
            f"{a['stage_seconds'] - a['self_attention_seconds']:.2f} | "
            f"{100 * (1 - a['self_attention_share']):.0f}% |",
            "",
        ]
        if "inference_block_calls" in a:
            lines += [f"DiT block calls of the stage: {a['inference_block_calls']:,} through the sampling path "
                      f"(`SparseDiTBlock.forward_inference`: no autograd, no autocast, one timestep), "
                      f"{a['autograd_block_calls']:,} through the autograd path (`forward`).", ""]
    pub = r["published_memory_gb"]
    verdict = "n/a (no GPU)" if peak is None else (
        f"{peak / 1e9:.2f} GB: {'under' if peak / 1e9 < r['target_peak_gb'] else 'OVER'} the target")
    lines += [
        f"GPU memory: published needs of the released pipeline: at least {pub['512']:.0f} GB at 512, about "
        f"{pub['1024']:.0f} GB at 1024. Our target at 1024: peak under {r['target_peak_gb']:.0f} GB. "
        f"Peak of this run: {verdict}.",
        "",
        "Peak = `torch.cuda.max_memory_allocated` since the stage began (the allocator's reserve can be larger). "
        + ("With offloading a stage's peak holds only its own parts' weights; with `--no-offload` all "
           f"{r['weight_bytes'] / 1e9:.2f} GB of weights stay on the GPU and add to every stage's peak. "
           if r["offload"] else "All weights stay on the GPU (`--no-offload`), so they are in every stage's peak. ")
        + ("Mesh extraction runs on the GPU (`model.pipeline.marching_cubes`); extraction of real meshes' SDFs "
           "against scikit-image and the released simplification are in reports/extract.md."
           if r["stages"].get("extract", {}).get("backend") == "torch" else
           "Mesh extraction runs on the CPU (scikit-image) after the pruning on the GPU; its peak is the pruning's."),
    ]
    glb = r.get("output_glb")
    if glb:
        lines += ["", f"Output mesh: {r['output_faces']:,} faces, written as GLB after the timed run "
                      f"({glb['bytes'] / 1e9:.2f} GB in {glb['seconds']:.1f} s, not counted in the total)."]
    return "\n".join(lines) + "\n"


#: How the report's header names the cross-attention path (its JSON's ``cross_attention``).
_CROSS = {"kernel": "the Triton kernel (`model.nets.cross_attention_kernel`)", "sdpa": "SDPA"}


def build_parser() -> argparse.ArgumentParser:
    from model.cli.args import (add_device, add_no_progress, add_out, add_seed, make_parser, positive_int,
                                share_below_one)
    from model.cli.generate import DTYPES

    p = make_parser("model.reports.generate", __doc__)
    add_out(p, "folder for generate.md and generate.json")
    p.add_argument("--mesh", default=None,
                   help="mesh whose latent voxels feed the sparse stages: a file, 'shell' (the benchmark's shell "
                        "surface, 110,656 tokens at 1024), 'shells:K' (K nested scaled copies of it, more tokens) or "
                        "'cache' (the first mesh of data_cache/meshes) (default shell; cache with --dry-run)")
    for stage in ("dense", "512", "1024"):
        p.add_argument(f"--steps-{stage}", type=positive_int, default=REPORT_STEPS[stage], metavar="N",
                       help=f"sampling steps of the {stage} stage (default %(default)s)")
    from model.pipeline.cascade import DECODE_CHUNKS

    for res in ("512", "1024"):
        p.add_argument(f"--decode-chunks-{res}", type=positive_int, default=None, metavar="N",
                       help=f"spatial chunks per axis of the {res} VAE decode: more chunks hold less memory and "
                            f"synchronise with the host more often (default {DECODE_CHUNKS}, the cascade's: the "
                            "fewest chunks of at most model.pipeline.pretrained.DECODE_CHUNK_TOKENS tokens)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default bfloat16 on CUDA)")
    p.add_argument("--simplify-ratio", type=share_below_one, default=None, metavar="R",
                   help="simplify the output mesh by removing this share of its faces (released 0.95; default: "
                        "none; random weights give a noise mesh of 100M+ faces, whose decimation takes minutes)")
    p.add_argument("--glb", default=None, metavar="PATH",
                   help="write the output mesh to PATH as GLB after the timed run (its time is recorded, not counted; "
                        "random weights give a mesh of tens of millions of faces, about 1 GB) (default: not written)")
    p.add_argument("--profile", nargs="+", default=[], metavar="STAGE",
                   help="run these stages under torch.profiler and list their largest GPU kernels (default: none; "
                        "profiled stages run slower, so their times are not comparable)")
    p.add_argument("--warmup", action="store_true",
                   help="run the cascade once untimed (one step per sampling stage) before the timed run")
    p.add_argument("--cross-attention", choices=("kernel", "sdpa"), default="kernel",
                   help="the sparse DiTs' cross-attention at sampling: kernel (model.nets.cross_attention_kernel) or "
                        "sdpa (PyTorch's scaled_dot_product_attention) (default %(default)s)")
    p.add_argument("--mesh-transfer", choices=("staged", "pinned"), default="staged",
                   help="how the extracted mesh reaches the host: staged (through one reused page-locked buffer, "
                        "model.pipeline.marching_cubes.STAGED_TRANSFER) or pinned (page-locked arrays of the mesh's "
                        "size from PyTorch's cache) (default %(default)s)")
    p.add_argument("--neighbour-tables", choices=("derived", "lookup"), default="derived",
                   help="the sparse convolutions' neighbour tables after a subdivision or a subset: derived from the "
                        "table before (model.sparse.conv.DERIVE_NEIGHBOUR_ROWS) or looked up in the coordinate hash "
                        "(default %(default)s)")
    p.add_argument("--refiner-layout", choices=("contiguous", "channels_last", "wide"), default="contiguous",
                   help="memory layout of the refiners' patches (model.nets.refiner_layout.DEFAULT_LAYOUT; wide: "
                        "channels-last below full resolution) (default %(default)s)")
    p.add_argument("--refiner-bias-kernel", action="store_true",
                   help="add the bias of the refiners' cuDNN convolutions with the bias kernel "
                        "(model.nets.refiner.BIAS_KERNEL) (default: off)")
    p.add_argument("--no-offload", action="store_true",
                   help="keep every part on the GPU (default: each part on the GPU for its own stage only)")
    add_seed(p)
    add_device(p, default=None, shown="cuda; cpu with --dry-run")
    p.add_argument("--dry-run", action="store_true", help="tiny random cascade on the CPU (tests), labelled DRY RUN")
    add_no_progress(p)
    return p


def main(argv=None) -> int:
    import shlex

    from model.cli.args import run

    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "model.reports.generate", *argv])
    return run(build_parser(), lambda args: _main(args, command), argv)


def _main(args, command: str | None = None) -> int:
    from model.cli.args import UserError, output_file, output_folder, resolve_device
    from model.cli.generate import DTYPES

    output_folder("--out", args.out)
    glb = output_file("--glb", args.glb, (".glb",)) if args.glb is not None else None
    if args.device is not None:
        resolve_device(args.device)
    if not args.dry_run and not torch.cuda.is_available():
        print("generate_report: no CUDA device here; the report needs one GPU (nothing written). Run with --dry-run "
              "for the tiny CPU version.")
        return 0
    from model.pipeline.cascade import STAGES

    unknown = sorted(set(args.profile) - set(STAGES))
    if unknown:
        raise UserError(f"--profile: unknown stages {unknown}; the stages are {', '.join(STAGES)}")
    device = args.device if args.device not in (None, "auto") else ("cpu" if args.dry_run else "cuda")
    steps = {"dense": args.steps_dense, "512": args.steps_512, "1024": args.steps_1024}
    switches = (cross_attention_kernel.ENABLED, torch_marching_cubes.STAGED_TRANSFER,
                sparse_conv.DERIVE_NEIGHBOUR_ROWS, refiner_layout.DEFAULT_LAYOUT, refiner_module.BIAS_KERNEL)
    cross_attention_kernel.ENABLED = args.cross_attention == "kernel"
    torch_marching_cubes.STAGED_TRANSFER = args.mesh_transfer == "staged"
    sparse_conv.DERIVE_NEIGHBOUR_ROWS = args.neighbour_tables == "derived"
    refiner_layout.DEFAULT_LAYOUT = args.refiner_layout
    refiner_module.BIAS_KERNEL = args.refiner_bias_kernel
    try:
        r = run_report(mesh_path=args.mesh, steps=steps, dry_run=args.dry_run, device=device,
                       dtype=DTYPES[args.dtype] if args.dtype else None, offload=not args.no_offload, seed=args.seed,
                       progress=args.progress, simplify_ratio=args.simplify_ratio, profile=args.profile,
                       warmup=args.warmup, command=command, glb=glb,
                       decode_chunks={res: n for res, n in (("512", args.decode_chunks_512),
                                                            ("1024", args.decode_chunks_1024)) if n is not None})
    except ValueError as exc:
        raise UserError(f"--mesh: {exc}" if args.mesh and str(args.mesh) in str(exc) else str(exc)) from None
    finally:  # the library's switches as they were (main may run inside another program or a test session)
        (cross_attention_kernel.ENABLED, torch_marching_cubes.STAGED_TRANSFER, sparse_conv.DERIVE_NEIGHBOUR_ROWS,
         refiner_layout.DEFAULT_LAYOUT, refiner_module.BIAS_KERNEL) = switches
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "generate.json", r, default=str)
    atomic_write_text(out / "generate.md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
