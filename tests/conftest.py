"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module's tests: the tests' models are tiny, so they run several
    times faster without OpenMP hand-offs, and on a shared CPU a descheduled second thread
    stalls every op. Modules ask for it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch  # the planner's tests never load torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
