"""Benchmark session setup: say plainly what runs where."""
import torch


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"ssa benchmark: GPU {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        "ssa benchmark: no CUDA GPU on this machine. GPU timings need a GPU and are skipped; running the CPU part "
        "only (layout build, a small reference timing). These CPU figures are not kernel speed."
    )
