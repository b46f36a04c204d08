"""A KeyboardInterrupt between two round trips of an operation, then the ordinary ``with``
exit: the client must settle what the operation left open (``fusee.settle``) before its
close calls the id CLEAN, so that every other client can still write the key and the audit
finds nothing open or leaked.

The interrupt is raised where a Ctrl-C lands in a real client: in the transport, before a
batch is posted or after it executed with its completions unseen. The verb-by-verb sweep of
every boundary is tests/test_interrupt_sweep.py; real SIGINTs to client processes are in
``test_sigint_to_client_processes_under_load`` below.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import multiprocessing as mp
import os
import random
import signal
import threading
import time

import pytest

from fusee.emulator.cluster import LocalCluster
from fusee.emulator.testkit.history import CRASHED, ERROR, OK, Op
from fusee.emulator.testkit.linearizability import check
from fusee.audit import audit
from fusee.client import Client
from fusee.driver import run, run_concurrently
from fusee.errors import KeyNotFound
from fusee.memory_map import MemoryMap
from fusee.verbs import NodeTimeout, Read
from fusee.config import LayoutConfig
from processes import StopFlag, wait_for
from storekit import SMALL, config
from test_failover_processes import KEYS, _history, _worker
from fusee.transports.local import LocalMemory, LocalTransport

#: a wait on another client's round that long means the round is never settled
PATIENCE = 2_000


class CtrlC:
    """A transport that raises KeyboardInterrupt at its batch number ``at`` (counted from
    ``arm``): before posting it, or once it executed (``executed``: the completions lost)."""

    def __init__(self, transport):
        self.transport = transport
        self.config, self.stats = transport.config, transport.stats
        self.batches, self.at, self.executed = 0, None, False

    def arm(self, after: int, executed: bool = False) -> None:
        """Interrupt the batch ``after`` + 1 from now."""
        self.at, self.executed = self.batches + after + 1, executed

    def execute(self, batch):
        self.batches += 1
        if self.batches == self.at and not self.executed:
            raise KeyboardInterrupt
        results = self.transport.execute(batch)
        if self.batches == self.at:
            raise KeyboardInterrupt
        return results

    def close(self) -> None:
        self.transport.close()


def _store(cfg, kind: str) -> LocalMemory:
    mem = LocalMemory(cfg)
    if kind != "insert":
        with Client(LocalTransport(cfg, memory=mem)) as setup:
            setup.insert(b"k", b"old")
    return mem


def _call(kv: Client, kind: str) -> None:
    getattr(kv, kind)(b"k", *([] if kind == "delete" else [b"new"]))


def _round_trips(cfg, kind: str) -> int:
    """The round trips the operation takes, uninterrupted."""
    t = CtrlC(LocalTransport(cfg, memory=_store(cfg, kind)))
    with Client(t) as kv:
        before = t.batches
        _call(kv, kind)
        return t.batches - before


def _writable_and_clean(cfg, mem, where: str) -> None:
    """Another client can update and delete the key, and the audit finds nothing open."""
    other = Client(LocalTransport(cfg, memory=mem))
    other.core.patience = PATIENCE
    with other:
        other.put(b"k", b"later")
        assert other.get(b"k") == b"later"
        other.delete(b"k")
        with pytest.raises(KeyNotFound):
            other.delete(b"k")
    report = run(audit(cfg, [other.core]), LocalTransport(cfg, memory=mem))
    assert report.ok, f"{where}:\n{report.explain()}"


@pytest.mark.parametrize("executed", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("kind", ["insert", "update", "delete", "put"])
def test_ctrl_c_between_round_trips_then_with_exit(kind, executed):
    """Ctrl-C before (or after) each round trip of one operation, then the ``with`` exit
    closes the client; another client then writes the key, and the store is audited."""
    cfg = config(nodes=3, r=3)
    for after in range(_round_trips(cfg, kind)):
        mem = _store(cfg, kind)
        t = CtrlC(LocalTransport(cfg, memory=mem))
        with pytest.raises(KeyboardInterrupt):
            with Client(t) as kv:
                t.arm(after, executed)
                _call(kv, kind)
        _writable_and_clean(cfg, mem, f"{kind}: Ctrl-C at round trip {after}")


def test_ctrl_c_caught_then_the_client_goes_on():
    """A caller that catches the KeyboardInterrupt and carries on: the next operation
    settles the cut one first (its own write of the key would otherwise wait on itself)."""
    cfg = config(nodes=3, r=3)
    mem = _store(cfg, "update")
    t = CtrlC(LocalTransport(cfg, memory=mem))
    with Client(t) as kv:
        kv.core.patience = PATIENCE
        t.arm(2)                        # the backup CASes went out, nothing after them
        with pytest.raises(KeyboardInterrupt):
            kv.update(b"k", b"cut")
        kv.update(b"k", b"next")
        assert kv.get(b"k") == b"next"
        assert kv.core.settled
    _writable_and_clean(cfg, mem, "after the client went on")


@pytest.mark.parametrize("batch", ["put_many", "pipeline"])
@pytest.mark.parametrize("after", [2, 3])
def test_ctrl_c_caught_then_a_batch_goes_on(batch, after):
    """As above, but the next write of the key is a batch (``fusee.batch``): it must settle
    the cut operation first too, not wait on the client's own open round (Stalled)."""
    cfg = config(nodes=3, r=3)
    mem = _store(cfg, "update")
    t = CtrlC(LocalTransport(cfg, memory=mem))
    with Client(t) as kv:
        kv.core.patience = PATIENCE
        t.arm(after)
        with pytest.raises(KeyboardInterrupt):
            kv.update(b"k", b"cut")
        if batch == "put_many":
            kv.put_many({b"k": b"next", b"other": b"o"})
        else:
            with kv.pipeline() as p:
                p.put(b"k", b"next").put(b"other", b"o")
        assert kv.get_many([b"k", b"other"]) == [b"next", b"o"]
        assert kv.core.settled
    _writable_and_clean(cfg, mem, f"after a {batch} went on")


def test_second_ctrl_c_during_close_leaves_the_id_for_recovery():
    """Ctrl-C during an insert, then again at each batch of the close that settles it: the
    id is never CLEAN with the claim open (recovering it, as its next holder must, leaves
    the store writable and clean)."""
    cfg = config(nodes=3, r=3)
    probe = CtrlC(LocalTransport(cfg, memory=_store(cfg, "insert")))
    kv = Client(probe)
    probe.arm(2)
    with pytest.raises(KeyboardInterrupt):
        _call(kv, "insert")
    before = probe.batches
    kv.close()
    closing = probe.batches - before
    assert closing > 3                  # recovery, adoption, then the close itself
    for second in range(closing):
        mem = _store(cfg, "insert")
        t = CtrlC(LocalTransport(cfg, memory=mem))
        kv = Client(t)
        t.arm(2)
        with pytest.raises(KeyboardInterrupt):
            _call(kv, "insert")
        t.arm(second)
        with pytest.raises(KeyboardInterrupt):
            kv.close()
        assert kv.closed
        # CLEAN (after the recovery, or at the very end) or left IN_USE: recovering it is
        # what a later holder does in either case (and nothing, if it is CLEAN)
        Client(LocalTransport(cfg, memory=mem), client_id=kv.client_id, recover=True).close()
        _writable_and_clean(cfg, mem, f"second Ctrl-C at batch {second} of the close")


@pytest.mark.parametrize("after", range(1, 5))
def test_ctrl_c_with_operations_in_flight_together(after):
    """``run_concurrently`` with four writes of one client in flight (5 batches together):
    the interrupt closes every one of them, and the close settles them all."""
    cfg = config(nodes=3, r=3)
    mem = LocalMemory(cfg)
    with Client(LocalTransport(cfg, memory=mem)) as setup:
        for k in (b"a", b"b"):
            setup.insert(k, b"old")
    t = CtrlC(LocalTransport(cfg, memory=mem))
    with pytest.raises(KeyboardInterrupt):
        with Client(t) as kv:
            t.arm(after)
            ops = [kv.core.update(b"a", b"new"), kv.core.insert(b"c", b"new"),
                   kv.core.delete(b"b"), kv.core.put(b"d", b"new")]
            run_concurrently(ops, kv.executor)
    other = Client(LocalTransport(cfg, memory=mem))
    other.core.patience = PATIENCE
    with other:
        for k in (b"a", b"b", b"c", b"d"):
            other.put(k, b"later")
    report = run(audit(cfg, [other.core]), LocalTransport(cfg, memory=mem))
    assert report.ok, report.explain()


def test_ctrl_c_while_the_shm_transport_takes_in_a_dead_mn():
    """A KeyboardInterrupt that lands while the shm transport takes in an MN's death (here:
    as it closes the MN's pidfd) must not make it forget the death: the segment stays
    mapped, and verbs to it would go on succeeding into memory nobody serves."""
    with LocalCluster(memnodes=3, transport="shm") as c:
        t = c.transport(timeout=1.0)
        addr = MemoryMap.of(c.config.layout).data
        c.kill(1)
        close = os.close

        def close_then_ctrl_c(fd):
            os.close = close
            close(fd)
            raise KeyboardInterrupt
        os.close = close_then_ctrl_c
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in range(10 ** 6):            # until the transport sees the death
                    t.execute([Read(1, addr, 8)])
        finally:
            os.close = close
        with pytest.raises(NodeTimeout):
            t.execute([Read(1, addr, 8)])
        t.close()


def test_ctrl_c_while_waiting_for_a_failover():
    """With a master: a write meets a memory node killed a moment before and waits for the
    failover; Ctrl-C then. The close settles the write in the new epoch (its recovery meets
    the epoch change and runs again in it), and the key stays writable."""
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), client_lease=2.0, mn_lease=2.0,
                      timeout=1.0) as c:
        with c.client() as setup:
            setup.put(b"k", b"old")
        kv = c.client()
        c.kill(0)
        ctrl_c = threading.Timer(0.5, signal.pthread_kill,
                                 (threading.main_thread().ident, signal.SIGINT))
        ctrl_c.start()
        with pytest.raises(KeyboardInterrupt):
            with kv:
                kv.put(b"k", b"new")            # meets MN 0 dead, waits for the failover
        ctrl_c.join()
        assert kv.core.membership.dead == {0}   # settled and closed in the new epoch
        with c.client() as other:
            other.core.patience = PATIENCE
            other.put(b"k", b"later")
            assert other.get(b"k") == b"later"
        wait_for(lambda: c.master_status()["repairs"] == {}, "the master's repairs")
        with c.transport(dead={0}) as t:
            report = run(audit(c.config, (), kv.core.membership), t)
        assert report.ok, report.explain()


#: client processes that keep writing; processes interrupted again and again, and how many
#: SIGINTs each of those gets
LOAD, VICTIMS, SIGINTS = 1, 2, 5


def _interrupted_worker(config_path: str, first: int, out: str, progress, stop) -> None:
    """``_worker`` (tests/test_failover_processes.py) again and again, as clients number
    ``first``, ``first`` + 1, ...: each SIGINT ends one (its KeyboardInterrupt leaves the
    ``with Client.connect(...)`` block, whose close settles the operation it cut short) and
    the next one starts, with a history file of its own."""
    for me in itertools.count(first):
        try:
            return _worker(config_path, me, f"{out}.{me}", progress, stop)
        except KeyboardInterrupt:
            pass


@contextlib.contextmanager
def _running(procs, stop):
    """Start ``procs``; on the way out, set ``stop`` and leave none of them running."""
    for p in procs:
        p.start()
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(60)
        for straggler in [p for p in procs if p.is_alive()]:
            straggler.kill()
            straggler.join()


@pytest.mark.parametrize("backend,master", [("shm", False), ("zmq", True)])
def test_sigint_to_client_processes_under_load(backend, master, tmp_path):
    """Real SIGINTs: ``LOAD + VICTIMS`` client processes write the hot keys; ``VICTIMS`` of
    them are sent ``SIGINTS`` SIGINTs each, mid-workload, and start a new client after each.
    Then another client writes every key (a round left open would stall it), and the history
    of everyone is linearizable, no operation failed unexpectedly, and the audit finds
    nothing open or leaked."""
    rng = random.Random(f"{backend} {master}")
    with LocalCluster(memnodes=3, transport=backend, replication=3, master=master,
                      layout=LayoutConfig(**SMALL), timeout=2.0) as c:
        ctx = mp.get_context("spawn")
        firsts = [LOAD + v * (SIGINTS + 1) for v in range(VICTIMS)]
        progress, stop = ctx.Array("q", LOAD + VICTIMS * (SIGINTS + 1), lock=False), StopFlag(ctx)
        procs = [ctx.Process(target=_worker, args=(str(c.config_path), i,
                                                   str(tmp_path / f"c{i}"), progress, stop))
                 for i in range(LOAD)]
        procs += [ctx.Process(target=_interrupted_worker,
                              args=(str(c.config_path), first, str(tmp_path / "c"), progress,
                                    stop)) for first in firsts]
        with _running(procs, stop):
            for k in range(SIGINTS):
                for p, first in zip(procs[LOAD:], firsts):
                    wait_for(lambda: progress[first + k] >= rng.randrange(10, 100),  # noqa: B023 (called in this iteration)
                          f"client {first + k} to get going")
                    os.kill(p.pid, signal.SIGINT)
            wait_for(lambda: all(progress[first + SIGINTS] for first in firsts),
                  "the clients after the last SIGINTs to get going")
        assert [p.exitcode for p in procs] == [0] * len(procs)
        ops = [op for out in sorted(tmp_path.glob("c*"))
               for op in _history(out.name, out)]
        unexpected = [op for op in ops if op.status == ERROR and
                      op.error not in ("KeyExists", "KeyNotFound")]
        assert not unexpected, "\n".join(map(str, unexpected[:10]))
        with c.client() as kv:
            kv.core.patience = PATIENCE
            for key in KEYS:
                t = 2 * time.monotonic_ns()
                kv.put(key, b"after")
                ops.append(Op(0, "after", "put", key, b"after", t, 2 * time.monotonic_ns() + 1,
                              OK))
        for i, op in enumerate(ops):
            op.id = i
        verdict = check(ops)
        assert verdict.ok, verdict.explain()
        # under the master's membership: on a loaded host it may have failed over an MN
        # that missed its lease, whose memory is then stale (once read as a replica: the
        # index naming objects in no block group)
        report = c.audit()
        assert report.ok, f"{report.explain()}\n{c.master_log() if master else ''}"
        cut = sum(op.status == CRASHED for op in ops)
        print(f"{backend}, master {master}: {VICTIMS * SIGINTS} SIGINTs, {cut} of them cut "
              f"an operation; {len(ops)} operations")


@pytest.mark.parametrize("call", ["get", "get_many", "pipeline"])
def test_a_ctrl_c_while_waiting_for_the_clients_lock_leaves_it_free(call):
    """Another thread holds the client's lock; a Ctrl-C lands as this one waits for it. Taken
    with ``lock.acquire()`` and then a ``try`` (``Client.get``; ``Exclusive`` for the batches,
    for a while), the interpreted build raised a KeyboardInterrupt pending as acquire()
    returned before the ``try``: the lock stayed held, and every later operation of the
    client, and its close, waited forever. A ``with`` of the lock itself has no such moment
    (found by the session-13 review)."""
    cfg = config(3)
    kv = Client(LocalTransport(cfg, memory=LocalMemory(cfg)))
    kv.insert(b"a", b"1")
    held = threading.Event()

    def holder():
        with kv._lock:
            held.set()
            time.sleep(0.3)
            _thread.interrupt_main()        # a Ctrl-C while the main thread waits
            time.sleep(0.05)

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    go = {"get": lambda: kv.get(b"a"), "get_many": lambda: kv.get_many([b"a"]),
          "pipeline": lambda: kv.pipeline().get(b"a").execute()}[call]
    try:
        with pytest.raises(KeyboardInterrupt):
            go()
    finally:
        t.join()
    free = kv._lock.acquire(timeout=2)
    if free:
        kv._lock.release()
        assert kv.get(b"a") == b"1"
        kv.close()
    assert free, "the client's lock is left held: every later operation waits forever"
