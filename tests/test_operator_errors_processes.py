"""An operator's mistakes against a running cluster, with real processes (MNs, a master): each
gets one clear line saying what to do, and nothing the cluster holds is touched.

- ``fusee memnode --rejoin`` (or a plain start) for an id whose MN is alive: refused at once
  (its endpoint is served), exit status 2.
- a dead MN restarted with ``--rejoin`` but another config (a region of another size): the
  master refuses to rebuild it before copying anything, says why in its log and in
  ``status``, keeps it dead, and rebuilds it once it is restarted with the cluster's config.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from storekit import SMALL
from processes import wait_for
from test_failover_processes import LEASES

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster

KEYS = [b"op%d" % i for i in range(40)]


def _cluster() -> LocalCluster:
    return LocalCluster(memnodes=3, transport="shm", replication=3, master=True,
                        layout=LayoutConfig(**SMALL), **LEASES)


def _memnode(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusee.emulator.memnode", "--config",
                           str(c.config_path), *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("scale", [0.5, pytest.param(2, marks=pytest.mark.soak)],
                         ids=["smaller", "larger"])
def test_a_rejoin_with_another_region_size_is_refused_then_rebuilt_once_restarted_right(scale):
    """Smaller: the copy would run off its end. Larger: the copy would succeed, and the MN
    would then hand out blocks that the other replicas of its groups do not have. First, a
    second MN for an id that is alive is refused at once."""
    with _cluster() as c:
        with c.client() as kv:
            kv.put_many({k: k for k in KEYS})
        for extra in (["--rejoin"], []):
            out = _memnode(c, "--id", "1", *extra)
            assert out.returncode == 2, out.stderr
            (line,) = out.stderr.strip().splitlines()
            assert line.startswith("fusee memnode: error: ") and "another live process" in line
        c.kill(1)
        wait_for(lambda: c.master_status()["dead"] == [1], "the failover of MN 1")
        wrong = c.config.with_(layout=dataclasses.replace(
            c.config.layout, region_size=int(c.config.layout.region_size * scale)))
        wrong_path = c.workdir / "wrong.toml"
        wrong.save(wrong_path)
        c.rejoin(1, config_path=wrong_path)
        state = wait_for(lambda: "rebuild_error" in (s := c.master_status()["memnodes"]["1"])
                      and s, "the master to refuse the rebuild")
        assert state["state"] == "dead", state
        assert state["rebuild_error"].startswith("WrongMemoryNode: memory node 1 at "), state
        assert "has a region of another layout" in state["rebuild_error"], state
        assert "restart it with the cluster's config" in state["rebuild_error"]
        assert "RemoteAccessError" not in c.master_log()       # nothing was copied to it
        # no pause announced for an epoch that is not the next (the clients pause only for
        # the rebuild's last phase)
        assert "master: memory node 1 asks to rejoin: its rebuild is queued" in c.master_log()
        assert "publishes epoch 0" not in c.master_log()
        with c.client() as kv:
            kv.put(KEYS[0], b"while refused")
            assert kv.get_many(KEYS[1:]) == KEYS[1:]
        c.kill(1)
        c.rejoin(1)                                 # the operator fixes it
        wait_for(lambda: c.master_status()["memnodes"]["1"]["state"] == "alive",
              "the rebuild of MN 1 restarted with the cluster's config")
        c.kill(0)                                   # MN 1 now holds what MN 0 had
        c.kill(2)
        wait_for(lambda: c.master_status()["dead"] == [0, 2], "the failover of MNs 0 and 2")
        with c.client() as kv:
            assert kv.get_many(KEYS) == [b"while refused", *KEYS[1:]]
