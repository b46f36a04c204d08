"""A memory node killed and restarted at its endpoint within its lease, with real processes
(r = 3, 3 MNs, a master, shm and zmq). The restarted MN answers the master's pings at once,
so its lease alone never ends: only its incarnation (a word drawn at each start, in its
region's header and in its pong) tells the master that its memory is gone. Then:

- the master declares it dead and fails it over, and rebuilds it (it runs with --rejoin);
- a client that was running carries on (over zmq the new MN refuses its old access key:
  that is a dead MN to it, never an error to the user);
- a new client reads every acknowledged key;
- and so it goes when the master was down meanwhile: the next one knows the incarnation from
  the stored state, never adopts the empty MN;
- a client opened after the restart but before the master's next ping (a long MN lease makes
  that window wide) learns from its grant the incarnation the master knows, finds another in
  the MN's header, and waits for the failover instead of reading the empty MN;
- the master's worker connecting in that window (its first job: a killed client's recovery)
  compares the incarnations too, and fails the MN over at once;
- a running client taking in a rebuilt MN that restarted again before the master's ping
  compares the incarnation that came with the membership, and waits for the failover.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from processes import wait_for
from storekit import SMALL

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster
from fusee.master.link import MasterLink, register_wait
from fusee.master.protocol import INCARNATIONS, REGISTER

KEYS = 100
#: an MN lease long enough that the master's next ping (every quarter of it: 6 s) comes well
#: after a restart and a client's open (a test waits for pings: a longer one costs the suite)
LONG_MN_LEASE = 24.0
#: ... and after a client's lease (2 s) ran out and the master's worker connected to recover it
WORKER_MN_LEASE = 60.0


def _values(tag: bytes) -> dict[bytes, bytes]:
    return {b"k%d" % i: tag + b"%d" % i for i in range(KEYS)}


def _cluster(backend: str, mn_lease: float = 3.0) -> LocalCluster:
    """3 MNs, r = 3, a master, leases short enough for a restart well within one."""
    return LocalCluster(memnodes=3, transport=backend, replication=3, master=True,
                        layout=LayoutConfig(**SMALL), client_lease=2.0, mn_lease=mn_lease,
                        timeout=1.0)


def _learned(c: LocalCluster) -> None:
    wait_for(lambda: "1" in c.master_status().get("incarnations", {}),
             "the master to learn MN 1's incarnation", timeout=30)


def _rebuilt(c: LocalCluster, what: str) -> None:
    wait_for(lambda: c.master_status()["memnodes"]["1"]["state"] == "alive"
             and any(r["node"] == 1 for r in c.master_status().get("rebuilds", [])),
             what, timeout=60)


def _just_pinged(c: LocalCluster, node: int) -> None:
    """Return right after a ping of the master renewed MN ``node``'s lease (what is left of
    it rose between two looks: it only falls otherwise): its next ping is (nearly) a quarter
    of the MN lease away."""
    def left() -> float:
        return c.master_status()["alive"].get(str(node), 0.0)

    last = [left()]

    def renewed() -> bool:
        now, before = left(), last[0]
        last[0] = now
        return now > before

    wait_for(renewed, f"a ping of MN {node}", timeout=c.config.mn_lease)


def restarted_after_its_rebuild(c: LocalCluster, config_path: Path | None = None) -> None:
    """MN 1 restarted, failed over and rebuilt, then restarted again (from ``config_path``)
    right after a ping of the master: a running client that idled meanwhile has the
    membership with MN 1 rebuilt, and the master counts the new process alive for (nearly)
    a quarter of the long MN lease."""
    _learned(c)
    c.kill(1)
    c.rejoin(1)
    _rebuilt(c, "the master to fail MN 1 over and rebuild it")
    _just_pinged(c, 1)
    c.kill(1)
    c.rejoin(1, config_path)


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_an_mn_restarted_within_its_lease_is_failed_over_and_rebuilt(backend):
    with _cluster(backend) as c:
        with c.client() as running:
            running.put_many(_values(b"a"))
            _learned(c)
            c.kill(1)
            c.rejoin(1)         # at once: well within its lease of 3 s
            running.put_many(_values(b"b"))     # meets the restarted MN (or its death)
            _rebuilt(c, "the master to fail MN 1 over and rebuild it")
            assert running.get_many(list(_values(b"b"))) == list(_values(b"b").values())
            running.put_many(_values(b"c"))
        with c.client() as fresh:
            assert fresh.get_many(list(_values(b"c"))) == list(_values(b"c").values())
        log = c.master_log()
        assert "memory node 1 restarted" in log, log


def test_a_master_started_after_the_restart_knows_the_incarnation_from_its_state():
    with _cluster("zmq") as c:
        with c.client() as kv:
            kv.put_many(_values(b"a"))
        _learned(c)
        c.stop_master(kill=True)
        c.kill(1)
        c.rejoin(1)
        c.start_master()
        _rebuilt(c, "the next master to fail MN 1 over and rebuild it")
        with c.client() as fresh:
            assert fresh.get_many(list(_values(b"a"))) == list(_values(b"a").values())


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_a_client_opened_before_the_masters_next_ping_never_reads_the_restarted_mn(backend):
    with _cluster(backend, mn_lease=LONG_MN_LEASE) as c:
        with c.client() as kv:
            kv.put_many(_values(b"a"))
        _learned(c)
        _just_pinged(c, 1)
        c.kill(1)
        c.rejoin(1)
        with c.client() as fresh:       # the master still counts the empty MN 1 alive
            assert fresh.get_many(list(_values(b"a"))) == list(_values(b"a").values())
            fresh.put_many(_values(b"b"))
        _rebuilt(c, "the master to fail MN 1 over and rebuild it")
        with c.client() as late:
            assert late.get_many(list(_values(b"b"))) == list(_values(b"b").values())


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_a_rebuilt_mn_restarted_before_a_running_client_takes_it_in_is_dead_to_it(backend):
    """The running client learns of MN 1's rebuild as it idles, and takes the MN in (its
    transport reconnects) at its next operation, after MN 1 restarted again: the
    incarnation that came with the membership is not the one in the header now."""
    with _cluster(backend, mn_lease=LONG_MN_LEASE) as c:
        with c.client() as running:
            running.put_many(_values(b"a"))
            restarted_after_its_rebuild(c)
            assert running.get_many(list(_values(b"a"))) == list(_values(b"a").values())


#: a client process that registers, says so, and idles (its lease renewed) until killed
IDLE = r"""
import sys, time
from fusee.client import Client
kv = Client.connect(sys.argv[1])
print("id", kv.client_id, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_the_worker_connecting_before_the_masters_next_ping_fails_the_restarted_mn_over(
        backend):
    with _cluster(backend, mn_lease=WORKER_MN_LEASE) as c:
        # no client closes before the restart: the worker's first connect is the recovery
        # of the idle client killed after it
        with c.client() as kv:
            kv.put_many(_values(b"a"))
            idle = subprocess.Popen([sys.executable, "-c", IDLE, str(c.config_path)],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert idle.stdout.readline().startswith("id"), "the idle client did not open"
                _learned(c)
                _just_pinged(c, 1)
                c.kill(1)
                c.rejoin(1)
            finally:
                idle.kill()         # its lease runs out: the worker connects to recover it
                idle.wait()
                idle.stdout.close()
            wait_for(lambda: "memory node 1 restarted" in c.master_log(),
                     "the master to find MN 1 restarted", timeout=WORKER_MN_LEASE)
            assert "found as the master connected" in c.master_log(), c.master_log()
            _rebuilt(c, "the master to fail MN 1 over and rebuild it")
            assert kv.get_many(list(_values(b"a"))) == list(_values(b"a").values())
        with c.client() as fresh:
            assert fresh.get_many(list(_values(b"a"))) == list(_values(b"a").values())


def test_the_incarnations_travel_to_a_client_that_asks_for_them_only():
    """An older client refuses a grant with a key it does not know (a malformed grant): so
    the master sends them to one that asks, which a rolling upgrade (masters first) needs."""
    with _cluster("zmq") as c:
        wait_for(lambda: len(c.master_status().get("incarnations", {})) == 3,
                 "the master to learn every MN's incarnation", timeout=30)
        with MasterLink(c.config, register_wait(c.config)) as link:
            old = link.call(REGISTER, register_wait(c.config))
            new = link.call(REGISTER, register_wait(c.config), **{INCARNATIONS: True})
        assert INCARNATIONS not in old
        assert [n for n, _ in new[INCARNATIONS]] == [0, 1, 2], new
