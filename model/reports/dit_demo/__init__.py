"""The sparse DiT's learning demonstration: a VAE and a small image-conditioned DiT trained on ~100 real meshes
(pybullet's objects) with rendered views; shapes generated from the training images must come back (memorisation
proves that the whole loop works: data, VAE latents, image conditioning, SSA training, sampling, decoding,
extraction), and held-out images are reported without a bar.

``python -m model.reports.dit_demo --stage STAGES --out DIR [options]``; ``STAGES`` is one stage or a comma list of
``render``, ``data``, ``vae``, ``dit``, ``sample`` (run in that order), or ``all``. Every stage reads what the
earlier ones left in ``DIR``, so a machine that allows 10 minutes per command runs them as consecutive calls:

1. ``render`` (the CPU machine, pyrender through EGL; the GPU machine has no pyrender): ``--views`` RGBA views per
   mesh (:func:`model.data.render.render_views`, ``--view-size`` px, elevation 20 degrees, azimuths 30 + k 360 / views)
   of the first ``--count`` meshes of ``--meshes`` into ``--views-dir`` (``NAME/view_XX.png`` + ``views.json``).
   Views ``0 .. --train-views - 1`` condition the training; the others are held out.
2. ``data``: the sparse SDF of every mesh at ``--resolution`` (band ``--tau``), ``--workers`` processes, cached
   in ``DIR/sdf_cache``; the name-hash split of :mod:`model.data.dataset` holds out ``--held-out-fraction``
   (the same split for the VAE and the DiT: held-out meshes are unseen by both).
3. ``vae``: :func:`model.training.vae.train` for ``--vae-time-limit`` minutes (the setup of ``model.reports.vae``:
   preset ``base``, batch 4, AdamW 1e-3, 200 warm-up steps, cosine annealed to the time limit, bf16), into
   ``DIR/vae``.
   ``--vae CKPT`` reuses a trained VAE instead (then this stage does nothing).
4. ``dit``: the first call encodes every mesh with the VAE (posterior mean and log-variance on the latent voxels,
   ``DIR/dit_data/NAME/latent.npz``) and writes the training manifest of :mod:`model.training.dit_data` (training
   meshes, training views); then :func:`model.training.dit.train` runs for ``--dit-time-limit`` minutes, resuming
   from the last checkpoint. Call it again to continue, until ``--dit-total-time-limit`` minutes of DiT training are
   spent (a call after that does nothing). The frozen image encoder's features of every conditioning view are computed once per call
   and looked up during training (:class:`CachedEncoder`: exact, keyed by the image's pixels; the DiT trainer's
   encoder is swapped for it while it runs), instead of a ViT-L forward pass on every training step.
5. ``sample``: for every training mesh, a shape generated from one of its training views, and for held-out
   images (views of training meshes never used in training; every view of the held-out meshes) with the **real
   latent coordinates of the target mesh** (the dense structure stage that predicts them does not exist yet):
   Euler sampling (``--sample-steps``, ``--shift``, ``--guidance``), VAE decoding, brick-wise marching cubes,
   F-score at 1/128 and Chamfer distance against the ground-truth mesh with the outer-surface evaluation of
   :func:`model.pipeline.reconstruct.evaluate_mesh` (``--eval-workers`` processes). References on the same coordinates:
   the VAE's own reconstruction (the posterior mean decoded: a perfect DiT's result) and the latents set to the
   training mean ("coordinates only": what the given coordinates alone yield). Ablations on some training meshes:
   no image (the zeroed condition) and other guidance scales. Writes ``DIR/report/dit_demo.md``,
   ``dit_demo.json``, side-by-side renders (conditioning view, ground truth, generated, VAE reconstruction;
   thumbnails of :func:`model.pipeline.preview.render_mesh`) and the loss curves.
6. ``report``: rewrites ``DIR/report/dit_demo.md`` from ``dit_demo.json`` (no model is loaded; ``sample`` already
   wrote it, this is for a report whose text changed after the run).

The bar (the issue's): mean F-score >= 0.7 on the shapes generated from the training images.

The image encoder is DINOv2 ViT-L/14 with registers built from its configuration with **random weights** (seeded,
frozen: a fixed function of the image, not DINOv2 features): no machine here can download DINOv2 weights
(``--encoder-size``/``--encoder-seed``; the report says so).

The DiT (``--dit-*``; reasons in :data:`DIT_CHOICES`): width 512, 8 blocks, 16 query heads of 32 and 2 kv heads
(the released head size and kv count), MLP ratio 4, SSA with 4^3 compression blocks (v1.1 compression), 8^3
selection blocks top-8 and 8^3 windows (shifted on odd blocks), through the Triton kernels on the GPU; about 47M
parameters. AdamW 3e-4 after 200 warm-up steps, constant, EMA 0.999, batches of 40,960 tokens (at most 16 shapes),
condition dropout 0.1, logit-normal timesteps, posterior means normalised per channel, bf16 autocast.

GPU sequence (one H100, each call under 10 minutes, the machine kept warm between them; ``DIR`` outside the
repository, e.g. ``/root/runs/dit_demo``)::

    python -m model.reports.dit_demo --stage render --meshes data_cache/meshes --count 100      # CPU machine, once
    python -m model.reports.dit_demo --stage data,vae --meshes data_cache/meshes --out DIR      # ~0.5 + 7 min
    python -m model.reports.dit_demo --stage dit --meshes data_cache/meshes --out DIR           # ~1 + 7.5 min
    python -m model.reports.dit_demo --stage dit --meshes data_cache/meshes --out DIR           # ~0.5 + 7.5 min
    python -m model.reports.dit_demo --stage sample --meshes data_cache/meshes --out DIR        # ~3 min

``--smoke``: the whole loop on the CPU at toy size (32^3, tiny models, a few steps, the numpy rasteriser), for the
tests; its figures mean nothing.

Modules: :mod:`.config` (options, constants, shared helpers), :mod:`.encoder` (the encoder feature cache),
:mod:`.stages` (steps 1-4), :mod:`.sample` (step 5: generation and evaluation), :mod:`.report` (the report,
step 6), :mod:`.cli` (the driver and the command line).
"""
from __future__ import annotations

from model.reports.dit_demo.cli import build_parser, main, run
from model.reports.dit_demo.config import BAR, DIT_CHOICES, SMOKE, STAGES, DemoConfig
from model.reports.dit_demo.encoder import CachedEncoder
from model.reports.dit_demo.report import KINDS, stage_report
from model.reports.dit_demo.sample import stage_sample
from model.reports.dit_demo.stages import (
    dit_train_config,
    prepare_latents,
    stage_data,
    stage_dit,
    stage_render,
    stage_vae,
)

__all__ = [
    "BAR",
    "DIT_CHOICES",
    "KINDS",
    "SMOKE",
    "STAGES",
    "CachedEncoder",
    "DemoConfig",
    "build_parser",
    "dit_train_config",
    "main",
    "prepare_latents",
    "run",
    "stage_data",
    "stage_dit",
    "stage_render",
    "stage_report",
    "stage_sample",
    "stage_vae",
]
