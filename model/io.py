"""Files: the one atomic-write helper of the project, safetensors checkpoints, and the provenance a report records.

* **Atomic writes** (:func:`atomic_write`): every file the project writes goes through it. The content is written
  to a temporary file in the target's folder (``<name>.<random>.tmp``), flushed and fsynced, given the usual
  permissions (``0666`` less the umask), then renamed over the target with ``os.replace`` (atomic on POSIX). A
  reader never sees a half-written file; when the writer raises, the temporary file is removed, the target is
  untouched (its old content, or still absent) and the error propagates. Conveniences over it:
  :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json`, :func:`atomic_save_npz`.
* **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`, :func:`restore_rng`): one safetensors file
  holding the model's state dict (``model/<name>``), the optimizer's tensors (``optim/<param>/<key>``), the RNG
  states (``rng/torch``, ``rng/cuda/<i>``, ``rng/gen/<name>`` for named ``torch.Generator`` objects) and, in the
  safetensors metadata (str to str), the format tag :data:`CHECKPOINT_FORMAT`, the step, the optimizer's non-tensor
  state, Python's and numpy's RNG states and a caller-given JSON document (configs, data positions, ...). Written
  with :func:`atomic_write`, so a crash never leaves a half-written checkpoint. The state dict is stored without
  the DDP / ``torch.compile`` wrapper prefixes, so a checkpoint loads on any number of ranks.
* **Provenance** (:func:`provenance`): the commit the code ran on (``<sha>`` or ``<sha>-dirty`` when tracked files
  have uncommitted changes; None outside a git checkout), the Python / torch / triton / CUDA versions, the device
  and GPU name, and the UTC date. Every report records it in its JSON and shows :func:`commit_label` in its
  markdown.

This module imports nothing of :mod:`model` (every package may import it) and imports torch only inside the
functions that need it, so the torch-free data workers (:mod:`model.data.sdf`) start fast.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "WRAPPER_PREFIXES",
    "Checkpoint",
    "atomic_save_npz",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "commit_label",
    "git_commit",
    "load_checkpoint",
    "provenance",
    "read_checkpoint_metadata",
    "resolve_device",
    "restore_rng",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "unwrap_model",
]

#: Suffix of the temporary files of :func:`atomic_write` (the name is ``<target name>.<random>.tmp``).
TEMP_SUFFIX = ".tmp"
#: Permission bits of a written file before the umask (those of ``open(path, "w")``).
FILE_MODE = 0o666
#: Value of the ``format`` metadata entry of our checkpoints.
CHECKPOINT_FORMAT = "ssa-kernels-checkpoint/1"
#: Key prefixes that DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add to a wrapped model's state dict.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Suffix of :func:`git_commit` when tracked files have uncommitted changes.
DIRTY_SUFFIX = "-dirty"
#: Characters of the commit shown by :func:`commit_label`.
SHORT_SHA = 12
#: Seconds a git command of :func:`git_commit` may take before the commit counts as unknown.
GIT_TIMEOUT_S = 10
#: The repository this file belongs to (the default of :func:`git_commit`).
REPO_ROOT = Path(__file__).resolve().parent.parent
_BYTES_PER_GIB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# atomic writes


def atomic_write(path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file ``tmp`` (a :class:`~pathlib.Path` in the
    same folder, already created and empty) by name, e.g. ``lambda tmp: fig.savefig(tmp, format="png")``; the file
    is then fsynced, given the usual permissions and renamed over ``path`` with ``os.replace``.

    The folder of ``path`` is created when missing. When ``write`` (or anything after it) raises, the temporary
    file is removed, ``path`` is left as it was and the exception propagates. ``write`` must write to ``tmp``
    itself (not to a name derived from it: ``np.savez(tmp)`` would add ``.npz``; see :func:`atomic_save_npz`).
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    if not callable(write):
        raise TypeError(f"write must be a callable taking the temporary file's path, got {type(write).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE & ~_umask())  # mkstemp makes 0600
        os.replace(name, path)
    except BaseException:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write the string ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` (bytes-like) to ``path`` atomically (:func:`atomic_write`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(bytes(data)))


def atomic_write_json(path, doc, *, indent: int | None = 1, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``json.dumps(doc, indent=indent, default=default)`` to ``path`` atomically (:func:`atomic_write`).
    The document is serialised before the temporary file is made, so an unserialisable one writes nothing."""
    return atomic_write_text(path, json.dumps(doc, indent=indent, default=default))


def atomic_save_npz(path, arrays: Mapping[str, Any], *, compressed: bool = True) -> Path:
    """Write ``arrays`` (name -> array) as an ``.npz`` at ``path`` atomically (:func:`atomic_write`); compressed
    (``np.savez_compressed``) unless ``compressed=False``. ``path`` is used as given (no ``.npz`` is appended)."""
    import numpy as np

    arrays = dict(arrays)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append ".npz" to a name
            (np.savez_compressed if compressed else np.savez)(fh, **arrays)

    return atomic_write(path, write)


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# devices


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to load onto and run on: ``"auto"``/None -> ``cuda`` when available else ``cpu``; anything else
    is parsed and checked (``ValueError`` for an unparsable name or a CUDA device without CUDA)."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: cannot parse {device!r} ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return dev


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    ``model``: state dict (``{name: tensor}``); ``optimizer``: an optimizer state dict ready for
    ``optimizer.load_state_dict`` (None when not saved); ``step``; ``meta``: the caller's JSON document;
    ``rng``: opaque RNG states for :func:`restore_rng`; ``path``.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict | None
    step: int
    meta: dict
    rng: dict
    path: str


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel and ``torch.compile`` wrappers."""
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict:
    """``state`` without the DDP / ``torch.compile`` key prefixes (:data:`WRAPPER_PREFIXES`), when every key carries
    one (a state dict taken from a wrapped model): checkpoints then load into the bare model on any number of
    ranks."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _cpu_tensor(t: torch.Tensor, seen: set) -> torch.Tensor:
    """Detached, contiguous CPU copy-if-needed; a tensor whose storage was already stored is cloned (safetensors
    refuses shared storage)."""
    t = t.detach()
    if t.device.type != "cpu":
        return t.cpu().contiguous()
    t = t.contiguous()
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.numel() else None
    if key is not None and key in seen:
        return t.clone()
    if key is not None:
        seen.add(key)
    return t


def _rng_payload(generators: Mapping[str, torch.Generator] | None) -> tuple[dict, dict]:
    """The RNG states to store: ``(tensors, metadata)`` (module docstring)."""
    import numpy as np
    import torch

    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    for name, gen in (generators or {}).items():
        if not isinstance(gen, torch.Generator):
            raise TypeError(f"generators[{name!r}] must be a torch.Generator, got {type(gen).__name__}")
        tensors[f"rng/gen/{name}"] = gen.get_state()
    np_state = np.random.get_state()
    meta = {
        "rng_python": json.dumps(random.getstate()),
        "rng_numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }
    return tensors, meta


def save_checkpoint(
    path,
    *,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    meta: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> Path:
    """Write a checkpoint atomically (module docstring) and return its path.

    Args:
        path: target file (``.safetensors``); its folder is created.
        model: a module (DDP-wrapped or not) or a state dict.
        optimizer: its state is saved when given.
        step: the number of optimizer steps taken.
        meta: a JSON-serialisable document stored as is (e.g. ``{"config": ..., "model_class": ...}``).
        generators: named ``torch.Generator`` objects whose states are saved (restored by :func:`restore_rng`).
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(model, torch.nn.Module):
        state = unwrap_model(model).state_dict()
    elif isinstance(model, Mapping):
        state = strip_wrapper_prefixes(model)
    else:
        raise TypeError(f"model must be a torch.nn.Module or a state dict, got {type(model).__name__}")
    seen: set = set()
    tensors = {f"model/{k}": _cpu_tensor(v, seen) for k, v in state.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(step), "meta": json.dumps(dict(meta or {}))}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        plain: dict[str, dict] = {}
        for pid, entries in opt_state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{pid}/{key}"] = _cpu_tensor(value, seen)
                else:
                    plain.setdefault(str(pid), {})[key] = value
        metadata["optim"] = json.dumps({"param_groups": opt_state["param_groups"], "plain_state": plain})
    rng_tensors, rng_meta = _rng_payload(generators)
    tensors.update(rng_tensors)
    metadata.update(rng_meta)
    return atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=metadata))


def read_checkpoint_metadata(path) -> dict[str, str]:
    """The raw safetensors metadata of ``path`` (``FileNotFoundError`` when missing, ``ValueError`` naming the file
    when it is not a safetensors file)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise ValueError(f"{path} is not a safetensors checkpoint ({type(exc).__name__}: {exc})") from exc


def load_checkpoint(path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``ValueError`` naming the file if it is not one)."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (format {metadata.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    tensors = load_file(str(path), device=str(map_location))
    model = strip_wrapper_prefixes({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    optimizer = None
    if "optim" in metadata:
        doc = json.loads(metadata["optim"])
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, pid, key = k.split("/", 2)
                state.setdefault(int(pid), {})[key] = v
        for pid, entries in doc["plain_state"].items():
            state.setdefault(int(pid), {}).update(entries)
        groups = doc["param_groups"]
        for g in groups:  # JSON turned tuples into lists
            for key, value in list(g.items()):
                if key != "params" and isinstance(value, list):
                    g[key] = tuple(value)
        optimizer = {"state": state, "param_groups": groups}
    rng = {k: v.cpu() for k, v in tensors.items() if k.startswith("rng/")}
    rng["python"] = metadata.get("rng_python")
    rng["numpy"] = metadata.get("rng_numpy")
    return Checkpoint(model=model, optimizer=optimizer, step=int(metadata["step"]),
                      meta=json.loads(metadata.get("meta", "{}")), rng=rng, path=str(path))


def restore_rng(checkpoint: Checkpoint, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore the global RNG states (Python, numpy, torch, CUDA where saved and available) and the states of the
    named ``generators`` saved with :func:`save_checkpoint` (``ValueError`` for a generator it has no state of)."""
    import numpy as np
    import torch

    rng = checkpoint.rng
    if rng.get("python"):
        version, state, gauss = json.loads(rng["python"])
        random.setstate((version, tuple(state), gauss))
    if rng.get("numpy"):
        name, keys, pos, has_gauss, cached = json.loads(rng["numpy"])
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "rng/torch" in rng:
        torch.set_rng_state(rng["rng/torch"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [rng[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in rng]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in states])
    for name, gen in (generators or {}).items():
        key = f"rng/gen/{name}"
        if key not in rng:
            raise ValueError(f"checkpoint {checkpoint.path} has no state for generator {name!r}")
        gen.set_state(rng[key].to(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# provenance


def _git(root: Path, *args: str) -> str | None:
    """``git -C root args`` -> its stripped stdout, or None when git is missing, fails or times out."""
    try:
        done = subprocess.run(["git", "-C", os.fspath(root), *args], capture_output=True, text=True, check=False,
                              timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


#: Environment variable naming the commit of a copy of the repository that has no ``.git`` (a working tree sent to a
#: GPU machine): :func:`provenance` records it when git cannot tell. Set it to ``$(git rev-parse HEAD)`` (with
#: ``-dirty`` when the copy holds uncommitted changes).
COMMIT_ENV = "SSA3D_COMMIT"


def git_commit(root=None) -> str | None:
    """The commit checked out in the git repository at ``root`` (default: the repository of this code,
    :data:`REPO_ROOT`): the full SHA, with :data:`DIRTY_SUFFIX` appended when ``git status --porcelain`` shows
    uncommitted changes to tracked files (untracked files do not count). None when ``root`` is not in a git
    checkout (for the default root: when this code is not the top of one, e.g. an installed copy), the checkout
    has no commit yet, or git is not installed."""
    default = root is None
    root = REPO_ROOT if default else Path(root)
    if not root.is_dir():
        return None
    top = _git(root, "rev-parse", "--show-toplevel")
    if not top or (default and Path(top).resolve() != root.resolve()):
        return None
    sha = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if not sha:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return sha + DIRTY_SUFFIX if status else sha


def provenance(device=None, *, root=None) -> dict:
    """What a report records about the run: ``commit`` (:func:`git_commit` of ``root``: ``<sha>``,
    ``<sha>-dirty`` or None; for a copy without git, the :data:`COMMIT_ENV` variable), ``dirty`` (bool, None when the commit is unknown), ``date`` (UTC, ISO 8601 to the
    second), ``python``, ``torch``, ``triton`` (None when not installed), ``cuda`` (torch's CUDA version, None for a
    CPU build), ``device`` (``"cuda"``/``"cpu"``/...), ``gpu`` (the GPU's name on CUDA, else None) and, on CUDA,
    ``gpu_memory_gib``.

    ``device``: the device the run used; None means the current CUDA device when CUDA is available, else the CPU.
    """
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    commit = git_commit(root)
    if commit is None and root is None:
        commit = os.environ.get(COMMIT_ENV) or None  # a copy without .git (e.g. a tree sent to a GPU machine)
    info = {
        "commit": commit,
        "dirty": None if commit is None else commit.endswith(DIRTY_SUFFIX),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": dev.type,
        "gpu": None,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / _BYTES_PER_GIB, 1))
    return info


def commit_label(info) -> str:
    """The commit as a report's markdown shows it: ``"commit <12 hex>"`` (plus ``-dirty``), or ``"commit unknown"``.
    ``info``: a :func:`provenance` dict (its ``commit``; the ``git_commit`` / ``git_dirty`` entries of reports
    written before :func:`provenance` existed are read too), a commit string, or None."""
    if isinstance(info, Mapping):
        commit = info.get("commit")
        if commit is None and info.get("git_commit"):  # an older report's environment
            commit = info["git_commit"] + (DIRTY_SUFFIX if info.get("git_dirty") else "")
    else:
        commit = info
    if not commit:
        return "commit unknown"
    dirty = commit.endswith(DIRTY_SUFFIX)
    sha = commit[:-len(DIRTY_SUFFIX)] if dirty else commit
    return f"commit {sha[:SHORT_SHA]}{DIRTY_SUFFIX if dirty else ''}"
