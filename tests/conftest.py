"""Fixtures for the test suite (plain helper functions are in helpers.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one thread, like the stage processes (2 threads on a busy 2-core machine are
    far slower for tiny models). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=devices)
def device(request) -> str:
    return request.param


@pytest.fixture
def petra_record(monkeypatch):
    """PETRA and pipeline stages keep full records (every update's gradients, inputs, reconstructions):
    the test-only switch of revbits.petra.testing, which the stage processes inherit."""
    from revbits.petra.testing import RECORD_ENV

    monkeypatch.setenv(RECORD_ENV, "1")
