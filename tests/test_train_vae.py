"""VAE training (model/training/vae.py) and the shared training infrastructure (model/training/common.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh

pytest.importorskip("igl")
pytest.importorskip("skimage")

from model.io import atomic_write  # noqa: E402
from model.training import common as T  # noqa: E402
from model.pipeline.reconstruct import load_vae  # noqa: E402
from model.training.vae import VAETrainConfig, model_config, train  # noqa: E402
from model.cli.train_vae import config_from_args, main

#: The tiny runs of these tests: grid side and batch size (2 meshes -> one batch per epoch).
RESOLUTION, BATCH = 32, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def primitives(tmp_path_factory):
    """Two small meshes written by trimesh (no pybullet needed) and a shared sample cache."""
    root = tmp_path_factory.mktemp("meshes")
    trimesh.creation.box(extents=(1.0, 0.7, 0.5)).export(root / "box.obj")
    trimesh.creation.icosphere(2).export(root / "sphere.obj")
    return dict(meshes=str(root), cache_dir=str(tmp_path_factory.mktemp("cache")))


def tiny_config(primitives, out, **overrides) -> VAETrainConfig:
    values = dict(meshes=primitives["meshes"], cache_dir=primitives["cache_dir"], resolutions=(RESOLUTION,),
                  model="tiny", batch_size=BATCH, steps=4, lr=3e-3, warmup_steps=2, schedule="constant",
                  log_every=1, val_every=0, val_meshes=1, val_points=2000, out=str(out), progress=False, seed=3)
    values.update(overrides)
    return VAETrainConfig(**values)


def test_train_writes_checkpoint_metrics_and_plot(primitives, tmp_path):
    cfg = tiny_config(primitives, tmp_path / "run", steps=4, val_every=2, schedule="cosine")
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["stopped"] == "steps" and summary["train_meshes"] >= 1
    out = tmp_path / "run"
    records = T.read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["resolution"] == RESOLUTION for r in records if r["kind"] == "train")
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and all(0 <= r["fscore"] <= 1 for r in val)
    assert summary["validation"]["meshes"][0]["name"] in ("box", "sphere")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["train"]["model"] == "tiny"
    vae, meta = load_vae(out / "checkpoint.safetensors")
    assert vae.config == model_config("tiny") and meta["data"]["tau"] == cfg.tau and not vae.training
    ckpt = T.load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.step == 4 and ckpt.optimizer["state"] and "rng/gen/posterior" in ckpt.rng


def test_resume_reproduces_the_uninterrupted_run(primitives, tmp_path):
    """3 steps, stop, resume to 6 == 6 steps in one go: same losses at every step, same final weights."""
    whole = tiny_config(primitives, tmp_path / "whole", steps=6)
    train(whole)
    train(tiny_config(primitives, tmp_path / "split", steps=3))
    summary = train(tiny_config(primitives, tmp_path / "split", steps=6, resume=True))
    assert summary["start_step"] == 3 and summary["steps"] == 6

    def losses(run):
        return [(r["step"], r["loss"], r["sdf_in"]) for r in T.read_jsonl(tmp_path / run / "metrics.jsonl")
                if r["kind"] == "train"]

    assert losses("split") == losses("whole")  # bit-for-bit on CPU
    a = T.load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors").model
    b = T.load_checkpoint(tmp_path / "split" / "checkpoint.safetensors").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another model configuration"):
        train(tiny_config(primitives, tmp_path / "split", steps=7, resume=True,
                          model_overrides={"latent_channels": 8}))


def test_time_limit_stops_cleanly(primitives, tmp_path):
    summary = train(tiny_config(primitives, tmp_path / "t", steps=10_000, time_limit=1e-4, val_meshes=0))
    assert summary["stopped"] == "time_limit" and summary["steps"] < 10_000
    assert T.load_checkpoint(tmp_path / "t" / "checkpoint.safetensors").step == summary["steps"]


def test_command_line_config_file_and_errors(primitives, tmp_path, capsys):
    cfg_file = tmp_path / "vae.json"
    cfg_file.write_text(json.dumps(dict(meshes=primitives["meshes"], model="tiny", steps=9, lr=5e-4)))
    cfg = config_from_args(["--config", str(cfg_file), "--steps", "2", "--resolutions", "32", "16"])
    assert (cfg.steps, cfg.lr, cfg.resolutions, cfg.model) == (2, 5e-4, (32, 16), "tiny")
    cfg = config_from_args(["--config", str(cfg_file), "--pybullet", "3"])  # a flag's data source replaces the file's
    assert cfg.pybullet == 3 and cfg.meshes is None
    import dataclasses

    from model.cli.train_vae import build_parser

    flags = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(VAETrainConfig)} <= flags  # every option has a flag
    for kwargs, match in [(dict(pybullet=2), "exactly one"), (dict(model="huge"), "model must be one of"),
                          (dict(batch_size=0), "batch_size"), (dict(schedule="step"), "schedule"),
                          (dict(model_overrides={"width": 3}), "unknown VAEConfig fields")]:
        with pytest.raises(ValueError, match=match):
            tiny_config(primitives, tmp_path, **kwargs)
    with pytest.raises(SystemExit):
        main(["--meshes", primitives["meshes"], "--model", "nope"])
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "--config: " in (err := capsys.readouterr().err) and "does not exist" in err
    rc = main(["--meshes", primitives["meshes"], "--cache-dir", primitives["cache_dir"], "--resolutions", "32",
               "--model", "tiny", "--steps", "1", "--batch-size", "2", "--val-meshes", "0", "--no-progress",
               "--out", str(tmp_path / "cli")])
    assert rc == 0 and "1 steps (steps)" in capsys.readouterr().out


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(7)
    path = T.save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt, step=11, meta={"a": [1, 2]},
                             generators={"g": gen})
    expected_draw = torch.rand(3, generator=gen)
    expected_global = torch.rand(2), np.random.rand()
    ck = T.load_checkpoint(path)
    assert ck.step == 11 and ck.meta == {"a": [1, 2]}
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model2.load_state_dict(ck.model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.optimizer)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    gen2 = torch.Generator()
    T.restore_rng(ck, {"g": gen2})
    assert torch.equal(torch.rand(3, generator=gen2), expected_draw)
    assert torch.equal(torch.rand(2), expected_global[0]) and np.random.rand() == expected_global[1]

    # a failing write leaves the previous file untouched and no temporary file behind
    before = path.read_bytes()

    def boom(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    (tmp_path / "x.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors"):
        T.load_checkpoint(tmp_path / "x.bin")


def test_schedule_metrics_log_and_time_limit(tmp_path):
    f = [T.lr_factor(s, total_steps=100, warmup_steps=10, schedule="cosine", min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert T.lr_factor(50, total_steps=100, schedule="constant") == 1.0
    assert T.lr_factor(50, total_steps=100, progress=1.0, min_ratio=0.2) == pytest.approx(0.2)
    log = T.MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s, "bad": float("nan")})
    assert [r["step"] for r in T.MetricsLog(tmp_path / "m.jsonl", resume_step=3).records()] == [1, 2, 3]
    assert T.plot_metrics(log.records(), tmp_path / "p.png", loss_keys=("loss",)).exists()
    assert not T.TimeLimit(None).expired() and T.TimeLimit(1e-9).expired()
    with pytest.raises(ValueError, match="time limit"):
        T.TimeLimit(-1)
