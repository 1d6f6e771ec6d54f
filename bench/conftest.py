"""Benchmark session setup: say plainly what runs where, choose the set, order and budget the items.

``pytest bench --benchmark-only`` runs the headline set; ``--full`` adds every shape x configuration x input set
of BENCHMARK.md and the scaling sweep (those items carry the ``full`` marker, so ``-m full`` / ``-m "not full"``
select within a ``--full`` run). Without a CUDA GPU the GPU items skip (GPU timings need a GPU) and only the CPU
part runs; ``--dry-run`` instead runs every GPU code path on CPU at a few dozen tokens to catch Python errors
(figures labelled ``cpu-dry-run``, not kernel speed). See bench/README.md for every option.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import pytest
import torch

from bench.cases import (
    DENSE_IMPLS,
    TIER_CEILING,
    TIER_CPU,
    Case,
    DenseCase,
    Item,
    build_items,
)
from bench.timing import TimingPolicy, environment_info

NO_GPU_MESSAGE = (
    "ssa benchmark: no CUDA GPU on this machine. GPU timings need a GPU and are skipped; running the CPU part "
    "only (layout build, a small reference and Triton-interpreter timing). These CPU figures are not kernel speed. "
    "`--dry-run` runs the GPU code paths on CPU at tiny size to check them."
)
DRY_RUN_MESSAGE = (
    "ssa benchmark: DRY RUN on CPU - every GPU code path runs at {tokens} tokens, heads (Hq, Hkv, D) = {heads}, "
    "float32, Triton interpreter, to catch errors; the figures (device 'cpu-dry-run') are not kernel speed."
)
#: Cost model of the budget guard: time grows like tokens^exponent (dense attention is quadratic).
COST_EXPONENT = {"dense": 2.0, "ssa": 1.0, "layout": 1.0}
DEFAULT_DRY_RUN_TOKENS = 64
#: (Hq, Hkv, D) of the dry run: the interpreter takes seconds per call even so (the GQA structure is kept).
DRY_RUN_HEADS = (4, 2, 16)
DEFAULT_CPU_TOKENS = 128
DEFAULT_DENSE_MAX_TOKENS = 600_000
DEFAULT_FLEX_MAX_TOKENS = 150_000
DEFAULT_MATMUL_SIZE = 8192
DRY_RUN_MATMUL_SIZE = 256


def pytest_addoption(parser):
    g = parser.getgroup("ssa-bench", "SSA benchmark (bench/README.md)")
    g.addoption("--full", action="store_true", help="run the full set: all shapes x configurations x input sets "
                                                    "and the scaling sweep (default: the headline set)")
    g.addoption("--dry-run", action="store_true", help="run the GPU code paths on CPU at tiny size (no timings "
                                                       "worth reading; catches errors)")
    g.addoption("--dry-run-tokens", type=int, default=DEFAULT_DRY_RUN_TOKENS, help="tokens per shape in the dry run")
    g.addoption("--ssa-standin", action="store_true", help="dry run only: stand in for missing kernel functions "
                                                           "with the dense reference")
    g.addoption("--cpu-tokens", type=int, default=DEFAULT_CPU_TOKENS,
                help="tokens of the CPU reference-vs-interpreter timing")
    g.addoption("--no-cpu-part", action="store_true", help="deselect the CPU part (bench/test_cpu.py)")
    g.addoption("--bench-budget-s", type=float, default=None,
                help="stop starting GPU items after this many seconds (and skip items predicted to overrun)")
    g.addoption("--baselines", default=",".join(DENSE_IMPLS), help="comma-separated dense baselines to run")
    g.addoption("--dense-max-tokens", type=int, default=DEFAULT_DENSE_MAX_TOKENS,
                help="skip dense baselines on more tokens than this")
    g.addoption("--flex-max-tokens", type=int, default=DEFAULT_FLEX_MAX_TOKENS,
                help="skip FlexAttention (full and selection mask) on more tokens than this")
    g.addoption("--matmul-size", type=int, default=DEFAULT_MATMUL_SIZE, help="M = N = K of the bf16 ceiling matmul")
    d = TimingPolicy()
    g.addoption("--bench-warmup-ms", type=float, default=d.warmup_ms, help="do_bench warm-up (ms)")
    g.addoption("--bench-rep-ms", type=float, default=d.rep_ms, help="do_bench repetition time (ms)")
    g.addoption("--bench-min-samples", type=int, default=d.min_samples, help="do_bench: at least this many samples")
    g.addoption("--bench-max-samples", type=int, default=d.max_samples, help="do_bench: about this many at most")
    g.addoption("--bench-slow-ms", type=float, default=d.slow_ms,
                help="ops slower than this per call get a fixed, budgeted number of timed calls instead of do_bench")
    g.addoption("--bench-slow-budget-ms", type=float, default=d.slow_budget_ms,
                help="GPU time budget per measurement of a slow op (ms)")
    g.addoption("--bench-slow-reps", type=int, default=d.slow_max_reps, help="at most this many timed calls of a "
                                                                            "slow op (at least 1)")


@dataclass
class BenchSession:
    """Settings and state of one benchmark session (one per pytest run)."""

    device: str
    dtype: torch.dtype
    dry_run: bool
    full: bool
    standin: bool
    max_tokens: int | None
    cpu_tokens: int
    budget_s: float | None
    baselines: tuple[str, ...]
    dense_max_tokens: int
    flex_max_tokens: int
    matmul_size: int
    policy: TimingPolicy
    start: float = field(default_factory=time.monotonic)
    costs: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)  # nodeid -> Item
    _ssa_ctx: object = None
    _dense_ctx: object = None
    _api: object = None
    _env: dict | None = None

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def heads(self) -> tuple[int, int, int] | None:
        """(Hq, Hkv, D) forced on every case (the dry run's small heads), or None: each configuration's own."""
        return DRY_RUN_HEADS if self.dry_run else None

    @property
    def runs_gpu_items(self) -> bool:
        return self.gpu or self.dry_run

    @property
    def timed_on(self) -> str:
        return "cuda" if self.gpu else "cpu-dry-run"

    def env(self) -> dict:
        if self._env is None:
            self._env = environment_info(self.device)
        return self._env

    def settings(self) -> dict:
        keys = ("device", "dry_run", "full", "standin", "max_tokens", "budget_s", "baselines", "dense_max_tokens",
                "flex_max_tokens", "matmul_size")
        out = {k: getattr(self, k) for k in keys}
        out.update(dtype=str(self.dtype).replace("torch.", ""), set="full" if self.full else "headline",
                   policy=asdict(self.policy))
        return out

    def require_gpu(self):
        if not self.runs_gpu_items:
            pytest.skip("GPU timings need a CUDA GPU (none on this machine); `--dry-run` checks these code paths "
                        "on CPU")

    # -- time budget --------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check_budget(self, item: Item, tokens: int) -> None:
        if self.budget_s is None:
            return
        used = self.elapsed()
        if used >= self.budget_s:
            pytest.skip(f"time budget exhausted ({used:.0f} s of --bench-budget-s {self.budget_s:g})")
        hist = self.costs.get(item.cost_key)
        if hist:
            exp = COST_EXPONENT.get(item.kind, 1.0)
            rate = min(sec / max(tok, 1) ** exp for tok, sec in hist)
            predicted = rate * tokens**exp
            if used + predicted > self.budget_s:
                pytest.skip(f"time budget: predicted {predicted:.0f} s after {used:.0f} s would pass "
                            f"--bench-budget-s {self.budget_s:g}")

    def record_cost(self, item: Item, tokens: int, seconds: float) -> None:
        self.costs.setdefault(item.cost_key, []).append((tokens, seconds))

    # -- shared contexts (one SSA and one dense context alive at a time, to bound GPU memory) -----------------------
    def api(self):
        if self._api is None:
            from bench.harness import load_kernel_api

            self._api = load_kernel_api(standin=self.standin and self.dry_run)
        return self._api

    def ssa_context(self, case: Case):
        from bench.harness import SSAContext
        from bench.timing import free_memory

        if self._ssa_ctx is None or self._ssa_ctx.case.id != case.id:
            self._ssa_ctx = None
            free_memory(self.device)
            self._ssa_ctx = SSAContext(case, self.api(), device=self.device, dtype=self.dtype,
                                       max_tokens=self.max_tokens, heads=self.heads)
        return self._ssa_ctx

    def dense_context(self, dcase: DenseCase):
        from bench.harness import DenseContext
        from bench.timing import free_memory

        if self._dense_ctx is None or self._dense_ctx.dcase.id != dcase.id:
            self._dense_ctx = None
            free_memory(self.device)
            self._dense_ctx = DenseContext(dcase, device=self.device, dtype=self.dtype, max_tokens=self.max_tokens,
                                           heads=self.heads)
        return self._dense_ctx


_SESSION = pytest.StashKey[BenchSession]()


def pytest_configure(config):
    config.addinivalue_line("markers", "full: the full benchmark set (all shapes x configurations, the sweep)")
    # Triton's interpreter (CPU) warns on every scalar index with numpy >= 1.25: thousands of identical lines.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
    # the dry run calls FlexAttention eagerly on CPU on purpose (tiny inputs)
    config.addinivalue_line("filterwarnings", "ignore:flex_attention called without torch.compile:UserWarning")
    opt = config.getoption
    dry = bool(opt("--dry-run", default=False))
    gpu = torch.cuda.is_available() and not dry
    policy = TimingPolicy(
        warmup_ms=opt("--bench-warmup-ms", default=TimingPolicy.warmup_ms),
        rep_ms=opt("--bench-rep-ms", default=TimingPolicy.rep_ms),
        min_samples=opt("--bench-min-samples", default=TimingPolicy.min_samples),
        max_samples=opt("--bench-max-samples", default=TimingPolicy.max_samples),
        slow_ms=opt("--bench-slow-ms", default=TimingPolicy.slow_ms),
        slow_budget_ms=opt("--bench-slow-budget-ms", default=TimingPolicy.slow_budget_ms),
        slow_max_reps=opt("--bench-slow-reps", default=TimingPolicy.slow_max_reps),
        cpu_reps=1 if dry else TimingPolicy.cpu_reps,
        cpu_warmup=not dry,
    )
    baselines = tuple(b.strip() for b in (opt("--baselines", default=",".join(DENSE_IMPLS)) or "").split(",")
                      if b.strip())
    unknown = sorted(set(baselines) - set(DENSE_IMPLS))
    if unknown:
        raise pytest.UsageError(f"--baselines: unknown {unknown}; known: {list(DENSE_IMPLS)}")
    config.stash[_SESSION] = BenchSession(
        device="cuda" if gpu else "cpu",
        dtype=torch.bfloat16 if gpu else torch.float32,  # the interpreter's bf16 tl.dot is garbage (DESIGN.md 5)
        dry_run=dry,
        full=bool(opt("--full", default=False)),
        standin=bool(opt("--ssa-standin", default=False)),
        max_tokens=None if gpu else opt("--dry-run-tokens", default=DEFAULT_DRY_RUN_TOKENS),
        cpu_tokens=opt("--cpu-tokens", default=DEFAULT_CPU_TOKENS),
        budget_s=opt("--bench-budget-s", default=None),
        baselines=baselines,
        dense_max_tokens=opt("--dense-max-tokens", default=DEFAULT_DENSE_MAX_TOKENS),
        flex_max_tokens=opt("--flex-max-tokens", default=DEFAULT_FLEX_MAX_TOKENS),
        matmul_size=opt("--matmul-size", default=DEFAULT_MATMUL_SIZE) if gpu else DRY_RUN_MATMUL_SIZE,
        policy=policy,
    )


def _session(config) -> BenchSession:
    return config.stash[_SESSION]


@pytest.fixture(scope="session")
def bench(request) -> BenchSession:
    return _session(request.config)


def pytest_generate_tests(metafunc):
    s = _session(metafunc.config)
    names = [n for n in ("ssa_item", "layout_item", "dense_item", "ceiling_item") if n in metafunc.fixturenames]
    if not names:
        return
    items = build_items(s.full, s.baselines)
    for name in names:
        params = [pytest.param(it, id=it.id, marks=[pytest.mark.full] if it.full_only else []) for it in items[name]]
        metafunc.parametrize(name, params)


def _item_spec(item) -> Item | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    for name in ("ssa_item", "layout_item", "dense_item", "ceiling_item"):
        if name in callspec.params:
            return callspec.params[name]
    return None


def pytest_collection_modifyitems(session, config, items):
    s = _session(config)
    if config.getoption("--no-cpu-part", default=False):
        keep = [it for it in items if "test_cpu" not in it.nodeid]
        config.hook.pytest_deselected(items=[it for it in items if "test_cpu" in it.nodeid])
        items[:] = keep

    def tier(pair):
        pos, it = pair
        spec = _item_spec(it)
        if spec is None:
            return (TIER_CPU if "test_cpu" in it.nodeid else TIER_CEILING, pos)
        return (spec.tier, pos)

    ordered = [it for _, it in sorted(enumerate(items), key=tier)]
    items[:] = ordered
    for it in items:
        spec = _item_spec(it)
        if spec is not None:
            s.items[it.nodeid] = spec


def pytest_report_header(config):
    s = _session(config)
    lines = []
    if s.gpu:
        env = s.env()
        lines.append(f"ssa benchmark: GPU {env['gpu']} (torch {env['torch']}, triton {env['triton']}, "
                     f"CUDA {env['cuda']}, cuDNN {env['cudnn']})")
    elif s.dry_run:
        lines.append(DRY_RUN_MESSAGE.format(tokens=s.max_tokens, heads=DRY_RUN_HEADS))
    else:
        lines.append(NO_GPU_MESSAGE)
    lines.append(f"ssa benchmark: {'full' if s.full else 'headline'} set; baselines {','.join(s.baselines)}; "
                 f"budget {s.budget_s if s.budget_s is not None else 'none'} s")
    return lines


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call") and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append((report.nodeid, reason.removeprefix("Skipped: ")))


#: (nodeid, reason) of skipped items, filled by the hook above (it does not get the config).
_SKIPS: list = []


def _skip_records(s: BenchSession) -> list[dict]:
    out = []
    for nodeid, reason in _SKIPS:
        spec = s.items.get(nodeid)
        rec = {"nodeid": nodeid, "reason": reason}
        if spec is not None:
            rec.update(kind=spec.kind, shape=spec.shape, what=spec.what, measured_pass=spec.passname,
                       config=spec.case.config if spec.case else None,
                       inputs=spec.case.inputs if spec.case else None,
                       configs=list(spec.dcase.configs) if spec.dcase else None)
        out.append(rec)
    return out


def pytest_benchmark_update_machine_info(config, machine_info):
    s = _session(config)
    machine_info["ssa_bench_env"] = s.env()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    s = _session(config)
    output_json["ssa_bench"] = {"env": s.env(), "settings": s.settings(), "skipped": _skip_records(s),
                                "elapsed_s": round(s.elapsed(), 1)}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("collectonly", default=False):
        return
    s = _session(config)
    tr = terminalreporter
    tr.section("ssa benchmark")
    if not s.gpu and not s.dry_run:
        tr.write_line("No CUDA GPU: GPU timings need a GPU and were skipped. The figures above are CPU figures "
                      "(layout build, reference / Triton interpreter), not kernel speed.")
    elif s.dry_run:
        tr.write_line(DRY_RUN_MESSAGE.format(tokens=s.max_tokens, heads=DRY_RUN_HEADS))
    else:
        tr.write_line(f"GPU figures on {s.env()['gpu']}: per-repetition CUDA-event times (do_bench or a fixed "
                      "count, bench/README.md) replayed into pytest-benchmark; the report derives bwd = fwd+bwd - fwd.")
    budget_skips = sum(1 for _, r in _SKIPS if r.startswith("time budget"))
    if budget_skips:
        tr.write_line(f"{budget_skips} items skipped by the time budget (--bench-budget-s {s.budget_s:g}).")
    tr.write_line(f"elapsed {s.elapsed():.0f} s. Report: python -m bench.report --json <the --benchmark-json file>")
