"""A memory node killed and restarted at its endpoint within its lease, with real processes
(r = 3, 3 MNs, a master, shm and zmq). The restarted MN answers the master's pings at once,
so its lease alone never ends: only its incarnation (a word drawn at each start, in its
region's header and in its pong) tells the master that its memory is gone. Then:

- the master declares it dead and fails it over, and rebuilds it (it runs with --rejoin);
- a client that was running carries on (over zmq the new MN refuses its old access key:
  that is a dead MN to it, never an error to the user);
- a new client reads every acknowledged key;
- and so it goes when the master was down meanwhile: the next one knows the incarnation from
  the stored state, never adopts the empty MN.
"""

from __future__ import annotations

import pytest
from processes import wait_for
from storekit import SMALL

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster

KEYS = 100


def _values(tag: bytes) -> dict[bytes, bytes]:
    return {b"k%d" % i: tag + b"%d" % i for i in range(KEYS)}


def _cluster(backend: str) -> LocalCluster:
    """3 MNs, r = 3, a master, leases short enough for a restart well within one."""
    return LocalCluster(memnodes=3, transport=backend, replication=3, master=True,
                        layout=LayoutConfig(**SMALL), client_lease=2.0, mn_lease=3.0,
                        timeout=1.0)


def _learned(c: LocalCluster) -> None:
    wait_for(lambda: "1" in c.master_status().get("incarnations", {}),
             "the master to learn MN 1's incarnation", timeout=30)


def _rebuilt(c: LocalCluster, what: str) -> None:
    wait_for(lambda: c.master_status()["memnodes"]["1"]["state"] == "alive"
             and any(r["node"] == 1 for r in c.master_status().get("rebuilds", [])),
             what, timeout=60)


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
