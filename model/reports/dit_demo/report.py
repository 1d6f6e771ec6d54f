"""The DiT demonstration's report (package docstring, steps 5-6): the summary per set of shapes, ``dit_demo.json``,
``dit_demo.md`` (with the commit it ran on, :func:`model.io.commit_label`), the side-by-side figures and the copied
loss curves; :func:`stage_report` rewrites the markdown from the JSON alone."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from model.io import atomic_write, atomic_write_json, atomic_write_text, commit_label
from model.reports.dit_demo.config import BAR, DIT_CHOICES, DemoConfig, _json_safe
from model.reports.dit_demo.stages import _dit_calls


def _summary(rows: list[dict]) -> dict:
    """Count, F-score statistics, share at the bar, Chamfer, normal consistency, latent error of one set of rows."""
    f = np.array([r["fscore"] for r in rows], dtype=np.float64)
    cd = np.array([r["chamfer"] for r in rows if r["chamfer"] is not None and math.isfinite(r["chamfer"])])
    nc = np.array([r["normal_consistency"] for r in rows], dtype=np.float64)
    if len(f) == 0:
        return dict(count=0)
    le = [r["latent_error"] for r in rows if isinstance(r.get("latent_error"), float)]
    return dict(count=len(f), latent_error_mean=float(np.mean(le)) if le else float("nan"),
                fscore_mean=float(f.mean()), fscore_median=float(np.median(f)),
                fscore_min=float(f.min()), fscore_max=float(f.max()), share_at_bar=float((f >= BAR).mean()),
                chamfer_mean=float(cd.mean()) if len(cd) else float("nan"), normal_consistency_mean=float(nc.mean()),
                empty=int(sum(bool(r["empty"]) for r in rows)))


#: The kinds of stage ``sample`` in the report's order, with their descriptions.
KINDS = {
    "train_image": "training meshes, generated from a training view (the bar)",
    "train_shape_unseen_view": "training meshes, generated from a view never used in training",
    "held_out_shape": "held-out meshes (unseen by the VAE and the DiT), every view",
    "train_no_image": "training meshes, generated without an image (zeroed condition: the unconditional model)",
    "coords_only": "no DiT: the latents set to the training mean on the true coordinates (training + held-out)",
    "vae_reconstruction": "no DiT: the VAE's posterior mean decoded (a perfect DiT's result; training + held-out)",
}


def _report(cfg, device, items, jobs, results, *, dit, meta, vae, vae_meta, timings) -> dict:
    from model.reports.vae import environment
    from model.training.common import read_jsonl

    out = cfg.report_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for j in jobs:
        r = {k: v for k, v in results[j["key"]].items() if k not in ("thumb", "gt_thumb")}
        rows.append(dict(kind=j["kind"], name=items[j["item"]]["name"], split=items[j["item"]]["split"],
                         view=j["view"], guidance=j["guidance"], tokens=items[j["item"]]["tokens"], **r))
    kinds = list(KINDS) + sorted({j["kind"] for j in jobs} - set(KINDS))
    summary = {k: _summary([r for r in rows if r["kind"] == k]) for k in kinds}
    summary = {k: v for k, v in summary.items() if v.get("count")}
    records = read_jsonl(cfg.dit_dir / "metrics.jsonl")
    train_recs = [r for r in records if "loss" in r]
    calls = _dit_calls(cfg)
    secs = [r["sec"] for r in train_recs if isinstance(r.get("sec"), (int, float))]
    last = [r["loss"] for r in train_recs[-50:]]
    vae_summary_path = cfg.root / "vae" / "summary.json"
    vae_summary = json.loads(vae_summary_path.read_text()) if vae_summary_path.is_file() else None
    data = json.loads((cfg.root / "data.json").read_text()) if (cfg.root / "data.json").is_file() else {}
    views = json.loads((Path(cfg.views_dir) / "views.json").read_text()) if (
        Path(cfg.views_dir) / "views.json").is_file() else {}
    training = dict(
        steps=train_recs[-1]["step"] if train_recs else 0, calls=calls,
        train_seconds=sum(c.get("seconds", 0.0) for c in calls),
        seconds_per_step_median=float(np.median(secs)) if secs else float("nan"),
        tokens_per_step_mean=float(np.mean([r["tokens"] for r in train_recs])) if train_recs else float("nan"),
        shapes_per_step_mean=float(np.mean([r["batch"] for r in train_recs])) if train_recs else float("nan"),
        final_loss=float(np.mean(last)) if last else float("nan"),
        first_loss=float(np.mean([r["loss"] for r in train_recs[:50]])) if train_recs else float("nan"),
        parameters=sum(p.numel() for p in dit.parameters()), dit_config=meta.get("dit_config"),
        train_config=meta.get("train_config"), encoder=meta.get("encoder"))
    for src, name in ((cfg.dit_dir / "loss.png", "dit_loss.png"), (cfg.root / "vae" / "loss.png", "vae_loss.png")):
        if src.is_file():
            shutil.copyfile(src, out / name)
    figures = []
    fig_train = [j for j in jobs if j["kind"] == "train_image" and j["thumbs"]]
    fig_held = [j for j in jobs if j["kind"] == "held_out_shape" and j["thumbs"]]
    for name, chosen, title in (("dit_demo_train.png", fig_train, "training meshes, from a training view"),
                                ("dit_demo_held_out.png", fig_held, "held-out meshes (no bar)")):
        if chosen:
            _figure(cfg, items, chosen, jobs, results, out / name, title)
            figures.append(name)
    bar_f = summary.get("train_image", {}).get("fscore_mean", float("nan"))
    doc = dict(
        environment=environment(device), config=dataclasses.asdict(cfg), smoke=cfg.smoke, bar=BAR,
        bar_met=bool(bar_f >= BAR), summary=summary, kinds=KINDS, rows=rows, training=training,
        vae=dict(checkpoint=str(cfg.vae_checkpoint), config=vae_meta.get("vae_config"), data=vae_meta.get("data"),
                 summary={k: vae_summary[k] for k in ("steps", "train_seconds", "seconds_per_step", "validation",
                                                      "parameters", "train_meshes", "stopped") if k in vae_summary}
                 if vae_summary else None),
        data=dict(meshes=len(items), train=sum(it["split"] == "train" for it in items),
                  held_out=sum(it["split"] == "held_out" for it in items),
                  tokens_mean=float(np.mean([it["tokens"] for it in items])),
                  tokens_min=int(min(it["tokens"] for it in items)), tokens_max=int(max(it["tokens"] for it in items)),
                  sdf_seconds=data.get("seconds"), views=dict((k, views.get(k)) for k in
                                                               ("views", "size", "backend", "elevation", "bytes"))),
        timings=timings, figures=figures, dit_choices=DIT_CHOICES)
    atomic_write_json(out / "dit_demo.json", _json_safe(doc))
    atomic_write_text(out / "dit_demo.md", _markdown(doc, cfg))
    return doc


def stage_report(cfg: DemoConfig, device: torch.device) -> str:
    """Rewrite ``dit_demo.md`` from ``dit_demo.json`` (package docstring, step 6); returns the markdown."""
    path = cfg.report_dir / "dit_demo.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run --stage sample first")
    md = _markdown(json.loads(path.read_text()), cfg)
    atomic_write_text(cfg.report_dir / "dit_demo.md", md)
    print(f"report: rewrote {cfg.report_dir / 'dit_demo.md'}")
    return md


def _figure(cfg, items, chosen, jobs, results, path: Path, title: str) -> None:
    """Rows of (conditioning view, ground truth, generated, VAE reconstruction)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    vae_by_item = {j["item"]: results[j["key"]] for j in jobs if j["kind"] == "vae_reconstruction"}
    cols = ("conditioning view", "ground truth", "generated (DiT)", "VAE reconstruction")
    fig, axes = plt.subplots(len(chosen), 4, figsize=(10.0, 2.5 * len(chosen) + 0.5), squeeze=False)
    for r, j in enumerate(chosen):
        res, it = results[j["key"]], items[j["item"]]
        rgba = np.asarray(Image.open(cfg.data_dir / it["views"][j["view"]]).convert("RGBA"), dtype=np.float64) / 255
        view = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        vae_res = vae_by_item.get(j["item"], {})
        panels = [(view, f"view {j['view']}"), (res["gt_thumb"], f"{it['tokens']} latent tokens"),
                  (res["thumb"], f"F {res['fscore']:.3f}  CD {_num(res['chamfer'], '.4f')}"),
                  (vae_res.get("thumb"), f"F {vae_res.get('fscore', float('nan')):.3f}")]
        for c, (img, caption) in enumerate(panels):
            ax = axes[r, c]
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=7)
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(it["name"], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _num(value, fmt: str) -> str:
    """``value`` formatted with ``fmt``, or ``n/a`` when it is not a finite number."""
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else format(value, fmt)


def _reading(s: dict) -> list[str]:
    """What the summary rows say together (the part of the report a reader would otherwise have to work out)."""
    def mean(kind):
        return (s.get(kind) or {}).get("fscore_mean", float("nan"))

    train, no_image, coords = mean("train_image"), mean("train_no_image"), mean("coords_only")
    out = [f"Reading the rows: with no DiT, the true coordinates alone give a mean F-score of {_num(coords, '.3f')}, "
           f"so the shapes come from the latents the DiT generates ({_num(train, '.3f')} from a training view)."]
    if math.isfinite(no_image) and math.isfinite(train):
        if no_image >= train - 0.05:
            out.append(f"Without the image the DiT does as well ({_num(no_image, '.3f')}): on its true latent "
                       "coordinates a training shape is identified by those coordinates, so this run shows that the "
                       "loop works (VAE latents, SSA training, sampling, decoding, extraction), not that the image "
                       "condition is used. Telling shapes apart by the image needs coordinates that do not give the "
                       "shape away: the dense structure stage's, or several shapes on the same coordinates.")
        else:
            out.append(f"Without the image the DiT drops to {_num(no_image, '.3f')}: the image condition carries "
                       "part of the shape.")
    return out


def _markdown(doc: dict, cfg: DemoConfig) -> str:
    """``dit_demo.md`` from the ``dit_demo.json`` document ``doc``."""
    env, s, tr, d = doc["environment"], doc["summary"], doc["training"], doc["data"]
    dc, tc = tr.get("dit_config") or {}, tr.get("train_config") or {}
    vs = (doc["vae"].get("summary") or {})
    val = vs.get("validation") or {}
    bar = s.get("train_image", {})
    lines = [
        "# Sparse DiT: learning demonstration",
        "",
        f"- date: {env['date']}; device: {env.get('gpu') or env['device']}; torch {env['torch']} (CUDA {env['cuda']})",
        f"- {commit_label(env)}",
        "- command sequence: `python -m model.reports.dit_demo --stage render|data,vae|dit|dit|sample` (module docstring)"
        + (" — **SMOKE RUN** (CPU, toy sizes, a few steps: the numbers mean nothing)" if doc["smoke"] else ""),
        "",
        f"**Bar** (mean F-score at 1/128 >= {BAR} on the shapes generated from the training images): "
        f"**{'met' if doc['bar_met'] else 'NOT met'}** — mean {_num(bar.get('fscore_mean'), '.3f')}, median "
        f"{_num(bar.get('fscore_median'), '.3f')}, min {_num(bar.get('fscore_min'), '.3f')}, "
        f"{_num(100 * bar.get('share_at_bar', float('nan')), '.0f')}% of the {bar.get('count', 0)} training meshes "
        f"at >= {BAR}.",
        "",
        "What this is and is not:",
        "",
        "- The image encoder is DINOv2 ViT-L/14 with registers **with random weights** (seeded "
        f"{_num((tr.get('encoder') or {}).get('seed'), 'd')}, frozen): a fixed function of the image, not DINOv2 "
        "features. No machine here can download DINOv2 weights.",
        "- Every shape is generated on the **real latent coordinates of its target mesh**: the dense structure stage "
        "that predicts them does not exist yet. The coordinates alone fix the occupied 8^3-voxel cells; the "
        "*coordinates only* row shows what they yield with no DiT, the *no image* row what the DiT makes of them "
        "without the image.",
        "- Memorisation (training images) is the bar; held-out images are reported without one.",
        "",
        "## Results",
        "",
        f"F-score at 1/128 of the unit cube ({cfg.resolution / 128:g} voxels at {cfg.resolution}^3), Chamfer distance "
        "(unit-cube units) and normal consistency against the ground-truth mesh, from "
        f"{cfg.points:,} surface points per mesh, ground-truth points buried inside the shape left out "
        "(`model.pipeline.reconstruct.evaluate_mesh`). Sampling: "
        f"{cfg.sample_steps} Euler steps, shift {cfg.shift:g}, "
        + (f"classifier-free guidance {cfg.guidance:g}" if cfg.guidance > 1 else "no classifier-free guidance "
           "(the conditional velocity)") + f", {cfg.weights.upper()} weights, one seeded noise per shape.",
        "",
        "| set | meshes | mean F | median F | min F | share >= 0.7 | mean Chamfer | normal cons. | latent error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, v in s.items():
        label = doc["kinds"].get(kind) or (f"training meshes from a training view, guidance {kind.rsplit('_', 1)[-1]} "
                                           "(ablation)" if kind.startswith("train_image_guidance_") else kind)
        lines.append(f"| {label} | {v['count']} | "
                     f"{_num(v['fscore_mean'], '.3f')} | {_num(v['fscore_median'], '.3f')} | "
                     f"{_num(v['fscore_min'], '.3f')} | {_num(100 * v['share_at_bar'], '.0f')}% | "
                     f"{_num(v['chamfer_mean'], '.4f')} | {_num(v['normal_consistency_mean'], '.3f')} | "
                     f"{_num(v.get('latent_error_mean'), '.3f')} |")
    lines += ["", "*Latent error*: the generated latents' distance to the target's posterior mean, relative to the "
              "target's norm, both in the DiT's normalised units (the training mean gives 1).", "", *_reading(s), ""]
    for name in doc["figures"]:
        lines += [f"![{name}]({name})", ""]
    lines += [
        "## Setup",
        "",
        f"- data: {d['meshes']} meshes of `{cfg.meshes}` ({d['train']} training, {d['held_out']} held out by name hash, the "
        f"same split for the VAE and the DiT); sparse SDF at {cfg.resolution}^3 (tau {cfg.tau:g} voxels); "
        f"{d['tokens_min']:,}-{d['tokens_max']:,} latent tokens per shape (mean {d['tokens_mean']:,.0f}); views: "
        f"{(d.get('views') or {}).get('views')} per mesh, {(d.get('views') or {}).get('size')} px RGBA "
        f"({(d.get('views') or {}).get('backend')}), views 0-{cfg.train_views - 1} for training, the others held out",
        f"- VAE: `{cfg.vae or 'trained here'}`; "
        + (f"{vs.get('parameters', 0):,} parameters, {vs.get('steps')} steps in {_num(vs.get('train_seconds'), '.0f')} "
           f"s, held-out F-score {_num(val.get('fscore'), '.3f')} on {len(val.get('meshes') or [])} meshes at the end "
           "of training" if vs else "reused checkpoint"),
        f"- DiT: {tr['parameters']:,} parameters; width {dc.get('model_channels')}, {dc.get('num_blocks')} blocks, "
        f"{dc.get('num_heads')} query heads, {dc.get('num_kv_heads')} kv heads, MLP ratio {dc.get('mlp_ratio')}; SSA "
        f"({dc.get('backend')}): compression {dc.get('compression_version')} on {dc.get('compression_block')}^3, "
        f"selection {dc.get('selection_block')}^3 top-{dc.get('topk')}, window {dc.get('window')}^3; latent grid "
        f"{dc.get('resolution')}^3, position factor {dc.get('pos_factor')}",
        f"- DiT training: {tr['steps']:,} steps in {_num(tr['train_seconds'] / 60, '.1f')} min over "
        f"{len(tr['calls'])} calls (median {_num(tr['seconds_per_step_median'], '.3f')} s/step, "
        f"{_num(tr['tokens_per_step_mean'], ',.0f')} tokens and {_num(tr['shapes_per_step_mean'], '.1f')} shapes per "
        f"step); AdamW {tc.get('lr')} ({tc.get('warmup_steps')} warm-up steps, {tc.get('schedule')}), EMA "
        f"{tc.get('ema_decay')}, condition dropout {tc.get('cond_drop_prob')}, {tc.get('precision')}; flow loss "
        f"{_num(tr['first_loss'], '.3f')} (first 50 steps) -> {_num(tr['final_loss'], '.4f')} (last 50)",
        "",
        "Why this DiT: " + doc["dit_choices"],
        "",
        "![DiT loss](dit_loss.png)",
        "",
        "![VAE loss](vae_loss.png)",
        "",
        "## Per mesh",
        "",
        "| mesh | split | tokens | F train view | F unseen view | F no image | F coords only | F VAE |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by = {}
    for r in doc["rows"]:
        by.setdefault(r["name"], {}).setdefault(r["kind"], []).append(r["fscore"])
    split = {r["name"]: (r["split"], r["tokens"]) for r in doc["rows"]}

    def cell(name, *kinds):
        vals = [f for k in kinds for f in by[name].get(k, [])]
        return _num(float(np.mean(vals)), ".3f") if vals else ""

    for name in sorted(by, key=lambda n: (split[n][0] != "train", n)):
        lines.append(f"| {name} | {split[name][0].replace('_', '-')} | {split[name][1]:,} | "
                     f"{cell(name, 'train_image')} | {cell(name, 'train_shape_unseen_view', 'held_out_shape')} | "
                     f"{cell(name, 'train_no_image')} | {cell(name, 'coords_only')} | "
                     f"{cell(name, 'vae_reconstruction')} |")
    t = doc["timings"]
    lines += ["", "(held-out meshes: *F unseen view* is the mean over all their views.)", "",
              f"Stage `sample`: image features {_num(t['features'], '.0f')} s, DiT sampling {_num(t['sampling'], '.0f')} "
              f"s, everything until the metrics {_num(t['total_until_metrics'], '.0f')} s. Every figure: "
              "`dit_demo.json`.", ""]
    return "\n".join(lines)


