"""What the compiled fast path (issue 12) must not change: the public API's arguments of the wrong
type are WrongType saying which (never mypyc's bare TypeError), and an shm transport dropped
unclosed is freed at once (its C ``execute`` holds it weakly: no reference cycle)."""

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


def test_a_client_id_of_the_wrong_type_is_wrongtype_through_connect_too(cluster):
    """``Client(transport, client_id='3')`` says WrongType (``client_id: Arg``), but
    ``Client.connect`` (and so ``LocalCluster.client`` on shm, ``fusee.asyncio``'s connect)
    still annotates ``client_id: int | None``: compiled, mypyc refuses a str there with its
    plain TypeError before the API's check runs."""
    from fusee.errors import WrongType
    with pytest.raises(WrongType, match="client_id is an int"):
        cluster.client(client_id="3")
    with pytest.raises(WrongType, match="client_id is an int"):
        cluster.client(client_id=3.0)


def test_a_pipeline_takes_any_truth_value_for_raise_on_error(cluster):
    """``Pipeline.execute(raise_on_error: bool)``: the source takes any truth value (0, 1,
    None...); compiled, mypyc refuses anything but a bool with a plain TypeError."""
    from fusee.batch import BatchError
    with cluster.client() as c:
        c.put(b"k", b"v")
        p = c.pipeline()
        p.insert(b"k", b"w")                # KeyExists
        assert isinstance(p.execute(raise_on_error=0)[0], Exception)
        p.insert(b"k", b"w")
        with pytest.raises(BatchError):
            p.execute(raise_on_error=1)


def test_a_cache_capacity_of_the_wrong_type_is_wrongtype_before_anything_runs(cluster):
    """``cache_capacity='x'``: compiled, mypyc's plain TypeError (``cache_capacity: int``);
    source, a TypeError comparing it at the first key cached, in the middle of an
    operation."""
    from fusee.errors import WrongType
    with pytest.raises(WrongType, match="cache_capacity is an int"):
        cluster.client(cache_capacity="x")


@pytest.mark.parametrize("transport", [3, b"shm", object()])
def test_a_transport_that_is_neither_a_name_nor_a_transport_is_wrongtype(cluster, transport):
    """``Client.connect(path, transport=3)`` raised the AttributeError of its own cleanup
    (``3.close()``), hiding what was wrong; ``Client(3, config)`` an AttributeError at the
    first batch. Both say WrongType, naming what a transport may be; a wrapper that executes
    and closes like one (the tests' fault injectors) is still taken."""
    from fusee.client import Client
    from fusee.errors import WrongType
    with pytest.raises(WrongType, match=f"transport must be .* got {type(transport).__name__}"):
        Client.connect(cluster.config_path, transport=transport)
    with pytest.raises(WrongType, match="transport must be"):
        Client(transport, cluster.config)


def test_a_wrapper_of_a_transport_is_taken(cluster):
    class Wrapper:
        def __init__(self, inner):
            self.inner, self.config, self.stats = inner, inner.config, inner.stats

        def execute(self, batch):
            return self.inner.execute(batch)

        def close(self):
            self.inner.close()

    from fusee.client import Client
    with Client.connect(cluster.config_path, transport=Wrapper(cluster.transport())) as kv:
        kv.put(b"k", b"v")
        assert kv.get(b"k") == b"v"


def test_client_given_a_backend_name_says_to_use_connect(cluster):
    """``Client("shm")``: Client() takes a connected transport; a backend's name is what
    ``Client.connect`` takes, and the error says so (the session-13 review: it said the
    transport "must be a backend name ... got str", refusing the very name it offered)."""
    from fusee.client import Client
    from fusee.errors import WrongType
    with pytest.raises(WrongType, match=r"Client\.connect\(config_path, transport='shm'\)"):
        Client("shm", cluster.config)
