"""Cluster identity (fusee.cluster_identity), with real processes: a client, a master or a
rebuild pointed at a memory node of ANOTHER cluster with the same layout (a wrong config, a
reused port, a moved host) is refused with one line naming the MN, its endpoint and both ids,
before it writes anything there, and the other cluster's data reads back untouched. Also: a
malformed ``cluster_id`` in the config, and a cluster made before ids (no ``cluster_id``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from processes import wait_for
from storekit import SMALL
from test_operator_errors_processes import _cluster

from fusee.client import Client
from fusee.cluster_identity import new_cluster_id
from fusee.config import ClusterConfig, LayoutConfig, MemNodeConfig
from fusee.emulator.cluster import LocalCluster
from fusee.emulator.memory import SharedSegment
from fusee.errors import WrongMemoryNode
from fusee.memory_map import MemoryMap

KEYS = [b"id%d" % i for i in range(30)]
ANOTHER = "belongs to another cluster"


def fusee(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusee.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def _one_line(out: subprocess.CompletedProcess[str], prefix: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(prefix) and "Traceback" not in out.stderr, line
    return line


def _pair(transport: str) -> tuple[LocalCluster, LocalCluster]:
    return tuple(LocalCluster(memnodes=3, transport=transport, layout=LayoutConfig(**SMALL))
                 for _ in range(2))        # type: ignore[return-value]


def _pointing_at(ours: LocalCluster, theirs: LocalCluster, node: int = 2) -> Path:
    """Our config, but MN ``node``'s endpoint is theirs (a reused port, a stale config)."""
    own = ours.config
    wrong = own.with_(memnodes=tuple(m if m.id != node else MemNodeConfig(
        node, theirs.config.node(node).endpoint) for m in own.memnodes))
    return wrong.save(ours.workdir / "wrong.toml")


def _untouched(theirs: LocalCluster) -> None:
    with theirs.client() as kv:
        assert kv.get_many(KEYS) == [k[::-1] for k in KEYS]
    report = theirs.audit()
    assert report.ok, report.explain()


@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_a_client_pointed_at_another_clusters_mn_is_refused_and_its_data_untouched(transport):
    ours, theirs = _pair(transport)
    with ours, theirs:
        with theirs.client() as kv:
            kv.put_many({k: k[::-1] for k in KEYS})
        wrong = _pointing_at(ours, theirs)
        with pytest.raises(WrongMemoryNode, match=ANOTHER) as refused:
            Client.connect(wrong)
        e = refused.value
        assert (e.node, e.endpoint) == (2, theirs.config.node(2).endpoint)
        assert (e.expected, e.found) == (ours.config.cluster_id, theirs.config.cluster_id)
        line = _one_line(fusee("put", "--config", wrong, KEYS[0], "clobbered"),
                         f"fusee put: error: memory node 2 at {e.endpoint} {ANOTHER} "
                         f"(cluster id {theirs.config.cluster_id}, this config's "
                         f"{ours.config.cluster_id}): ")
        assert "restart that memory node with this config" in line
        status = fusee("status", "--config", wrong, "--json")
        nodes = json.loads(status.stdout)["memnodes"]
        assert [n["state"] for n in nodes] == ["up", "up", "wrong memory node"], nodes
        assert ANOTHER in nodes[2]["error"]
        assert "wrong memory node" in fusee("status", "--config", wrong).stdout
        _untouched(theirs)
        with Client.connect(ours.config_path) as kv:       # the right config still works
            kv.put(b"ours", b"fine")


def test_a_master_pointed_at_another_clusters_mn_refuses_to_start():
    ours, theirs = _pair("shm")
    with ours, theirs:
        with theirs.client() as kv:
            kv.put_many({k: k[::-1] for k in KEYS})
        wrong = _pointing_at(ours, theirs, node=1)
        _one_line(fusee("master", "--config", wrong, "--state", ours.workdir / "m.json",
                        "--endpoint", f"ipc://{ours.workdir}/m.sock"),
                  f"fusee master: error: memory node 1 at {theirs.config.node(1).endpoint} "
                  f"{ANOTHER}")
        _untouched(theirs)


def test_a_rejoin_by_another_clusters_mn_is_refused_then_rebuilt_once_restarted_right():
    """An MN of another cluster (another config, the same layout) comes up at a dead MN's
    endpoint with --rejoin: the master copies nothing to it, says why, keeps it dead."""
    with _cluster() as c:
        with c.client() as kv:
            kv.put_many({k: k[::-1] for k in KEYS})
        c.kill(1)
        wait_for(lambda: c.master_status()["dead"] == [1], "the failover of MN 1")
        other = c.config.with_(cluster_id=new_cluster_id()).save(c.workdir / "other.toml")
        c.rejoin(1, config_path=other)
        state = wait_for(lambda: "rebuild_error" in (s := c.master_status()["memnodes"]["1"])
                         and s, "the master to refuse the rebuild")
        assert state["state"] == "dead", state
        assert state["rebuild_error"].startswith(
            f"WrongMemoryNode: memory node 1 at {c.config.node(1).endpoint} {ANOTHER}"), state
        seg = SharedSegment(c.shm_names[1])       # nothing of ours was copied to it
        try:
            data = MemoryMap.of(c.config.layout).data
            assert seg.mmap[data:] == bytes(len(seg.mmap) - data)
        finally:
            seg.close()
        nodes = json.loads(fusee("status", "--config", c.config_path, "--json").stdout)
        assert nodes["memnodes"][1]["state"] == "wrong memory node", nodes
        c.kill(1)
        c.rejoin(1)                                 # the operator fixes it
        wait_for(lambda: c.master_status()["memnodes"]["1"]["state"] == "alive",
                 "the rebuild of MN 1 restarted with the cluster's config")
        with c.client() as kv:
            assert kv.get_many(KEYS) == [k[::-1] for k in KEYS]


@pytest.mark.parametrize("value", ['"nothex0123456789"', '"0000000000000000"', "12"])
def test_a_malformed_cluster_id_is_one_line(tmp_path, value):
    path = tmp_path / "c.toml"
    path.write_text(f'[cluster]\ncluster_id = {value}\n\n[[memnodes]]\nid = 0\n'
                    f'endpoint = "ipc://{tmp_path}/mn0.sock"\n')
    for command in (("get", "--config", path, "k"), ("status", "--config", path)):
        line = _one_line(fusee(*command), f"fusee {command[0]}: error: [cluster] cluster_id "
                                          "must be 16 hex digits")
        assert "fusee cluster-id" in line
    _one_line(fusee("memnode", "--config", path, "--id", "0"), "fusee memnode: error: ")


def test_a_cluster_made_without_ids_is_used_as_before_and_ids_must_agree(tmp_path):
    """An old config (no cluster_id): its MNs hold none and its clients expect none; a config
    with an id refuses them, and an old config refuses an MN of a cluster with an id."""
    old = LocalCluster(memnodes=3, transport="zmq", layout=LayoutConfig(**SMALL))
    old.config = old.config.with_(cluster_id=None)
    with old, LocalCluster(memnodes=3, transport="zmq", layout=LayoutConfig(**SMALL)) as new:
        assert "cluster_id" not in old.config_path.read_text()
        with old.client() as kv:
            kv.put(b"old", b"still works")
        with_id = old.config.with_(cluster_id=new_cluster_id()).save(tmp_path / "id.toml")
        with pytest.raises(WrongMemoryNode, match="started without a cluster id"):
            Client.connect(with_id)
        stale = new.config.with_(cluster_id=None).save(tmp_path / "stale.toml")
        with pytest.raises(WrongMemoryNode, match=r"this config has no \[cluster\] cluster_id"):
            Client.connect(stale)
        assert ClusterConfig.load(old.config_path).cluster_id is None
        with old.client() as kv:
            assert kv.get(b"old") == b"still works"


def test_cluster_id_gives_a_new_config_an_id_once(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[[memnodes]]\nid = 0\nendpoint = "ipc://{tmp_path}/mn0.sock"\n')
    first = fusee("cluster-id", "--config", path)
    assert first.returncode == 0 and "cluster_id set" in first.stderr
    assert ClusterConfig.load(path).cluster_id == first.stdout.strip()
    again = fusee("cluster-id", "--config", path)
    assert (again.returncode, again.stdout, again.stderr) == (0, first.stdout, "")


def test_a_master_state_saved_for_another_cluster_id_is_refused(tmp_path):
    """Same name, same endpoints (a config copied, then given a new id): the state says whose
    it is, and a master of the other id does not carry on from it."""
    from fusee.master.identity import check_same_cluster, identity
    from fusee.master.logic import StateMismatch
    config = ClusterConfig(memnodes=(MemNodeConfig(0, f"ipc://{tmp_path}/mn0.sock"),),
                           cluster_id=new_cluster_id())
    check_same_cluster(config, identity(config), "here")
    check_same_cluster(config.with_(cluster_id=None), identity(config), "here")   # (older)
    with pytest.raises(StateMismatch, match=f"cluster id {config.cluster_id}, not "):
        check_same_cluster(config.with_(cluster_id=new_cluster_id()), identity(config), "here")


def test_a_client_reconnecting_to_a_rebuilt_mn_checks_it_again():
    """MN 1 is rebuilt while a client idles; then, before the client's next operation, another
    cluster's MN takes MN 1's endpoint (killed and replaced within its lease, so the master
    still counts it alive). The client reconnects to it as it moves to the rebuild's epoch
    (``revive``) and refuses it there, writing nothing to it."""
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), client_lease=2.0, mn_lease=8.0,
                      timeout=1.0) as c:
        kv = c.client()
        try:
            kv.put_many({k: k[::-1] for k in KEYS})
            c.kill(1)
            wait_for(lambda: c.master_status()["dead"] == [1], "the failover of MN 1")
            c.rejoin(1)
            wait_for(lambda: c.master_status()["memnodes"]["1"]["state"] == "alive",
                     "the rebuild of MN 1")
            other = c.config.with_(cluster_id=new_cluster_id()).save(c.workdir / "other.toml")
            c.kill(1)
            c.rejoin(1, config_path=other)          # another cluster's MN at MN 1's endpoint
            with pytest.raises(WrongMemoryNode, match=f"memory node 1 at .* {ANOTHER}"):
                kv.put(KEYS[0], b"clobbered")
            seg = SharedSegment(c.shm_names[1])
            try:
                data = MemoryMap.of(c.config.layout).data
                assert seg.mmap[data:] == bytes(len(seg.mmap) - data)
            finally:
                seg.close()
        finally:
            kv.transport.close()
            kv.lease.close()
