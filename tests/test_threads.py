"""One Client shared by many threads, on real memory-node processes (shm, zmq) and in-process
memory (local): no errors, and the history the threads observe is linearizable.

Before the client had a lock, six threads sharing one Client failed on shm with
``RuntimeError('concurrent poll() invocation')`` (one transport's liveness poll entered twice)
and on zmq with NodeTimeout after the whole timeout (two threads receiving on one DEALER socket
took each other's replies and dropped them as late)."""

from __future__ import annotations

import random
import threading

import pytest

from fusee.emulator.cluster import LocalCluster
from fusee.emulator.testkit.history import History
from fusee.emulator.testkit.linearizability import check
from fusee.errors import ClientClosed, KeyExists, KeyNotFound

THREADS = 6
OPS = 120
KEYS = [b"k%d" % i for i in range(4)]


class SharedHistory:
    """A History several threads append to: each event is recorded under a lock, so the
    logical clock orders invocations and returns as they really happened."""

    def __init__(self):
        self.history = History()
        self.lock = threading.Lock()

    def invoke(self, *args):
        with self.lock:
            return self.history.invoke(*args)

    def ok(self, op, result=None):
        with self.lock:
            self.history.ok(op, result)

    def fail(self, op, error):
        with self.lock:
            self.history.fail(op, error)


def _worker(kv, name: str, seed: int, h: SharedHistory, errors: list) -> None:
    rng = random.Random(seed)
    try:
        for n in range(OPS):
            roll = rng.random()
            if roll < 0.1:                       # a batch: its ops overlap its whole span
                keys = rng.sample(KEYS, 2)
                if rng.random() < 0.5:
                    items = {k: b"%s-%d" % (name.encode(), n) for k in keys}
                    ops = [h.invoke(name, "put", k, v) for k, v in items.items()]
                    kv.put_many(items)
                    for op in ops:
                        h.ok(op)
                else:
                    ops = [h.invoke(name, "get", k) for k in keys]
                    for op, value in zip(ops, kv.get_many(keys)):
                        h.ok(op, value)
                continue
            key = rng.choice(KEYS)
            kind = rng.choice(("get", "get", "put", "insert", "update", "delete"))
            value = b"%s-%d" % (name.encode(), n) if kind in ("put", "insert", "update") else None
            op = h.invoke(name, kind, key, value)
            try:
                result = kv.get(key) if kind == "get" else getattr(kv, kind)(
                    *((key,) if value is None else (key, value)))
            except (KeyExists, KeyNotFound) as e:
                h.fail(op, e)
            else:
                h.ok(op, result)
    except BaseException as e:          # anything else fails the test, with its thread named
        errors.append((name, e))


@pytest.mark.parametrize("transport", ["shm", "zmq", "local"])
def test_one_client_shared_by_threads_is_linearizable(transport):
    with LocalCluster(memnodes=3, transport=transport, replication=2) as cluster:
        with cluster.client() as kv:
            h, errors = SharedHistory(), []
            threads = [threading.Thread(target=_worker, args=(kv, f"t{i}", i, h, errors))
                       for i in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), "a thread hung"
            assert not errors, errors
            report = check(h.history)
            assert report.ok, report.explain()
            assert report.ops == sum(1 for op in h.history.ops if op.key is not None) > 0


def test_close_waits_for_the_operation_in_flight_and_later_ones_are_refused():
    """``close`` from one thread while another runs operations: the running one completes
    (the lock orders them), and every later one says the client is closed."""
    with LocalCluster(memnodes=3, transport="shm", replication=2) as cluster:
        kv = cluster.client()
        started, outcomes = threading.Event(), []

        def loop():
            n = 0
            try:
                while True:
                    kv.put(b"loop", b"%d" % n)
                    n += 1
                    started.set()
            except ClientClosed as e:
                outcomes.append(str(e))

        t = threading.Thread(target=loop)
        t.start()
        assert started.wait(30)
        kv.close()
        t.join(30)
        assert not t.is_alive()
        assert outcomes == ["this client is closed: open a new one"]
        with cluster.client() as again:              # the id was closed cleanly, the put kept
            assert again.get(b"loop") is not None
