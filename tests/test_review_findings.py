"""Review of trial-merge (issue 12): behaviours the fast path's rewrite changed."""

from __future__ import annotations

import gc
import weakref

import pytest

from fusee.emulator.cluster import LocalCluster


@pytest.fixture
def cluster():
    with LocalCluster(memnodes=3, transport="shm") as c:
        yield c


def test_an_shm_transport_dropped_unclosed_is_freed_without_the_cycle_collector(cluster):
    """``_atomic.shm_executor`` binds the transport (and its bound ``_execute``) into the
    function stored as the instance's ``execute``: transport -> execute -> state -> transport.
    Dropped without ``close()``, the transport, its mappings and its pidfds stay until the
    cycle collector runs (on main, refcounting freed them at once)."""
    t = cluster.transport()
    ref = weakref.ref(t)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del t
        freed = ref() is None
    finally:
        if enabled:
            gc.enable()
        gc.collect()
    assert freed, "an unclosed ShmTransport sits in a reference cycle (its C execute)"
