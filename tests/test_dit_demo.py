"""``python -m model.reports.dit_demo --smoke``: the DiT learning demonstration end to end on the CPU at toy size, run as the
GPU run is (one stage per call, the DiT stage twice), plus the encoder feature cache it trains with."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the image encoder needs transformers")
pytest.importorskip("igl")
pytest.importorskip("skimage")
trimesh = pytest.importorskip("trimesh")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """Six primitives; the name-hash split at 0.3 holds out cylinder and torus."""
    root = tmp_path_factory.mktemp("demo_meshes")
    trimesh.creation.box(extents=(1.0, 0.6, 0.4)).export(root / "box.obj")
    trimesh.creation.icosphere(2).export(root / "ball.obj")
    trimesh.creation.capsule(height=1.0, radius=0.3).export(root / "capsule.obj")
    trimesh.creation.torus(0.6, 0.2).export(root / "torus.obj")
    trimesh.creation.cylinder(radius=0.4, height=1.0).export(root / "cylinder.obj")
    trimesh.creation.cone(radius=0.5, height=1.0).export(root / "cone.obj")
    return root


def test_smoke_stage_by_stage(meshes, tmp_path):
    from PIL import Image

    from model.reports.dit_demo import main

    views, out = tmp_path / "views", tmp_path / "run"
    common = ["--smoke", "--meshes", str(meshes), "--views-dir", str(views), "--out", str(out)]
    assert main(common + ["--stage", "render"]) == 0  # the CPU machine's part: the views to carry
    doc = json.loads((views / "views.json").read_text())
    assert sorted(doc["items"]) == ["ball", "box", "capsule", "cone", "cylinder", "torus"] and not doc["failed"]
    img = Image.open(views / doc["items"]["box"][2])
    assert img.mode == "RGBA" and img.size == (64, 64) and 0.05 < (np.asarray(img)[..., 3] > 0).mean() < 0.9

    assert main(common + ["--stage", "data,vae"]) == 0
    data = json.loads((out / "data.json").read_text())
    assert sorted(data["held_out"]) == ["cylinder", "torus"] and len(data["train"]) == 4
    assert (out / "vae" / "checkpoint.safetensors").is_file() and (out / "vae" / "summary.json").is_file()

    assert main(common + ["--stage", "dit"]) == 0
    manifest = json.loads((out / "dit_data" / "manifest.json").read_text())
    assert sorted(it["name"] for it in manifest["items"]) == sorted(data["train"])  # held-out meshes: not trained
    assert all(len(it["views"]) == 2 for it in manifest["items"])  # view 2 stays held out
    assert main(common + ["--stage", "dit"]) == 0  # continues from the checkpoint
    calls = [json.loads(line) for line in (out / "dit" / "calls.jsonl").read_text().splitlines()]
    assert [(c["start_step"], c["end_step"]) for c in calls] == [(0, 2), (2, 4)]
    assert all(c["encoder_cache_misses"] == 0 and c["encoder_cache_hits"] > 0 for c in calls)
    steps = [json.loads(line)["step"] for line in (out / "dit" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert main(common + ["--stage", "dit"]) == 0  # the step budget is spent: nothing more
    assert len((out / "dit" / "calls.jsonl").read_text().splitlines()) == 2

    assert main(common + ["--stage", "sample"]) == 0
    report = out / "report"
    doc = json.loads((report / "dit_demo.json").read_text())
    s = doc["summary"]
    assert s["train_image"]["count"] == 4 and s["held_out_shape"]["count"] == 2 * 3
    assert s["train_shape_unseen_view"]["count"] == 4 and s["vae_reconstruction"]["count"] == 6
    assert {"train_no_image", "coords_only", "train_image_guidance_3"} <= set(s)
    assert doc["bar"] == 0.7 and isinstance(doc["bar_met"], bool) and doc["smoke"] is True
    assert all(0.0 <= r["fscore"] <= 1.0 for r in doc["rows"])
    assert doc["training"]["steps"] == 4 and doc["environment"]["date"]
    md = (report / "dit_demo.md").read_text()
    for phrase in ("**Bar**", "random weights", "real latent coordinates", "held-out", "SMOKE RUN", "| mesh |"):
        assert phrase in md, phrase
    assert "Reading the rows" in md
    (report / "dit_demo.md").unlink()
    assert main(common + ["--stage", "report"]) == 0  # the markdown again, from the JSON alone
    assert (report / "dit_demo.md").read_text() == md
    for png in ("dit_demo_train.png", "dit_demo_held_out.png", "dit_loss.png", "vae_loss.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in md


def test_cached_encoder_returns_the_encoders_features():
    from model.nets.conditioning import DinoV2Encoder
    from model.reports.dit_demo import CachedEncoder

    with pytest.warns(UserWarning, match="RANDOM weights"):
        cached = CachedEncoder.build(size="tiny", seed=3, device="cpu")
        plain = DinoV2Encoder.build(None, size="tiny", seed=3)
    rgb = torch.randint(0, 256, (3, 3, 56, 56)).float() / 255
    rgb[2] = rgb[0]
    rgb[2, 1, 7, 9] = (rgb[2, 1, 7, 9] * 255 + 1) % 256 / 255  # one pixel differs from image 0
    first = cached(rgb)
    assert torch.equal(first, plain(rgb)) and cached.misses == 3 and cached.hits == 0
    again = cached(rgb[[2, 0]])
    assert torch.equal(again, first[[2, 0]]) and cached.hits == 2 and cached.misses == 3


def test_trainer_gets_the_cached_encoder_only_inside():
    from model.nets.conditioning import DinoV2Encoder
    from model.reports.dit_demo.encoder import CachedEncoder, _trainer_uses

    with pytest.warns(UserWarning, match="RANDOM weights"):
        cached = CachedEncoder.build(size="tiny", seed=0, device="cpu")
        with _trainer_uses(cached):
            assert DinoV2Encoder.build(None, size="tiny", seed=0) is cached
            other = DinoV2Encoder.build(None, size="tiny", seed=1)  # another encoder is built as usual
            assert isinstance(other, DinoV2Encoder)
        assert DinoV2Encoder.build(None, size="tiny", seed=0) is not cached


def test_bad_options(tmp_path, capsys):
    from model.reports.dit_demo import main

    assert main(["--stage", "train", "--out", str(tmp_path)]) == 2
    assert "stage must be" in capsys.readouterr().err
    assert main(["--stage", "sample", "--out", str(tmp_path / "empty"), "--device", "cpu"]) == 2
    assert "run --stage dit first" in capsys.readouterr().err
