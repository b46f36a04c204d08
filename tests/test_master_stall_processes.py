"""The master process stalled (SIGSTOP: a long GC pause, a VM migration, a starved host) for
longer than the client and MN leases, under a multi-process workload, then resumed. Its
missed renewals and heartbeats say nothing of the clients' and MNs' health: it must not
expire every client (they would all end with LeaseExpired) nor declare every MN dead (DATA
LOST, and no failover ever again: every key wedged). The clients carry on once it answers
again, and the history with a reader's final gets is linearizable, the audit clean.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from histories import check_with_final_reads, unexpected_errors
from processes import stop_processes, wait_for, worker_processes
from storekit import SMALL
from test_failover_processes import KEYS, LEASES, _history

from fusee.emulator.cluster import LocalCluster
from fusee.audit import audit
from fusee.config import ClusterConfig, LayoutConfig, MemNodeConfig
from fusee.master.server import MasterServer
from fusee.master.store import FileStore
from fusee.driver import run
from fusee.membership import Membership

CLIENTS = 2
#: operations every client does before the stall, and again after it
BEFORE, AFTER = 60, 60


def test_a_stalled_master_expires_nobody_when_it_resumes(tmp_path):
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        procs, progress, stop, outs = worker_processes(c.config_path, tmp_path, CLIENTS)
        for p in procs:
            p.start()
        try:
            wait_for(lambda: min(progress) >= BEFORE, "the clients to get going")
            (master,) = c.master_procs.values()
            os.kill(master.pid, signal.SIGSTOP)
            try:        # every lease (clients' and MNs') runs out meanwhile, twice over
                time.sleep(2 * max(c.config.client_lease, c.config.mn_lease) + 1)
            finally:
                os.kill(master.pid, signal.SIGCONT)
            marks = list(progress)
            wait_for(lambda: all(progress[i] >= marks[i] + AFTER for i in range(CLIENTS)),
                  "the clients to carry on after the stall")
            assert stop_processes(procs, stop) == [0] * CLIENTS
        finally:
            stop_processes(procs, stop, timeout=5)
        status = c.master_status()
        assert status["dead"] == [] and status["epoch"] == 0, c.master_log()
        assert all(m["state"] == "alive" for m in status["memnodes"].values()), c.master_log()
        ops = [op for i, out in enumerate(outs) for op in _history(f"c{i}", out)]
        unexpected = unexpected_errors(ops)
        assert not unexpected, "\n".join(map(str, unexpected[:10]))
        with c.client() as reader:
            check_with_final_reads(ops, reader, KEYS)
        wait_for(lambda: (s := c.master_status())["repairs"] == {} and
              len(s["free_ids"]) == CLIENTS, "every id to be free")
        with c.transport() as t:
            report = run(audit(c.config, (), Membership()), t)
        assert report.ok, report.explain()


def test_a_client_registers_with_a_master_stalled_for_longer_than_one_timeout():
    """A registration may wait on the master's survey of the MNs (several round trips, each
    bounded by the timeout) and its saves, so a client gives a busy master more than one
    timeout (``register_wait``) before taking it as down. Here the master is stopped across
    the registration for twice the timeout (a loaded host): the client registered on the old
    code only if the master answered within one timeout."""
    # (an MN lease longer than the stall: here the master's view of the MNs is not in question)
    with LocalCluster(memnodes=1, transport="shm", master=True, timeout=1.0,
                      mn_lease=5.0) as c:
        (master,) = c.master_procs.values()
        os.kill(master.pid, signal.SIGSTOP)
        resume = threading.Timer(2 * c.config.timeout, os.kill, (master.pid, signal.SIGCONT))
        resume.start()
        try:
            with c.client() as kv:              # its registration is sent to the stopped master
                kv.put(b"k", b"v")
                assert kv.get(b"k") == b"v"
        finally:
            resume.cancel()
            os.kill(master.pid, signal.SIGCONT)
            resume.join()


def test_a_master_that_does_not_run_before_its_first_tick_declares_no_mn_dead(tmp_path):
    """Every lease counts from the master's start; a master starved from there past an MN
    lease (a loaded host) declared every MN dead at its first tick, DATA LOST with r = 1,
    where any later stall gives every lease afresh."""
    config = ClusterConfig(memnodes=(MemNodeConfig(0, f"ipc://{tmp_path}/mn0"),),
                           master=f"ipc://{tmp_path}/m", mn_lease=0.2, client_lease=0.2)
    server = MasterServer(config, FileStore(tmp_path / "master.json"))
    try:
        time.sleep(2 * config.mn_lease)         # no thread of it runs meanwhile
        server.tick()
        assert not server.logic.failing and server.logic.lost is None, server.logic.lost
    finally:
        server.store.close()


def test_a_renewal_that_waited_for_the_lock_is_answered_as_of_its_arrival(tmp_path):
    """The worker holds the master's lock across a save that hangs (ZooKeeper lost its quorum
    in the last phase of a rebuild: seen in tests/chaos.py, seed 202 of the combos) for
    longer than a client lease; a renewal that arrived meanwhile waits for the lock. Judged
    at the time it got the lock, the client's lease had run out: the master recovered (and
    fenced) a live client, whose every operation then failed with LeaseExpired. It arrived
    in time: it is answered as of its arrival (the client counts its lease from before it
    sent it, so that is never longer than what the client believes), and the tick that
    follows gives every lease afresh (the main thread did not run)."""
    config = ClusterConfig(memnodes=(MemNodeConfig(0, f"ipc://{tmp_path}/mn0"),),
                           master=f"ipc://{tmp_path}/m", mn_lease=0.3, client_lease=0.3,
                           timeout=0.1)
    server = MasterServer(config, FileStore(tmp_path / "master.json"))
    try:
        with server.lock:
            server.logic.grant(7, 1234, time.monotonic())
        held, release = threading.Event(), threading.Event()

        def hung_save():
            with server.lock:
                held.set()
                release.wait(10)

        worker = threading.Thread(target=hung_save)
        worker.start()
        held.wait(10)
        threading.Timer(3 * (config.client_lease + config.timeout), release.set).start()
        try:
            reply = server._renew({"id": 7, "token": 1234})     # waits for the lock
        finally:
            release.set()
            worker.join(10)
        assert reply is not None and 7 not in server.logic.repairs
        server.tick()                           # the stall: every lease afresh
        server._renew({"id": 7, "token": 1234})
    finally:
        server.store.close()
