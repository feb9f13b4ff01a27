"""Settings every test shares."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the models here are tiny, and OpenMP threads that spin-wait for
    cores other processes hold make a test 10-20x slower on a busy machine (see README: Threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
