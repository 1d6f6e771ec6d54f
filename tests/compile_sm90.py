"""Record the Triton launches a workload makes under the interpreter, and compile each for an H100 without one.

The CPU tests run the kernels through Triton's interpreter, which executes the kernel's Python: code that the
interpreter takes can still fail to compile (a global that is not a ``tl.constexpr``, an unsupported construct),
and a launch setting that is off by default is first compiled on a GPU machine, where time is scarce. This module
closes that gap on the CPU:

- :func:`record` runs a workload with ``InterpretedFunction.run`` wrapped, and returns every distinct launch:
  the kernel's module and name, the type of each runtime argument as the compiler names it (``*fp16``, ``i32``),
  the ``tl.constexpr`` arguments' values and ``num_warps`` / ``num_stages``;
- ``python tests/compile_sm90.py LAUNCHES.json`` (run with ``TRITON_INTERPRET=0``, so that the kernels are real
  ``JITFunction`` objects) compiles each launch for ``sm_90`` down to a cubin with the ptxas bundled in Triton's
  wheel, and prints one JSON line per launch (shared memory, or the error).

tests/test_compile_sm90.py drives both.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
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
        types = {names[i]: _arg_type(a) for i, a in enumerate(args)}
        entry = dict(module=self.fn.__module__, name=self.fn.__name__, types=types, constexprs=constexprs,
                     num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3))
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


def compile_launch(entry: dict) -> dict:
    """Compile one recorded launch for :data:`TARGET_ARCH`: ``{"shared": bytes}`` or ``{"error": text}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        signature[name] = "constexpr" if name in entry["constexprs"] else entry["types"][name]
    source = ASTSource(kernel, signature, constexprs=dict(entry["constexprs"]))
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, WARP_SIZE),
                                  options=dict(num_warps=entry["num_warps"], num_stages=entry["num_stages"]))
    except Exception as exc:  # reported, the caller decides
        return dict(error=f"{type(exc).__name__}: {exc}"[-2000:])
    return dict(shared=compiled.metadata.shared)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: TRITON_INTERPRET=0 python tests/compile_sm90.py LAUNCHES.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        launches = json.load(f)
    for entry in launches:
        print(json.dumps(dict(module=entry["module"], name=entry["name"], constexprs=entry["constexprs"],
                              **compile_launch(entry)), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
