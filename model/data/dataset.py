"""A dataset of sparse SDF samples made from mesh files, cached on disk, for training the sparse SDF VAE.

* :class:`SparseSDFDataset` finds the meshes (a folder searched recursively, one file, or a list of files), turns
  each (mesh, resolution) into a sample once with :func:`model.data.sdf.mesh_to_sparse_sdf`, and keeps it as one
  compressed ``.npz`` in ``cache_dir``. The file name carries a cache key: a hash of the mesh file's resolved path,
  size and modification time, the resolution, ``tau``, ``margin``, the sharp-edge parameters and the sample format
  version, so editing the mesh or changing a parameter makes a new entry. Files are written atomically
  (:func:`model.io.atomic_save_npz`: a temporary file in the same folder, fsynced, then renamed over the final name
  with ``os.replace``), so a reader never sees a half-written file and a crash leaves no partial entry.
* Items are ``dict(coords=int32 [M, 3], sdf=float32 [M], sharp=bool [M], resolution=int, name=str, index=int)``
  (torch tensors). ``sdf`` is ``sdf_voxels / tau`` in (-1, 1) by default (``sdf_units="tau"``, the VAE's tanh target)
  or the signed distance in voxels (``sdf_units="voxel"``). ``dataset[i]`` picks one of ``resolutions`` at random,
  seeded by ``(seed, epoch, i)`` (call :meth:`SparseSDFDataset.set_epoch` each epoch for fresh choices);
  ``dataset[i, R]`` asks for resolution ``R``. :class:`MultiResolutionBatchSampler` gives batches that share one
  resolution (the paper samples one resolution per training iteration).
* A mesh that cannot be read, or is empty, is skipped with a warning naming the file: ``dataset[i]`` then serves the
  next good mesh, :meth:`SparseSDFDataset.prepare_all` reports it and (by default) drops it. Failures are remembered
  in the cache (a ``.failed`` note under the same key), so later runs skip them at once until the file changes.
* :func:`collate_sparse_sdf` packs a list of items into one batch: ``coords [N, 4] int32`` (batch, x, y, z) sorted by
  batch, ``sdf [N, 1]``, ``sharp [N]``.
* :func:`split_by_name` is a deterministic train / held-out split by a hash of each sample's name.

``python -m model.data.dataset ROOT --resolutions 256 512 --workers 2`` fills the cache from the command line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from model.io import atomic_save_npz  # noqa: F401  (re-exported: the cache writer; its home is model.io)

from .meshes import MESH_EXTENSIONS, find_meshes
from .sdf import (
    DEFAULT_MARGIN,
    DEFAULT_SHARP_ANGLE,
    DEFAULT_SHARP_RADIUS,
    DEFAULT_TAU,
    SDF_FORMAT_VERSION,
    MeshError,
    SparseSDF,
    _check_tau,
    compute_and_store,
    load_sample,
    prepare_sample_file,
)

#: Cache folder used when none is given (relative to the working directory; ignored by git).
DEFAULT_CACHE_DIR = os.path.join("data_cache", "sparse_sdf")
#: Fraction of samples held out by :func:`split_by_name` unless told otherwise.
DEFAULT_HELD_OUT_FRACTION = 0.05
_SDF_UNITS = ("tau", "voxel")


class SparseSDFDataset(torch.utils.data.Dataset):
    """Sparse SDF samples of meshes, prepared once per (mesh, resolution) and cached on disk.

    Args:
        meshes: a folder (searched recursively for :data:`~model.data.meshes.MESH_EXTENSIONS`), one mesh file, or a
            list of mesh files.
        resolutions: the grid resolutions R served (each item is made at every one of them on demand).
        tau: band half-width in voxels; margin, sharp_angle, sharp_radius: see :mod:`model.data.sdf`.
        cache_dir: where the ``.npz`` samples go (created if missing); default :data:`DEFAULT_CACHE_DIR`.
        sdf_units: ``"tau"`` (``sdf / tau`` in (-1, 1), default) or ``"voxel"``.
        seed: seeds the per-item resolution choice.
        names: one name per mesh (default: the path relative to the folder, or to the list's common folder,
            without the extension unless two meshes would get the same name).
    """

    def __init__(
        self,
        meshes,
        resolutions: Sequence[int] = (256,),
        *,
        tau: float = DEFAULT_TAU,
        cache_dir=None,
        margin: float = DEFAULT_MARGIN,
        sharp_angle: float = DEFAULT_SHARP_ANGLE,
        sharp_radius: float = DEFAULT_SHARP_RADIUS,
        sdf_units: str = "tau",
        seed: int = 0,
        names: Sequence[str] | None = None,
    ):
        self.paths = _mesh_paths(meshes)
        if not self.paths:
            raise ValueError(f"meshes: no mesh files ({', '.join(MESH_EXTENSIONS)}) found in {meshes!r}")
        if names is None:
            names = _default_names(self.paths, meshes)
        names = [str(n) for n in names]
        if len(names) != len(self.paths):
            raise ValueError(f"names has {len(names)} entries for {len(self.paths)} meshes")
        if len(set(names)) != len(names):
            raise ValueError("names must be unique")
        self.names = names
        if isinstance(resolutions, (int, np.integer)):
            resolutions = (int(resolutions),)
        resolutions = tuple(resolutions)
        if not resolutions or not all(
            isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 2 for r in resolutions
        ):
            raise ValueError(f"resolutions must be a non-empty sequence of ints >= 2, got {resolutions!r}")
        self.resolutions = tuple(int(r) for r in resolutions)
        if sdf_units not in _SDF_UNITS:
            raise ValueError(f"sdf_units must be one of {_SDF_UNITS}, got {sdf_units!r}")
        self.sdf_units = sdf_units
        _check_tau(tau)
        if not (isinstance(margin, (int, float)) and 0 < margin <= 1):
            raise ValueError(f"margin must be a number in (0, 1], got {margin!r}")
        if not (isinstance(sharp_angle, (int, float)) and 0 <= sharp_angle < 180):
            raise ValueError(f"sharp_angle must be a number of degrees in [0, 180), got {sharp_angle!r}")
        if not (isinstance(sharp_radius, (int, float)) and sharp_radius > 0):
            raise ValueError(f"sharp_radius must be a positive number of voxels, got {sharp_radius!r}")
        self.params = dict(tau=float(tau), margin=float(margin), sharp_angle=float(sharp_angle),
                           sharp_radius=float(sharp_radius))
        self.cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.seed = int(seed)
        self.epoch = 0
        self.failed: dict[str, str] = {}  # name -> reason

    # ---------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random resolution choice of ``dataset[i]`` (call once per epoch)."""
        self.epoch = int(epoch)

    def pick_resolution(self, index: int) -> int:
        """The resolution ``dataset[index]`` serves this epoch (seeded by ``(seed, epoch, index)``)."""
        if len(self.resolutions) == 1:
            return self.resolutions[0]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return self.resolutions[int(rng.integers(len(self.resolutions)))]

    def cache_path(self, index: int, resolution: int) -> Path:
        """Cache file of (mesh ``index``, ``resolution``); its name changes with the mesh file and the parameters."""
        path = self.paths[index]
        st = path.stat()
        key = json.dumps(
            dict(path=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns, resolution=int(resolution),
                 version=SDF_FORMAT_VERSION, **self.params),
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.names[index].replace("/", "__"))[:80]
        return self.cache_dir / f"{safe}-r{int(resolution)}-{digest}.npz"

    def sample(self, index: int, resolution: int | None = None) -> SparseSDF:
        """The :class:`~model.data.sdf.SparseSDF` of mesh ``index`` at ``resolution`` (default: the first one), from
        the cache or computed and cached. Raises :class:`~model.data.sdf.MeshError` (a ``ValueError``) for a mesh
        that cannot be used."""
        index = self._check_index(index)
        resolution = self.resolutions[0] if resolution is None else int(resolution)
        path = self.paths[index]
        try:
            cache = self.cache_path(index, resolution)
        except OSError as exc:
            raise _mesh_error(path, exc) from exc
        failed = cache.with_suffix(".failed")
        if failed.exists():
            raise _mesh_error(path, failed.read_text(errors="replace").strip() or "failed before")
        if cache.exists():
            try:
                return load_sample(cache)
            except Exception as exc:  # unreadable or old-format entry: make it again
                warnings.warn(f"cache entry {cache} unreadable ({exc}); recomputing", RuntimeWarning, stacklevel=2)
        try:
            return compute_and_store(path, resolution, self.params, cache)
        except MeshError as exc:
            raise _mesh_error(path, exc) from exc

    def __getitem__(self, item) -> dict:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise TypeError(f"item must be an index or (index, resolution), got {item!r}")
            index, resolution = item
            resolution = int(resolution)
        else:
            index, resolution = item, None
        index = self._check_index(index)
        for k in range(len(self)):
            j = (index + k) % len(self)
            if self.names[j] in self.failed:
                continue
            r = self.pick_resolution(j) if resolution is None else resolution
            try:
                s = self.sample(j, r)
            except Exception as exc:  # never let one bad mesh stop a training run
                self._mark_failed(j, exc)
                continue
            return self._item(j, s)
        raise RuntimeError(f"none of the {len(self)} meshes could be made into a sample")

    def _item(self, index: int, s: SparseSDF) -> dict:
        sdf = s.sdf_scaled if self.sdf_units == "tau" else s.sdf
        return dict(
            coords=torch.from_numpy(np.ascontiguousarray(s.coords, dtype=np.int32)),
            sdf=torch.from_numpy(np.ascontiguousarray(sdf, dtype=np.float32)),
            sharp=torch.from_numpy(np.ascontiguousarray(s.sharp, dtype=bool)),
            resolution=int(s.resolution),
            name=self.names[index],
            index=int(index),
        )

    def _mark_failed(self, index: int, exc: BaseException) -> None:
        name = self.names[index]
        if name not in self.failed:
            self.failed[name] = str(exc)
            path = str(self.paths[index])
            msg = f"skipping mesh: {exc}" if path in str(exc) else f"skipping mesh {path}: {exc}"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} meshes")
        return index % len(self)

    # ---------------------------------------------------------------------------------------------------------
    def prepare_all(self, num_workers: int = 0, *, resolutions: Iterable[int] | None = None, progress: bool = True,
                    drop_failed: bool = True) -> dict:
        """Fill the cache for every mesh at every resolution (default: all of ``self.resolutions``).

        ``num_workers`` > 1 runs that many processes (spawned); 0 or 1 works in this process. Failed meshes are
        warned about, recorded in :attr:`failed` and, with ``drop_failed``, removed from the dataset. Returns
        ``dict(computed=int, cached=int, failed={name: reason})``.
        """
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        res = self.resolutions if resolutions is None else tuple(int(r) for r in resolutions)
        todo, cached = [], 0
        for i in range(len(self)):
            if self.names[i] in self.failed:
                continue
            for r in res:
                try:
                    cache = self.cache_path(i, r)
                except OSError as exc:
                    self._mark_failed(i, _mesh_error(self.paths[i], exc))
                    break
                if cache.with_suffix(".failed").exists():
                    self._mark_failed(i, _mesh_error(self.paths[i], cache.with_suffix(".failed").read_text().strip()))
                    break
                if cache.exists():
                    cached += 1
                else:
                    todo.append((i, r, str(self.paths[i]), str(cache)))
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="sparse SDF cache", disable=not progress)
        computed = 0

        def done(i, err):
            nonlocal computed
            if err is None:
                computed += 1
            else:
                self._mark_failed(i, _mesh_error(self.paths[i], err))
            bar.update(1)

        if num_workers <= 1:
            for i, r, path, cache in todo:
                if self.names[i] in self.failed:
                    bar.update(1)
                    continue
                done(i, prepare_sample_file((path, r, self.params, cache)))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
                futures = {
                    pool.submit(prepare_sample_file, (path, r, self.params, cache)): i for i, r, path, cache in todo
                }
                for fut in as_completed(futures):
                    try:
                        err = fut.result()
                    except BrokenProcessPool as exc:  # not the mesh's fault: do not mark anything failed
                        bar.close()
                        raise RuntimeError(
                            "a worker process of prepare_all died. Workers are spawned: a script that calls "
                            "prepare_all(num_workers > 1) must guard its top level with `if __name__ == '__main__':`;"
                            " otherwise run with num_workers=0 to find the mesh that crashes"
                        ) from exc
                    done(futures[fut], err)
        bar.close()
        failed = dict(self.failed)
        if drop_failed and failed:
            keep = [i for i in range(len(self)) if self.names[i] not in failed]
            self.paths = [self.paths[i] for i in keep]
            self.names = [self.names[i] for i in keep]
        return dict(computed=computed, cached=cached, failed=failed)

    def split(self, held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION, seed: int = 0):
        """``(train, held_out)``: two datasets with the same parameters and cache, split by :func:`split_by_name`."""
        train, held = split_by_name(self.names, held_out_fraction, seed=seed)
        held_set = set(held)
        out = []
        for want in (False, True):
            idx = [i for i in range(len(self)) if (self.names[i] in held_set) == want]
            if not idx:
                out.append(None)
                continue
            out.append(SparseSDFDataset(
                [self.paths[i] for i in idx], self.resolutions, cache_dir=self.cache_dir, sdf_units=self.sdf_units,
                seed=self.seed, names=[self.names[i] for i in idx], **self.params,
            ))
        return tuple(out)


def _mesh_error(path, exc) -> MeshError:
    """A MeshError whose message names the file once."""
    msg = str(exc)
    return MeshError(msg if str(path) in msg else f"{path}: {msg}")


# -------------------------------------------------------------------------------------------------------------
# Paths and names
# -------------------------------------------------------------------------------------------------------------


def _mesh_paths(meshes) -> list[Path]:
    if isinstance(meshes, (str, os.PathLike)):
        return find_meshes(meshes)
    if isinstance(meshes, Iterable):
        out = []
        for m in meshes:
            if not isinstance(m, (str, os.PathLike)):
                raise TypeError(f"meshes must be a folder, a file or a list of paths; got an item of type "
                                f"{type(m).__name__}")
            out.append(Path(m))
        return out
    raise TypeError(f"meshes must be a folder, a file or a list of paths, got {type(meshes).__name__}")


def _default_names(paths: list[Path], meshes) -> list[str]:
    if isinstance(meshes, (str, os.PathLike)) and Path(meshes).is_dir():
        base = Path(meshes)
    else:
        base = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    rel = []
    for p in paths:
        try:
            rel.append(p.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            rel.append(p.name)
    stems = [os.path.splitext(r)[0] for r in rel]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else r for s, r in zip(stems, rel)]


def held_out(name: str, fraction: float = DEFAULT_HELD_OUT_FRACTION, seed: int = 0) -> bool:
    """Whether ``name`` belongs to the held-out split: a SHA-256 of ``"{seed}/{name}"`` read as a number in [0, 1)
    is below ``fraction``. Stable across machines, Python versions and dataset sizes."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    h = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split_by_name(names: Iterable[str], held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION, *, seed: int = 0):
    """``(train_names, held_out_names)``, each in the input order, decided per name by :func:`held_out`."""
    names = [str(n) for n in names]
    held = [held_out(n, held_out_fraction, seed) for n in names]
    return [n for n, h in zip(names, held) if not h], [n for n, h in zip(names, held) if h]


# -------------------------------------------------------------------------------------------------------------
# Batching
# -------------------------------------------------------------------------------------------------------------


def collate_sparse_sdf(samples: Sequence[dict]) -> dict:
    """Stack items of :class:`SparseSDFDataset` into one batch.

    Returns ``coords [N, 4] int32`` (batch, x, y, z): sample ``b``'s voxels, in its raster order, come after those of
    samples ``0..b-1`` (sorted by batch); ``sdf [N, 1] float32``; ``sharp [N] bool``; ``resolution [B] int64``;
    ``offsets [B + 1] int64`` (sample ``b`` is rows ``offsets[b]:offsets[b+1]``); ``name``: list of B strings.
    """
    if not isinstance(samples, Sequence) or len(samples) == 0:
        raise ValueError("samples must be a non-empty list of dataset items")
    coords, sdf, sharp, counts = [], [], [], []
    for b, s in enumerate(samples):
        if not isinstance(s, dict) or not {"coords", "sdf", "sharp"} <= s.keys():
            raise TypeError(f"samples[{b}] must be a dict with coords, sdf and sharp")
        c = torch.as_tensor(s["coords"]).to(torch.int32)
        if c.dim() != 2 or c.shape[1] != 3:
            raise ValueError(f"samples[{b}]['coords'] must have shape [M, 3], got {tuple(c.shape)}")
        m = c.shape[0]
        coords.append(torch.cat([torch.full((m, 1), b, dtype=torch.int32), c], dim=1))
        sdf.append(torch.as_tensor(s["sdf"]).to(torch.float32).reshape(m, 1))
        sharp.append(torch.as_tensor(s["sharp"]).to(torch.bool).reshape(m))
        counts.append(m)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return dict(
        coords=torch.cat(coords), sdf=torch.cat(sdf), sharp=torch.cat(sharp),
        resolution=torch.tensor([int(s.get("resolution", -1)) for s in samples], dtype=torch.int64),
        offsets=offsets, name=[str(s.get("name", "")) for s in samples],
    )


class MultiResolutionBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, resolution)`` pairs sharing one resolution, drawn at random per batch (seeded by
    ``(seed, epoch)``), for ``DataLoader(dataset, batch_sampler=..., collate_fn=collate_sparse_sdf)``."""

    def __init__(self, dataset_len: int, batch_size: int, resolutions: Sequence[int], *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not resolutions:
            raise ValueError("resolutions must not be empty")
        self.n, self.batch_size, self.resolutions = int(dataset_len), batch_size, tuple(int(r) for r in resolutions)
        self.shuffle, self.drop_last, self.seed, self.epoch = shuffle, drop_last, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            r = self.resolutions[int(rng.integers(len(self.resolutions)))]
            yield [(int(i), r) for i in idx]


# -------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Fill the sparse SDF cache for a folder of meshes.")
    ap.add_argument("root", nargs="?", help="folder of meshes (or use --pybullet)")
    ap.add_argument("--pybullet", action="store_true", help="use pybullet's ~1,000 object meshes")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256])
    ap.add_argument("--tau", type=float, default=DEFAULT_TAU)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    if args.pybullet:
        from .meshes import pybullet_meshes

        meshes = pybullet_meshes()
    elif args.root:
        meshes = args.root
    else:
        ap.error("give a folder of meshes or --pybullet")
    ds = SparseSDFDataset(meshes, args.resolutions, tau=args.tau, cache_dir=args.cache_dir)
    report = ds.prepare_all(num_workers=args.workers)
    print(f"{len(ds)} meshes ready; computed {report['computed']}, already cached {report['cached']}, "
          f"failed {len(report['failed'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
