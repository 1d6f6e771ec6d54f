"""Everything on the GPU machine in one call: the benchmark, the report, a short summary.

    python -m bench.run_gpu --out OUT [--full] [--time-limit-s 480] [-- extra pytest arguments]

runs ``pytest bench --benchmark-only --benchmark-json=OUT/raw/benchmark-raw.json`` (the log goes to
``OUT/pytest.log`` as well as the terminal), then ``python -m bench.report`` into ``OUT`` (``benchmark.md``,
``benchmark.json``, the PNG plots), and prints the summary table. ``--time-limit-s`` is the wall-clock limit of the
whole call: the benchmark gets ``--bench-budget-s`` = the limit minus reserves for start-up, the report and the
longest single item, stops starting items when that is spent, and skips items predicted to overrun (they are
listed in the report). The report is written even if some items fail; the exit status is pytest's.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

#: Seconds kept back from --time-limit-s: Python/torch start-up and collection, the report, and one long item
#: (a dense fwd+bwd at 550k tokens takes ~45 s: one warm-up call and one timed call).
STARTUP_RESERVE_S = 20.0
REPORT_RESERVE_S = 20.0
LONGEST_ITEM_RESERVE_S = 45.0
DEFAULT_TIME_LIMIT_S = 480.0
#: Below this much benchmark budget the run would measure almost nothing.
MIN_BUDGET_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def _check_environment() -> str | None:
    for mod, hint in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark (and its dependency py-cpuinfo)"),
                      ("matplotlib", "matplotlib")):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not importable: install {hint} (a wheel will do; the machine has no internet)"
    return None


def pytest_command(raw: Path, *, full: bool, budget_s: float | None, cpu_part: bool, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "bench", "--benchmark-only", f"--benchmark-json={raw}",
           "-p", "no:cacheprovider", "-q", "-rsfE"]
    if full:
        cmd.append("--full")
    if budget_s is not None:
        cmd += ["--bench-budget-s", f"{budget_s:.0f}"]
    if not cpu_part:
        cmd.append("--no-cpu-part")
    return cmd + extra


def _stream(cmd: list[str], log: Path) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m bench.run_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (raw JSON, log, report, plots)")
    ap.add_argument("--full", action="store_true", help="the full set instead of the headline set")
    ap.add_argument("--time-limit-s", type=float, default=DEFAULT_TIME_LIMIT_S,
                    help=f"wall-clock limit of this whole call (default {DEFAULT_TIME_LIMIT_S:g}); 0 = no budget")
    ap.add_argument("--cpu-part", action="store_true", help="also run the CPU part (bench/test_cpu.py)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    problem = _check_environment()
    if problem:
        print(f"bench.run_gpu: {problem}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("bench.run_gpu: no CUDA GPU here; GPU timings need a GPU. The run continues (CPU part only) so that "
              "the command can be checked.", file=sys.stderr)
    out = args.out.resolve()
    raw = out / "raw" / "benchmark-raw.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    if raw.exists():
        raw.unlink()  # never report a stale run
    budget = None
    if args.time_limit_s > 0:
        budget = args.time_limit_s - (time.monotonic() - t0) - STARTUP_RESERVE_S - REPORT_RESERVE_S \
            - LONGEST_ITEM_RESERVE_S
        budget = max(budget, MIN_BUDGET_S)
    cmd = pytest_command(raw, full=args.full, budget_s=budget, cpu_part=args.cpu_part, extra=extra)
    print(f"bench.run_gpu: benchmark budget {budget:.0f} s" if budget else "bench.run_gpu: no time budget",
          flush=True)
    rc = _stream(cmd, out / "pytest.log")
    if not raw.exists():
        print(f"bench.run_gpu: pytest (exit {rc}) wrote no {raw}; see {out / 'pytest.log'}", file=sys.stderr)
        return rc or 1
    from bench.report import make_report, summary_table

    res = make_report(raw, out)
    print(f"\nreport: {res['markdown']}\nrecords: {res['json']}\nplots: " +
          ", ".join(str(p) for p in res["plots"]))
    print(f"\n{summary_table(res['records'])}")
    print(f"\nbench.run_gpu: done in {time.monotonic() - t0:.0f} s (pytest exit status {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
