"""fusee.asyncio.Client on real memory-node processes: the operations, many coroutines sharing
one client (a linearizable history), a loop that keeps running while a round trip waits, and
an operation cancelled half way that the next one settles."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from fusee.emulator.cluster import LocalCluster
from fusee.emulator.testkit.history import History
from fusee.emulator.testkit.linearizability import check
from fusee.asyncio import Client
from fusee.audit import audit
from fusee.batch import BatchError
from fusee.driver import run
from fusee.errors import ClientClosed, KeyExists, KeyNotFound, NodeTimeout

TASKS = 24
OPS = 15
KEYS = [b"k%d" % i for i in range(4)]


def _run(coroutine, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.mark.parametrize("transport, master", [("shm", False), ("zmq", False), ("shm", True)])
def test_the_operations_and_many_coroutines_sharing_one_client(transport, master):
    with LocalCluster(memnodes=3, transport=transport, replication=2, master=master) as c:
        async def main():
            async with await Client.connect(c.config_path) as kv:
                await kv.insert(b"a", b"1")
                with pytest.raises(KeyExists):
                    await kv.insert(b"a", b"2")
                await kv.update(b"a", b"2")
                assert await kv.get(b"a") == b"2"
                await kv.delete(b"a")
                with pytest.raises(KeyNotFound):
                    await kv.delete(b"a")
                assert await kv.get(b"a") is None
                await kv.put_many({b"x": b"1", b"y": b"2"})
                assert await kv.get_many([b"x", b"y", b"z"]) == [b"1", b"2", None]
                async with kv.pipeline() as p:
                    p.insert(b"z", b"3").get(b"x").delete(b"y")
                assert p.results == [None, b"1", None]
                with pytest.raises(BatchError):
                    await kv.pipeline().delete(b"y").execute()

                h = History()                 # one thread: the loop's order is real time
                rng = random.Random(7)

                async def task(name: str):
                    for n in range(OPS):
                        key = rng.choice(KEYS)
                        kind = rng.choice(("get", "put", "insert", "update", "delete"))
                        value = b"%s-%d" % (name.encode(), n) if kind in (
                            "put", "insert", "update") else None
                        op = h.invoke(name, kind, key, value)
                        try:
                            result = await getattr(kv, kind)(
                                *((key,) if value is None else (key, value)))
                        except (KeyExists, KeyNotFound) as e:
                            h.fail(op, e)
                        else:
                            h.ok(op, result)

                await asyncio.gather(*(task(f"t{i}") for i in range(TASKS)))
                report = check(h)
                assert report.ok, report.explain()
                assert report.ops == TASKS * OPS
            with pytest.raises(ClientClosed):
                await kv.get(b"x")

        _run(main())
        with c.client() as kv:
            assert kv.get(b"z") == b"3"
        report = c.audit()                      # the async client closed its id cleanly
        assert report.ok, report.explain()


def test_the_loop_runs_on_while_a_round_trip_waits_and_a_cancelled_op_is_settled():
    """Every MN stopped (SIGSTOP): a get waits for its reply on the worker thread until the
    timeout, while a ticker coroutine keeps running; a put cancelled mid-wait is settled by
    the next operation once the MNs run again, and the client closes clean."""
    with LocalCluster(memnodes=3, transport="zmq", replication=2, timeout=1.0) as c:
        async def main():
            kv = await Client.connect(c.config_path)
            await kv.put(b"k", b"before")
            ticks = 0
            stop = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticking = asyncio.create_task(ticker())
            pids = [p.pid for p in c.procs.values()]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(NodeTimeout):
                    await kv.get(b"k")
                assert ticks >= 3           # blocked loop: at most one tick in that second
                put = asyncio.create_task(kv.put(b"k", b"cut short"))
                await asyncio.sleep(0.2)
                put.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await put
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            stop.set()
            await ticking
            assert await kv.get(b"k") in (b"before", b"cut short")   # settled first
            await kv.put(b"k", b"after")
            assert await kv.get(b"k") == b"after"
            await kv.close()

        _run(main())
        with c.transport() as t:
            report = run(audit(c.config), t)
            assert report.ok, report


def test_an_operation_that_meets_a_dead_mn_goes_on_in_the_epoch_of_its_failover():
    """Under a master, an MN killed: the operations that meet it ask their driver for the next
    epoch (AwaitMembership, answered by the lease guard on the worker thread, the loop free),
    or have it thrown in once the master published it, and go on there; nothing is lost."""
    with LocalCluster(memnodes=3, transport="zmq", replication=2, master=True) as c:
        keys = [b"f%d" % i for i in range(12)]

        async def main():
            async with await Client.connect(c.config_path) as kv:
                for k in keys:
                    await kv.put(k, b"before")
                c.kill(2)
                for k in keys:
                    await kv.put(k, b"after")
                assert await kv.get_many(keys) == [b"after"] * len(keys)
                return kv.sync.core.membership

        membership = _run(main())
        assert membership.epoch >= 1 and 2 in membership.dead
        with c.client() as kv:
            assert kv.get_many(keys) == [b"after"] * len(keys)
