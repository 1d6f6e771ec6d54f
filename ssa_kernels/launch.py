"""Launch configurations of the SSA kernels: one table keyed by GPU architecture, head dim and dtype.

Every kernel has a base configuration (:data:`BASE`), tuned on an H100 (``sm90``) at head dim 32 in bf16 with
``bench/kernel_profile.py`` (reports/kernels.md has the figures). Entries (:class:`Entry`) refine it for an
architecture (``"sm90"``, ``"sm80"``, ... or any), a range of head dims and a set of dtypes, each replacing some of
the base values: :func:`config` applies the matching entries in order, then the values of the innermost
:func:`overriding` block. Two kinds of entries exist:

- :data:`ENTRIES`, written here: wider heads (above :data:`TUNED_HEAD_DIM`) use smaller tiles where the tuned
  ones would need twice the registers or more;
- the measured table ``launch_table.json`` beside this module (absent until a sweep writes it), loaded after them:
  ``python -m bench.kernel_profile --sweep ... --write-table`` times the configurations it is given and records the
  fastest one per kernel for the GPU, head dim and dtype it ran on.

A sweep times variants inside :func:`overriding` blocks; nothing here is changed by timing, so a process that
profiles and a process that runs compute with the same configurations. An override holds for the whole process while
its block is open, not for one thread: autograd runs the backward kernels of CUDA tensors on its own device thread,
so a thread-local override would reach the forward kernels of ``with overriding(...): loss.backward()`` and silently
miss the backward ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import threading

import torch

__all__ = ["BASE", "ENTRIES", "Entry", "OverrideStack", "TABLE_PATH", "architecture", "config", "load_table",
           "overriding", "parse_sweep", "write_entries"]

#: Head dims up to this use the base configurations as tuned.
TUNED_HEAD_DIM = 32

#: Base configurations per kernel. rows: query rows (tokens x heads) per matrix product; block_n: keys per step;
#: block_s: selection blocks per scoring chunk; programs: target number of dK/dV programs; max_queries: query tokens
#: per selection dK/dV program (a block chosen by more is split, 0: never split); max_heads: heads of one kv group
#: per program; tokens_per_program(_agg): query tokens per scoring program; aggregate: how scoring sums
#: the compressed scores of a selection block ("prefix" or "mask"); the backward's streams and kernel order, and
#: recompute_window_bytes: above this size of one [N, Hq, D] tensor of q's dtype the window branch's output is not
#: kept for the backward but recomputed there (ssa_kernels.ssa). selection.FWD's and selection.DQ's key_outer (0/1)
#: picks the key-outer kernel (ssa_kernels.selection_key_outer), with ko_rows / ko_block_n / ko_warps / ko_stages
#: for its partials kernel, merge_rows / merge_warps for the merge, scratch_bytes bounding the partials of one chunk
#: of queries, and ko_persistent (k > 0: k partials programs per multiprocessor, each looping over work items with
#: the next one's loads in flight; 0: one program per work item); their merged (0/1) makes a
#: query-outer program of one token walk the keys of all its chosen blocks as one stream of full tiles instead of
#: block by block (ssa_kernels.selection). selection.DKDV's tail (0/1) runs a
#: block's last key tile as a half tile when at most block_n / 2 keys are left (block_n >= 32). The compression
#: kernels' and the query-outer selection forward's and dQ's fma_exp_every (0: never) takes every k-th key tile's
#: exponentials from the FMA units instead of the special-function unit (ssa_kernels._common.exp2_fma;
#: half-precision inputs only; the selection counts the tiles a program visits, over its blocks); scoring.SCORE's
#: counts the matrix products of a program's tokens (tokens_per_program of them per key tile) instead. Their
#: whole_tiles (0/1, query-outer programs of one token) runs a block's whole key tiles without the per-score mask
#: in a loop of their own, the part-filled last tile after it (fewer instructions per tile, one more loop per block);
#: scoring.SCORE's whole_tiles (0/1) scores the chunks of selection blocks that lie wholly inside the batch element
#: of all a program's tokens without the per-score batch mask (ssa_kernels.scoring._chunk_scores); its key_rows
#: (0/1, one token per matrix product) computes the scores as keys x heads, summing the heads along the product's
#: rows and masking once per key (ssa_kernels.scoring._key_row_scores).
BASE: dict[str, dict] = {
    "compression.FWD": dict(rows=128, block_n=64, num_warps=4, num_stages=3, fma_exp_every=0),
    "compression.DQ": dict(rows=128, block_n=32, num_warps=4, num_stages=3, fma_exp_every=0),
    "compression.DKDV": dict(rows=32, block_n=128, programs=2048, num_warps=4, num_stages=1, fma_exp_every=0),
    "selection.FWD": dict(rows=16, block_n=32, num_warps=1, num_stages=2, key_outer=0, ko_rows=128, ko_block_n=64,
                          ko_warps=4, ko_stages=2, merge_rows=64, merge_warps=4, scratch_bytes=2**29, merged=0,
                          fma_exp_every=0, whole_tiles=0, ko_persistent=0),
    "selection.DQ": dict(rows=16, block_n=32, num_warps=1, num_stages=2, key_outer=0, ko_rows=128, ko_block_n=64,
                         ko_warps=4, ko_stages=2, merge_rows=64, merge_warps=4, scratch_bytes=2**29, merged=0,
                         fma_exp_every=0, whole_tiles=0, ko_persistent=0),
    "selection.DKDV": dict(rows=128, block_n=64, num_warps=4, num_stages=3, max_queries=8192, tail=0),
    "window.FWD": dict(max_heads=8, block_n=32, num_warps=4, num_stages=2),
    "window.DQ": dict(max_heads=8, block_n=32, num_warps=4, num_stages=2),
    "window.DKDV": dict(max_heads=16, rows=256, num_warps=4, num_stages=2),
    "scoring.SCORE": dict(rows=16, tokens_per_program=4, tokens_per_program_agg=4, block_n=32, block_s=64,
                          max_heads=16, num_warps=1, num_stages=2, aggregate="prefix", fma_exp_every=0,
                          whole_tiles=0, key_rows=0),
    "ssa.BACKWARD": dict(streams=2, side="dkdv", side_priority=-1, dq_order="cmp-sel-win",
                         dkdv_order="cmp-sel-win", recompute_window_bytes=2**29),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """Values that replace ``kernel``'s base ones on ``arch`` (``"*"``: any), for head dims in ``[min_head_dim,
    max_head_dim]`` (None: unbounded) and the ``dtypes`` named (``"*"``: any; else names such as ``"bfloat16"``)."""

    kernel: str
    values: dict
    arch: str = "*"
    min_head_dim: int | None = None
    max_head_dim: int | None = None
    dtypes: tuple[str, ...] = ("*",)

    def matches(self, arch: str, head_dim: int | None, dtype: str | None) -> bool:
        if self.arch != "*" and self.arch != arch:
            return False
        if head_dim is not None:
            if self.min_head_dim is not None and head_dim < self.min_head_dim:
                return False
            if self.max_head_dim is not None and head_dim > self.max_head_dim:
                return False
        elif self.min_head_dim is not None or self.max_head_dim is not None:
            return False
        return "*" in self.dtypes or dtype in self.dtypes


#: Entries written here (module docstring), applied before the measured table.
ENTRIES: tuple[Entry, ...] = (
    Entry("compression.DKDV", dict(rows=64, block_n=64), min_head_dim=TUNED_HEAD_DIM + 1),
    Entry("selection.DQ", dict(block_n=16, num_stages=3), min_head_dim=TUNED_HEAD_DIM + 1),
)
#: The measured table (module docstring).
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_table.json")


def load_table(path: str = TABLE_PATH) -> tuple[Entry, ...]:
    """The entries of a table file (``{"entries": [{"kernel", "values", "arch", ...}, ...]}``); none when absent."""
    if not os.path.isfile(path):
        return ()
    with open(path) as f:
        doc = json.load(f)
    out = []
    for raw in doc.get("entries", []):
        entry = Entry(**{**raw, "dtypes": tuple(raw.get("dtypes", ("*",)))})
        _check_values(entry.kernel, entry.values)
        out.append(entry)
    return tuple(out)


def write_entries(entries, path: str = TABLE_PATH) -> None:
    """Add ``entries`` to the table file, replacing any entry of the same kernel, architecture, head dims and
    dtypes (written atomically)."""
    for e in entries:
        _check_values(e.kernel, e.values)
    key = lambda e: (e.kernel, e.arch, e.min_head_dim, e.max_head_dim, tuple(e.dtypes))  # noqa: E731
    new = {key(e) for e in entries}
    kept = [e for e in load_table(path) if key(e) not in new]
    doc = {"entries": [dataclasses.asdict(e) for e in [*kept, *entries]]}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _check_values(kernel: str, values: dict) -> None:
    if kernel not in BASE:
        raise ValueError(f"unknown kernel {kernel!r}; known: {sorted(BASE)}")
    unknown = sorted(set(values) - set(BASE[kernel]))
    if unknown:
        raise ValueError(f"{kernel} has no launch settings {unknown}; its settings: {sorted(BASE[kernel])}")


_MEASURED = load_table()  # after _check_values, which it calls


class OverrideStack:
    """Launch settings over the defaults while a block is open, seen by every thread of the process (autograd runs
    the backward kernels of CUDA tensors on a thread of its own). Blocks nest; the innermost wins. Closing a block
    removes its own entry, so blocks opened by different threads may close in any order. ``check(name, values)``
    raises ValueError for an unknown kernel or setting. One stack serves :func:`config`, another the DiT's
    cross-attention kernels (``model.nets.cross_attention_kernel.overriding``)."""

    def __init__(self, check):
        self._check = check
        self._entries: tuple = ()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def overriding(self, name: str, values: dict):
        self._check(name, values)
        entry = (name, dict(values))
        with self._lock:
            self._entries = (*self._entries, entry)
        try:
            yield
        finally:
            with self._lock:
                self._entries = tuple(e for e in self._entries if e is not entry)

    def apply(self, name: str, launch: dict) -> dict:
        """``launch`` updated in place by the open blocks' values for ``name`` (outermost first); returned."""
        for key, values in self._entries:
            if key == name:
                launch.update(values)
        return launch


#: The open :func:`overriding` blocks.
_OVERRIDES = OverrideStack(_check_values)


def architecture(device=None) -> str:
    """``"sm90"`` for an H100 / H200 (compute capability 9.0), ...; ``"cpu"`` off CUDA. Asked once per device (a
    lookup runs before every kernel launch)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return "cpu"
    return _cuda_architecture(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_architecture(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def config(kernel: str, *, head_dim: int | None = None, dtype: torch.dtype | None = None, device=None) -> dict:
    """The launch configuration of ``kernel`` (a fresh dict) for ``head_dim``, ``dtype`` and ``device``'s
    architecture (module docstring)."""
    if kernel not in BASE:
        raise ValueError(f"unknown kernel {kernel!r}; known: {sorted(BASE)}")
    arch = architecture(device)
    dname = str(dtype).replace("torch.", "") if dtype is not None else None
    out = dict(BASE[kernel])
    for entry in (*ENTRIES, *_MEASURED):
        if entry.kernel == kernel and entry.matches(arch, head_dim, dname):
            out.update(entry.values)
    return _OVERRIDES.apply(kernel, out)


def parse_sweep(text: str, check=None) -> list[tuple[str, list[dict]]]:
    """A sweep of launch configurations written as ``"selection.FWD:rows=16|32,num_warps=1|2;selection.DQ:rows=32"``
    -> ``[(kernel, [values, ...])]``: per kernel, every combination of the listed values (integers where they
    parse as such). Raises ValueError for an unknown kernel or setting (``check(kernel, {setting: None})``, this
    table's kernels by default; other modules pass their own), or an item without ``=``."""
    import itertools

    out = []
    for spec in filter(None, (text or "").split(";")):
        kernel, _, params = spec.partition(":")
        keys, values = [], []
        for item in filter(None, params.split(",")):
            key, eq, vals = item.partition("=")
            if not eq or not vals:
                raise ValueError(f"sweep item {item!r} of {kernel!r} must be written setting=value|value...")
            keys.append(key)
            values.append([int(x) if x.lstrip("-").isdigit() else x for x in vals.split("|")])
        if not keys:
            raise ValueError(f"sweep of {kernel!r} lists no setting (write {kernel}:setting=value|value)")
        (check or _check_values)(kernel, dict.fromkeys(keys))
        out.append((kernel, [dict(zip(keys, combo)) for combo in itertools.product(*values)]))
    return out


@contextlib.contextmanager
def overriding(kernel: str, values: dict):
    """Inside the block, :func:`config` gives ``kernel`` these values over the table's, in every thread of the
    process (the module docstring says why). Blocks nest; the innermost wins. Closing a block removes its own
    entry, so blocks opened by different threads may close in any order."""
    with _OVERRIDES.overriding(kernel, values):
        yield
