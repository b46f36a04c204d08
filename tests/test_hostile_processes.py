"""Hostile process tests: faults the other process tests do not inject, judged as they are
(the history of every client process linearizable with a reader's final gets, the leak audit
and the index check). Real processes and sockets throughout: zmq memory nodes, a master.

- a memory node SIGSTOPped under load, for longer than its MN lease (declared dead and
  failed over while it still holds the verbs the clients posted to it), then SIGCONTed,
  killed and rebuilt; or for less (the clients' verbs time out, the master still hears from
  it: xfail, the operations that met the stall fail);
- the master SIGKILLed, or a source MN SIGKILLed, while a rejoining MN is rebuilt;
- an MN stalled while another dies.

All behind the ``soak`` marker (10-25 s each):
python3 -m pytest tests/test_hostile_processes.py -m soak
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from histories import unexpected_errors
from processes import wait_for, worker_processes
from storekit import SMALL
from test_failover_processes import (
    LEASES,
    _history,
    read_back_and_check,
    running,
)

from fusee.emulator.cluster import LocalCluster
from fusee.emulator.testkit.history import CRASHED
from fusee.config import LayoutConfig
from fusee.membership import Membership

CLIENTS = 3
STEP = 60


def _carry_on(progress, what: str, step: int = STEP, timeout: float = 120,
              survivors=None) -> None:
    """Wait until each client (of ``survivors``, if given) has done ``step`` more operations."""
    marks = list(progress)
    wait_for(lambda: all(progress[i] >= marks[i] + step
                         for i in (range(len(marks)) if survivors is None else survivors)),
          f"the clients to carry on {what}", timeout=timeout)


def _kill_and_fail_over(c: LocalCluster, progress, node: int) -> None:
    """Once the clients got going, kill MN ``node``; return once they carry on after its
    failover."""
    _carry_on(progress, "at first")
    c.kill(node)
    wait_for(lambda: c.master_status()["dead"] == [node], f"MN {node}'s failover")
    _carry_on(progress, f"after MN {node}'s failover")


def _cluster() -> LocalCluster:
    """3 zmq MNs (r = 3) and a master, with the short leases of the failover tests."""
    return LocalCluster(memnodes=3, transport="zmq", replication=3, master=True,
                        layout=LayoutConfig(**SMALL), **LEASES)


def _clients(c: LocalCluster, tmp_path, fresh: float = 0.3):
    return worker_processes(c.config_path, tmp_path, CLIENTS, fresh)


def _finish(c: LocalCluster, procs, stop, outs) -> None:
    """Stop the clients, then judge: no unexpected error, a linearizable history with a
    reader's final gets, the audit and the index check under the final membership."""
    stop.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * CLIENTS
    status = wait_for(lambda: (s := c.master_status())["repairs"] == {} and s,
                   "the master's repairs")
    membership = Membership.from_wire(status["membership"])
    ops = [op for i, out in enumerate(outs) for op in _history(f"c{i}", out)]
    unexpected = unexpected_errors(ops)
    assert not unexpected, "\n".join(map(str, unexpected[:10]))
    assert not any(op.status == CRASHED for op in ops)
    read_back_and_check(c, ops, membership)


def _stop_for(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.soak
def test_a_memory_node_stopped_past_its_lease_is_failed_over_and_rebuilt(tmp_path):
    """MN 1 SIGSTOPped for twice its MN lease: declared dead and failed over while it still
    holds the clients' last verbs; SIGCONTed, it answers the master but is not used (it was
    not started with --rejoin). Then it is killed, restarted with --rejoin and rebuilt, and
    MN 0 and 2 are killed: MN 1 alone must hold everything acknowledged."""
    with _cluster() as c:
        procs, progress, stop, outs = _clients(c, tmp_path)
        with running(procs, stop):
            _carry_on(progress, "at first")
            _stop_for(c.procs[1].pid, 2 * c.config.mn_lease)
            wait_for(lambda: c.master_status()["dead"] == [1], "MN 1's failover")
            _carry_on(progress, "after MN 1's failover")
            assert c.master_status()["dead"] == [1]         # it answers, and stays dead
            c.kill(1)
            c.rejoin(1)
            wait_for(lambda: c.master_status()["memnodes"]["1"]["state"] == "alive",
                  "MN 1's rebuild", timeout=120)
            _carry_on(progress, "after MN 1's rebuild")
            c.kill(0)
            c.kill(2)
            wait_for(lambda: c.master_status()["dead"] == [0, 2], "MN 0 and 2's failover")
            _carry_on(progress, "on MN 1 alone")
            _finish(c, procs, stop, outs)


@pytest.mark.soak
def test_a_memory_node_stopped_for_less_than_its_lease_fails_nothing(tmp_path):
    """MN 1 SIGSTOPped for 1.5 s: longer than the clients' timeout (1 s), shorter than its
    MN lease (2 s). Their batches to it time out, it executes them once it resumes, and the
    master never declares it dead. The operations that met the stall carry on once it
    answers again, with its late replies (``fusee.lease_guard.LeaseGuard``): none fails, and no
    epoch changes. (They used to wait for an epoch that never came and fail with
    NodeTimeout after membership_wait.)"""
    with _cluster() as c:
        procs, progress, stop, outs = _clients(c, tmp_path)
        with running(procs, stop):
            _carry_on(progress, "at first")
            _stop_for(c.procs[1].pid, 1.5 * c.config.timeout)
            _carry_on(progress, "after the stall")
            membership = Membership.from_wire(c.master_status()["membership"])
            assert membership.epoch == 0 and not membership.dead, "no MN was failed over"
            _finish(c, procs, stop, outs)


@pytest.mark.soak
@pytest.mark.parametrize("fault", ["master", "source"])
def test_a_fault_during_a_rebuild_loses_nothing(fault, tmp_path):
    """MN 0 killed, failed over, restarted with --rejoin; once the master has queued or
    started its rebuild, the master is SIGKILLed and restarted from its state file
    (``master``), or MN 1, a source of the copy, is SIGKILLed (``source``). Once MN 0 is alive
    again, every other MN is killed: MN 0 alone must hold everything acknowledged."""
    with _cluster() as c:
        procs, progress, stop, outs = _clients(c, tmp_path)

        def state(node: int) -> str:
            return c.master_status()["memnodes"][str(node)]["state"]

        with running(procs, stop):
            _kill_and_fail_over(c, progress, 0)
            c.rejoin(0)
            wait_for(lambda: state(0) in ("joining", "rebuilding"), "MN 0's rebuild to start")
            if fault == "master":
                c.stop_master(kill=True)
                c.start_master()
            else:
                c.kill(1)
            wait_for(lambda: state(0) == "alive", "MN 0's rebuild", timeout=120)
            _carry_on(progress, "after MN 0's rebuild")
            for other in {1, 2} - ({1} if fault == "source" else set()):
                c.kill(other)
            wait_for(lambda: c.master_status()["dead"] == [1, 2], "MN 1 and 2's failover")
            _carry_on(progress, "on MN 0 alone")
            _finish(c, procs, stop, outs)


@pytest.mark.soak
def test_a_slow_memory_node_while_another_dies_loses_nothing(tmp_path):
    """MN 1 is SIGSTOPped for longer than the clients' timeout but less than its MN lease
    while MN 2 is SIGKILLed: the clients' batches to MN 1 time out, yet MN 1 executes them
    once it resumes, and stays alive in the epoch that fails MN 2 over (the deterministic
    version, which finds the double free this can cause, is tests/test_slow_node.py)."""
    with _cluster() as c:
        procs, progress, stop, outs = _clients(c, tmp_path, fresh=0.0)
        with running(procs, stop):
            _carry_on(progress, "at first")
            c.kill(2)
            _stop_for(c.procs[1].pid, 1.3 * c.config.timeout)
            wait_for(lambda: c.master_status()["dead"] == [2], "MN 2's failover")
            _carry_on(progress, "after MN 2's failover")
            _finish(c, procs, stop, outs)
