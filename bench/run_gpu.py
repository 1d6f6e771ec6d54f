"""Everything on the GPU machine in one call: the benchmark, the report, a short summary.

    python -m bench.run_gpu --out OUT [--full] [--time-limit 8] [-- extra pytest arguments]

runs ``pytest bench --benchmark-only --benchmark-json=OUT/raw/benchmark-raw.json`` (the log goes to
``OUT/pytest.log`` as well as the terminal), then ``python -m bench.report`` into ``OUT`` (``benchmark.md``,
``benchmark.json``, the PNG plots), and prints the summary table. ``--time-limit`` is the wall-clock limit of the
whole call in minutes: the benchmark gets ``--bench-budget-s`` = the limit minus reserves for start-up, the report
and the longest single item, stops starting items when that is spent, and skips items predicted to overrun (they
are listed in the report). The report is written even if some items fail; the exit status is pytest's.

On a machine without a CUDA GPU it says so, runs the CPU part (layout build, reference and Triton-interpreter
timings: CPU figures, not kernel speed) and reports those.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

#: Seconds kept back from --time-limit: Python/torch start-up and collection, the report, and one long item
#: (a dense fwd+bwd at 550k tokens takes ~45 s: one warm-up call and one timed call).
STARTUP_RESERVE_S = 20.0
REPORT_RESERVE_S = 20.0
LONGEST_ITEM_RESERVE_S = 45.0
DEFAULT_TIME_LIMIT_MIN = 8.0
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


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of minutes >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.run_gpu", description=__doc__.split("\n\n")[0].strip(),
                                 usage="%(prog)s --out OUT [--full] [--time-limit MINUTES] [--cpu-part] "
                                       "[-- extra pytest arguments]")
    ap.add_argument("--out", type=Path, required=True, metavar="PATH",
                    help="output folder: raw JSON, log, report, plots (created when missing)")
    ap.add_argument("--full", action="store_true", help="the full set instead of the headline set")
    ap.add_argument("--time-limit", type=_minutes, default=DEFAULT_TIME_LIMIT_MIN, metavar="MINUTES",
                    help="wall-clock minutes of this whole call, 0 for no limit (default %(default)g)")
    ap.add_argument("--cpu-part", action="store_true",
                    help="also run the CPU part, bench/test_cpu.py (default: only on a machine without CUDA)")
    return ap


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(our arguments, pytest's)``: pytest's follow ``--``."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def main(argv=None) -> int:
    argv, extra = split_argv(list(sys.argv[1:] if argv is None else argv))
    ap = build_parser()
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out: {args.out} is a file; give a folder (it is created when missing)")
    problem = _check_environment()
    if problem:
        ap.error(problem)
    import torch

    cpu_part = args.cpu_part
    if not torch.cuda.is_available():
        cpu_part = True
        print("bench.run_gpu: no CUDA GPU on this machine: GPU timings need a GPU and are skipped. Running the CPU "
              "part only (layout build, reference and Triton-interpreter timings); its figures are CPU figures, not "
              "kernel speed.", file=sys.stderr, flush=True)
    out = args.out.resolve()
    raw = out / "raw" / "benchmark-raw.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    if raw.exists():
        raw.unlink()  # never report a stale run
    budget = None
    if args.time_limit > 0:
        budget = args.time_limit * 60.0 - (time.monotonic() - t0) - STARTUP_RESERVE_S - REPORT_RESERVE_S \
            - LONGEST_ITEM_RESERVE_S
        budget = max(budget, MIN_BUDGET_S)
    cmd = pytest_command(raw, full=args.full, budget_s=budget, cpu_part=cpu_part, extra=extra)
    print(f"bench.run_gpu: benchmark budget {budget:.0f} s" if budget else "bench.run_gpu: no time budget",
          flush=True)
    rc = _stream(cmd, out / "pytest.log")
    if not raw.exists() or not _has_benchmarks(raw):
        why = "no benchmark item ran" + (" (pytest arguments after -- may have deselected every item)"
                                         if extra else "")
        print(f"bench.run_gpu: {why}, so there is no report; the pytest log is {out / 'pytest.log'} "
              f"(pytest exit status {rc})", file=sys.stderr)
        return rc if rc not in (0, 5) else 1
    from bench.report import make_report, summary_table

    res = make_report(raw, out)
    print(f"\nreport: {res['markdown']}\nrecords: {res['json']}\nplots: " +
          ", ".join(str(p) for p in res["plots"]))
    print(f"\n{summary_table(res['records'])}")
    if not torch.cuda.is_available():
        print(f"\nbench.run_gpu: no CUDA GPU: {res['markdown']} holds the CPU part's figures (CPU figures, not kernel "
              "speed); GPU timings need a GPU.")
    print(f"\nbench.run_gpu: done in {time.monotonic() - t0:.0f} s (pytest exit status {rc})")
    return rc


def _has_benchmarks(raw: Path) -> bool:
    import json

    try:
        return bool(json.loads(raw.read_text()).get("benchmarks"))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
