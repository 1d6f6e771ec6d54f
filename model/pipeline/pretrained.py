"""Load the released Direct3D-S2 checkpoints into our modules (RELEASED_MODEL.md A, B, G).

A released folder (the model hub's ``direct3d-s2-v-1-1`` or ``direct3d-s2-v-1-0``) holds ``config.yaml`` and five
torch files, each a dict of state dicts:

- ``model_dense.ckpt``: ``["vae"]`` part ``dense_vae`` (:class:`model.nets.dense.DenseShapeVAE`), ``["dit"]`` part
  ``dense_dit`` (:class:`model.nets.dense.DenseDiT`);
- ``model_sparse_512.ckpt``: ``["vae"]`` part ``sparse_vae_512`` (:class:`model.nets.vae.SparseSDFVAE` with
  ``prune="none"``), ``["dit"]`` part ``sparse_dit_512`` (:class:`model.nets.dit.SparseDiT`);
- ``model_sparse_1024.ckpt``: ``["vae"]`` part ``sparse_vae_1024``, ``["dit"]`` part ``sparse_dit_1024`` (same
  classes);
- ``model_refiner.ckpt``: ``["refiner"]`` part ``refiner`` (:class:`model.nets.refiner.VoxelRefiner`);
- ``model_refiner_1024.ckpt``: ``["refiner"]`` part ``refiner_1024`` (:class:`model.nets.refiner.SignRefiner`).

:func:`from_pretrained` reads such a folder (or fetches it from the model hub, :data:`DEFAULT_HUB_ID`), maps every
released tensor to exactly one parameter or buffer of our modules and loads strictly: a missing, unexpected or
misshapen tensor, a missing file or entry, or a config.yaml entry we cannot map is an error, and all problems of one
call are collected and reported together, each named (:class:`ReleasedCheckpointError`). Our modules mirror the
released names and layouts one to one (the sparse convolutions keep torchsparse's ``[27, Cin, Cout]`` kernels,
RELEASED_MODEL.md B), so the per-part key map (:attr:`model.pipeline.released_config.PartSpec.rename`) is the
identity today; it is the one place a
rename or re-layout goes when our structure departs from the released one. Checkpoint dtypes (float16 or float32,
G.4) are accepted and cast to the ``dtype`` asked for.

Configurations come from ``config.yaml`` (``<part>: {target, params}``, the released constructor parameters,
mapped to our dataclass configs; unknown parameters are errors), from the optional ``ours`` mapping of a part (the
fields of our config; :func:`save_released` writes it when the released parameters cannot express our config, e.g.
the tiny test sizes), or from the ``configs`` override of :func:`from_pretrained`. Without config.yaml the released
sizes are used (a sparse DiT holding ``cond_proj`` is taken as v1.0). The parts (:data:`PARTS`: files, entries,
classes) and this mapping live in :mod:`model.pipeline.released_config`; this module reads, checks and writes the
weights.

:func:`save_released` writes modules in the released layout (tests, and our own weights for tools that expect the
released folder); our training checkpoints stay safetensors (:mod:`model.io`).

:func:`decode_chunked` decodes like the released ``sparse_vae_1024`` (``chunk_size`` 4): every child of every latent
voxel, the subdivide blocks run per spatial chunk with 4 latent cells of padding (same values as one pass; unlike
the released code, no voxel is emitted twice at chunk seams).
"""
from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from model.pipeline.released_config import (
    ALL_PARTS,
    CONFIG_FILE,
    PARTS,
    PartSpec,
    config_entry,
    normalise_parts,
    part_config,
    read_config_yaml,
)
from model.sparse.tensor import SparseTensor

__all__ = [
    "DEFAULT_HUB_ID",
    "DEFAULT_SUBFOLDER",
    "PretrainedDownloadError",
    "RELEASED_MC_LEVEL",
    "RELEASED_SDF_TAU",
    "ReleasedCheckpointError",
    "ReleasedModels",
    "decode_chunk_count",
    "decode_chunked",
    "from_pretrained",
    "released_state_dict",
    "resolve_folder",
    "save_released",
]

#: Model hub repository of the release and the folder of each version inside it.
DEFAULT_HUB_ID = "wushuang98/Direct3D-S2"
DEFAULT_SUBFOLDER = "direct3d-s2-v-1-1"
SUBFOLDER_V10 = "direct3d-s2-v-1-0"
#: Iso level of the released pipeline on the sparse VAE's decoded SDF (RELEASED_MODEL.md A.3, C.5).
RELEASED_MC_LEVEL = 0.2
#: Our ASSUMPTION for the released sparse VAE's input (not published, RELEASED_MODEL.md F): the signed distance
#: (negative inside) divided by ``tau`` at the voxels with ``|sdf| < tau``, ``tau`` in voxels of the SDF grid; 4
#: voxels mirrors the 4-voxel band the released pipeline uses to choose the 1024 stage's tokens (C.4).
RELEASED_SDF_TAU = 4.0
#: Latent cells of padding around each chunk of the chunked decoder (RELEASED_MODEL.md C.5).
CHUNK_PADDING = 4
#: Most latent tokens (its own and its padding's) the largest spatial chunk may hold when :func:`decode_chunk_count`
#: picks the chunk count. While every coordinate set's neighbour table was looked up in a hash, a decode's peak grew
#: by about 1.3-1.4 MB per token of its largest chunk (1024 stage 9.71 GB with 7,271 tokens), and 7,500 tokens a
#: chunk kept it near 10 GB. Derived tables (:func:`model.sparse.conv.neighbour_rows`) cut the 1024 decode of the
#: shell mesh (110,656 tokens, one H100, generate report, reports/generate_history.md runs 34-35) to 4.43 GB with 3
#: chunks per axis and 4.57 GB with 2 (0.32 -> 0.26 s): the chunk's own working set is small beside the decoded
#: voxels, so chunks of up to 20,000 tokens (2 per axis for that mesh) cost little memory and synchronise with the
#: host less often.
DECODE_CHUNK_TOKENS = 20_000
#: Chunks per axis :func:`decode_chunk_count` chooses from: counts between the powers of two too, so a mesh whose
#: 4 chunks fit the token budget by a wide margin may get 3 (27 chunks to visit, not 64, and less padding decoded
#: twice); any count cuts the grid into ``ceil(resolution / count)`` cells a chunk (tests/test_pretrained.py checks
#: 3 against one pass).
DECODE_CHUNK_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16)
#: Tokens per pass of :func:`decode_chunk_count`'s counting (its products hold this many x chunks^2 floats).
_COUNT_TOKENS = 65_536


class ReleasedCheckpointError(ValueError):
    """Loading released weights failed; ``problems`` lists every problem found (each names its file, entry, part
    and tensor)."""

    def __init__(self, source, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.source}: {len(self.problems)} problem(s) with the released checkpoint:\n{lines}")


class PretrainedDownloadError(RuntimeError):
    """The released folder could not be fetched from the model hub (no network, unknown id, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# where the folder is


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _has_release(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or any((folder / s.file).is_file() for s in PARTS.values())


def resolve_folder(path_or_id, *, parts: Iterable[str] = ALL_PARTS, subfolder: str | None = None,
                   revision: str | None = None, cache_dir=None, local_files_only: bool = False) -> Path:
    """The local folder holding the released files of ``parts``.

    A local folder is used as is when it holds config.yaml or a checkpoint file, else its ``subfolder`` (default
    ``direct3d-s2-v-1-1``; the hub repository's layout). Anything else that looks like a hub id (``owner/name``) is
    fetched with ``huggingface_hub.snapshot_download`` (only config.yaml and the files of ``parts``), which needs
    network access or a filled hub cache; failures raise :class:`PretrainedDownloadError` with what to do instead.
    """
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: expected the folder of a release (config.yaml and the .ckpt files), got a file")
        if subfolder is not None:
            if not (path / subfolder).is_dir():
                raise FileNotFoundError(f"{path} has no subfolder {subfolder!r}")
            return path / subfolder
        if _has_release(path):
            return path
        for name in (DEFAULT_SUBFOLDER, SUBFOLDER_V10):
            if _has_release(path / name):
                return path / name
        raise FileNotFoundError(f"{path} holds neither {CONFIG_FILE} nor any released .ckpt file "
                                f"(nor a {DEFAULT_SUBFOLDER}/ subfolder with them)")
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise FileNotFoundError(f"{text}: no such folder, and not a model hub id of the form owner/name "
                                f"(the release is {DEFAULT_HUB_ID!r})")
    return _download(text, normalise_parts(tuple(parts)), subfolder or DEFAULT_SUBFOLDER, revision, cache_dir,
                     local_files_only)


def _download(repo_id: str, parts: tuple[str, ...], subfolder: str, revision, cache_dir,
              local_files_only: bool) -> Path:
    files = sorted({PARTS[p].file for p in parts})
    patterns = [f"{subfolder}/{CONFIG_FILE}"] + [f"{subfolder}/{f}" for f in files]
    advice = (f"Without network access here, fetch the files on a machine that has it, e.g. "
              f"`hf download {repo_id} --include '{subfolder}/*' --local-dir DIR` (older huggingface_hub: "
              f"`huggingface-cli download`), copy DIR over and "
              f"pass DIR/{subfolder} (or DIR) instead of the id; with HF_HUB_OFFLINE=1 a filled hub cache is used.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise PretrainedDownloadError(f"fetching {repo_id!r} needs the huggingface_hub package "
                                      f"(pip install huggingface_hub). {advice}") from exc
    try:
        local = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                                  local_files_only=local_files_only)
    except Exception as exc:  # network, authentication, unknown repository or revision, offline cache miss
        raise PretrainedDownloadError(f"could not fetch {', '.join(patterns)} from the model hub repository "
                                      f"{repo_id!r} ({type(exc).__name__}: {exc}). {advice}") from exc
    return Path(local) / subfolder


# ---------------------------------------------------------------------------------------------------------------
# reading


def _load_file(path: Path) -> Any:
    """``torch.load`` of a released file (``weights_only``; memory-mapped where the format allows)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_entries(root: Path, parts: tuple[str, ...], problems: list[str]) -> dict[str, dict]:
    """``{part: released state dict}`` for the parts whose file and entry exist; problems are recorded."""
    out: dict[str, dict] = {}
    by_file: dict[str, list[str]] = {}
    for part in parts:
        by_file.setdefault(PARTS[part].file, []).append(part)
    for file, file_parts in by_file.items():
        path = root / file
        if not path.is_file():
            problems.append(f"{file}: file not found in {root} (needed for {', '.join(file_parts)})")
            continue
        try:
            blob = _load_file(path)
        except Exception as exc:  # pickle/zip errors, unsupported objects under weights_only
            problems.append(f"{file}: cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(blob, Mapping):
            problems.append(f"{file}: expected a dict of state dicts, got {type(blob).__name__}")
            continue
        for part in file_parts:
            entry = PARTS[part].entry
            if entry not in blob:
                problems.append(f"{file}: no entry {entry!r} for {part} (entries: {sorted(map(str, blob))})")
                continue
            state = blob[entry]
            if not isinstance(state, Mapping):
                problems.append(f"{file}[{entry!r}] ({part}): expected a state dict, got {type(state).__name__}")
                continue
            bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
            for k in bad:
                problems.append(f"{file}[{entry!r}] ({part}): entry {k!r} is not a tensor")
            out[part] = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out


def _shape(t) -> list[int]:
    return list(t.shape)


def _map_state(spec: PartSpec, released: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
               where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released tensors -> ours (rename + re-layout) and the problems: every expected tensor present exactly once,
    nothing unexpected, every shape equal."""
    problems: list[str] = []
    ours: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our name -> the released name mapped to it
    for name, tensor in released.items():
        target = spec.rename(name)
        if target not in expected:
            problems.append(f"{where}: unexpected tensor {name!r} {_shape(tensor)} (no parameter or buffer of our "
                            f"{spec.name} module has this name)")
            continue
        if target in source:
            problems.append(f"{where}: tensors {source[target]!r} and {name!r} both map to {target!r}")
            continue
        source[target] = name
        mapped = spec.relayout(target, tensor)
        if tuple(mapped.shape) != tuple(expected[target]):
            problems.append(f"{where}: tensor {name!r} has shape {_shape(tensor)}, expected "
                            f"{list(expected[target])}")
            continue
        ours[target] = mapped
    for target, shape in expected.items():
        if target not in source:
            problems.append(f"{where}: missing tensor {spec.unrename(target)!r} {list(shape)}")
    return ours, problems


class ReleasedModels(dict):
    """``{part: module}`` (eval mode) returned by :func:`from_pretrained`, plus ``root`` (the folder read),
    ``configs`` (``{part: our config}``) and ``options`` (``{part: {...}}``, e.g. ``chunk_size`` of the sparse
    VAEs, from config.yaml)."""

    def __init__(self, modules: dict, *, root: Path, configs: dict, options: dict):
        super().__init__(modules)
        self.root, self.configs, self.options = root, configs, options


def from_pretrained(path_or_id=DEFAULT_HUB_ID, *, parts: str | Iterable[str] | None = None, device="cpu",
                    dtype: torch.dtype = torch.float32, configs: Mapping[str, Any] | None = None,
                    subfolder: str | None = None, revision: str | None = None, cache_dir=None,
                    local_files_only: bool = False) -> ReleasedModels:
    """Our modules with the released weights (module docstring).

    Args:
        path_or_id: a released folder (or a folder holding ``direct3d-s2-v-1-1/``), or a model hub id
            (default :data:`DEFAULT_HUB_ID`, fetched with ``huggingface_hub``; needs network access).
        parts: part names (:data:`ALL_PARTS`; one name or several); default all of them.
        device, dtype: where the modules go and the floating dtype of their weights (checkpoint tensors are cast;
            ``None`` keeps each tensor's checkpoint dtype).
        configs: ``{part: config}`` overriding config.yaml (e.g. smaller sizes with the released names).
        subfolder: the folder inside a hub repository or local folder (default ``direct3d-s2-v-1-1``; v1.0:
            ``direct3d-s2-v-1-0``). revision, cache_dir, local_files_only: passed to ``snapshot_download``.

    Raises :class:`ReleasedCheckpointError` listing every problem (missing files or entries, config entries we
    cannot map, missing / unexpected / misshapen tensors) and :class:`PretrainedDownloadError` when fetching fails.
    """
    parts = normalise_parts(parts)
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(PARTS))
    if unknown:
        raise ValueError(f"configs names unknown part(s) {unknown}; known: {list(ALL_PARTS)}")
    root = resolve_folder(path_or_id, parts=parts, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                          local_files_only=local_files_only)
    problems: list[str] = []
    doc = read_config_yaml(root, problems)
    states = _read_entries(root, parts, problems)
    pending, out_configs, out_options = [], {}, {}
    for part in parts:
        spec = PARTS[part]
        state = states.get(part)
        try:
            config, options = part_config(spec, doc, None if state is None else set(state), configs.get(part))
        except (ValueError, TypeError) as exc:
            problems.append(f"{CONFIG_FILE} ({part}): {exc}")
            continue
        out_configs[part], out_options[part] = config, options
        with torch.device("meta"):
            module = spec.build(config)
        if state is None:
            continue
        expected = {k: v.shape for k, v in module.state_dict().items()}
        mapped, part_problems = _map_state(spec, state, expected, f"{spec.file}[{spec.entry!r}] ({part})")
        problems += part_problems
        if not part_problems:
            pending.append((part, module, mapped))
    if problems:
        raise ReleasedCheckpointError(root, problems)
    modules = {}
    for part, module, mapped in pending:
        tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in mapped.items()}
        module.load_state_dict(tensors, strict=True, assign=True)
        left = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
        if left:
            raise ReleasedCheckpointError(root, [f"{part}: our module has tensors the checkpoint cannot fill: {left}"])
        modules[part] = module.eval()
    return ReleasedModels(modules, root=root, configs=out_configs, options=out_options)


# ---------------------------------------------------------------------------------------------------------------
# writing


def released_state_dict(part: str, module: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``module``'s state dict under the released names and layouts of ``part`` (optionally cast)."""
    spec = PARTS[normalise_parts(part)[0]]
    out = {}
    for name, tensor in module.state_dict().items():
        t = spec.unrelayout(name, tensor.detach())
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[spec.unrename(name)] = t.cpu().contiguous()
    return out


def save_released(folder, modules: Mapping[str, nn.Module], *, dtype: torch.dtype | None = None) -> Path:
    """Write ``{part: module}`` as a released folder: each part's state dict under its entry of its file (merged
    into an existing file), and its config.yaml entry (``target``, ``params`` and, when the released parameters do
    not determine our config, ``ours``: its fields). Returns the folder."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = normalise_parts(tuple(modules))
    by_file: dict[str, dict] = {}
    for part in parts:
        spec = PARTS[part]
        by_file.setdefault(spec.file, {})[spec.entry] = released_state_dict(part, modules[part], dtype=dtype)
    for file, entries in by_file.items():
        path = folder / file
        blob = dict(torch.load(path, map_location="cpu", weights_only=True)) if path.is_file() else {}
        blob.update(entries)
        torch.save(blob, path)
    cfg_path = folder / CONFIG_FILE
    doc = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    for part in parts:
        config = getattr(modules[part], "config", None)
        if config is None:
            raise ValueError(f"{part}: the module has no .config to describe in {CONFIG_FILE}")
        doc[part] = config_entry(part, config)
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# decoding like the released sparse VAE


@torch.no_grad()
def decode_chunk_count(coords: torch.Tensor, resolution: int | None, *, max_tokens: int | None = None,
                       padding: int = CHUNK_PADDING, choices: Iterable[int] | None = None) -> int:
    """The fewest chunks per axis (of ``choices``, default :data:`DECODE_CHUNK_CHOICES`) for which every chunk
    :func:`decode_chunked` decodes holds at most ``max_tokens`` (default :data:`DECODE_CHUNK_TOKENS`) latent
    tokens, its ``padding`` cells of context included; the most of ``choices`` if none does.

    Args:
        coords: ``[N, 4]`` (batch, x, y, z) or ``[N, 3]`` latent coordinates.
        resolution: side of the latent grid (:func:`decode_chunked` cuts ``ceil(resolution / chunks)`` cells per
            chunk); None: the largest coordinate + 1, as :func:`decode_chunked` takes it.

    One host synchronisation per chunk count tried: each count's chunks are counted at once, as products of per-axis
    memberships summed over the tokens (:data:`_COUNT_TOKENS` at a time, which bounds the memory).
    """
    max_tokens = DECODE_CHUNK_TOKENS if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if coords.ndim != 2 or coords.shape[1] not in (3, 4):
        raise ValueError(f"coords must be [N, 3] or [N, 4], got {tuple(coords.shape)}")
    choices = sorted(DECODE_CHUNK_CHOICES if choices is None else choices)
    xyz = coords[:, -3:].long()
    if resolution is None:
        resolution = int(xyz.max()) + 1 if xyz.numel() else 1
    for k in choices:
        side = math.ceil(resolution / k)
        lo = torch.arange(k, device=xyz.device) * side  # [k] first cell of each chunk along an axis
        owned = torch.zeros(k, k, k, device=xyz.device)
        held = torch.zeros_like(owned)
        for start in range(0, xyz.shape[0], _COUNT_TOKENS):
            x = xyz[start:start + _COUNT_TOKENS, :, None]
            for count, pad in ((owned, 0), (held, padding)):
                # [n, 3, k]: the token lies in the chunk's span along that axis, widened by pad; tokens per chunk
                # are the products of the three axes' memberships summed over the tokens
                m = ((x >= lo - pad) & (x < lo + side + pad)).float()
                count += torch.einsum("na,nb,nc->abc", m[:, 0], m[:, 1], m[:, 2])
        if float(torch.where(owned > 0, held, torch.zeros_like(held)).max()) <= max_tokens:
            return k
    return choices[-1]


def decode_chunked(vae, z: SparseTensor, chunk_size: int = 1, *, padding: int = CHUNK_PADDING,
                   features: bool = True, progress: bool = False,
                   desc: str = "decode") -> tuple[SparseTensor, SparseTensor | None]:
    """Decode every child of every latent voxel (the released decoder, no pruning): ``(sdf [M, 1] tanh, features
    [M, C0])`` on the decoded voxels, in raster order (batch, x, y, z). ``features=False`` returns ``(sdf, None)``
    without keeping the decoder features (the 1024 stage does not use them; they are 32 values per voxel).

    ``chunk_size > 1`` runs the transformer on all tokens, then the subdivide blocks per spatial chunk
    (``chunk_size`` chunks per axis) on the chunk's latent voxels plus ``padding`` latent cells of context (4, as
    released), keeping each chunk's own voxels: the same values as one pass (the subdivide blocks see 2.625 latent
    cells around a voxel) with a fraction of the peak memory (RELEASED_MODEL.md C.5). After each subdivide block
    the context is trimmed to what the remaining blocks still read, so the chunks together cost about one pass.
    ``progress``: a tqdm bar (``desc``) over the chunks.
    """
    if getattr(vae, "pruning", None) is not None:
        raise ValueError("decode_chunked decodes every child: build the VAE with prune='none' (as released)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dec = vae.decoder
    levels = len(dec.upsample)
    factor = 2**levels
    if chunk_size == 1:
        out = dec(z)
        parts = [(out.sdf.coords, out.sdf.feats, out.features.feats if features else None)]
    else:
        h = dec.input_layer(z)
        h = h.replace(h.feats + dec.pos_embedder(h))
        for block in dec.blocks:
            h = block(h)
        xyz = h.coords[:, 1:].long()
        res = h.resolution if h.resolution is not None else int(xyz.max()) + 1 if xyz.numel() else 1
        side = math.ceil(res / chunk_size)
        # latent cells of context the blocks after block i still read (a 3^3 conv before and after each subdivide)
        margins = [math.ceil(sum(2.0**-j + 2.0**-(j + 1) for j in range(i + 1, levels))) for i in range(levels)]
        parts = []
        cells = itertools.product(range(chunk_size), repeat=3)
        if progress:
            from tqdm.auto import tqdm

            cells = tqdm(list(cells), desc=desc, unit="chunk", leave=False)
        for cell in cells:
            lo = torch.tensor(cell, device=xyz.device) * side
            hi = lo + side
            if not bool(((xyz >= lo) & (xyz < hi)).all(1).any()):
                continue
            hc = h.subset(((xyz >= lo - padding) & (xyz < hi + padding)).all(1))
            for i, block in enumerate(dec.upsample):
                hc = block(hc)
                parent = hc.coords[:, 1:].long() // 2 ** (i + 1)
                hc = hc.subset(((parent >= lo - margins[i]) & (parent < hi + margins[i])).all(1))
            sdf = torch.tanh(dec.out_layer(hc).feats)
            parts.append((hc.coords, sdf, hc.feats if features else None))
            del hc
    coords = torch.cat([p[0] for p in parts]) if parts else z.coords.new_zeros((0, 4))
    sdf = torch.cat([p[1] for p in parts]) if parts else z.feats.new_zeros((0, 1))
    feats = None
    if features:
        feats = torch.cat([p[2] for p in parts]) if parts else z.feats.new_zeros((0, 0))
    del parts
    fine_res = (z.resolution * factor) if z.resolution is not None else None
    radix = int(coords[:, 1:].max()) + 1 if coords.numel() else 1
    key = coords[:, 0].long()
    for axis in (1, 2, 3):  # column by column: no [M, 4] int64 copy of the coordinates
        key = key * radix + coords[:, axis]
    order = torch.argsort(key)
    del key
    coords = coords[order]
    kw = dict(batch_size=z.batch_size, resolution=fine_res, validate=False)
    sdf_out = SparseTensor(coords, sdf[order], **kw)
    return sdf_out, (SparseTensor(coords, feats[order], **kw) if features else None)
