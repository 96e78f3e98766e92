"""Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spinning
makes them much slower: run this directory single-threaded, restoring the setting afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
