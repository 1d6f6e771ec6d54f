"""Record the Triton launches a workload makes under the interpreter, and compile each for an H100 without one.

The CPU tests run the kernels through Triton's interpreter, which executes the kernel's Python: code that the
interpreter takes can still fail to compile (a global that is not a ``tl.constexpr``, an unsupported construct),
and a launch setting that is off by default is first compiled on a GPU machine, where time is scarce. This module
closes that gap on the CPU:

- :func:`record` runs a workload with ``InterpretedFunction.run`` wrapped, and returns every distinct launch:
  the kernel's module and name, the type of each runtime argument as the compiler names it (``*fp16``, ``i32``),
  which of them the GPU's launcher would mark 16-byte aligned (its specialisation, so that the code compiled here
  is the code a GPU runs: vector loads need it), the ``tl.constexpr`` arguments' values (ints equal to 1 among
  them, as the launcher makes them) and ``num_warps`` / ``num_stages``;
- ``python tests/compile_sm90.py LAUNCHES.json`` (run with ``TRITON_INTERPRET=0``, so that the kernels are real
  ``JITFunction`` objects) compiles each launch for ``sm_90`` down to a cubin with the ptxas bundled in Triton's
  wheel, and prints one JSON line per launch (shared memory, or the error).

tests/test_compile_sm90.py drives both. By hand (the counts of reports/kernels.md):

    TRITON_INTERPRET=1 python -m tests.compile_sm90 --record ssa /tmp/ssa.json
    TRITON_INTERPRET=0 python -m tests.compile_sm90 /tmp/ssa.json --bf16 --loops
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import inspect
import json
import subprocess
import sys

import torch

#: The GPU the launches are compiled for: an H100 (compute capability 9.0, 32-thread warps).
TARGET_ARCH = 90
WARP_SIZE = 32
#: Compiler names of the pointer element types.
POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                 torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
                 torch.uint8: "*u8", torch.bool: "*i1"}
INT32_MAX = 2**31 - 1


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -INT32_MAX - 1 <= value <= INT32_MAX else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no compiler type for a runtime argument of type {type(value).__name__}")


def _specialization(value) -> tuple[str, object]:
    """How the GPU launcher specialises a runtime argument (Triton's own rule): ``(type, "D")`` for a tensor whose
    address or an int that is a multiple of 16 (the compiler may then assume the alignment), ``(type, "")``
    otherwise, ``("constexpr", 1)`` for the int 1; floats and bools as their type."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if isinstance(value, torch.Tensor):
        return _arg_type(value), "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, int) and not isinstance(value, bool):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        return kind, spec
    return _arg_type(value), ""


@contextlib.contextmanager
def record():
    """Inside the block every interpreted launch is recorded; yields the list the launches go into (dicts with
    ``module``, ``name``, ``types``, ``constexprs``, ``num_warps``, ``num_stages``; each distinct launch once)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches, seen = [], set()
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        constexprs = {k: v for k, v in kwargs.items() if k in params}
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        types, aligned = {}, []
        for i, a in enumerate(args):
            kind, spec = _specialization(a)
            if kind == "constexpr":  # an int equal to 1: the GPU's launcher compiles it as a constant
                constexprs[names[i]] = spec
            else:
                types[names[i]] = kind
                if spec == "D":
                    aligned.append(names[i])
        entry = dict(module=self.fn.__module__, name=self.fn.__name__, types=types, constexprs=constexprs,
                     aligned=aligned, num_warps=options.get("num_warps", 4),
                     num_stages=options.get("num_stages", 3))
        key = json.dumps(entry, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            launches.append(entry)
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = real


def ssa_workload(switches: dict | None = None, hq: int = 32, hkv: int = 2, head_dim: int = 32, topk: int = 3,
                 compression_block: int = 4):
    """One forward and backward of the SSA op in float16 on a small random two-element sequence
    (``compression_block``^3 compression and 8^3 selection blocks, window 8, shift 4), with the launch settings
    ``switches`` (``{kernel: values}``)."""
    import ssa_kernels
    from tests.helpers import random_coords, random_inputs

    gen = torch.Generator().manual_seed(0)
    mc = compression_block
    coords = random_coords((30, 20), 12, compression_block=mc, selection_block=8, generator=gen)
    inp = random_inputs(coords, hq, hkv, head_dim, compression_block=mc, selection_block=8, generator=gen,
                        dtype=torch.float16)
    layout = ssa_kernels.build_layout(coords, compression_block=mc, selection_block=8, window=8)
    with contextlib.ExitStack() as stack:
        for kernel, values in (switches or {}).items():
            stack.enter_context(ssa_kernels.launch.overriding(kernel, values))
        x = [t.clone().requires_grad_() for t in inp]
        o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=topk, shift=4)
        torch.autograd.grad(o, x, torch.randn_like(o))


def cross_attention_workload(rows: int = 300, keys: int = 200, heads: int = 2, head_dim: int = 32):
    """One forward and backward of the DiT's cross-attention kernels with their default launches (float16)."""
    from model.nets.cross_attention_kernel import cross_attention

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(rows, heads, head_dim, generator=gen).half().requires_grad_()
    kv = torch.randn(1, keys, 2, heads, head_dim, generator=gen).half().requires_grad_()
    cross_attention(q, kv[:, :, 0], kv[:, :, 1], None).float().sum().backward()


#: ``--record`` workloads: the SSA op at the DiT's and the benchmark's v1.1 shape (32 query heads of 32, 2 kv
#: heads), and the cross-attention.
WORKLOADS = {"ssa": ssa_workload, "cross_attention": cross_attention_workload}


def compile_launch(entry: dict, *, bf16: bool = False, loops: bool = False) -> dict:
    """Compile one recorded launch for :data:`TARGET_ARCH`: ``{"shared": bytes}`` or ``{"error": text}``.
    ``bf16``: float16 pointers compiled as bfloat16 (the GPU's dtype; the interpreter records float16). ``loops``:
    also ``"loops"``, the instruction counts of the loops that hold matrix instructions (:func:`sass_loops`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        kind = entry["types"].get(name)
        signature[name] = "constexpr" if name in entry["constexprs"] else (
            "*bf16" if bf16 and kind == "*fp16" else kind)
    names = list(inspect.signature(kernel.fn).parameters)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in entry.get("aligned", ())}
    source = ASTSource(kernel, signature, constexprs=dict(entry["constexprs"]), attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, WARP_SIZE),
                                  options=dict(num_warps=entry["num_warps"], num_stages=entry["num_stages"]))
    except Exception as exc:  # reported, the caller decides
        return dict(error=f"{type(exc).__name__}: {exc}"[-2000:])
    out = dict(shared=compiled.metadata.shared)
    if loops:
        out["loops"] = sass_loops(compiled.asm["cubin"])
    return out


#: Opcodes of the matrix units (warp-level ``mma`` and Hopper's warpgroup ``wgmma``).
MATRIX_OPCODES = ("HMMA", "HGMMA")


def sass_loops(cubin: bytes) -> list[dict]:
    """The loops of a compiled kernel that hold matrix instructions, innermost first: ``{"instructions": count,
    "opcodes": {opcode: count}}`` over the instructions between a backward branch's target and the branch (the
    loop body as laid out; nested loops are counted inside the loops around them). Disassembled with the
    ``nvdisasm`` of Triton's wheel. A static count: the instructions one trip issues per warp, which is what an
    issue-bound loop costs."""
    import re
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-c", f.name], capture_output=True, text=True, check=True).stdout
    code, labels, pending = [], {}, []
    for line in text.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if ins:
            addr, body = int(ins.group(1), 16), ins.group(2)
            for name in pending:
                labels[name] = addr
            pending = []
            words = body.split()
            code.append((addr, (words[1] if words[0].startswith("@") else words[0]).split(".")[0], body))
    found = []
    for addr, op, body in code:
        target = re.search(r"(\.L_x_\d+)", body) if op == "BRA" else None
        if target and labels.get(target.group(1), addr + 1) <= addr:
            ops = collections.Counter(o for a, o, _ in code if labels[target.group(1)] <= a <= addr)
            if any(ops[m] for m in MATRIX_OPCODES):
                found.append(dict(instructions=sum(ops.values()), opcodes=dict(ops.most_common())))
    return sorted(found, key=lambda r: r["instructions"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile recorded Triton launches for an H100 (sm_90) without a GPU "
                                            "(run with TRITON_INTERPRET=0).")
    p.add_argument("launches", help="the JSON list that record() gave (with --record: where to write it)")
    p.add_argument("--record", choices=sorted(WORKLOADS), metavar="WORKLOAD",
                   help=f"record the launches of a workload ({', '.join(sorted(WORKLOADS))}) into LAUNCHES instead "
                        "(run with TRITON_INTERPRET=1)")
    p.add_argument("--bf16", action="store_true", help="compile float16 pointers as bfloat16")
    p.add_argument("--loops", action="store_true",
                   help="also print the opcode counts of each kernel's loops that hold matrix instructions")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.record:
        with record() as launches:
            WORKLOADS[args.record]()
        with open(args.launches, "w") as f:
            json.dump(launches, f, default=str)
        print(f"{len(launches)} launches -> {args.launches}")
        return 0
    with open(args.launches) as f:
        launches = json.load(f)
    for entry in launches:
        print(json.dumps(dict(module=entry["module"], name=entry["name"], constexprs=entry["constexprs"],
                              **compile_launch(entry, bf16=args.bf16, loops=args.loops)), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
