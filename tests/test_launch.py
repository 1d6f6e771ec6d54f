"""The kernels' launch-configuration table (ssa_kernels.launch): lookups by architecture, head dim and dtype, sweep
overrides that leave the table alone, the measured table file, and the kernels asking it for every launch."""
import math

import pytest
import torch

import ssa_kernels
from ssa_kernels import launch
from ssa_kernels.launch import BASE, Entry, config, load_table, overriding, write_entries
from tests.helpers import random_coords, random_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: The settings the kernels ran with before the table existed (hand-set dicts in each kernel module; wide_head
#: values above head dim 32): the table must give exactly these until a measured entry says otherwise.
PREVIOUS = {
    "compression.FWD": dict(rows=128, block_n=64, num_warps=4, num_stages=3, fma_exp_every=0),  # added later:
    "compression.DQ": dict(rows=128, block_n=32, num_warps=4, num_stages=3, fma_exp_every=0),  # FMA exponentials,
    "compression.DKDV": dict(rows=32, block_n=128, programs=2048, num_warps=4, num_stages=1, fma_exp_every=0),  # off
    "selection.FWD": dict(rows=16, block_n=32, num_warps=1, num_stages=2,  # added later: the key-outer forward's
                          key_outer=0, ko_rows=128, ko_block_n=64, ko_warps=4, ko_stages=2,  # settings, off
                          merge_rows=64, merge_warps=4, scratch_bytes=2**29, merged=0,  # and the merged stream,
                          fma_exp_every=0, whole_tiles=0, ko_persistent=0),  # FMA exps, unmasked tiles, persistent, off
    "selection.DQ": dict(rows=16, block_n=32, num_warps=1, num_stages=2, key_outer=0, ko_rows=128, ko_block_n=64,
                         ko_warps=4, ko_stages=2, merge_rows=64, merge_warps=4, scratch_bytes=2**29, merged=0,
                         fma_exp_every=0, whole_tiles=0, ko_persistent=0),
    "selection.DKDV": dict(rows=128, block_n=64, num_warps=4, num_stages=3, max_queries=8192,
                           tail=0),  # added later: half last tiles, off
    "window.FWD": dict(max_heads=8, block_n=32, num_warps=4, num_stages=2),
    "window.DQ": dict(max_heads=8, block_n=32, num_warps=4, num_stages=2),
    "window.DKDV": dict(max_heads=16, rows=256, num_warps=4, num_stages=2),
    "scoring.SCORE": dict(rows=16, tokens_per_program=4, tokens_per_program_agg=4, block_n=32, block_s=64,
                          max_heads=16, num_warps=1, num_stages=2, aggregate="prefix",
                          fma_exp_every=0, whole_tiles=0, key_rows=0),  # added later, off
    "ssa.BACKWARD": dict(streams=2, side="dkdv", side_priority=-1, dq_order="cmp-sel-win", dkdv_order="cmp-sel-win",
                         recompute_window_bytes=2**29),  # added later: above it the window output is recomputed
}
PREVIOUS_WIDE = {"compression.DKDV": dict(rows=64, block_n=64), "selection.DQ": dict(block_n=16, num_stages=3)}


@pytest.mark.parametrize("head_dim", [16, 32, 33, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_table_gives_the_previous_settings(head_dim, dtype):
    assert set(BASE) == set(PREVIOUS)
    for kernel, values in PREVIOUS.items():
        expected = {**values, **(PREVIOUS_WIDE.get(kernel, {}) if head_dim > 32 else {})}
        assert config(kernel, head_dim=head_dim, dtype=dtype) == expected, kernel


def test_overrides_apply_inside_the_block_only_and_nest():
    base = config("selection.FWD", head_dim=32)
    with overriding("selection.FWD", {"block_n": 64}):
        assert config("selection.FWD", head_dim=32)["block_n"] == 64
        with overriding("selection.FWD", {"block_n": 16, "num_warps": 2}):
            assert config("selection.FWD", head_dim=32) == {**base, "block_n": 16, "num_warps": 2}
        assert config("selection.FWD", head_dim=32) == {**base, "block_n": 64}
        assert config("selection.DQ", head_dim=32) == PREVIOUS["selection.DQ"]  # other kernels untouched
    assert config("selection.FWD", head_dim=32) == base
    assert BASE["selection.FWD"] == PREVIOUS["selection.FWD"]  # the table itself never changes
    config("selection.FWD")["block_n"] = 999  # callers get a copy
    assert config("selection.FWD")["block_n"] == 32
    with pytest.raises(ValueError, match="unknown kernel"):
        config("selection.BWD")
    with pytest.raises(ValueError, match="no launch settings"):
        with overriding("window.FWD", {"rows": 64}):
            pass


def test_overrides_reach_other_threads_and_close_in_any_order():
    """Autograd runs a CUDA backward on its own thread: an override around ``loss.backward()`` must reach it."""
    import threading

    seen = {}

    def read(key):
        seen[key] = config("selection.DKDV", head_dim=32)["max_queries"]

    with overriding("selection.DKDV", {"max_queries": 0}):
        worker = threading.Thread(target=read, args=("inside",))
        worker.start()
        worker.join()
    read("after")
    assert seen == {"inside": 0, "after": PREVIOUS["selection.DKDV"]["max_queries"]}
    # two blocks that close out of nesting order (two threads): each removes its own values only
    outer = overriding("selection.FWD", {"block_n": 64})
    inner = overriding("selection.FWD", {"block_n": 16})
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert config("selection.FWD")["block_n"] == 16
    inner.__exit__(None, None, None)
    assert config("selection.FWD") == PREVIOUS["selection.FWD"]


def test_entries_match_architecture_head_dims_and_dtypes(monkeypatch):
    e = Entry("window.FWD", {"block_n": 64}, arch="sm90", min_head_dim=64, max_head_dim=64, dtypes=("bfloat16",))
    assert e.matches("sm90", 64, "bfloat16")
    assert not e.matches("sm80", 64, "bfloat16") and not e.matches("sm90", 32, "bfloat16")
    assert not e.matches("sm90", 64, "float16") and not e.matches("sm90", None, "bfloat16")
    assert Entry("window.FWD", {}).matches("cpu", None, None)
    any_arch = Entry("window.FWD", {"block_n": 16}, min_head_dim=64, dtypes=("float32",))
    monkeypatch.setattr(launch, "_MEASURED", (e, any_arch))
    assert config("window.FWD", head_dim=64, dtype=torch.bfloat16)["block_n"] == 32  # sm90 only; this is "cpu"
    assert config("window.FWD", head_dim=128, dtype=torch.float32)["block_n"] == 16
    monkeypatch.setattr(launch, "architecture", lambda device=None: "sm90")
    assert config("window.FWD", head_dim=64, dtype=torch.bfloat16)["block_n"] == 64
    assert launch.architecture.__name__ == "<lambda>"


def test_table_file_round_trip_and_sweep_winners(tmp_path):
    from bench.kernel_profile import best_entries

    path = str(tmp_path / "table.json")
    assert load_table(path) == ()
    results = [dict(head_dim=64, dtype="bfloat16", sweeps=[
        dict(kernel="selection.FWD", config={"block_n": 32}, ms=2.0),
        dict(kernel="selection.FWD", config={"block_n": 64}, ms=1.5),
        dict(kernel="selection.FWD", config={"block_n": 128}, ms=math.nan),  # did not compile
        dict(kernel="window.DKDV", config={"rows": 128}, ms=3.0)])]
    entries = best_entries(results, "sm90")
    assert [(e.kernel, e.values) for e in entries] == [("selection.FWD", {"block_n": 64}), ("window.DKDV",
                                                                                             {"rows": 128})]
    assert all(e.arch == "sm90" and e.min_head_dim == e.max_head_dim == 64 and e.dtypes == ("bfloat16",)
               for e in entries)
    # two cases of one head dim and dtype (v1.1 and v1.0): one entry, the least total time of both
    two = [dict(head_dim=32, dtype="bfloat16", sweeps=[
        dict(kernel="scoring.SCORE", config={"key_rows": 0}, ms=3.0),
        dict(kernel="scoring.SCORE", config={"key_rows": 1}, ms=2.0)]),
        dict(head_dim=32, dtype="bfloat16", sweeps=[
            dict(kernel="scoring.SCORE", config={"key_rows": 0}, ms=10.0),
            dict(kernel="scoring.SCORE", config={"key_rows": 1}, ms=12.0)])]
    assert [e.values for e in best_entries(two, "sm90")] == [{"key_rows": 0}]
    two[1]["sweeps"][0]["ms"] = math.nan  # failed in one case: not chosen
    assert [e.values for e in best_entries(two, "sm90")] == [{"key_rows": 1}]
    write_entries(entries, path)
    assert load_table(path) == tuple(entries)
    again = Entry("selection.FWD", {"block_n": 16}, arch="sm90", min_head_dim=64, max_head_dim=64,
                  dtypes=("bfloat16",))
    write_entries([again], path)  # same key: replaces, keeps the other
    assert load_table(path) == (entries[1], again)
    with pytest.raises(ValueError, match="no launch settings"):
        write_entries([Entry("selection.FWD", {"bogus": 1})], path)


def test_every_kernel_asks_the_table_with_its_head_dim_and_dtype(monkeypatch):
    """The whole op, forward and backward, looks up all eleven configurations (interpreter on a CPU)."""
    asked = []
    real = launch.config

    def spy(kernel, **kwargs):
        asked.append((kernel, kwargs["head_dim"], kwargs["dtype"]))
        return real(kernel, **kwargs)

    for mod in ("compression", "selection", "window", "scoring", "ssa"):
        monkeypatch.setattr(getattr(ssa_kernels, mod), "config", spy)
    gen = torch.Generator().manual_seed(0)
    coords = random_coords((40,), 10, compression_block=4, selection_block=8, generator=gen)
    inp = random_inputs(coords, 4, 2, 16, compression_block=4, selection_block=8, generator=gen,
                        dtype=torch.float32)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    x = [t.requires_grad_() for t in inp]
    o = ssa_kernels.spatial_sparse_attention(*x, layout, topk=2, shift=0)
    torch.autograd.grad(o, x, torch.randn_like(o))
    assert {a[0] for a in asked} == set(BASE)
    assert {(a[1], a[2]) for a in asked} == {(16, torch.float32)}


def test_parse_sweep_expands_every_combination_and_checks_names():
    """launch.parse_sweep: the sweep grammar of kernel_profile and ssa_inputs, checked against the table's settings."""
    import pytest

    from ssa_kernels.launch import parse_sweep

    out = parse_sweep("selection.FWD:rows=16|64,num_warps=1|4;scoring.SCORE:aggregate=prefix|mask")
    assert out[0] == ("selection.FWD", [dict(rows=16, num_warps=1), dict(rows=16, num_warps=4),
                                        dict(rows=64, num_warps=1), dict(rows=64, num_warps=4)])
    assert out[1] == ("scoring.SCORE", [dict(aggregate="prefix"), dict(aggregate="mask")])
    assert parse_sweep("") == []
    for bad, words in (("selection.FOO:rows=16", "unknown kernel"), ("selection.FWD:tiles=2", "tiles"),
                       ("selection.FWD:rows", "setting=value"), ("selection.FWD", "lists no setting")):
        with pytest.raises(ValueError, match=words):
            parse_sweep(bad)


def test_shipped_table_loads_and_keeps_the_swept_kernels_launches(monkeypatch):
    """ssa_kernels/launch_table.json (written on an H100 by kernel_profile --write-table) is loaded at import; its
    sm90 bf16 entries recorded the swept winners: the key-outer selection forward and dQ at head dims 64 and 128
    (reports/kernels.md), every other setting as in the base table; elsewhere (another GPU, float32) the base."""
    import torch

    from ssa_kernels import launch

    assert launch._MEASURED == launch.load_table(launch.TABLE_PATH) and launch._MEASURED
    dims = (32, 64, 128)
    before = {(k, d): launch.config(k, head_dim=d, dtype=torch.bfloat16) for k in BASE for d in dims}
    monkeypatch.setattr(launch, "architecture", lambda device=None: "sm90")
    swept = {(kernel, 64): dict(key_outer=1, scratch_bytes=2**31) for kernel in ("selection.FWD", "selection.DQ")}
    swept.update({(kernel, 128): dict(key_outer=1, ko_rows=64, ko_block_n=32)
                  for kernel in ("selection.FWD", "selection.DQ")})
    for (kernel, dim), values in before.items():
        want = {**values, **swept.get((kernel, dim), {})}
        assert launch.config(kernel, head_dim=dim, dtype=torch.bfloat16) == want, (kernel, dim)
        assert launch.config(kernel, head_dim=dim, dtype=torch.float32) == values, (kernel, dim)
