"""Rectified flow for the sparse DiT: the training objective, timestep sampling, condition dropout, and the released
Euler sampler with its exact timestep schedule.

Convention (DESIGN.md 4, RELEASED_MODEL.md A.4): ``x_t = (1 - t) x_0 + t * noise`` for ``t`` in [0, 1] (``t = 1`` is
pure noise); the model predicts the velocity ``d x_t / d t = noise - x_0`` and is fed the timestep as ``t * 1000``.

Training timesteps are drawn **logit-normal** by default (``t = sigmoid(n)``, ``n ~ N(mean, std)``; Esser et al.
2024, "Scaling Rectified Flow Transformers", found it the best of the samplers they compared): the velocity target is
hardest to predict in the middle of the path and nearly trivial at the ends (at ``t -> 1`` the optimum is ``noise -
E[x_0]``, at ``t -> 0`` it is read off ``x_t``), so the density puts the training signal where the loss is largest
while still covering both ends. ``"uniform"`` is the alternative. ``shift`` (default 1, no change) maps the drawn
``t`` with the same ``s t / (1 + (s - 1) t)`` the released sampler uses, pushing training towards the noisy end for
large token counts.

Classifier-free guidance: during training the condition of each batch element is replaced with zeros with
probability ``cond_drop_prob`` (the released sampler's unconditional input is an all-zero tensor of the condition's
shape); at sampling ``v = v_uncond + g (v_cond - v_uncond)`` from two forwards, whenever ``guidance > 0``.

Sampler (:class:`FlowMatchEulerScheduler`, :func:`euler_sample`): diffusers' ``FlowMatchEulerDiscreteScheduler``
with default options, as the released pipeline runs it: the 1000 training sigmas ``k / 1000`` are shifted; then
``set_timesteps(n)`` spaces ``n`` values evenly between the shifted ``sigma_max = 1`` and ``sigma_min``, and shifts
them **again** (the shift is applied twice to the low end), appends 0; the model sees ``sigma * 1000`` (rounded to
float16, as the released pipeline's fp16 timestep tensor does, unless ``timestep_dtype`` says otherwise) and each
step is ``x += (sigma_next - sigma) * v`` in float32. Noise is drawn on the CPU from a seeded generator, so a seed
gives the same sample on every device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .sparse.tensor import SparseTensor

__all__ = [
    "TIMESTEP_MODES",
    "FlowMatchEulerScheduler",
    "drop_condition",
    "euler_sample",
    "flow_loss",
    "interpolate",
    "sample_timesteps",
    "shift_sigmas",
    "velocity_target",
]

#: ``mode=`` values of :func:`sample_timesteps`.
TIMESTEP_MODES = ("logit_normal", "uniform")
#: Training timesteps of the released schedulers.
NUM_TRAIN_TIMESTEPS = 1000
#: Released timestep shift by latent resolution (64^3 -> 6, 128^3 -> 8).
RELEASED_SHIFT = {64: 6.0, 128: 8.0}


def _generator_device(generator: torch.Generator | None) -> str:
    return "cpu" if generator is None else generator.device.type


def shift_sigmas(sigma, shift: float):
    """``shift * s / (1 + (shift - 1) * s)`` (tensor or array)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t noise``; ``t`` broadcast against ``x0`` (e.g. ``[N, 1]`` per token)."""
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity ``noise - x0``."""
    return noise - x0


def sample_timesteps(n: int, *, mode: str = "logit_normal", mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``n`` training timesteps in (0, 1), float32 (module docstring for the choice of ``mode``)."""
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"mode must be one of {TIMESTEP_MODES}, got {mode!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    gdev = _generator_device(generator)
    if mode == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=gdev) * std + mean)
    else:
        t = torch.rand(n, generator=generator, device=gdev)
    if shift != 1.0:
        t = shift_sigmas(t, shift)
    return t.to(device) if device is not None else t


def drop_condition(cond, drop_prob: float, *, generator: torch.Generator | None = None):
    """Classifier-free-guidance dropout: each batch element's condition is zeroed with probability ``drop_prob``.

    ``cond``: a ``[B, L, C]`` tensor or a :class:`~model.nets.dit.Condition`. Returns ``(cond', keep [B] bool)``.
    """
    from model.nets.dit import Condition

    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob!r}")
    tokens = cond.tokens if isinstance(cond, Condition) else cond
    b = tokens.shape[0]
    keep = torch.rand(b, generator=generator, device=_generator_device(generator)) >= drop_prob
    keep = keep.to(tokens.device)
    if isinstance(cond, Condition):
        return cond.drop(keep), keep
    return cond * keep.view(-1, 1, 1).to(cond.dtype), keep


def flow_loss(model: Callable, x0: SparseTensor, cond, *, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              timestep_mode: str = "logit_normal", timestep_shift: float = 1.0, cond_drop_prob: float = 0.0,
              logit_mean: float = 0.0, logit_std: float = 1.0) -> dict:
    """Rectified-flow loss of ``model(x_t, t * 1000, cond)`` against ``noise - x0``.

    Args:
        model: the DiT (``SparseTensor``, timesteps ``[B]`` in 0..1000, condition) -> velocity ``SparseTensor``.
        x0: clean latents ``[N, C]`` (several batch elements packed).
        cond: condition ``[B, L, Cc]`` or :class:`~model.nets.dit.Condition`.
        t: ``[B]`` timesteps in [0, 1] (drawn with :func:`sample_timesteps` when None).
        noise: ``[N, C]`` (drawn from ``generator`` when None).
        cond_drop_prob: classifier-free-guidance dropout probability.

    Returns ``{"loss": mean squared error over tokens and channels (float32 or wider), "loss_per_element": [B],
    "t": [B]}``.
    """
    if not isinstance(x0, SparseTensor):
        raise TypeError(f"x0 must be a SparseTensor, got {type(x0).__name__}")
    b = x0.batch_size
    dev = x0.device
    if t is None:
        t = sample_timesteps(b, mode=timestep_mode, shift=timestep_shift, mean=logit_mean, std=logit_std,
                             generator=generator)
    t = t.to(dev, torch.float32)
    if t.shape != (b,):
        raise ValueError(f"t must have shape [{b}], got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x0.feats.shape, generator=generator, device=_generator_device(generator))
    noise = noise.to(dev, x0.dtype)
    if cond_drop_prob > 0:
        cond, _ = drop_condition(cond, cond_drop_prob, generator=generator)
    t_tok = t.index_select(0, x0.batch_index).unsqueeze(1).to(x0.dtype)
    xt = x0.replace(interpolate(x0.feats, noise, t_tok))
    pred = model(xt, t * NUM_TRAIN_TIMESTEPS, cond)
    cdt = torch.promote_types(pred.dtype, torch.float32)
    err = (pred.feats.to(cdt) - velocity_target(x0.feats, noise).to(cdt)).square().mean(1)  # [N]
    per_elem = torch.zeros(b, dtype=cdt, device=dev).index_add(0, x0.batch_index, err)
    counts = x0.batch_counts.to(cdt).clamp_min(1)
    return {"loss": err.mean(), "loss_per_element": per_elem / counts, "t": t}


def _linspace64(start: float, stop: float, num: int) -> torch.Tensor:
    """``numpy.linspace`` in float64 (as diffusers computes the schedule), torch's when numpy is missing."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency; the GPU report may run without it
        return torch.linspace(start, stop, num, dtype=torch.float64)
    return torch.from_numpy(np.linspace(start, stop, num))


@dataclass(frozen=True)
class FlowMatchEulerScheduler:
    """The released sampler's schedule (diffusers ``FlowMatchEulerDiscreteScheduler``, default options; module
    docstring). ``shift`` 6 for 64^3 latents, 8 for 128^3 (:data:`RELEASED_SHIFT`)."""

    shift: float = 6.0
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift!r}")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")

    def _train_sigma_range(self) -> tuple[float, float]:
        n = self.num_train_timesteps
        ts = torch.linspace(1, n, n, dtype=torch.float32).flip(0)
        sig = shift_sigmas(ts / n, self.shift)  # float32, as the scheduler holds them
        return float(sig[0]), float(sig[-1])

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """``[num_steps + 1]`` float32: the schedule from 1 down to the doubly shifted ``sigma_min``, then 0."""
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        n = self.num_train_timesteps
        sigma_max, sigma_min = self._train_sigma_range()
        ts = _linspace64(sigma_max * n, sigma_min * n, num_steps)
        sig = shift_sigmas(ts / n, self.shift).to(torch.float32)
        return torch.cat([sig, torch.zeros(1)])

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """``[num_steps]`` float32 timesteps ``sigma * 1000`` fed to the model."""
        return self.sigmas(num_steps)[:-1] * self.num_train_timesteps


#: Largest token count for which ``euler_sample(batched_guidance="auto")`` runs the two guidance passes as one
#: batched forward. Measured on an H100 (reports/dit_runs/3c91e92_full_baseline.md, released-size DiT, bf16): at
#: 19,000 tokens one batched forward took 131 ms against 185 ms for two forwards; at 137,124 tokens they were even
#: (1,084 vs 1,076 ms) and the batched one needs 7.0 GB against 4.6 GB. With the inference blocks
#: (reports/dit_runs/143e3d2_sampling.md): 98.5 against 103.8 ms at 19,000 tokens, 975.6 against 976.9 ms (7.1 against
#: 4.7 GB) at 137,124.
BATCHED_GUIDANCE_MAX_TOKENS = 65536


@torch.no_grad()
def euler_sample(
    model: Callable,
    x: SparseTensor,
    cond,
    *,
    uncond=None,
    steps: int = 30,
    guidance: float = 7.0,
    shift: float = 6.0,
    seed: int | None = 0,
    noise: torch.Tensor | None = None,
    timestep_dtype: torch.dtype | None = torch.float16,
    progress: bool = False,
    callback: Callable | None = None,
    batched_guidance: bool | str = "auto",
) -> SparseTensor:
    """Sample latents on ``x``'s coordinates with the released Euler sampler and classifier-free guidance.

    Args:
        model: the DiT: ``model(x_t, t [B] in 0..1000, cond) -> velocity``.
        x: a SparseTensor giving the coordinates (its features are ignored; its number of channels is the latent
            width). Every step reuses ``x``'s coordinate cache (block layout built once).
        cond: the condition (``[B, L, C]`` or :class:`~model.nets.dit.Condition`); ``uncond`` defaults to zeros of the
            same shape (:meth:`~model.nets.dit.Condition.zeros_like`).
        steps, guidance, shift: Euler steps, guidance scale (CFG whenever ``guidance > 0``: two forwards per step),
            timestep shift (6 at 64^3, 8 at 128^3).
        seed: seeds the initial noise (drawn on the CPU, float32); or pass ``noise [N, C]``.
        timestep_dtype: the dtype the timestep is rounded through before the model sees it (float16 as released;
            None keeps float32).
        callback: called as ``callback(step, sigma, x_t)`` after each step.
        batched_guidance: for a model with ``guided_velocity`` (:meth:`model.nets.dit.SparseDiT.guided_velocity`)
            and the default zeroed ``uncond``, the guided velocity comes from it: one forward over the conditioned
            and unconditioned copies (``True``) or two forwards (``False``), the unconditioned rows skipping the
            cross-attention either way; ``"auto"`` batches below :data:`BATCHED_GUIDANCE_MAX_TOKENS` tokens. Other
            models: two forwards.

    Returns the sampled ``x_0`` as a SparseTensor on ``x``'s coordinates (float32).
    """
    from model.nets.dit import Condition

    if not isinstance(x, SparseTensor):
        raise TypeError(f"x must be a SparseTensor, got {type(x).__name__}")
    if noise is None:
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        noise = torch.randn(x.feats.shape, generator=gen)
    if noise.shape != x.feats.shape:
        raise ValueError(f"noise must have shape {tuple(x.feats.shape)}, got {tuple(noise.shape)}")
    fused_guidance = guidance > 0 and uncond is None and hasattr(model, "guided_velocity")
    if fused_guidance and not isinstance(cond, Condition):
        cond = Condition(cond)  # one object for the whole run: it keeps the condition's projections
    if uncond is None and guidance > 0:
        uncond = cond.zeros_like() if isinstance(cond, Condition) else torch.zeros_like(cond)
    sched = FlowMatchEulerScheduler(shift=shift)
    sigmas = sched.sigmas(steps).tolist()
    latent = noise.to(x.device, torch.float32)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    b = x.batch_size
    batched = x.num_voxels <= BATCHED_GUIDANCE_MAX_TOKENS if batched_guidance == "auto" else bool(batched_guidance)
    for i in it:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = torch.full((b,), sigma * NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
        if timestep_dtype is not None:
            t = t.to(timestep_dtype).to(torch.float32)
        t = t.to(x.device)
        xt = x.replace(latent.to(x.dtype))
        if fused_guidance:
            v = model.guided_velocity(xt, t, cond, guidance, batched=batched).feats
        else:
            v = model(xt, t, cond).feats.float()
            if guidance > 0:
                v_u = model(xt, t, uncond).feats.float()
                v = v_u + guidance * (v - v_u)
        latent = latent + (sigma_next - sigma) * v
        if callback is not None:
            callback(i, sigma, x.replace(latent))
    return x.replace(latent)
