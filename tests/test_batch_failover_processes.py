"""The batch APIs (``put_many``, ``get_many``, ``pipeline``) with many operations in flight
while a memory node is killed, on real memory-node processes with a master.

Three clients (one thread each) run batches of 1-10 random operations on a few hot keys
(pipelines of depth 1, 4 or 8, mixed kinds and keys twice; put_many; get_many) while MN
``victim`` is killed and failed over. Every operation's outcome is recorded in a history (a
batch's operations each from the batch's call to its return: concurrent with one another);
an operation may end only with its result, KeyExists or KeyNotFound (anything else is a bug:
the batch APIs must not misreport one key's outcome for another's failure). After the run a
reader gets every key, and the whole history must be linearizable: no acknowledged write of
any batch lost. (``tests/test_failover_processes.py`` does this for single operations.)
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from histories import check_with_final_reads

from fusee.batch import BatchError
from fusee.emulator.cluster import LocalCluster
from fusee.emulator.testkit.history import ERROR, OK, Op
from fusee.errors import KeyExists, KeyNotFound

KEYS = [b"k%d" % i for i in range(12)]
KINDS = ["get", "put", "put", "insert", "update", "delete"]


def _batches(kv, me: int, ops: list[Op], unexpected: list[str], stop: threading.Event) -> None:
    """Client ``me``'s batches until ``stop``; each operation's outcome into ``ops``."""
    rng = random.Random(me)
    i = 0
    while not stop.is_set():
        plan = []
        for _ in range(rng.randint(1, 10)):
            kind, key = rng.choice(KINDS), rng.choice(KEYS)
            i += 1
            plan.append((kind, key, None if kind in ("get", "delete") else b"c%d-%d" % (me, i)))
        t0 = 2 * time.monotonic_ns()
        kinds, keys = {k for k, _, _ in plan}, [k for _, k, _ in plan]
        try:
            if kinds == {"put"} and len(set(keys)) == len(keys) and rng.random() < 0.5:
                kv.put_many({k: v for _, k, v in plan})
                results: list = [None] * len(plan)
            elif kinds == {"get"} and rng.random() < 0.5:
                results = kv.get_many(keys)
            else:
                p = kv.pipeline(depth=rng.choice([1, 4, 8]))
                for kind, key, value in plan:
                    getattr(p, kind)(*((key,) if value is None else (key, value)))
                results = p.execute(raise_on_error=False)
        except BatchError as e:
            results = e.results
        t1 = 2 * time.monotonic_ns() + 1
        for (kind, key, value), r in zip(plan, results):
            if isinstance(r, (KeyExists, KeyNotFound)):
                ops.append(Op(0, f"c{me}", kind, key, value, t0, t1, ERROR, None,
                              type(r).__name__))
            elif isinstance(r, Exception):
                unexpected.append(f"c{me} {kind} {key!r}: {r!r}")
                return
            else:
                ops.append(Op(0, f"c{me}", kind, key, value, t0, t1, OK, r))


@pytest.mark.soak
@pytest.mark.parametrize("backend, victim", [("shm", 0), ("zmq", 1), ("shm", 2)])
def test_batches_in_flight_lose_nothing_when_an_mn_dies(backend, victim):
    with LocalCluster(memnodes=3, transport=backend, replication=3, master=True,
                      client_lease=2.0, mn_lease=2.0, timeout=1.0) as c:
        clients = [c.client() for _ in range(3)]
        ops: list[Op] = []
        unexpected: list[str] = []
        stop = threading.Event()
        threads = [threading.Thread(target=_batches, args=(kv, i, ops, unexpected, stop))
                   for i, kv in enumerate(clients)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            c.kill(victim)
            deadline = time.monotonic() + 60
            while c.master_status()["dead"] != [victim]:
                assert time.monotonic() < deadline, "no failover"
                time.sleep(0.2)
            before = len(ops)
            while len(ops) < before + 2000 and not unexpected:
                assert time.monotonic() < deadline, "the clients did not carry on"
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not unexpected, unexpected[:5]
        with c.client() as reader:
            check_with_final_reads(ops, reader, KEYS)
        for kv in clients:
            kv.close()
