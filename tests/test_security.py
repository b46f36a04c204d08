"""Who may touch a memory node: CURVE over tcp://, owner-only ipc://, opt-in plaintext."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys

import pytest

from fusee.emulator.cluster import ClusterStartError, LocalCluster
from fusee.config import SecurityConfig
from fusee.memory_map import MAGIC
from fusee.verbs import Read, RemoteAccessError
from fusee.transports import connect
from fusee.transports.security import InsecureEndpointError, add_client, init_keys

HEADER = struct.pack("<Q", MAGIC)


def _with_key(cluster, key_path, timeout=1.0):
    cfg = cluster.config.with_(security=SecurityConfig(
        curve=True, keys_dir=cluster.config.security.keys_dir, client_key=str(key_path)))
    return connect(cfg, "zmq", timeout=timeout)


def test_tcp_cluster_speaks_curve_and_admits_its_client():
    with LocalCluster(memnodes=2, transport="zmq", endpoint="tcp") as c:
        assert c.config.security.curve and all(m.curve_public for m in c.config.memnodes)
        t = c.transport()
        assert t.execute([Read(0, 0, 8), Read(1, 0, 8)]) == [HEADER, HEADER]
        t.close()


def test_client_without_an_authorized_key_is_refused(tmp_path):
    with LocalCluster(memnodes=1, transport="zmq", endpoint="tcp") as c:
        init_keys(tmp_path / "other", 0, ["stranger"])
        stranger = tmp_path / "other" / "stranger.key_secret"
        with pytest.raises(RemoteAccessError, match="refused this client.s CURVE key"):
            _with_key(c, stranger)
        # authorizing it takes effect without restarting the memory node
        newcomer = add_client(c.config.security.keys_dir, "newcomer")
        t = _with_key(c, newcomer, timeout=5.0)
        assert t.execute([Read(0, 0, 8)]) == [HEADER]
        t.close()


def test_plaintext_tcp_without_opt_in_is_refused(tmp_path):
    c = LocalCluster(memnodes=1, transport="zmq", endpoint="tcp", secure=False)
    c.config = c.config.with_(security=SecurityConfig())       # no opt-in
    with pytest.raises(ClusterStartError, match="without CURVE"):
        c.start()
    with pytest.raises(InsecureEndpointError):
        connect(c.config.with_(memnodes=(c.config.node(0).__class__(0, "tcp://127.0.0.1:1"),)),
                "zmq")


def test_plaintext_tcp_opt_in_warns():
    with LocalCluster(memnodes=1, transport="zmq", endpoint="tcp", secure=False) as c:
        assert "WARNING" in c.log(0) and "plaintext" in c.log(0)
        t = c.transport()
        assert t.execute([Read(0, 0, 8)]) == [HEADER]
        t.close()


def test_ipc_socket_and_segment_are_owner_only():
    with LocalCluster(memnodes=1, transport="zmq", endpoint="ipc") as c:
        sock = c.config.node(0).endpoint[len("ipc://"):]
        assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
        seg = f"/dev/shm/{c.shm_names[0].lstrip('/')}"
        assert stat.S_IMODE(os.stat(seg).st_mode) == 0o600


def test_keys_command(tmp_path):
    d = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "fusee.cli", "keys", "init", "--dir", str(d),
                          "--memnodes", "2", "--client", "app"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "curve = true" in out and out.count("curve_public") == 2
    assert stat.S_IMODE(os.stat(d / "mn0.key_secret").st_mode) & 0o077 == 0
    assert (d / "clients" / "app.key").exists()
    again = subprocess.run([sys.executable, "-m", "fusee.cli", "keys", "init", "--dir", str(d),
                            "--memnodes", "1"], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
