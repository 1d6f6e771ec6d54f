"""Time one patch forward of each dense refiner under every variant of memory layout, cuDNN autotuning and precision.

``python -m model.reports.refiner --out reports`` (one CUDA GPU; about 2 minutes on an H100) builds the two refiners of
:mod:`model.nets.refiner` at the released sizes with random weights (``RefinerConfig.released_512()``: one 192^3
patch with 32 decoder features; ``RefinerConfig.released_1024()``: one 256^3 patch of the pooled SDF) and times one
patch forward of each (no grad): the PyTorch path (bf16, contiguous NCDHW, the chunked group norm of
:class:`model.nets.refiner.GroupNorm32`, cuDNN convolutions, the adaptive filter as 27 ``addcmul_`` passes), then
the Triton adaptive filter (:mod:`model.nets.adaptive_kernel`), then also the Triton few-channel convolutions
(:mod:`model.nets.conv3d_kernel`, CUDA-core and tensor-core variants), then fp16 (:data:`KERNEL_SETS`; the
cascade runs with both kernels on). Earlier reports timed channels-last, cudnn.benchmark and the float32 group
norm (git history of reports/refiner.md). Per variant: the median of ``--reps``
calls timed with CUDA events after ``--warmup`` calls, the first call (with cuDNN's autotuning when benchmark is on),
``torch.cuda.max_memory_allocated`` over the timed calls and over the first call, and the relative difference of the
output from the first variant's. Then ``torch.profiler`` over one forward of the fastest variant of each refiner: GPU
time per kind of kernel and the 15 largest kernels. Writes ``OUT/refiner.json`` and ``OUT/refiner.md`` with the GPU,
the torch, triton, CUDA and cuDNN versions and the commit (:func:`model.io.provenance`).

Without CUDA (or with ``--device cpu``) it says so and times the tiny configuration on the CPU instead, labelled
SMOKE RUN (what the tests run), and exits 0; ``--tiny`` takes the tiny configuration on a GPU too.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys

import torch

from model.io import commit_label, provenance
from model.reports.common import time_calls, write_report

__all__ = ["KERNEL_KINDS", "REFINERS", "kernel_kind", "main", "markdown", "run_report"]

#: The refiners the report times: key -> description.
REFINERS = {"512": "512 refiner (Voxel_RefinerXL)", "1024": "sign refiner (Voxel_RefinerXL_sign)"}
#: Half-precision dtypes of the variants.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Layouts of the variants: the inputs' memory format and the refiner's layout
#: (``model.nets.refiner_layout.set_layout``; "wide": channels-last below full resolution only).
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d,
           "wide": torch.contiguous_format}
MODEL_LAYOUTS = {"contiguous": "contiguous", "channels_last_3d": "channels_last", "wide": "wide"}
#: Kernels listed per profile.
TOP_KERNELS = 15
#: Kernel kinds by name fragments (case-insensitive), first match wins.
KERNEL_KINDS = (
    ("Triton adaptive filter", ("_adaptive_filter",)),
    ("Triton convolution", ("_conv3_fma", "_conv3_dot", "_conv1x1")),
    ("layout transposes", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("group norm", ("rowwisemoments", "groupnorm", "group_norm", "computefusedparams", "_group_")),
    ("copy / cat / pad / fill", ("copy", "cat", "pad", "fill", "memset", "memcpy", "index")),
    ("convolution (cuDNN)", ("cudnn", "xmma", "implicit", "fprop", "dgrad", "gemm", "conv", "winograd", "cutlass",
                             "sm90_", "sm80_", "nvjet")),
    ("element-wise / reduction", ("elementwise", "vectorized", "unrolled", "reduce", "silu", "tanh", "sigmoid",
                                  "mul", "add", "norm")),
)


def kernel_kind(name: str) -> str:
    """The :data:`KERNEL_KINDS` entry of a kernel name ("other" when none matches)."""
    low = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


# ---------------------------------------------------------------------------------------------------------------
# models, inputs, timing


def _build(key: str, tiny: bool, seed: int):
    """The refiner ``key`` with random weights (float32, CPU) and its configuration."""
    from model.nets.refiner import RefinerConfig, SignRefiner, VoxelRefiner

    torch.manual_seed(seed)
    if key == "512":
        cfg = RefinerConfig.tiny() if tiny else RefinerConfig.released_512()
        return VoxelRefiner(cfg).eval(), cfg
    cfg = RefinerConfig.tiny(pool_mode="released") if tiny else RefinerConfig.released_1024()
    return SignRefiner(cfg).eval(), cfg


def _patch_inputs(key: str, cfg, seed: int) -> tuple[torch.Tensor, ...]:
    """One patch's inputs (float32, CPU): the SDF of a sphere of radius 0.3 patch sides, clamped to [-1, 1] over 4
    voxels either side of the surface (1 outside the band, as empty voxels read); for the 512 refiner also random
    decoder features inside the band (0 outside). The network is dense: its time does not depend on the values."""
    p = cfg.patch_size
    axis = torch.arange(p, dtype=torch.float32) - (p - 1) / 2
    dist = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2).sqrt_()
    sdf = ((dist - 0.3 * p) / 4.0).clamp_(-1.0, 1.0)[None, None]
    del dist
    if key == "1024":
        return (sdf,)
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn((1, cfg.feature_channels, p, p, p), generator=gen)
    feats.mul_(sdf.abs() < 1)
    return sdf, feats


def _to_variant(t: torch.Tensor, device, dtype, memory_format) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype``, laid out in ``memory_format`` (explicitly, also for one channel)."""
    out = torch.empty(t.shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.copy_(t)


class _CudnnBenchmark:
    """``torch.backends.cudnn.benchmark`` set while the block runs, restored afterwards."""

    def __init__(self, value: bool):
        self.value = value

    def __enter__(self):
        self.before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.value

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.before


#: Kernel sets of the variants: (Triton adaptive filter, Triton small convolutions, their tensor-core variant,
#: fused 1^3 shortcuts, the bias kernel after cuDNN's convolutions).
KERNEL_SETS = {"pytorch": (False, False, False, False, False), "adaptive": (True, False, False, False, False),
               "adaptive+conv": (True, True, False, False, False),
               "adaptive+conv+shortcut": (True, True, False, True, False),
               "adaptive+conv-dot": (True, True, True, False, False),
               "adaptive+conv+shortcut+bias": (True, True, False, True, True)}


class _Paths:
    """The refiners' switches set while the block runs, restored afterwards: ``GroupNorm32.cuda_native`` and the
    kernel set (:data:`KERNEL_SETS`: ``refiner.ADAPTIVE_KERNEL``, ``refiner.CONV_KERNEL``,
    ``conv3d_kernel.USE_DOT``, ``refiner.SHORTCUT_KERNEL``, ``refiner.BIAS_KERNEL``)."""

    def __init__(self, v: dict):
        self.native = v["group_norm"] == "native"
        self.kernels = KERNEL_SETS[v["kernels"]]

    def __enter__(self):
        import model.nets.conv3d_kernel as conv3d_kernel
        import model.nets.refiner as refiner

        self.before = (refiner.GroupNorm32.cuda_native, refiner.ADAPTIVE_KERNEL, refiner.CONV_KERNEL,
                       conv3d_kernel.USE_DOT, refiner.SHORTCUT_KERNEL, refiner.BIAS_KERNEL)
        refiner.GroupNorm32.cuda_native = self.native
        (refiner.ADAPTIVE_KERNEL, refiner.CONV_KERNEL, conv3d_kernel.USE_DOT,
         refiner.SHORTCUT_KERNEL, refiner.BIAS_KERNEL) = self.kernels

    def __exit__(self, *exc):
        import model.nets.conv3d_kernel as conv3d_kernel
        import model.nets.refiner as refiner

        (refiner.GroupNorm32.cuda_native, refiner.ADAPTIVE_KERNEL, refiner.CONV_KERNEL,
         conv3d_kernel.USE_DOT, refiner.SHORTCUT_KERNEL, refiner.BIAS_KERNEL) = self.before


def _plan() -> list[dict]:
    """The variants in the order they run; the first (the PyTorch path: cuDNN convolutions, 27 ``addcmul_`` passes
    per adaptive filter) is the reference of the relative differences."""
    base = {"dtype": "bf16", "layout": "contiguous", "cudnn_benchmark": False, "group_norm": "native",
            "kernels": "pytorch"}
    fp16 = {**base, "dtype": "fp16"}
    return [base, {**base, "kernels": "adaptive"}, {**base, "kernels": "adaptive+conv"},
            {**base, "kernels": "adaptive+conv+shortcut"}, {**base, "kernels": "adaptive+conv-dot"},
            {**fp16, "kernels": "adaptive+conv"},
            # the cascade's refiners (fp16, every kernel on), then the bias kernel and channels-last with the
            # group norm's channels-last kernels
            {**fp16, "kernels": "adaptive+conv+shortcut"}, {**fp16, "kernels": "adaptive+conv+shortcut+bias"},
            {**fp16, "layout": "channels_last_3d", "kernels": "adaptive+conv+shortcut"},
            {**fp16, "layout": "channels_last_3d", "kernels": "adaptive+conv+shortcut+bias"},
            {**fp16, "layout": "wide", "kernels": "adaptive+conv+shortcut"},
            {**fp16, "layout": "wide", "kernels": "adaptive+conv+shortcut+bias"}]


def _label(v: dict) -> str:
    gn = ", float32 group norm (previous path)" if v["group_norm"] == "float32" else ""
    kernels = {"pytorch": "cuDNN convolutions + PyTorch adaptive filter",
               "adaptive": "cuDNN convolutions + Triton adaptive filter",
               "adaptive+conv": "Triton adaptive filter + Triton few-channel convolutions (FMA)",
               "adaptive+conv+shortcut": "Triton adaptive filter + few-channel convolutions (FMA) + 1^3 shortcuts "
                                         "fused with the residual sum",
               "adaptive+conv-dot": "Triton adaptive filter + Triton few-channel convolutions (tensor cores)",
               "adaptive+conv+shortcut+bias": "Triton adaptive filter + few-channel convolutions (FMA) + fused 1^3 "
                                              "shortcuts + the bias kernel after cuDNN"}
    return (f"{v['dtype']}, {kernels[v['kernels']]}, {v['layout']}, "
            f"cudnn.benchmark {'on' if v['cudnn_benchmark'] else 'off'}{gn}")


def _rel_diff(out: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    if ref is None:
        return None
    value = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
    return value if math.isfinite(value) else None


def _variant_model(master, device, v: dict):
    from model.nets.refiner_layout import set_layout

    return set_layout(copy.deepcopy(master).to(device=device, dtype=DTYPES[v["dtype"]]), MODEL_LAYOUTS[v["layout"]])


def _time_variants(master, inputs, *, device, reps: int, warmup: int, patches: int) -> list[dict]:
    """One row per variant of :func:`_plan` (an ``error`` instead of the timings when it fails)."""
    rows, ref = [], None
    built, model, args = None, None, None
    for v in _plan():
        row = {**v, "label": _label(v)}
        try:
            key = (v["dtype"], v["layout"])
            if built != key:
                model = args = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model = _variant_model(master, device, v)
                args = tuple(_to_variant(t, device, DTYPES[v["dtype"]], LAYOUTS[v["layout"]]) for t in inputs)
                built = key

            def forward(model=model, args=args):
                with torch.no_grad():
                    return model(*args)

            with _CudnnBenchmark(v["cudnn_benchmark"]), _Paths(v):
                timing = time_calls(forward, reps=reps, warmup=warmup, device=device)
            out = timing.pop("output")
            row.update(timing, finite=bool(torch.isfinite(out).all()), rel_diff=_rel_diff(out, ref),
                       grid_seconds=timing["median_ms"] * patches / 1e3)
            if ref is None:
                ref = out.float()
            del out
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # one failing variant does not stop the report
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            model = args = built = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _profile(master, inputs, v: dict, *, device) -> dict:
    """``torch.profiler`` over one forward of the variant ``v`` (CUDA only; warm: its variant ran before)."""
    from model.reports.dit_profile import profile_step

    model = _variant_model(master, device, v)
    args = tuple(_to_variant(t, device, DTYPES[v["dtype"]], LAYOUTS[v["layout"]]) for t in inputs)

    def forward():
        with torch.no_grad():
            model(*args)

    with _CudnnBenchmark(v["cudnn_benchmark"]), _Paths(v):
        forward()  # warm (the autotuning cache is per process, so this is the timed variant's state)
        prof = profile_step(forward, top=10 ** 6)
    kernels = prof["top_kernels"]
    kinds: dict[str, float] = {}
    for name, ms, _ in kernels:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    return {"variant": _label(v), "total_ms": prof["total_ms"],
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "top_kernels": kernels[:TOP_KERNELS]}


# ---------------------------------------------------------------------------------------------------------------
# launch sweep of the few-channel convolution

#: (Cin, Cout, side) of the swept convolutions: the refiners' full-resolution shapes (40 -> 8: the first residual
#: block of the last up block, which reads the upsampled 32 channels and an 8-channel skip).
SWEEP_SHAPES = ((8, 8, 192), (8, 27, 192), (8, 8, 256), (16, 8, 256), (40, 8, 256), (8, 27, 256))
#: (block_w, num_warps, rows) launches of the sweep (rows: output rows per program, ``conv3d_small(rows=...)``).
SWEEP_LAUNCHES = ((64, 1, 1), (64, 2, 1), (128, 1, 1), (128, 2, 1), (256, 1, 1), (256, 2, 1), (256, 4, 1),
                  (64, 1, 2), (64, 1, 4), (128, 1, 2), (128, 2, 4), (256, 2, 2), (256, 4, 4))
#: Label of the tensor-core variant (``conv3d_small(use_dot=True)``, its default tile) in the sweep.
DOT_LABEL = "tensor cores"
#: (block_w, num_warps) launches of the tensor-core variant the sweep times besides its default.
DOT_LAUNCHES = ((64, 4), (128, 4), (256, 4), (128, 8), (256, 8))


def _dot_label(block_w: int, warps: int) -> str:
    return f"{DOT_LABEL} {block_w} x {warps}"

#: (Cin, Cout, side) of the 1^3 shortcuts the sweep times (:mod:`model.nets.conv1x1_kernel` against cuDNN + the
#: residual sum): the full-resolution ones of the 256^3 sign-refiner patch and those one level down.
SHORTCUT_SHAPES = ((40, 8, 256), (16, 8, 256), (160, 32, 128), (64, 32, 128), (40, 32, 128))


def _launch_label(block_w: int, warps: int, rows: int) -> str:
    return f"{block_w} x {warps}" + (f" x {rows} rows" if rows > 1 else "")


def sweep_conv(device, *, reps: int = 5) -> dict:
    """Time :func:`model.nets.conv3d_kernel.conv3d_small` (bf16) for every launch of :data:`SWEEP_LAUNCHES` of the
    FMA kernel and for the tensor-core variant on every shape of :data:`SWEEP_SHAPES`, beside cuDNN (``F.conv3d``
    on the same NCDHW tensors, its layout transposes included); then the 1^3 shortcuts of :data:`SHORTCUT_SHAPES`
    as ``residual + F.conv3d(x, w, b)`` (cuDNN, in place as the refiners add) against
    :func:`model.nets.conv1x1_kernel.conv1x1_residual`. Medians of ``reps`` calls (CUDA events). Returns
    ``{"rows": [{cin, cout, side, cudnn_ms, launches: {label: ms}, default: label}], "shortcuts": [{cin, cout, side,
    cudnn_ms, kernel_ms}]}`` (labels ``"block_w x warps"``, with ``" x R rows"`` for R output rows per program, and
    :data:`DOT_LABEL`)."""
    import torch.nn.functional as F

    from model.nets.conv1x1_kernel import conv1x1_residual
    from model.nets.conv3d_kernel import _fma_launch, conv3d_small

    def median(fn):
        return time_calls(fn, reps=reps, warmup=1, device=device)["median_ms"]

    rows, shortcuts = [], []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for cin, cout, side in SWEEP_SHAPES:
            x = torch.randn(1, cin, side, side, side, generator=gen).to(device, torch.bfloat16)
            w = (torch.randn(cout, cin, 3, 3, 3, generator=gen) * 0.1).to(device, torch.bfloat16)
            b = torch.randn(cout, generator=gen).to(device, torch.bfloat16)
            row = {"cin": cin, "cout": cout, "side": side, "cudnn_ms": median(lambda: F.conv3d(x, w, b, padding=1)),
                   "launches": {}, "default": _launch_label(*_fma_launch(cout, side))}
            for block_w, warps, rows_per_program in SWEEP_LAUNCHES:
                row["launches"][_launch_label(block_w, warps, rows_per_program)] = median(
                    lambda: conv3d_small(x, w, b, block_w=block_w, num_warps=warps, rows=rows_per_program))
            row["launches"][DOT_LABEL] = median(lambda: conv3d_small(x, w, b, use_dot=True))
            for block_w, warps in DOT_LAUNCHES:
                row["launches"][_dot_label(block_w, warps)] = median(
                    lambda: conv3d_small(x, w, b, use_dot=True, block_w=block_w, num_warps=warps))
            rows.append(row)
        for cin, cout, side in SHORTCUT_SHAPES:
            x = torch.randn(1, cin, side, side, side, generator=gen).to(device, torch.bfloat16)
            w = (torch.randn(cout, cin, 1, 1, 1, generator=gen) * 0.1).to(device, torch.bfloat16)
            b = torch.randn(cout, generator=gen).to(device, torch.bfloat16)
            res = torch.randn(1, cout, side, side, side, generator=gen).to(device, torch.bfloat16)
            shortcuts.append({"cin": cin, "cout": cout, "side": side,
                              "cudnn_ms": median(lambda: res.add_(F.conv3d(x, w, b))),
                              "kernel_ms": median(lambda: conv1x1_residual(x, w, b, res, out=res))})
    return {"rows": rows, "shortcuts": shortcuts}


def _sweep_markdown(sweep: dict) -> list[str]:
    labels = ([_launch_label(*launch) for launch in SWEEP_LAUNCHES] + [DOT_LABEL]
              + [_dot_label(*launch) for launch in DOT_LAUNCHES])
    lines = ["", "## Few-channel convolution: launch sweep (bf16, one 3^3 convolution, ms)", "",
             "`python -m model.reports.refiner --sweep-conv`: `conv3d_small` per tile width x warps (x output rows "
             "per program where more than one; default launch in bold) and its tensor-core variant, beside cuDNN on "
             "the same NCDHW tensors (its layout transposes included).", "",
             "| Cin -> Cout, side | cuDNN | " + " | ".join(labels) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |"]
    for row in sweep["rows"]:
        cells = []
        for label in labels:
            ms = row["launches"].get(label)  # launches a sweep of an earlier commit did not time: "-"
            text = "-" if ms is None else f"{ms:.2f}"
            cells.append(f"**{text}**" if label == row["default"] else text)
        lines.append(f"| {row['cin']} -> {row['cout']}, {row['side']}^3 | {row['cudnn_ms']:.2f} | "
                     + " | ".join(cells) + " |")
    if sweep.get("shortcuts"):
        lines += ["", "1^3 shortcuts plus the residual sum (bf16, ms): cuDNN's convolution then an in-place add, "
                  "against `conv1x1_residual` (one pass, in place).", "",
                  "| Cin -> Cout, side | cuDNN + add | conv1x1_residual |", "| --- | ---: | ---: |"]
        lines += [f"| {r['cin']} -> {r['cout']}, {r['side']}^3 | {r['cudnn_ms']:.2f} | {r['kernel_ms']:.2f} |"
                  for r in sweep["shortcuts"]]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# the report


def run_report(*, tiny: bool = False, device=None, reps: int = 3, warmup: int = 1, refiners=tuple(REFINERS),
               seed: int = 0, profile: bool = True) -> dict:
    """Run the measurements (module docstring) and return the result document. Without CUDA the tiny configuration
    runs on the CPU (a smoke run)."""
    from model.nets.refiner import patch_offsets

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    smoke = dev.type != "cuda"
    tiny = tiny or smoke
    prov = provenance(dev)
    cudnn = torch.backends.cudnn.version() if dev.type == "cuda" and torch.backends.cudnn.is_available() else None
    doc = {"smoke": smoke, "tiny": tiny, "gpu": prov["gpu"] or "CPU", "device": str(dev), "date": prov["date"],
           "commit": prov["commit"], "torch": prov["torch"], "triton": prov["triton"], "cuda": prov["cuda"],
           "cudnn": cudnn, "python": prov["python"], "reps": reps, "warmup": warmup, "seed": seed, "refiners": {}}
    for key in refiners:
        master, cfg = _build(key, tiny, seed)
        inputs = _patch_inputs(key, cfg, seed)
        patches = len(patch_offsets(cfg.resolution, cfg.patch_size, cfg.patch_stride)) ** 3
        rows = _time_variants(master, inputs, device=dev, reps=reps, warmup=warmup, patches=patches)
        ok = [r for r in rows if "error" not in r]
        fastest = min(ok, key=lambda r: r["median_ms"]) if ok else None
        entry = {"name": REFINERS[key], "config": dataclasses.asdict(cfg), "patch_size": cfg.patch_size,
                 "patches_per_grid": patches, "parameters": sum(p.numel() for p in master.parameters()),
                 "input_channels": [int(t.shape[1]) for t in inputs], "variants": rows,
                 "fastest": fastest["label"] if fastest else None, "profile": None}
        if fastest is not None and ok[0] is rows[0]:
            entry["speedup_of_fastest"] = rows[0]["median_ms"] / fastest["median_ms"]
        if profile and fastest is not None and dev.type == "cuda":
            entry["profile"] = _profile(master, inputs, fastest, device=dev)
        doc["refiners"][key] = entry
        del master, inputs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return doc


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(r: dict) -> str:
    first = next(iter(r["refiners"].values()), None)
    reps = f"median of {r['reps']} calls after {r['warmup']} warm-up call{'s' if r['warmup'] != 1 else ''}"
    lines = [
        "# Dense refiners: one patch forward per variant" + (" (SMOKE RUN)" if r["smoke"] else ""),
        "",
        (f"{r['date']}, {r['gpu']}, torch {r['torch']}, triton {r['triton']}, CUDA {r['cuda']}, cuDNN {r['cudnn']}, "
         f"{commit_label(r)}. `python -m model.reports.refiner`."),
        "",
    ]
    if r["smoke"]:
        lines += ["SMOKE RUN: no CUDA GPU, the tiny configuration on the CPU (wall clock); NOT a measurement.", ""]
    lines += [
        (f"Random weights at the {'tiny' if r['tiny'] else 'released'} sizes, no grad; {reps} "
         f"({'CUDA events' if not r['smoke'] else 'wall clock'}). First call: the first warm-up call (with cuDNN's "
         "autotuning when benchmark is on). Peak: `torch.cuda.max_memory_allocated` over the timed calls (weights, "
         "input and activations) and over the first call. Grid: the median times the patches of the whole grid "
         "(an upper bound: empty patches run once). Rel. difference: norm of the output's difference from the "
         "first row's over its norm (fp16 rows differ by bf16's rounding)."),
    ]
    if first is None:  # --refiners none: the sweep alone
        if r.get("conv_sweep"):
            lines += _sweep_markdown(r["conv_sweep"])
        return "\n".join(lines) + "\n"
    for e in r["refiners"].values():
        p = e["patch_size"]
        title = (f"## {e['name']}: one {p}^3 patch ({e['parameters']:,} parameters; input channels "
                 f"{e['input_channels']}; {e['patches_per_grid']} patches per grid)")
        lines += ["", title, "",
                  "| variant | median ms | first call ms | peak GB | first-call peak GB | grid s | rel. difference |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in e["variants"]:
            if "error" in row:
                lines.append(f"| {row['label']} | failed: {row['error']} | | | | | |")
                continue
            rel = "reference" if row is e["variants"][0] else (
                f"{row['rel_diff']:.1e}" if row["rel_diff"] is not None else "n/a")
            rel += "" if row["finite"] else " (non-finite output)"
            mark = "**" if row["label"] == e["fastest"] else ""
            lines.append(f"| {mark}{row['label']}{mark} | {_fmt(row['median_ms'])} | {_fmt(row['first_call_ms'])} | "
                         f"{_fmt(row['peak_gb'], 2)} | {_fmt(row['first_call_peak_gb'], 2)} | "
                         f"{_fmt(row['grid_seconds'], 2)} | {rel} |")
        if e["fastest"]:
            speed = f" ({e['speedup_of_fastest']:.2f}x the first row)" if e.get("speedup_of_fastest") else ""
            lines += ["", f"Fastest: {e['fastest']}{speed}."]
        prof = e.get("profile")
        if prof:
            total = prof["total_ms"] or 1.0
            lines += ["", f"### torch.profiler, {prof['variant']}: {prof['total_ms']:,.1f} ms of GPU kernels", "",
                      "| kind of kernel | ms | share |", "| --- | ---: | ---: |"]
            lines += [f"| {k} | {ms:,.1f} | {100 * ms / total:.0f}% |" for k, ms in prof["kinds"].items()]
            lines += ["", f"| top {TOP_KERNELS} kernels | ms | calls |", "| --- | ---: | ---: |"]
            lines += [f"| `{name}` | {ms:,.2f} | {calls} |" for name, ms, calls in prof["top_kernels"]]
        elif not r["smoke"]:
            lines += ["", "(no profile)"]
    if r["smoke"]:
        lines += ["", "(no profiles on the CPU)"]
    if r.get("conv_sweep"):
        lines += _sweep_markdown(r["conv_sweep"])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from model.cli.args import add_device, add_out, add_seed, make_parser, positive_int

    p = make_parser("model.reports.refiner", __doc__)
    add_out(p, "folder for refiner.md and refiner.json", default="reports")
    p.add_argument("--tiny", action="store_true",
                   help="time the tiny configuration (RefinerConfig.tiny) instead of the released sizes (default: "
                        "off; always on without CUDA)")
    p.add_argument("--refiners", choices=("both", *REFINERS, "none"), default="both",
                   help="which refiner to time: 512, 1024 (the sign refiner), both, or none (with --sweep-conv: the "
                        "sweep alone) (default %(default)s)")
    p.add_argument("--reps", type=positive_int, default=3, metavar="N",
                   help="timed calls per variant, their median is reported (default %(default)s)")
    p.add_argument("--warmup", type=positive_int, default=1, metavar="N",
                   help="untimed calls per variant before the timed ones; the first is reported as the first call "
                        "(default %(default)s)")
    p.add_argument("--sweep-conv", action="store_true",
                   help="also time the few-channel convolution kernel per launch against cuDNN (CUDA only; default: "
                        "off)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler run of the fastest variants (default: profile them)")
    add_device(p, default=None, shown="cuda when available, else the CPU with the tiny configuration")
    add_seed(p)
    return p


def main(argv=None) -> int:
    from model.cli.args import run

    return run(build_parser(), _main, argv)


def _main(args) -> int:
    from model.cli.args import output_folder, resolve_device

    out = output_folder("--out", args.out)
    dev = resolve_device(args.device)
    if dev.type != "cuda":
        print("model.reports.refiner: no CUDA GPU here; timing the tiny configuration on the CPU instead "
              "(a smoke run, not a measurement)")
    refiners = {"both": tuple(REFINERS), "none": ()}.get(args.refiners, (args.refiners,))
    r = run_report(tiny=args.tiny, device=dev, reps=args.reps, warmup=args.warmup, refiners=refiners,
                   seed=args.seed, profile=args.profile)
    if args.sweep_conv and dev.type == "cuda":
        r["conv_sweep"] = sweep_conv(dev)
    write_report(out, "refiner", r, markdown(r))
    print(f"wrote {out / 'refiner.md'} and {out / 'refiner.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
