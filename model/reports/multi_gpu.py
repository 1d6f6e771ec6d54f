"""Multi-GPU training report: the sparse DiT and the sparse SDF VAE trained with ``torchrun`` on 1 and on N GPUs.

``python -m model.reports.multi_gpu --out DIR [--gpus N] [--time-limit MINUTES] [--models dit vae] [--meshes MESH_DIR]``
(one host with N CUDA GPUs; ``--smoke``: tiny models on the CPU through gloo, for the tests)

For each model, two runs on the same data with the same seed: one process, then N processes, each started with
``python -m torch.distributed.run --nproc-per-node P`` (NCCL on GPUs, gloo on CPU). Every process it starts gets
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1`` (NVLink multicast
off). Both runs train on the same sequence of global batches, so their loss curves must coincide up to float
rounding:

- **DiT** (an internal training loop around :func:`model.training.dit.sharded_flow_loss`, the trainer's own loss and
  sharding, since the trainer needs prepared views and a DINOv2 encoder): the ``released_1024`` width and depth
  (1024 wide, 24 blocks, 509M parameters, SSA through the Triton kernels, bf16 autocast, activation checkpointing,
  AdamW), ``--samples`` latents on the ``shell-1024`` coordinates (:func:`ssa_kernels.shapes.shape_coords`, 137,124 tokens
  each) with random features and a random 1374-token condition each. A step's global batch is ``N *
  --per-gpu-batch`` samples; N ranks take one share each (:func:`model.training.common.partition_by_tokens`), the single
  process accumulates the gradients of the same N shares one after another. Per-GPU work is the same in both runs.
- **VAE** (the trainer itself, ``python -m model.cli.train_vae``): preset ``--vae-model`` (default ``base``) at 256^3,
  on the meshes of ``--meshes`` or, without it, on synthetic closed shapes made with trimesh (ellipsoids, boxes,
  cylinders, capsules, tori of assorted proportions: their SDF bands are shells of different voxel counts).
  Global batch ``N * --per-gpu-batch`` samples: N ranks take a token-balanced share each, the single process
  trains on the whole global batch in one forward (the trainer has no gradient accumulation: its loss terms are
  normalised by counts only known after the forward pass).

Measured per run, after ``--warmup`` steps: tokens per second (latent tokens for the DiT, input voxels for the VAE,
summed over the ranks, over the wall time of the steps), and with N ranks the spread of the ranks' step times,
forward times and token counts per step (``(max - min) / max``, gathered every step). Scaling efficiency =
``tokens_per_s(N) / (N * tokens_per_s(1))``. The time limit ``--time-limit`` (minutes, default 9) covers the
whole command: it is shared out among the runs still to do (data preparation and process start-up included).

Writes ``DIR/multi_gpu.md``, ``DIR/multi_gpu.json`` (a list, one record per run: ``model``, ``gpus``,
``tokens_per_s``, ``efficiency``, ``gpu``, ``date``, ``commit`` (:func:`model.io.provenance`) and the details; records
of other models already in the file are kept, so ``--models dit`` and ``--models vae`` may run as two commands),
``DIR/multi_gpu_loss.png`` (the loss curves of both runs per model) and the runs' folders under ``DIR/runs``
(``metrics.jsonl`` and logs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model.io import atomic_write, atomic_write_json, atomic_write_text, commit_label, provenance

__all__ = ["NVLINK_MULTICAST_OFF", "crashed_by_signal", "main", "markdown", "summarize_run", "synthetic_meshes"]

#: NVLink multicast (NVLS) off in every process the report starts.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MODELS = ("dit", "vae")
REPO = Path(__file__).resolve().parent.parent
#: Start-up allowance of one run (process start, imports, model building, CUDA context), seconds.
STARTUP_S = 45.0
#: Runs repeated when a worker died from a signal rather than from a Python error (see :func:`crashed_by_signal`).
RETRIES_AFTER_SIGNAL = 1
SMOKE_STEPS = 3
#: Condition tokens of the released DiT (1 class + 4 registers + 37 x 37 patches of DINOv2 ViT-L/14 at 518 px).
CONDITION_TOKENS = 1374


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, **NVLINK_MULTICAST_OFF)
    # torchrun sets 1 thread per process for several processes, not for one: the same for both runs
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


#: A worker that died from a signal, as torchrun's error summary prints it (``exitcode : -6``).
_SIGNAL_EXIT = re.compile(r"exitcode\s*:\s*-(\d+)")


def crashed_by_signal(log_tail: str) -> int | None:
    """The signal number that killed a torchrun worker, read from the launcher's error summary in ``log_tail``
    (the root cause's first: torchrun lists the rank that failed first), or None when no worker died from a signal
    (a Python exception exits with code 1 and is not retried)."""
    found = [int(m) for m in _SIGNAL_EXIT.findall(log_tail)]
    root = log_tail.rfind("Root Cause")
    if root >= 0:
        found = [int(m) for m in _SIGNAL_EXIT.findall(log_tail[root:])] or found
    # the SIGTERM torchrun sends the other ranks is a consequence, not a cause
    causes = [n for n in found if n != signal.SIGTERM]
    return causes[0] if causes else (found[0] if found else None)


def _torchrun(nproc: int, module_args: list[str], *, log: Path, timeout: float) -> tuple[int, str]:
    """Run ``python -m torch.distributed.run --nproc-per-node nproc -m MODULE ...``; ``(exit code, log tail)``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", *module_args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        # a session of its own: on timeout the launcher and its workers go down together
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=30)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            rc = 124
    return rc, log.read_text()[-4000:]


# ---------------------------------------------------------------------------------------------------------------
# data


def synthetic_meshes(folder, count: int, seed: int = 0) -> list[Path]:
    """``count`` closed meshes of assorted shapes and proportions (ellipsoids, boxes, cylinders, capsules, tori)
    written as ``.obj`` into ``folder``; the same files for the same seed."""
    import numpy as np
    import trimesh

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        a, b, c = rng.uniform(0.3, 1.0, 3)
        kind = k % 5
        if kind == 0:
            mesh = trimesh.creation.icosphere(subdivisions=3)
            mesh.apply_scale((a, b, c))
        elif kind == 1:
            mesh = trimesh.creation.box(extents=(a, b, c))
        elif kind == 2:
            mesh = trimesh.creation.cylinder(radius=0.5 * a * b, height=c, sections=48)
        elif kind == 3:
            mesh = trimesh.creation.capsule(height=c, radius=0.3 * a, count=[24, 24])
        else:
            mesh = trimesh.creation.torus(major_radius=0.5, minor_radius=0.08 + 0.2 * a * b, major_sections=48,
                                          minor_sections=24)
        path = folder / f"shape_{k:03d}.obj"
        mesh.export(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# the DiT worker (runs inside torchrun)


def _dit_inputs(smoke: bool, samples: int, seed: int, device):
    """``(DiTConfig, [(coords [n, 3], latents [n, C], condition [1, L, Cc])] on device, shape name)``."""
    from model.nets.dit import DiTConfig

    gen = torch.Generator().manual_seed(seed)
    if smoke:
        from ssa_kernels.shapes import shell_coords
        from ssa_kernels.layout import layout_order

        cfg = DiTConfig.tiny(backend="kernels" if device.type == "cuda" else "reference", use_checkpoint=True)
        coords = shell_coords(16, 1.0)
        coords = coords[layout_order(coords, compression_block=cfg.compression_block,
                                     selection_block=cfg.selection_block)]
        sizes = [96 + 32 * (k % 4) for k in range(samples)]  # different token counts: the sharding balances them
        cond_tokens, shape = 21, "shell-16 prefixes (smoke)"
    else:
        from ssa_kernels.shapes import shape_coords

        cfg = DiTConfig.released_1024(backend="kernels", use_checkpoint=True)
        coords = shape_coords("shell-1024", compression_block=cfg.compression_block,
                              selection_block=cfg.selection_block)
        sizes = [coords.shape[0]] * samples
        cond_tokens, shape = CONDITION_TOKENS, "shell-1024"
    out = []
    for n in sizes:
        xyz = coords[:n, 1:].contiguous()  # a prefix of layout order is in layout order
        z = torch.randn(n, cfg.in_channels, generator=gen)
        cond = torch.randn(1, cond_tokens, cfg.cond_channels, generator=gen)
        out.append((xyz.to(device), z.to(device), cond.to(device)))
    return cfg, out, shape


def _dit_worker(a) -> None:
    """One rank of a DiT run. After the last step every rank meets at a barrier, destroys its process group and
    leaves with ``os._exit(0)``: the interpreter's teardown of a finished gloo rank can abort it (std::terminate
    from a C++ thread object destroyed while still joinable), which torchrun reports as a failed run."""
    from model.training.common import Distributed

    dist = Distributed(a.device)
    try:
        _dit_train(a, dist)  # returns having dropped the DDP model: it must go before its process group
        dist.barrier()
    finally:
        dist.close()
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.world_size > 1:
        os._exit(0)


def _dit_train(a, dist) -> None:
    from model.nets.dit import SparseDiT
    from model.sparse.tensor import SparseTensor
    from model.training.dit import item_generator, sharded_flow_loss
    from model.training.common import MetricsLog, TimeLimit, partition_by_tokens

    dev = dist.device
    if a.gpus % dist.world_size:
        raise ValueError(f"--gpus {a.gpus} is not a multiple of the {dist.world_size} ranks")
    parts_per_rank = a.gpus // dist.world_size  # micro-batches accumulated per rank and step
    cfg, samples, shape = _dit_inputs(a.smoke, a.samples, a.seed, dev)
    torch.manual_seed(a.seed)
    model = SparseDiT(cfg).to(dev)
    ddp = dist.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    out = Path(a.out)
    log = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main)
    if dist.is_main:
        (out / "config.json").write_text(json.dumps(dict(
            dit=cfg.to_dict(), shape=shape, samples=len(samples), tokens=[s[0].shape[0] for s in samples],
            parameters=sum(p.numel() for p in model.parameters()), world_size=dist.world_size,
            micro_batches_per_rank=parts_per_rank, per_gpu_batch=a.per_gpu_batch, lr=a.lr,
            environment={k: os.environ.get(k) for k in NVLINK_MULTICAST_OFF}), indent=1))
    use_bf16 = dev.type == "cuda"
    per_step = a.gpus * a.per_gpu_batch
    limit = TimeLimit(a.seconds / 60.0 if a.seconds else None)
    model.train()
    for step in range(a.max_steps):
        if dist.any(limit.expired() or (a.deadline and time.time() > a.deadline)):
            break
        t0 = time.perf_counter()
        items = [(step * per_step + j) % len(samples) for j in range(per_step)]
        tokens = [samples[i][0].shape[0] for i in items]
        mine = partition_by_tokens(tokens, dist.world_size)[dist.rank]
        micro = partition_by_tokens([tokens[p] for p in mine], parts_per_rank)
        opt.zero_grad(set_to_none=True)
        share_sum, fwd_s = torch.zeros((), dtype=torch.float64, device=dev), 0.0
        for m, group in enumerate(micro):
            pos = [mine[j] for j in group]
            sync = nullcontext() if not dist.enabled or m == len(micro) - 1 else ddp.no_sync()
            with sync:
                tf = time.perf_counter()
                x0 = SparseTensor.from_list([samples[items[p]][0] for p in pos],
                                            [samples[items[p]][1] for p in pos], resolution=cfg.resolution)
                cond = torch.cat([samples[items[p]][2] for p in pos])
                gens = [item_generator(a.seed, step, p) for p in pos]
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, share = sharded_flow_loss(ddp, x0, cond, gens, total_tokens=sum(tokens),
                                                    world_size=dist.world_size, cond_drop_prob=0.1)
                dist.synchronize()
                fwd_s += time.perf_counter() - tf
                loss.backward()
            share_sum = share_sum + share.double()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dist.synchronize()
        step_s = time.perf_counter() - t0
        loss_g = float(dist.sum(share_sum))
        ranks = dist.rank_stats(dict(step_s=step_s, fwd_s=fwd_s, tokens=float(sum(tokens[p] for p in mine))))
        log.log(dict(kind="train", step=step + 1, loss=loss_g, tokens=sum(tokens), batch=per_step,
                     seconds_per_step=time.perf_counter() - t0, grad_norm=float(gnorm),
                     world_size=dist.world_size, micro_batches_per_rank=parts_per_rank, **ranks))


# ---------------------------------------------------------------------------------------------------------------
# analysis


def summarize_run(records: list[dict], *, warmup: int, token_key: str) -> dict:
    """Throughput and rank statistics of one run's training records (the first ``warmup`` steps left out, unless
    that would leave nothing)."""
    train = [r for r in records if r.get("kind", "train") == "train" and "step" in r]
    timed = train[warmup:] if len(train) > warmup else train[-1:]
    out: dict = {"steps": len(train), "timed_steps": len(timed), "losses": [(r["step"], r.get("loss")) for r in train]}
    if not timed:
        return dict(out, tokens_per_s=None)
    secs = sum(r["seconds_per_step"] for r in timed)
    toks = sum(r[token_key] for r in timed)
    out.update(tokens_per_s=toks / secs if secs > 0 else None, seconds_per_step=secs / len(timed),
               tokens_per_step=toks / len(timed), final_loss=train[-1].get("loss"))
    for key in ("rank_step_s_spread", "rank_fwd_s_spread", f"rank_{token_key}_spread"):
        vals = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
        if vals:
            name = key.replace(f"rank_{token_key}_", "rank_tokens_")
            out[f"{name}_mean"], out[f"{name}_max"] = sum(vals) / len(vals), max(vals)
    return out


def _loss_gap(a: list, b: list) -> float | None:
    """Largest relative difference of two runs' losses over their common steps."""
    la, lb = dict(a), dict(b)
    common = [s for s in la if s in lb and la[s] is not None and lb[s] is not None]
    if not common:
        return None
    return max(abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-12) for s in common)


def _plot(records: list[dict], runs: Path, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from model.training.common import read_jsonl

    models = [m for m in MODELS if any(r["model"] == m for r in records)]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in sorted((r for r in records if r["model"] == model), key=lambda r: r["gpus"]):
            pts = [(x["step"], x["loss"]) for x in read_jsonl(runs / r["run"] / "metrics.jsonl")
                   if x.get("kind", "train") == "train" and isinstance(x.get("loss"), (int, float))]
            if pts:
                style = dict(lw=2.5, alpha=0.6) if r["gpus"] == 1 else dict(lw=1.0, ls="--", marker=".")
                ax.plot(*zip(*pts), label=f"{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}", **style)
        ax.set_title(f"{model.upper()}: same data and seed, 1 vs N GPUs", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (global batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def _fmt(v, spec=",.0f", none="n/a"):
    return none if v is None else format(v, spec)


def markdown(records: list[dict]) -> str:
    """The report from the JSON records."""
    if not records:
        return "# Multi-GPU training\n\nNo runs.\n"
    first = records[0]
    smoke = any(r.get("smoke") for r in records)
    lines = [
        "# Multi-GPU training: the sparse DiT and the sparse SDF VAE on 1 and N GPUs",
        "",
        f"{first['date']}, {first['gpu']}, torch {first.get('torch')}, "
        + " / ".join(dict.fromkeys(commit_label(r) for r in records))  # every commit the records were measured on
        + ("; **SMOKE RUN** (tiny models on the CPU through gloo): not a measurement." if smoke else "."),
        f"Made by `{first.get('command', 'python -m model.reports.multi_gpu')}`; NVLink multicast off in every "
        "process (" + ", ".join(f"`{k}={v}`" for k, v in NVLINK_MULTICAST_OFF.items()) + ").",
        "",
        "| model | GPUs | tokens/s | scaling efficiency | s/step | tokens/step | timed steps | rank step-time spread "
        "(mean / max) | rank forward-time spread (mean / max) | rank token spread (mean) | loss gap to 1 GPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(records, key=lambda r: (MODELS.index(r["model"]), r["gpus"])):
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['gpus']} | failed: {r['error']} | | | | | | | | |")
            continue
        spread = (f"{_fmt(r.get('rank_step_s_spread_mean'), '.1%')} / {_fmt(r.get('rank_step_s_spread_max'), '.1%')}"
                  if r["gpus"] > 1 else "")
        fwd = (f"{_fmt(r.get('rank_fwd_s_spread_mean'), '.1%')} / {_fmt(r.get('rank_fwd_s_spread_max'), '.1%')}"
               if r["gpus"] > 1 else "")
        lines.append(
            f"| {r['model']} | {r['gpus']} | {_fmt(r['tokens_per_s'])} | {_fmt(r.get('efficiency'), '.1%')} | "
            f"{_fmt(r.get('seconds_per_step'), '.3f')} | {_fmt(r.get('tokens_per_step'))} | {r.get('timed_steps')} | "
            f"{spread} | {fwd} | {_fmt(r.get('rank_tokens_spread_mean'), '.1%', '') if r['gpus'] > 1 else ''} | "
            f"{_fmt(r.get('loss_gap'), '.2e', '') if r['gpus'] > 1 else ''} |")
    for r in records:
        if r.get("retried"):
            lines += ["", f"The {r['model']} run on {r['gpus']} GPU(s) ran twice: {r['retried']} "
                          f"(its log: `runs/{r['run']}/log_attempt1.txt`)."]
    bars = [r for r in records if r["gpus"] == 2 and r.get("efficiency") is not None]
    if bars:
        lines += ["", "Bar (scaling efficiency >= 90% at N = 2): " + "; ".join(
            f"{r['model']} {r['efficiency']:.1%} ({'met' if r['efficiency'] >= 0.9 else 'NOT met'})" for r in bars)
            + "."]
    lines += ["", "![loss curves](multi_gpu_loss.png)", "", "## Setup", ""]
    for model in MODELS:
        rs = [r for r in records if r["model"] == model and not r.get("error")]
        if rs:
            lines.append(f"- **{model.upper()}**: {rs[0].get('setup', '')}")
    lines += [
        "",
        "## How it is measured",
        "",
        "Each run is `python -m torch.distributed.run --nproc-per-node P ...` on the same data with the same seed; "
        "both runs of a model train on the same sequence of global batches (N x the per-GPU batch), so their loss "
        "curves coincide up to float (bf16) rounding: the *loss gap* is the largest relative difference over the "
        "common steps. N ranks each take a share of a global batch balanced by token count "
        "(`model.training.common.partition_by_tokens`: greedy, largest sample first into the lightest share), and the loss "
        "is normalised by the global counts so that DDP's gradient mean is the one-process gradient on the whole "
        "global batch.",
        "",
        "Tokens per second: tokens of the global batches (DiT: latent tokens; VAE: input voxels) over the wall time "
        "of the steps after the warm-up steps (Triton compilation, allocator warm-up). Scaling efficiency = "
        "tokens_per_s(N) / (N x tokens_per_s(1)). Rank spreads are `(max - min) / max` over the ranks of each "
        "step's figures, gathered every step: the step time (all ranks wait for the gradient all-reduce, so it "
        "shows little), the forward time (before any communication: where unbalanced work shows) and the rank's "
        "tokens.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the launcher


def _device_name(smoke: bool) -> str:
    if not smoke and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _per_gpu_batch(a, model: str) -> int:
    return a.per_gpu_batch or (1 if model == "dit" else 2)


def _prepare_vae_data(a, out: Path) -> tuple[str, str, str, int]:
    """``(mesh folder, cache folder, description, meshes)``: the meshes (given or synthetic) with their sparse SDF
    samples prepared up front (so no run times the preparation)."""
    from model.data.dataset import SparseSDFDataset

    per_step = a.gpus * _per_gpu_batch(a, "vae")
    if a.meshes:
        meshes, what = a.meshes, f"the meshes of `{a.meshes}`"
    else:
        count = max(a.vae_meshes, per_step)
        synthetic_meshes(out / "synthetic_meshes", count, seed=a.seed)
        meshes = str(out / "synthetic_meshes")
        what = (f"{count} synthetic closed shapes made with trimesh (ellipsoids, boxes, cylinders, capsules, tori of "
                "assorted proportions; no mesh folder given)")
    cache = str(out / "sdf_cache")
    ds = SparseSDFDataset(meshes, (a.vae_resolution,), tau=2.0, cache_dir=cache)
    report = ds.prepare_all(num_workers=0 if a.smoke else min(16, os.cpu_count() or 1), progress=False)
    return meshes, cache, what, len(ds) - len(report["failed"])


def _run_dit(a, nproc: int, run: Path, budget_s: float | None) -> tuple[int, str]:
    args = ["model.reports.multi_gpu", "--worker", "dit", "--out", str(run), "--gpus", str(a.gpus),
            "--per-gpu-batch", str(_per_gpu_batch(a, "dit")), "--samples", str(a.samples), "--seed", str(a.seed),
            "--lr", str(a.lr if a.lr is not None else (1e-3 if a.smoke else 1e-4)), "--device", a.device,
            "--max-steps", str(SMOKE_STEPS if a.smoke else a.max_steps)]
    if a.smoke:
        args.append("--smoke")
    if budget_s is not None:
        args += ["--seconds", str(max(10.0, budget_s - STARTUP_S)), "--deadline", str(time.time() + budget_s)]
    return _torchrun(nproc, args, log=run / "log.txt", timeout=(budget_s or 300) + 240)


def _run_vae(a, nproc: int, run: Path, budget_s: float | None, meshes: str, cache: str) -> tuple[int, str]:
    batch = a.gpus * _per_gpu_batch(a, "vae") // nproc
    args = ["model.cli.train_vae", "--meshes", meshes, "--cache-dir", cache, "--resolutions", str(a.vae_resolution),
            "--model", "tiny" if a.smoke else a.vae_model, "--batch-size", str(batch),
            "--steps", str(SMOKE_STEPS if a.smoke else a.max_steps), "--lr", str(a.lr if a.lr is not None else 1e-3),
            "--warmup-steps", "0", "--schedule", "constant", "--log-every", "1", "--ckpt-every", str(10**9),
            "--val-meshes", "0", "--held-out-fraction", "0", "--no-progress", "--seed", str(a.seed),
            "--out", str(run), "--device", a.device]
    if budget_s is not None:
        args += ["--time-limit", str(max(10.0, budget_s - STARTUP_S) / 60.0)]
    return _torchrun(nproc, args, log=run / "log.txt", timeout=(budget_s or 300) + 240)


def run_report(a, command: str = "") -> list[dict]:
    """All runs of ``a.models`` (1 and ``a.gpus`` processes), their records, the JSON, the plot and the report."""
    from model.training.common import read_jsonl

    t_start = time.time()
    deadline = None if a.smoke else t_start + a.minutes * 60.0 - 20.0  # 20 s for the report itself
    out = Path(a.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    gpu = _device_name(a.smoke)
    prov = provenance("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    plan = [(m, p) for m in a.models for p in (1, a.gpus)]
    vae_data = _prepare_vae_data(a, out) if "vae" in a.models else None
    records: list[dict] = []
    for k, (model, nproc) in enumerate(plan):
        budget = None if deadline is None else max(30.0, (deadline - time.time()) / (len(plan) - k))
        run = runs / f"{model}_{nproc}gpu"
        if (run / "metrics.jsonl").exists():
            (run / "metrics.jsonl").unlink()
        print(f"[multi_gpu_report] {model} on {nproc} process(es), budget "
              f"{'-' if budget is None else f'{budget:.0f} s'}", flush=True)
        retried = None
        for attempt in range(1 + RETRIES_AFTER_SIGNAL):
            if model == "dit":
                rc, tail = _run_dit(a, nproc, run, budget)
            else:
                rc, tail = _run_vae(a, nproc, run, budget, vae_data[0], vae_data[1])
            sig = crashed_by_signal(tail) if rc not in (0, 124) else None
            if sig is None or attempt == RETRIES_AFTER_SIGNAL:
                break
            # a worker killed by a signal (an abort in a C++ thread, say) says nothing about the code's scaling:
            # run once more on the same data, and say so in the record and the report
            retried = f"the first attempt's worker died from signal {sig} ({signal.Signals(sig).name})"
            print(f"[multi_gpu_report] {model} on {nproc} process(es): {retried}; running it again\n{tail}",
                  file=sys.stderr, flush=True)
            (run / "log.txt").rename(run / "log_attempt1.txt")
            if (run / "metrics.jsonl").exists():
                (run / "metrics.jsonl").unlink()
            if deadline is not None:
                budget = max(30.0, (deadline - time.time()) / (len(plan) - k))
        b = _per_gpu_batch(a, model)
        rec: dict = dict(model=model, gpus=nproc, gpu=gpu, date=prov["date"], commit=prov["commit"],
                         torch=prov["torch"], triton=prov["triton"], cuda=prov["cuda"], smoke=a.smoke,
                         command=command, run=run.name, per_gpu_batch=b, global_batch=a.gpus * b,
                         tokens_per_s=None, efficiency=None)
        if retried:
            rec["retried"] = retried
        if rc != 0:
            rec["error"] = f"exit code {rc} (log: runs/{run.name}/log.txt)"
            print(tail, file=sys.stderr)
        summary = summarize_run(read_jsonl(run / "metrics.jsonl"), warmup=a.warmup,
                                token_key="tokens" if model == "dit" else "voxels")
        losses = summary.pop("losses")
        rec.update(summary)
        rec["losses"] = losses
        cfg_path = run / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if model == "dit":
            d = cfg.get("dit", {})
            rec["setup"] = (f"DiT width {d.get('model_channels')}, {d.get('num_blocks')} blocks, "
                            f"{_fmt(cfg.get('parameters'))} parameters, SSA backend {d.get('backend')}, activation "
                            f"checkpointing, {'bf16 autocast' if not a.smoke else 'fp32'}, AdamW lr {cfg.get('lr')}; "
                            f"{cfg.get('samples')} samples on {cfg.get('shape')} "
                            f"({_fmt(max(cfg.get('tokens') or [0]))} tokens each at most), random latents and {CONDITION_TOKENS if not a.smoke else 21}-token "
                            f"random conditions; global batch {a.gpus * b} samples per step; 1 GPU "
                            f"accumulates the gradients of the {a.gpus} per-GPU shares.")
        else:
            v = cfg.get("vae", {})
            rec["setup"] = (f"VAE preset `{'tiny' if a.smoke else a.vae_model}` (conv widths {v.get('conv_channels')}, "
                            f"width {v.get('model_channels')}) at {a.vae_resolution}^3 on {vae_data[2]}; "
                            f"{vae_data[3]} samples, global batch {a.gpus * b} samples per step "
                            f"(1 GPU: all at once; {a.gpus} GPUs: {b} each, token-balanced), "
                            "AdamW lr 1e-3 constant, bf16 autocast on CUDA (the trainer `model.training.vae`).")
        records.append(rec)
    for model in a.models:
        one = next((r for r in records if r["model"] == model and r["gpus"] == 1), None)
        for r in records:
            if r["model"] != model or one is None or not one.get("tokens_per_s") or not r.get("tokens_per_s"):
                continue
            r["efficiency"] = r["tokens_per_s"] / (r["gpus"] * one["tokens_per_s"])
            if r["gpus"] > 1:
                r["loss_gap"] = _loss_gap(r["losses"], one["losses"])
    # keep the records of models not run this time
    path = out / "multi_gpu.json"
    old = json.loads(path.read_text()) if path.exists() else []
    if isinstance(old, list):
        records = [r for r in old if r.get("model") not in a.models] + records
    for r in records:
        r.pop("losses", None)
    atomic_write_json(path, records, default=str)
    _plot(records, runs, out / "multi_gpu_loss.png")
    atomic_write_text(out / "multi_gpu.md", markdown(records))
    print(f"[multi_gpu_report] done in {time.time() - t_start:.0f} s: {out / 'multi_gpu.md'}", flush=True)
    return records


def build_parser() -> argparse.ArgumentParser:
    from model.cli.args import (
        add_out,
        add_seed,
        add_time_limit,
        make_parser,
        non_negative_int,
        positive_float,
        positive_int,
    )

    p = make_parser("model.reports.multi_gpu", __doc__)
    add_out(p, "folder for multi_gpu.md, multi_gpu.json, the plot and the runs")
    p.add_argument("--gpus", type=positive_int, default=None, metavar="N",
                   help="GPUs of the multi-GPU runs (default: every visible GPU; 2 with --smoke)")
    add_time_limit(p, "the whole command, shared out among the runs", default=9.0, dest="minutes")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help=f"models to run (default {' '.join(MODELS)})")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU through gloo (tests)")
    p.add_argument("--per-gpu-batch", type=positive_int, default=None, metavar="N",
                   help="samples per GPU and step (default 1 for the DiT, 2 for the VAE)")
    p.add_argument("--samples", type=positive_int, default=8, metavar="N",
                   help="distinct DiT samples, latents and conditions (default %(default)s)")
    p.add_argument("--meshes", default=None, metavar="DIR", help="VAE meshes (default: synthetic shapes)")
    p.add_argument("--vae-meshes", type=positive_int, default=16, metavar="N",
                   help="synthetic VAE meshes when --meshes is not given (default %(default)s)")
    p.add_argument("--vae-model", default="base",
                   help="VAE preset, as model.cli.train_vae --model (default %(default)s)")
    p.add_argument("--vae-resolution", type=positive_int, default=None, metavar="R",
                   help="SDF grid side of the VAE runs (default 256; 32 with --smoke)")
    p.add_argument("--warmup", type=non_negative_int, default=None, metavar="N",
                   help="steps left out of the timing (default 3; 1 with --smoke)")
    p.add_argument("--max-steps", type=positive_int, default=10_000, metavar="N",
                   help="step cap of a run; the time limit decides (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default 1e-4 for the DiT, 1e-3 for the VAE and with --smoke)")
    add_seed(p)
    p.add_argument("--device", default=None, help="auto or cpu (default auto; cpu with --smoke)")
    # internal: the DiT worker inside torchrun
    p.add_argument("--worker", choices=("dit",), help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    from model.cli.args import run

    return run(build_parser(), lambda a: _main(a, argv), argv)


def _main(a, argv) -> int:
    from model.cli.args import UserError, output_folder

    output_folder("--out", a.out)
    if a.device is None:
        a.device = "cpu" if a.smoke else "auto"
    if a.worker == "dit":
        a.per_gpu_batch = a.per_gpu_batch or 1
        a.lr = a.lr if a.lr is not None else (1e-3 if a.smoke else 1e-4)
        _dit_worker(a)
        return 0
    if a.gpus is None:
        a.gpus = 2 if a.smoke or not torch.cuda.is_available() else torch.cuda.device_count()
    if a.gpus < 2:
        raise UserError("--gpus: the report compares 1 GPU with N >= 2 GPUs; give --gpus 2 or more")
    if not a.smoke and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here: the report needs CUDA GPUs; use --smoke on a CPU")
    if not a.smoke and torch.cuda.device_count() < a.gpus:
        raise UserError(f"--gpus {a.gpus}: only {torch.cuda.device_count()} GPUs are visible; give --gpus "
                        f"{torch.cuda.device_count()} or fewer")
    a.vae_resolution = a.vae_resolution or (32 if a.smoke else 256)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    command = "python -m model.reports.multi_gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    records = run_report(a, command)
    print(markdown(records))
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
