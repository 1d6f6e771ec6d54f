"""Data-parallel VAE training on the CPU: two gloo processes against one process on the same global batch.

The two ranks train the tiny VAE on a global batch of two samples of different sizes (a box and a rod at 32^3,
split one per rank by the token-balanced partition); one process trains on both samples at once. With the global
normalisation of :func:`model.training.vae.global_vae_loss`, per-sample posterior noise and DDP's gradient mean, both
take the same steps up to float32 rounding. Checkpoints written by either configuration resume in the other.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("igl")
pytest.importorskip("skimage")
trimesh = pytest.importorskip("trimesh")

import torch.distributed as tdist  # noqa: E402

from model.training import common as T  # noqa: E402
from model.training.vae import VAETrainConfig, train  # noqa: E402

#: Tolerances, derived from float32 rounding and Adam's step bound rather than fitted to a measurement. The two
#: configurations compute the same gradients up to float32 summation order (DDP's bucketed all-reduce, the loss
#: assembled from per-rank shares, window attention padded to another length): in float64 the summed shares equal
#: the one-process gradient to 1e-15. With EPS32 the float32 unit roundoff and N the number of terms the losses and
#: gradients sum over (the global batch's decoded voxels, read from the runs' logs: ``_terms``), the random-walk
#: model of rounding gives a relative error of about sqrt(N) * EPS32 for such a sum.
#:
#: * Losses (means over N voxels): relative difference <= SAFETY * sqrt(N) * EPS32.
#: * Every parameter (hard bound, no statistics): Adam's t-th update is at most lr * C_t in absolute value
#:   (``_adam_step_bound``: C_1 = 1, C_4 = 1.0068 for betas (0.9, 0.999); finite for all t since beta1 <
#:   sqrt(beta2); Adam's eps only shrinks it), whatever the gradients are, so two runs from the same initial weights
#:   differ by at most 2 * lr * sum_t C_t (+ the rounding of the updates). Decoupled weight decay is 0 here (checked;
#:   with 0 <= lr * wd <= 2 the bound would still hold).
#: * The bulk of the parameters: Adam's update m_hat / (sqrt(v_hat) + eps) is invariant to the gradient's scale,
#:   so a relative gradient error of sqrt(N) * EPS32 changes a step by about lr * sqrt(N) * EPS32; each run also
#:   rounds theta - lr * update to |theta| * EPS32 / 2. Weight i's allowance after ``steps`` steps is therefore
#:   ``scale_i = steps * EPS32 * (lr * sqrt(N) + |theta_i|)``, and the QUANTILE (99%) of |diff_i| / scale_i must
#:   be <= SAFETY. Not the maximum: a gradient entry that is a cancellation of many terms has a large relative
#:   rounding error and Adam's normalisation turns it into a visibly different step (up to the hard bound), so the
#:   elementwise maximum over ~8e4 weights is a heavy-tailed statistic (measured 2e-6 ... 5e-5 across seeds, i.e.
#:   up to 250 * scale_i), and so is a norm-wise relative difference (dominated by those few entries).
#:
#: Measured on the seed of this test (seed 5; seeds 1, 2, 3, 7, 11 in brackets): 99% quantile of |diff| / scale
#: 0.17 (0.08 ... 0.78), loss differences 5e-8 (up to 6e-7) relative against a bound of ~2e-4. Normalising each
#: rank by its local counts instead of the global ones (the bug this test exists for) gives a 99% quantile of
#: 5e4 ... 7e4 (|diff| 1.4e-2) and loss differences of 1e-2 ... 5e-2. A flipped pruning decision (a prune logit
#: within rounding of the threshold: the untrained model's logits sit around it) is a genuine bifurcation that no
#: rounding tolerance covers (seed 4: one decoded voxel more at step 2, then loss differences of 2e-4 and a 99%
#: quantile of 900): the failure messages show both runs' decoded voxel counts per step to tell it apart.
#:
#: One exception: the key part of the attention's qkv bias has an exactly zero true gradient (softmax ignores a
#: constant added to every score of a query), so its gradient is pure rounding noise that Adam may turn into steps
#: of up to lr in either run: those entries are left out of the quantile (the hard bound holds for them too).
EPS32 = torch.finfo(torch.float32).eps
SAFETY = 10.0
QUANTILE = 0.99
LR = 3e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A box and a rod of clearly different voxel counts, their samples cached up front."""
    from model.data.dataset import SparseSDFDataset

    root = tmp_path_factory.mktemp("dist_meshes")
    trimesh.creation.box(extents=(1.0, 0.7, 0.5)).export(root / "box.obj")
    trimesh.creation.cylinder(radius=0.12, height=1.0, sections=24).export(root / "rod.obj")
    cache = tmp_path_factory.mktemp("dist_cache")
    ds = SparseSDFDataset(str(root), (32,), tau=2.0, cache_dir=str(cache))
    assert not ds.prepare_all(progress=False)["failed"]
    sizes = [len(ds.sample(i, 32)) for i in range(len(ds))]
    assert max(sizes) > 1.3 * min(sizes), sizes  # the ranks really hold different token counts
    return dict(meshes=str(root), cache_dir=str(cache))


#: The decoder's pruning threshold in these runs. With the released 0.5, an untrained pruning head's logits sit
#: around the threshold, and a float32 rounding difference between the two configurations can flip one decision
#: (seen on one seed of seven: 14,140 vs 14,141 decoded voxels), after which the runs legitimately diverge. At 1e-3
#: every child with a logit above -6.9 is kept: no logit of the untrained head comes near that, so the decoded voxel
#: sets are identical by construction, while the extra-voxel SDF loss and the pruning BCE still run and train.
PRUNE_THRESHOLD = 1e-3


def _config(data, out, *, batch_size, steps, resume=False) -> dict:
    return dict(meshes=data["meshes"], cache_dir=data["cache_dir"], resolutions=(32,), model="tiny",
                model_overrides={"prune_threshold": PRUNE_THRESHOLD},
                batch_size=batch_size, steps=steps, lr=LR, warmup_steps=0, schedule="constant", log_every=1,
                ckpt_every=1000, val_every=0, val_meshes=0, held_out_fraction=0.0, out=str(out), progress=False,
                seed=5, resume=resume)


def _worker(rank: int, world: int, init_file: str, jobs: list, dump: str) -> None:
    """One rank: a gloo group through a file (no network), then the ``jobs`` one after another; each job's final
    parameters on this rank go to ``dump/<name>.rank<rank>.pt``."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import model.training.vae as tv

        made = []

        class Recorded(tv.SparseSDFVAE):  # keeps a handle on the model each train() builds
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        tv.SparseSDFVAE = Recorded
        for name, config in jobs:
            summary = tv.train(tv.VAETrainConfig(**config))
            assert summary["world_size"] == world
            torch.save({k: v.detach().clone() for k, v in made[-1].state_dict().items()},
                       os.path.join(dump, f"{name}.rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def _two_ranks(tmp_path, jobs) -> None:
    import torch.multiprocessing as mp

    init_file = tmp_path / "gloo_init"
    if init_file.exists():
        init_file.unlink()
    mp.spawn(_worker, args=(2, str(init_file), jobs, str(tmp_path)), nprocs=2, join=True)


def _train_records(run) -> list[dict]:
    return [r for r in T.read_jsonl(run / "metrics.jsonl") if r.get("kind") == "train"]


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _train_records(run)}


def _params(run) -> dict[str, torch.Tensor]:
    return T.load_checkpoint(run / "checkpoint.safetensors").model


def _terms(*runs) -> int:
    """N of the tolerances: the most voxels (input or decoded, global batch) any step of ``runs`` summed over."""
    return int(max(max(r["voxels"], r["decoded_voxels"]) for run in runs for r in _train_records(run)))


def _decoded(run) -> list[int]:
    return [int(r["decoded_voxels"]) for r in _train_records(run)]


def _key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """Mask of the entries with an exactly zero true gradient: the k third of an attention's qkv bias."""
    mask = torch.zeros_like(value, dtype=torch.bool)
    if name.endswith("attn.to_qkv.bias"):
        c = value.numel() // 3
        mask[c:2 * c] = True
    return mask


def _adam_step_bound(betas, t: int) -> float:
    """The largest ``|update| / lr`` of Adam's ``t``-th step over all gradient sequences: with
    ``m_t = (1 - b1) sum_k b1^k g_(t-k)`` and ``v_t = (1 - b2) sum_k b2^k g_(t-k)^2``, Cauchy-Schwarz gives
    ``|m_t| <= (1 - b1) sqrt(sum_k (b1^2 / b2)^k) sqrt(v_t / (1 - b2))``, so with the bias corrections
    ``|m_hat / sqrt(v_hat)| <= (1 - b1) / (1 - b1^t) * sqrt(sum_(k<t) (b1^2 / b2)^k * (1 - b2^t) / (1 - b2))``;
    sharp (``g_(t-k)`` proportional to ``(b1 / b2)^k``), 1 for ``t = 1``."""
    b1, b2 = betas
    rho = sum((b1 * b1 / b2) ** k for k in range(t))
    return (1 - b1) / (1 - b1 ** t) * math.sqrt(rho * (1 - b2 ** t) / (1 - b2))


def _scaled_diffs(a: dict, b: dict, n: int, steps: int) -> torch.Tensor:
    """``|a_i - b_i| / scale_i`` (module comment) of every weight except the key biases."""
    out = []
    for k in b:
        diff = (a[k].double() - b[k].double()).abs()
        scale = steps * EPS32 * (LR * math.sqrt(n) + torch.maximum(a[k].double().abs(), b[k].double().abs()))
        out.append((diff / scale)[~_key_bias(k, diff)])
    return torch.cat(out)


def _assert_runs_agree(run, original, steps: int = 4) -> None:
    """``run`` and ``original`` took the same ``steps`` steps up to float32 rounding: losses, the hard bound on every
    parameter, the QUANTILE of the scaled differences (module comment)."""
    n = _terms(run, original)
    why = f"N = {n}, decoded voxels per step {_decoded(run)} vs {_decoded(original)}"
    losses, expected, rtol = _losses(run), _losses(original), SAFETY * math.sqrt(n) * EPS32
    for s in range(1, steps + 1):
        assert losses[s] == pytest.approx(expected[s], rel=rtol), (s, losses[s], expected[s], why)

    a, b = _params(run), _params(original)
    assert a.keys() == b.keys()
    groups = T.load_checkpoint(original / "checkpoint.safetensors").optimizer["param_groups"]
    for g in groups:  # the hypotheses of the hard bound: Adam, the constant lr, no weight decay
        assert g["lr"] == LR and g["weight_decay"] == 0 and not g["amsgrad"] and not g["maximize"], g
    bound = max(2 * LR * sum(_adam_step_bound(g["betas"], t) for t in range(1, steps + 1)) for g in groups)
    rounding = {k: 2 * steps * EPS32 * torch.maximum(a[k].double().abs(), b[k].double().abs()) for k in a}
    worst = max(float(((a[k].double() - b[k].double()).abs() - rounding[k]).max()) for k in a)
    assert worst <= bound, f"a parameter differs by {worst:.3g} > {bound:.3g}, more than Adam can move it ({why})"

    q = float(torch.quantile(_scaled_diffs(a, b, n, steps), QUANTILE))
    assert q <= SAFETY, f"{QUANTILE:.0%} of the weights differ by up to {q:.3g} > {SAFETY} allowances ({why})"


def test_two_gloo_ranks_match_one_process_and_resume_across_world_sizes(data, tmp_path):
    # one process, the whole global batch of two samples: 4 steps in one go, and 2 steps to resume from with 2 ranks
    train(VAETrainConfig(**_config(data, tmp_path / "one", batch_size=2, steps=4)))
    train(VAETrainConfig(**_config(data, tmp_path / "one_then_two", batch_size=2, steps=2)))

    # two ranks, one sample each: 4 steps in one go; 2 steps (resumed below by one process); the resume of the
    # one-process checkpoint to step 4
    _two_ranks(tmp_path, [
        ("two", _config(data, tmp_path / "two", batch_size=1, steps=4)),
        ("two_then_one", _config(data, tmp_path / "two_then_one", batch_size=1, steps=2)),
        ("one_then_two", _config(data, tmp_path / "one_then_two", batch_size=1, steps=4, resume=True)),
    ])
    # one process resumes the two-rank checkpoint of step 2 to step 4
    summary = train(VAETrainConfig(**_config(data, tmp_path / "two_then_one", batch_size=2, steps=4, resume=True)))
    assert summary["start_step"] == 2 and summary["steps"] == 4

    # (a) DDP keeps the ranks' parameters identical, bit for bit
    for name in ("two", "one_then_two"):
        r0, r1 = (torch.load(tmp_path / f"{name}.rank{r}.pt") for r in (0, 1))
        assert all(torch.equal(r0[k], r1[k]) for k in r0), name
        assert all(torch.equal(r0[k], v) for k, v in _params(tmp_path / name).items())  # rank 0 wrote these

    # (b) two ranks on one sample each == one process on both samples, within float32 rounding
    one, two = tmp_path / "one", tmp_path / "two"
    _assert_runs_agree(two, one)
    at_step_2 = torch.load(tmp_path / "two_then_one.rank0.pt")  # dumped before the one-process resume
    moved = torch.quantile(_scaled_diffs(_params(one), at_step_2, _terms(one), 4), 0.5)
    assert moved > 100 * SAFETY  # steps 3 and 4 moved most weights far more than the tolerance allows
    rec_two, rec_one = _train_records(two), _train_records(one)
    assert [r["voxels"] for r in rec_two] == [r["voxels"] for r in rec_one]  # global counts
    for r in rec_two:
        assert r["world_size"] == 2
        assert r["rank_voxels_min"] < r["rank_voxels_max"] and r["rank_voxels_min"] + r["rank_voxels_max"] == \
            r["voxels"]
        assert 0 <= r["rank_step_s_spread"] < 1 and r["rank_step_s_min"] <= r["rank_step_s_max"]
    assert "rank_step_s_max" not in rec_one[0]

    # (c) a checkpoint of either world size resumes in the other and continues as the original configuration would
    for resumed, original in ((tmp_path / "two_then_one", two), (tmp_path / "one_then_two", one)):
        losses = _losses(resumed)
        assert sorted(losses) == [1, 2, 3, 4]
        _assert_runs_agree(resumed, original)
        ck = T.load_checkpoint(resumed / "checkpoint.safetensors")
        assert ck.step == 4 and not any(k.startswith("module.") for k in ck.model)
        assert ck.meta["global_batch_size"] == 2


def test_partition_by_tokens_balances_tokens_not_samples():
    parts = T.partition_by_tokens([100, 10, 60, 50, 5, 45], 2)
    assert parts == [[0, 5], [1, 2, 3, 4]]  # 145 and 125 tokens: 2 samples on one rank, 4 on the other
    assert sorted(sum(parts, [])) == list(range(6))
    assert T.partition_by_tokens([7, 7, 7], 3) == [[0], [1], [2]]
    assert T.partition_by_tokens([3], 2) == [[0], []]
    loads = [sum([9, 1, 8, 2, 7, 3][i] for i in p) for p in T.partition_by_tokens([9, 1, 8, 2, 7, 3], 3)]
    assert loads == [10, 10, 10]
    with pytest.raises(ValueError):
        T.partition_by_tokens([1], 0)


def test_checkpoints_drop_wrapper_prefixes(tmp_path):
    lin = torch.nn.Linear(2, 3)
    state = {f"module.{k}": v for k, v in lin.state_dict().items()}
    path = T.save_checkpoint(tmp_path / "c.safetensors", model=state, step=1)
    assert set(T.load_checkpoint(path).model) == {"weight", "bias"}
    assert T.strip_wrapper_prefixes({"a.module.b": 1}) == {"a.module.b": 1}


def test_multi_gpu_report_smoke(tmp_path):
    """The GPU report end to end at tiny size: torchrun with 1 and 2 gloo processes for the DiT loop and the VAE
    trainer, same data and seed, so the two runs of each model have the same losses."""
    from model.reports.multi_gpu import NVLINK_MULTICAST_OFF, main

    assert main(["--smoke", "--gpus", "2", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert sorted((r["model"], r["gpus"]) for r in records) == [("dit", 1), ("dit", 2), ("vae", 1), ("vae", 2)]
    for r in records:
        assert r["tokens_per_s"] > 0 and r["efficiency"] > 0 and r["gpu"] and r["date"] and r["smoke"]
        assert not r.get("error")
    for r in (r for r in records if r["gpus"] == 2):
        assert r["loss_gap"] < 1e-5, r  # the same run on one and on two processes
        assert 0 <= r["rank_step_s_spread_mean"] < 1 and 0 <= r["rank_fwd_s_spread_max"] < 1
        assert r["timed_steps"] >= 1
    env = json.loads((tmp_path / "runs" / "dit_2gpu" / "config.json").read_text())["environment"]
    assert env == NVLINK_MULTICAST_OFF  # what the workers saw
    md = (tmp_path / "multi_gpu.md").read_text()
    assert "SMOKE RUN" in md and "NCCL_NVLS_ENABLE=0" in md and "| dit | 2 |" in md and "| vae | 2 |" in md
    assert (tmp_path / "multi_gpu_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second command for one model keeps the other model's records
    assert main(["--smoke", "--gpus", "2", "--models", "dit", "--out", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "multi_gpu.json").read_text())) == 4


#: torchrun's summary when a rank aborted in C++ and the launcher then stopped the other rank (as printed in CI).
_ABORT_SUMMARY = """terminate called without an active exception
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 30780)  (SIGTERM)
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 30781)  (SIGABRT)
"""


def test_crashed_by_signal_reads_the_root_cause():
    from model.reports.multi_gpu import crashed_by_signal

    assert crashed_by_signal(_ABORT_SUMMARY) == 6  # the abort, not the SIGTERM torchrun sent afterwards
    assert crashed_by_signal("Root Cause (first observed failure):\n  exitcode  : 1 (pid: 7)\nValueError: x") is None
    assert crashed_by_signal("  exitcode  : -15 (pid: 3)") == 15
    assert crashed_by_signal("") is None


def test_multi_gpu_report_runs_a_signal_crash_again_and_says_so(tmp_path, monkeypatch):
    """A run whose worker died from a signal runs once more; a run that failed with a Python error does not."""
    from model.reports import multi_gpu as M

    calls: list[int] = []

    def fake_dit(a, nproc, run, budget):
        calls.append(nproc)
        run.mkdir(parents=True, exist_ok=True)
        (run / "log.txt").write_text("attempt\n")
        if nproc == 2 and calls.count(2) == 1:
            return 1, _ABORT_SUMMARY
        rows = [dict(kind="train", step=s, loss=1.0 / s, tokens=100 * nproc, seconds_per_step=0.1) for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0, ""

    monkeypatch.setattr(M, "_run_dit", fake_dit)
    assert M.main(["--smoke", "--gpus", "2", "--models", "dit", "--out", str(tmp_path)]) == 0
    assert calls == [1, 2, 2]
    two = next(r for r in json.loads((tmp_path / "multi_gpu.json").read_text()) if r["gpus"] == 2)
    assert "signal 6 (SIGABRT)" in two["retried"] and not two.get("error")
    assert (tmp_path / "runs" / "dit_2gpu" / "log_attempt1.txt").exists()
    assert "ran twice" in (tmp_path / "multi_gpu.md").read_text()

    def python_error(a, nproc, run, budget):
        calls.append(nproc)
        run.mkdir(parents=True, exist_ok=True)
        (run / "log.txt").write_text("ValueError\n")
        return 1, "Root Cause (first observed failure):\n  exitcode  : 1 (pid: 9)\n"

    calls.clear()
    monkeypatch.setattr(M, "_run_dit", python_error)
    assert M.main(["--smoke", "--gpus", "2", "--models", "dit", "--out", str(tmp_path)]) == 1
    assert calls == [1, 2]
