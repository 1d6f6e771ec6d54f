"""Rectified flow: the released schedule, the Euler sampler against closed forms, timestep sampling, the loss."""
from __future__ import annotations

import pytest
import torch

from model.nets.dit import Condition
from model.flow import (FlowMatchEulerScheduler, drop_condition, euler_sample, flow_loss, interpolate,
                        sample_timesteps, velocity_target)
from model.sparse import SparseTensor


@pytest.mark.parametrize("shift,steps,head,tail", [
    # reference values of RELEASED_MODEL.md A.4 (diffusers' FlowMatchEulerDiscreteScheduler logic)
    (6.0, 50, [1.0, 0.996561, 0.993001], [0.226538, 0.139257, 0.034783]),
    (6.0, 30, [1.0, 0.994119, 0.987882], [0.201028, 0.034783]),
    (8.0, 15, [1.0, 0.990557, 0.979777], [0.406309, 0.060207]),
])
def test_released_schedule(shift, steps, head, tail):
    s = FlowMatchEulerScheduler(shift).sigmas(steps)
    assert s.dtype == torch.float32 and s.shape == (steps + 1,)
    assert s[-1] == 0
    torch.testing.assert_close(s[:3], torch.tensor(head), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-1 - len(tail):-1], torch.tensor(tail), atol=1e-6, rtol=0)
    assert bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(FlowMatchEulerScheduler(shift).timesteps(steps), s[:-1] * 1000)


def _points(n=40, channels=4, batch=2):
    coords = [torch.stack([torch.arange(n // batch)] * 3, 1).int() for _ in range(batch)]
    return SparseTensor.from_list(coords, [torch.zeros(n // batch, channels) for _ in range(batch)])


class _PointMassField:
    """Exact rectified-flow velocity of a point-mass data distribution at ``mu`` (per condition):
    ``v(x, sigma) = (x - mu) / sigma``. Records the timesteps it is fed."""

    def __init__(self, mu_cond, mu_uncond):
        self.mu_cond, self.mu_uncond, self.ts = mu_cond, mu_uncond, []

    def __call__(self, x, t, cond):
        self.ts.append(t.clone())
        sigma = t[0] / 1000.0
        mu = self.mu_uncond if float(cond.abs().sum()) == 0 else self.mu_cond
        return x.replace((x.feats - mu) / sigma)


def test_euler_lands_on_the_closed_form():
    """With a velocity field that is linear in x, Euler's x_i equals the closed form (1 - s_i) mu + s_i noise at
    every step, and with guidance g it lands on mu_u + g (mu_c - mu_u) (the guided field's point mass)."""
    x = _points()
    mu_c, mu_u = torch.randn(40, 4), torch.randn(40, 4)
    cond = torch.randn(1, 3, 8)
    noise = torch.randn(40, 4)
    sigmas = FlowMatchEulerScheduler(6.0).sigmas(12)
    traj = []
    field = _PointMassField(mu_c, mu_u)
    out = euler_sample(field, x, cond, steps=12, guidance=0.0, shift=6.0, noise=noise, timestep_dtype=None,
                       callback=lambda i, s, xt: traj.append(xt.feats.clone()))
    for i, xt in enumerate(traj):
        s = float(sigmas[i + 1])
        torch.testing.assert_close(xt, (1 - s) * mu_c + s * noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.feats, mu_c, atol=1e-5, rtol=1e-5)
    assert len(field.ts) == 12  # no guidance: one forward per step
    torch.testing.assert_close(torch.stack([t[0] for t in field.ts]), sigmas[:-1] * 1000)

    guided = _PointMassField(mu_c, mu_u)
    out = euler_sample(guided, x, cond, steps=12, guidance=7.0, shift=6.0, noise=noise, timestep_dtype=None)
    torch.testing.assert_close(out.feats, mu_u + 7.0 * (mu_c - mu_u), atol=1e-4, rtol=1e-5)
    assert len(guided.ts) == 24  # two forwards per step


def test_euler_is_seeded_and_rounds_timesteps_like_the_release():
    x = _points()
    field = _PointMassField(torch.zeros(40, 4), torch.zeros(40, 4))
    a = euler_sample(field, x, torch.ones(1, 2, 3), steps=3, guidance=0.0, shift=8.0, seed=7).feats
    b = euler_sample(field, x, torch.ones(1, 2, 3), steps=3, guidance=0.0, shift=8.0, seed=7).feats
    c = euler_sample(field, x, torch.ones(1, 2, 3), steps=3, guidance=0.0, shift=8.0, seed=8).feats
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, atol=1e-3, rtol=0)  # every seed lands near mu (fp16-rounded timesteps)
    t = field.ts[1][0]
    assert t == t.half().float() and t != FlowMatchEulerScheduler(8.0).timesteps(3)[1]


def test_sample_timesteps():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, generator=g)
    assert t.shape == (20000,) and bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03
    u = sample_timesteps(20000, mode="uniform", generator=g)
    assert abs(float(u.mean()) - 0.5) < 0.01
    s = sample_timesteps(20000, mode="uniform", shift=3.0, generator=torch.Generator().manual_seed(1))
    assert float(s.mean()) > 0.6
    with pytest.raises(ValueError, match="mode"):
        sample_timesteps(3, mode="cosine")


def test_drop_condition():
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.ones(1000, 2, 3))
    dropped, keep = drop_condition(cond, 0.25, generator=g)
    assert abs(float((~keep).float().mean()) - 0.25) < 0.05
    assert torch.equal(dropped.tokens[~keep], torch.zeros_like(dropped.tokens[~keep]))
    assert torch.equal(dropped.tokens[keep], cond.tokens[keep])
    plain, _ = drop_condition(torch.ones(4, 2, 3), 1.0, generator=g)
    assert float(plain.abs().sum()) == 0
    with pytest.raises(ValueError, match="drop_prob"):
        drop_condition(cond, 1.5)


def test_flow_loss_matches_its_definition():
    x0 = _points()
    x0 = x0.replace(torch.randn(40, 4))
    noise = torch.randn(40, 4)
    t = torch.tensor([0.25, 0.75])
    seen = {}

    def model(xt, tt, cond):
        seen["xt"], seen["t"] = xt.feats.clone(), tt.clone()
        return xt.replace(torch.zeros_like(xt.feats))

    out = flow_loss(model, x0, torch.zeros(2, 1, 3), t=t, noise=noise)
    tt = torch.where(x0.coords[:, :1] == 0, 0.25, 0.75)
    torch.testing.assert_close(seen["xt"], interpolate(x0.feats, noise, tt))
    torch.testing.assert_close(seen["t"], t * 1000)
    target = velocity_target(x0.feats, noise)
    torch.testing.assert_close(out["loss"], target.square().mean())
    torch.testing.assert_close(out["loss_per_element"], torch.stack([target[:20].square().mean(),
                                                                     target[20:].square().mean()]))
