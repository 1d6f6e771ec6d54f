"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs: on a shared 2-core machine two OpenMP threads can be ~100x slower
    (each parallel region waits for a busy core), and single-threaded CPU sums are bitwise reproducible. Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
