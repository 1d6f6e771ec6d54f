"""model/io.py: the one atomic-write helper (old file intact and no temporary file left when the writer fails), its
conveniences, checkpoints through their new home, and the provenance every report records (the commit of this
checkout, ``-dirty`` with uncommitted changes to tracked files, None outside a git checkout)."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.io import (
    DIRTY_SUFFIX,
    REPO_ROOT,
    TEMP_SUFFIX,
    atomic_save_npz,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    commit_label,
    git_commit,
    load_checkpoint,
    provenance,
    resolve_device,
    save_checkpoint,
)

#: A commit as :func:`model.io.git_commit` gives it.
COMMIT = re.compile(r"^[0-9a-f]{40}(-dirty)?$")
HAVE_GIT = shutil.which("git") is not None
IN_CHECKOUT = HAVE_GIT and (REPO_ROOT / ".git").exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# atomic writes


def test_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "doc.json"
    atomic_write_text(target, "old")

    def half_then_fail(tmp):
        assert tmp.parent == tmp_path and tmp.name.startswith("doc.json.") and tmp.name.endswith(TEMP_SUFFIX)
        tmp.write_text("half-written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]


def test_failed_write_of_a_new_file_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "new.bin"

    def interrupted(tmp):
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt  # not only Exception: an interrupt cleans up too

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_unserialisable_json_writes_nothing(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_conveniences_round_trip_with_the_usual_permissions(tmp_path):
    p = atomic_write_text(tmp_path / "deep" / "a.md", "héllo\n")  # the folder is created
    assert p == tmp_path / "deep" / "a.md" and p.read_text(encoding="utf-8") == "héllo\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask()
    assert atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]}, default=str)
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    atomic_save_npz(tmp_path / "d.latent", {"a": np.arange(4)})  # the name is kept (numpy would add .npz)
    with np.load(tmp_path / "d.latent") as z:
        assert z["a"].tolist() == [0, 1, 2, 3]
    atomic_write(tmp_path / "e.txt", lambda tmp: tmp.write_text("by name"))
    assert (tmp_path / "e.txt").read_text() == "by name"
    assert not list(tmp_path.rglob("*" + TEMP_SUFFIX))


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="callable"):
        atomic_write(tmp_path / "x", "not a writer")
    with pytest.raises(TypeError, match="str"):
        atomic_write_text(tmp_path / "x", b"bytes")
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(tmp_path / "x", "text")
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x")


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and devices


def test_checkpoint_round_trip_from_model_io(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, step=3, meta={"k": "v"})
    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.meta == {"k": "v"} and torch.equal(ck.model["weight"], model.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="cannot parse"):
        resolve_device("not-a-device")


def test_library_loads_checkpoints_without_the_training_package():
    """model.nets and model.pipeline get checkpoints from model.io (docs/architecture.md)."""
    from model.training import common

    assert common.save_checkpoint is save_checkpoint and common.load_checkpoint is load_checkpoint


# ---------------------------------------------------------------------------------------------------------------
# provenance


@pytest.mark.skipif(not IN_CHECKOUT, reason="not a git checkout (or git is not installed)")
def test_provenance_records_the_commit_of_this_checkout():
    info = provenance("cpu")
    assert COMMIT.match(info["commit"]), info["commit"]
    assert info["dirty"] == info["commit"].endswith(DIRTY_SUFFIX)
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert info["commit"].removesuffix(DIRTY_SUFFIX) == head
    assert info["torch"] == torch.__version__ and info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["device"] == "cpu" and info["gpu"] is None and info["date"].endswith("+00:00")
    assert {"triton", "cuda"} <= set(info)
    assert commit_label(info).startswith("commit " + head[:12])


def test_provenance_outside_a_git_checkout_has_no_commit(tmp_path):
    info = provenance("cpu", root=tmp_path)
    assert info["commit"] is None and info["dirty"] is None and info["date"]
    assert git_commit(tmp_path / "missing") is None
    assert commit_label(info) == "commit unknown"


@pytest.mark.skipif(not HAVE_GIT, reason="git is not installed")
def test_dirty_means_uncommitted_changes_to_tracked_files(tmp_path):
    """A throw-away repository in tmp_path: clean after the commit, still clean with an untracked file, dirty once a
    tracked file changes."""
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, env=env)

    git("init", "-q")
    assert git_commit(tmp_path) is None  # no commit yet
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    clean = git_commit(tmp_path)
    assert COMMIT.match(clean) and not clean.endswith(DIRTY_SUFFIX)
    (tmp_path / "untracked.txt").write_text("x")
    assert git_commit(tmp_path) == clean
    (tmp_path / "f.txt").write_text("2")
    assert git_commit(tmp_path) == clean + DIRTY_SUFFIX
    assert commit_label(clean + DIRTY_SUFFIX) == f"commit {clean[:12]}-dirty"


def test_commit_label_reads_older_reports():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert commit_label({"git_commit": sha, "git_dirty": True}) == "commit 0123456789ab-dirty"
    assert commit_label(None) == "commit unknown"


def test_benchmark_report_prints_the_commit(tmp_path):
    from bench import report

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    bench = {"name": "test_cpu_layout_build[shell-512]", "stats": {"median": 0.012, "data": [0.012]},
             "extra_info": {"kind": "cpu", "device": "cpu", "shape": "shell-512", "config": "v1.1",
                            "impl": "layout-build", "measured_pass": "build", "tokens": 19000, "median_ms": 12.0}}
    raw = {"machine_info": {}, "datetime": "2026-01-01T00:00:00+00:00", "benchmarks": [bench],
           "ssa_bench": {"env": {"device": "cpu", "gpu": None, "torch": "2.13.0", "triton": "3.6.0",
                                 "commit": sha + DIRTY_SUFFIX}, "settings": {}, "skipped": []}}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    res = report.make_report(tmp_path / "raw.json", tmp_path / "out")
    assert "commit 89abcdef0123-dirty" in res["markdown"].read_text()
    assert json.loads(res["json"].read_text())["commit"] == sha + DIRTY_SUFFIX
    # a run recorded without it: pytest-benchmark's commit_info
    del raw["ssa_bench"]["env"]["commit"]
    raw["commit_info"] = {"id": sha, "dirty": False}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    res = report.make_report(tmp_path / "raw.json", tmp_path / "out2")
    assert "commit 89abcdef0123." in res["markdown"].read_text()


def test_provenance_takes_the_commit_from_the_environment_without_git(monkeypatch):
    """A copy of the tree without .git (sent to a GPU machine) records the commit named in SSA3D_COMMIT."""
    import model.io as io

    monkeypatch.setattr(io, "git_commit", lambda root=None: None)
    monkeypatch.setenv(io.COMMIT_ENV, "0123abcd-dirty")
    assert io.provenance(device="cpu")["commit"] == "0123abcd-dirty"
    monkeypatch.delenv(io.COMMIT_ENV)
    assert io.provenance(device="cpu")["commit"] is None
