"""model.reports.ssa_inputs on the CPU: the spread statistics and the benchmark input set."""
import torch


def test_ssa_inputs_spread_counts_every_choice():
    """model.reports.ssa_inputs' spread statistics on a small random set: every top-k choice lands in one bucket."""
    import ssa_kernels
    from model.reports.ssa_inputs import choice_spread
    from tests.helpers import random_coords, random_inputs

    gen = torch.Generator().manual_seed(0)
    coords = random_coords((60, 30), 16, compression_block=4, selection_block=8, generator=gen)
    args = [t.float() for t in random_inputs(coords, 4, 2, 16, compression_block=4, selection_block=8,
                                              generator=gen)]
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    s = choice_spread(args, layout, topk=3)
    _, lse = ssa_kernels.compression_attention(args[0], args[3], args[4], layout)
    idx = ssa_kernels.select_blocks(args[0], args[3], lse, layout, topk=3)
    assert s["choices"] == int((idx >= 0).sum())
    assert s["buckets"] == 2 * layout.num_sel_blocks
    assert s["max_queries"] >= s["mean_queries"] > 0 and s["max_over_mean"] >= 1.0
    assert 0.0 < s["top_share"] <= 1.0


def test_ssa_inputs_benchmark_set_is_the_benchmarks():
    """The report's stand-in for the benchmark's scaled compressed keys and values equals bench.inputs' own."""
    import ssa_kernels
    from bench.inputs import compressed_kv_for_layout
    from model.reports.ssa_inputs import benchmark_inputs
    from tests.helpers import random_coords

    gen = torch.Generator().manual_seed(1)
    coords = random_coords((50, 20), 12, compression_block=4, selection_block=8, generator=gen)
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    like = [torch.zeros(70, 4, 16), torch.zeros(70, 2, 16), torch.zeros(70, 2, 16)]
    q, k, v, kc, vc, gate = benchmark_inputs(layout, like, seed=3)
    ref_kc, ref_vc = compressed_kv_for_layout(k.double(), v.double(), layout)
    torch.testing.assert_close(kc.double(), ref_kc.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc.double(), ref_vc.double(), rtol=1e-6, atol=1e-6)
    assert q.shape == (70, 4, 16) and gate.shape == (70, 3) and bool(((gate > 0) & (gate < 1)).all())


def test_cpu_run_writes_the_spread_of_a_real_block(tmp_path):
    """The CPU run: the released-size DiT's first block on shell-512 through the dense reference, the spread of its
    top-k choice and of the benchmark inputs' (no timings)."""
    import json

    from model.reports.ssa_inputs import main

    assert main(["--out", str(tmp_path), "--shape", "shell-512", "--blocks", "0", "--device", "cpu"]) == 0
    doc = json.loads((tmp_path / "ssa_inputs.json").read_text())
    assert not doc["timed"] and [c["inputs"] for c in doc["cases"]] == ["DiT block 0", "benchmark scaled inputs"]
    for case in doc["cases"]:
        s = case["spread"]
        assert case["timings"] == [] and s["choices"] == doc["tokens"] * 2 * 8  # every query chose 8 blocks per head
        assert s["max_queries"] > s["mean_queries"] > 0
    md = (tmp_path / "ssa_inputs.md").read_text()
    assert "max_queries" not in md and "| inputs | 1 token | 2 tokens | 4 tokens | 8 tokens |" in md
    dit, bench = (c["spread"]["blocks_per_token"] for c in doc["cases"])
    assert dit["1"] == bench["1"] == 8.0  # one token: its own 8 distinct blocks
    for per in (dit, bench):
        assert per["1"] >= per["2"] >= per["4"] >= per["8"] >= 8 / 8
    assert dit["4"] < bench["4"]  # a model's neighbouring queries share their choice more than random inputs do


def test_tile_union_counts_distinct_blocks_per_token():
    """tile_union: distinct non-negative blocks per tile of consecutive tokens, per token; the partial tile left out."""
    from model.reports.ssa_inputs import tile_union

    idx = torch.tensor([[[0, 1]], [[1, 2]], [[5, -1]], [[5, 6]], [[9, 9]]], dtype=torch.int32)  # [N 5, Hkv 1, topk 2]
    assert tile_union(idx, 1) == (2 + 2 + 1 + 2 + 1) / 5
    assert tile_union(idx, 2) == (3 + 2) / 2 / 2  # tiles {0,1,2} and {5,6}; token 4 left out
    assert tile_union(idx, 4) == 5 / 4  # {0, 1, 2, 5, 6}
    assert tile_union(idx, 8) == 0.0
    other = torch.where(idx[:4, 0] >= 0, idx[:4, 0] + 100, -1)
    two_heads = torch.stack([idx[:4, 0], other], 1)  # heads counted apart, then averaged
    assert tile_union(two_heads, 2) == tile_union(idx[:4], 2)


def test_sweep_option_is_checked(tmp_path, capsys):
    """--sweep: a kernel the report cannot time alone, an unknown setting and a malformed item are user errors."""
    from model.reports.ssa_inputs import main

    for spec, words in (("compression.FWD:rows=64", "selection.FWD"), ("selection.FWD:tiles=3", "tiles"),
                        ("selection.FWD:rows", "setting=value")):
        assert main(["--out", str(tmp_path), "--shape", "shell-512", "--device", "cpu", "--sweep", spec]) != 0
        err = capsys.readouterr().err
        assert "--sweep" in err and words in err, err


def test_cpu_run_refuses_large_shapes(tmp_path, capsys):
    from model.reports.ssa_inputs import main

    assert main(["--out", str(tmp_path), "--shape", "shell-1024", "--device", "cpu"]) != 0
    assert "--shape" in capsys.readouterr().err


def test_sweep_compares_only_the_outputs_a_kernel_writes(monkeypatch):
    """A launch setting that computes the same function shows a rounding-level difference, not the garbage of the
    accumulators the other backward part leaves uninitialised (every selection kernel alone, one setting each;
    the timing is stubbed: this checks the comparison, not the speed)."""
    import triton.testing

    import ssa_kernels
    from model.reports.ssa_inputs import sweep_kernels
    from ssa_kernels.launch import parse_sweep
    from tests.helpers import random_coords, random_inputs

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    gen = torch.Generator().manual_seed(1)
    coords = random_coords((40, 24), 12, compression_block=4, selection_block=8, generator=gen)
    args = [t.float() for t in random_inputs(coords, 16, 1, 16, compression_block=4, selection_block=8,
                                              generator=gen)]
    layout = ssa_kernels.build_layout(coords, compression_block=4, selection_block=8, window=8)
    sweeps = parse_sweep("selection.FWD:rows=16|32;selection.DQ:rows=16|32;selection.DKDV:max_queries=0|8")
    rows = sweep_kernels(args, layout, 3, sweeps, rep=1)
    assert [r["kernel"] for r in rows] == ["selection.FWD"] * 2 + ["selection.DQ"] * 2 + ["selection.DKDV"] * 2
    for r in rows:
        assert r["error"] is None and r["ms"] == 1.0, r
        assert r["rel_diff"] < 1e-5, r  # float32 rounding; larger tiles and the split sum in other orders
