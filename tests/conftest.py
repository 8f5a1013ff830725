"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ray_cluster import RayNamespace, namespaces_available


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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayNamespace]:
    """A real 3-node Ray cluster (hosts hostA, hostB, hostC) in a network namespace of its own,
    started once per test session and torn down with every process it started."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'pqctl[ray]')")
    why = namespaces_available()
    if why:
        pytest.skip(f"no network namespace for the Ray cluster: {why}")
    with RayNamespace(["hostA", "hostB", "hostC"]) as cluster:
        yield cluster
