"""Shared fixtures: clusters of every backend, always stopped."""

from __future__ import annotations

import pytest

from fusee.emulator.cluster import LocalCluster

#: backend id -> LocalCluster arguments
BACKENDS = {
    "local": dict(transport="local"),
    "shm": dict(transport="shm"),
    "zmq-ipc": dict(transport="zmq", endpoint="ipc"),
    "zmq-tcp": dict(transport="zmq", endpoint="tcp"),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture
def cluster(backend):
    with LocalCluster(memnodes=3, **BACKENDS[backend]) as c:
        yield c
