"""Stalls (SIGSTOP: a long GC pause, a starved host), real MN and master processes on zmq.

- A memory node stalled for longer than the clients' verb timeout but less than its MN lease:
  the master never declares it dead, and the clients ride through with its late replies
  (``fusee.transports.channel``, ``Transport.late``, ``fusee.lease_guard.LeaseGuard``).
- A client stalled past its lease: the master expires it and fences it at every MN before
  recovering its id (``fusee.fencing``), so a batch that was past its lease check when it
  stopped writes nothing once it runs again.

The multi-client version under load, judged by the linearizability checker and the audit, is
tests/test_hostile_processes.py (soak); the deterministic one, tests/test_slow_node.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from storekit import SMALL
from processes import wait_for
from test_failover_processes import LEASES

from fusee.client import Client
from fusee.emulator.cluster import LocalCluster
from fusee.config import LayoutConfig
from fusee.errors import Fenced, NodeTimeout, TransportError
from fusee.layout import pack_u64, unpack_u64
from fusee.memory_map import MemoryMap
from fusee.transports.zeromq import ZmqTransport
from fusee.verbs import Faa, FreeBlock, Read, Write


@contextmanager
def _stopped(pid: int, seconds: float | None = None) -> Iterator[None]:
    """Process ``pid`` SIGSTOPped in the block; SIGCONTed after ``seconds`` (from a timer:
    the block may wait on it) or when the block ends, whichever comes first."""
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT)) if seconds else None
    try:
        if timer is not None:
            timer.start()
        yield
    finally:
        if timer is not None:
            timer.cancel()
        os.kill(pid, signal.SIGCONT)


def test_a_stalled_memory_node_s_late_reply_completes_the_batch():
    """The FAA of a batch that timed out ran once the MN resumed; ``late`` hands back its
    completion (the old word), and the word shows it ran exactly once."""
    with LocalCluster(memnodes=1, transport="zmq", replication=1,
                      layout=LayoutConfig(**SMALL)) as c:
        scratch = MemoryMap.of(c.config.layout).client_meta(7)     # no client holds id 7
        with ZmqTransport(c.config, timeout=0.3) as t:
            before = unpack_u64(t.execute([Read(0, scratch, 8)])[0])
            batch = [Faa(0, scratch, 5), Read(0, scratch, 8)]
            with _stopped(c.procs[0].pid):
                with pytest.raises(NodeTimeout):
                    t.execute(batch)
                assert t.awaits_late(batch)
                assert t.late(batch, 0.2) is None           # still stopped: nothing yet
            results = t.late(batch, 10.0)
            assert results == [before, pack_u64(before + 5)]
            assert not t.awaits_late(batch)
            assert unpack_u64(t.execute([Read(0, scratch, 8)])[0]) == before + 5


def test_a_client_rides_through_a_memory_node_stalled_less_than_its_lease():
    """MN 1 stopped for 1.5 timeouts (less than its MN lease) while a put and a get run: both
    complete, in epoch 0 (the master failed nothing over), and the put took effect once."""
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        with c.client() as kv:
            kv.put(b"k", b"before")
            with _stopped(c.procs[1].pid, 1.5 * c.config.timeout):
                kv.put(b"k", b"during")
                assert kv.get(b"k") == b"during"
            assert kv.core.membership.epoch == 0
            kv.put(b"k", b"after")
            assert kv.get(b"k") == b"after"
        assert c.master_status()["dead"] == []


def expired_client(c: LocalCluster, timeout: float = 60.0) -> Client:
    """A client of ``c`` that wrote k = v and stopped renewing its lease (as one SIGSTOPped
    past it would), once the master has expired it, fenced it and recovered its id."""
    kv = c.client()
    try:
        kv.put(b"k", b"v")
        cid = str(kv.client_id)
        kv.lease.close(release=False)
        wait_for(lambda: cid not in (s := c.master_status())["clients"]
              and cid not in s["repairs"], "the master to expire and recover the client",
              timeout)
    except BaseException:
        kv.closed = True
        kv.transport.close()
        raise
    return kv


def test_a_client_the_master_expired_is_fenced_by_every_memory_node():
    """The client stops renewing its lease (as one SIGSTOPped past it would); the master
    expires it, fences it at the MNs and recovers its id. A batch that had passed the lease
    check before the stall (posted straight to its transport here) is refused with Fenced at
    every MN, and writes nothing; another client goes on."""
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        scratch = MemoryMap.of(c.config.layout).client_meta(15)    # no client holds id 15
        kv = expired_client(c)
        try:
            stale = [Write(n, scratch, b"stale!!!") for n in range(3)]
            with pytest.raises(Fenced) as refused:
                kv.transport.execute(stale)
            assert all(isinstance(r, Fenced) for r in refused.value.results)
        finally:
            kv.closed = True
            kv.transport.close()
        with ZmqTransport(c.config) as t:
            words = t.execute([Read(n, scratch, 8) for n in range(3)])
            assert b"stale!!!" not in words
        with c.client() as other:
            assert other.get(b"k") == b"v"
            other.put(b"k", b"w")


def test_a_restarted_master_fences_the_expired_client_it_inherits():
    """The master expires a client and dies before it has fenced it everywhere (MN 2 was
    stalled: the fence there timed out, the repair waits to be retried); a new master starts
    from the stored state. It must fence that client at every MN before recovering its id,
    so the batch the client had passed its lease check with is refused at MN 2 too. MN 2's
    lease is long: the stall is a fence that failed, not a failover."""
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), client_lease=1.0, mn_lease=120.0,
                      timeout=1.0) as c:
        scratch = MemoryMap.of(c.config.layout).client_meta(15)    # no client holds id 15
        kv = c.client()
        try:
            kv.put(b"k", b"v")
            cid = str(kv.client_id)
            with _stopped(c.procs[2].pid):
                kv.lease.close(release=False)
                wait_for(lambda: (c.master_status()["repairs"].get(cid) or {}).get("attempts"),
                      "the master to expire the client and fail to fence it at MN 2")
                c.stop_master(kill=True)
            c.start_master()
            wait_for(lambda: int(cid) in c.master_status()["free_ids"],
                  "the restarted master to recover the client")
            stale = [Write(n, scratch, b"stale!!!") for n in range(3)]
            with pytest.raises(Fenced) as refused:
                kv.transport.execute(stale)
            assert all(isinstance(r, Fenced) for r in refused.value.results), \
                refused.value.results
        finally:
            kv.closed = True
            kv.transport.close()
        with ZmqTransport(c.config) as t:
            assert b"stale!!!" not in t.execute([Read(n, scratch, 8) for n in range(3)])
        with c.client() as other:
            assert other.get(b"k") == b"v"


def test_a_stale_block_request_is_refused_by_a_memory_node_rebuilt_since():
    """A client stalls past its lease (it stops renewing, as one SIGSTOPped would) with a
    batch past its lease check that frees one of its blocks on MN 0. Meanwhile MN 0 dies and
    is failed over, the master expires the client, fences it at the live MNs (1 and 2) and
    recovers its id, and MN 0 is rebuilt: a new process at the same endpoint, which no fence
    ever reached. The client resumes and its batch goes out on its old socket, which ZeroMQ
    reconnects to the new MN 0. Its one-sided verbs carry the old process's access key and
    are refused; the FreeBlock used to be served all the same (the MN's CPU checked no key
    for block requests), and MN 0's table then had the block free while the id's next holder
    held it, for the next AllocBlock to hand out again. The MN now checks the key of every
    request of a verbs message, as a NIC does (``fusee.emulator.memnode``)."""
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        mmap_ = MemoryMap.of(c.config.layout)
        kv = c.client()
        try:
            kv.put(b"k", b"v")
            cid = kv.client_id
            with ZmqTransport(c.config) as t:
                table = t.execute([Read(0, mmap_.table, 8 * mmap_.num_blocks)])[0]
            owned = [i for i in range(mmap_.num_blocks)
                     if unpack_u64(table[8 * i:8 * i + 8]) == cid + 1]
            assert owned, "the client holds a block on MN 0"
            block = mmap_.block_addr(owned[0])
            kv.lease.close(release=False)               # the stall begins
            c.kill(0)
            wait_for(lambda: (s := c.master_status())["dead"] == [0] and
                     str(cid) not in s["clients"] and str(cid) not in s["repairs"],
                     "MN 0's failover and the stalled client's recovery", timeout=60)
            c.rejoin(0)
            wait_for(lambda: c.master_status()["dead"] == [], "MN 0's rebuild", timeout=120)
            with pytest.raises(TransportError):        # the stalled batch goes out
                kv.transport.execute([FreeBlock(0, cid, block), Write(0, block, b"stale!!!")])
        finally:
            kv.closed = True
            kv.transport.close()
        entry = mmap_.table_entry(owned[0])
        with ZmqTransport(c.config) as t:
            words = t.execute([Read(n, entry, 8) for n in range(3)])
        assert words[0] == words[1] == words[2] == pack_u64(cid + 1), \
            f"block {block:#x}'s owner words on MNs 0, 1, 2: {words}"
        with c.client() as other:
            assert other.get(b"k") == b"v"


@contextmanager
def stale_writes(kv: Client, scratch: int, nodes: tuple[int, ...]
                 ) -> Iterator[tuple[list[float], list[TransportError]]]:
    """``kv`` stalls past its lease (it stops renewing, as one SIGSTOPped would) with batches
    past its lease check: in the block, a thread posts them straight to its transport, each
    writing the next number at ``scratch`` on ``nodes``, until one is refused. Yields (when
    each batch that landed was sent, wall clock; the refusal, once it came)."""
    stop, landed, refused = threading.Event(), [], []

    def post() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            sent = time.time()
            try:
                kv.transport.execute([Write(n, scratch, pack_u64(i)) for n in nodes])
            except TransportError as e:
                refused.append(e)
                return
            landed.append(sent)
    writer = threading.Thread(target=post)
    kv.lease.close(release=False)               # the stall begins
    writer.start()
    try:
        yield landed, refused
    finally:
        stop.set()
        writer.join(30)
        kv.closed = True
        kv.transport.close()


def test_a_client_expired_before_a_rebuild_s_pause_is_fenced_before_the_copy():
    """MN 0 dead and failed over; a client stalls past its lease (it stops renewing) with
    batches past its lease check that keep writing a word of the client metadata on MNs 1
    and 2 (posted straight to its transport, one after the other). MN 0 rejoins: its
    rebuild's pause, which waits no more for the expired client, copies that word from MN 1.
    The master used to fence an expired client only before its recovery, after the rebuild
    had published: the writes that landed between the copy and that fence left MN 0 with an
    older word than MN 1. It now fences every expired client before the pause copies (and
    before a failover runs): MN 0 has MN 1's word. (MN 2's may differ: the last batch may
    land on MN 1 before its fence and on MN 2 after, as a crashed client's last batch may.)"""
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        scratch = MemoryMap.of(c.config.layout).client_meta(15)    # no client holds id 15
        c.kill(0)
        wait_for(lambda: c.master_status()["dead"] == [0], "MN 0's failover")
        kv = c.client()
        kv.put(b"k", b"v")
        cid = str(kv.client_id)
        with stale_writes(kv, scratch, (1, 2)) as (_, refused):
            c.rejoin(0)
            wait_for(lambda: (s := c.master_status())["dead"] == [] and
                     cid not in s["clients"] and cid not in s["repairs"],
                     "MN 0's rebuild and the stalled client's recovery", timeout=120)
        assert refused and isinstance(refused[0], Fenced), refused
        with ZmqTransport(c.config) as t:
            words = t.execute([Read(n, scratch, 8) for n in range(3)])
        assert words[0] == words[1], f"the word on MNs 0, 1, 2: {[unpack_u64(w) for w in words]}"
        with c.client() as other:
            assert other.get(b"k") == b"v"


def test_a_client_expired_before_a_failover_is_fenced_before_it_runs():
    """A client stalls past its lease (it stops renewing) with batches past its lease check
    that keep writing a word on MNs 0 and 1 (posted straight to its transport), and MN 2 is
    killed: the failover goes on without the expired client's ack. It used to be fenced only
    before its recovery, after the failover had published, so its writes landed while the
    failover ran and after it; now every expired client is fenced before the failover runs,
    and no write sent after it started lands."""
    with LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        scratch = MemoryMap.of(c.config.layout).client_meta(15)    # no client holds id 15
        kv = c.client()
        kv.put(b"k", b"v")
        cid = str(kv.client_id)
        with stale_writes(kv, scratch, (0, 1)) as (landed, refused):
            c.kill(2)
            status = wait_for(lambda: (s := c.master_status())["dead"] == [2] and
                              cid not in s["clients"] and cid not in s["repairs"] and s,
                              "MN 2's failover and the stalled client's recovery")
        assert refused and isinstance(refused[0], Fenced), refused
        (failover,) = status["failovers"]
        late = [t for t in landed if t > failover["started_at"]]
        assert not late, f"{len(late)} stale writes sent after the failover started landed"
        with c.client() as other:
            assert other.get(b"k") == b"v"
