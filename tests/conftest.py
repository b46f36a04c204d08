"""Shared fixtures: clusters of every backend, always stopped."""

from __future__ import annotations

import pytest
from verbs_cluster import VerbsClusters, require_device

from fusee.emulator.cluster import LocalCluster

#: backend id -> LocalCluster arguments
BACKENDS = {
    "local": dict(transport="local"),
    "shm": dict(transport="shm"),
    "zmq-ipc": dict(transport="zmq", endpoint="ipc"),
    "zmq-tcp": dict(transport="zmq", endpoint="tcp"),
}


@pytest.fixture(autouse=True)
def _rdma_device(request):
    """A test marked ``rdma`` needs an RDMA device (``verbs_cluster.require_device``)."""
    if request.node.get_closest_marker("rdma"):
        require_device()


@pytest.fixture(params=[*BACKENDS, pytest.param("verbs", marks=pytest.mark.rdma)])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def _verbs_clusters():
    clusters = VerbsClusters()
    yield clusters
    clusters.stop()


@pytest.fixture
def cluster(backend, _verbs_clusters):
    """3 MNs of ``backend``: a new cluster, or the session's verbs cluster made fresh."""
    if backend == "verbs":
        yield _verbs_clusters.fresh()
        return
    with LocalCluster(memnodes=3, **BACKENDS[backend]) as c:
        yield c
