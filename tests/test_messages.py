"""Errors that say what to do, on real processes: an unauthorized CURVE key fails at once
(not at the timeout) naming the server and its endpoint, and the server logs the refused
key; an unreachable master and a wrong MN endpoint are named in the error."""

from __future__ import annotations

import threading

import pytest
import zmq.auth

from fusee.emulator.cluster import LocalCluster
from fusee.client import Client
from fusee.config import MemNodeConfig
from fusee.errors import MasterTimeout, NodeTimeout, NotAuthorized


def _outcome(call, bound: float = 60.0):
    """What ``call()`` raised or returned, from a thread; the test fails if it takes longer
    than ``bound`` seconds (the cluster's own timeout is far longer)."""
    out = []

    def target():
        try:
            out.append(call())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(bound)
    if t.is_alive():
        pytest.fail(f"still waiting after {bound:g} s: the refusal was not noticed")
    return out[0]


@pytest.fixture
def stranger(tmp_path, monkeypatch):
    """A client keypair nobody authorized, made this client's key; its public key (Z85)."""
    public, secret = zmq.auth.create_certificates(str(tmp_path), "stranger")
    monkeypatch.setenv("FUSEE_CLIENT_KEY", secret)
    return zmq.auth.load_certificate(public)[0].decode()


@pytest.mark.parametrize("master", [False, True])
def test_an_unauthorized_key_fails_at_once_and_the_server_logs_it(master, stranger):
    with LocalCluster(memnodes=3, transport="zmq", endpoint="tcp", replication=2,
                      master=master, timeout=600.0) as c:
        error = _outcome(lambda: Client.connect(c.config_path))
        assert isinstance(error, NotAuthorized), error
        message = str(error)
        assert "\n" not in message and stranger in message and "authorize it" in message
        if master:
            assert message.startswith(f"the master at {c.config.master} refused")
            log = c.master_log
        else:
            assert message.startswith(f"MN 0 at {c.config.node(0).endpoint} refused")
            log = lambda: c.log(0)                                    # noqa: E731
        for _ in range(100):                      # the log line may lag the refusal a little
            if stranger in log():
                break
            threading.Event().wait(0.05)
        assert f"refused a client whose CURVE public key {stranger} is not authorized" in log()


def test_an_unreachable_master_is_named(tmp_path):
    with LocalCluster(memnodes=3, transport="zmq", replication=2, timeout=0.5) as c:
        endpoint = f"ipc://{tmp_path}/no-master.sock"
        c.config.with_(master=endpoint).save(tmp_path / "cluster.toml")
        with pytest.raises(MasterTimeout) as e:
            Client.connect(tmp_path / "cluster.toml")
        # it waits as long as a registration may take a master (register_wait: 4 timeouts)
        assert str(e.value).startswith(f"master at {endpoint}: no reply to 'register' within "
                                       "2 s")


@pytest.mark.parametrize("transport, master", [("zmq", False), ("shm", False), ("zmq", True)])
def test_a_wrong_memory_node_endpoint_is_named_within_the_timeout(transport, master, tmp_path):
    """With a master, the client used to wait for a failover that never came (the master
    hears from that MN), half a minute, then failed naming no node."""
    with LocalCluster(memnodes=3, transport=transport, replication=3, timeout=0.5,
                      master=master) as c:
        wrong = f"ipc://{tmp_path}/mn1-typo.sock"
        c.config.with_(memnodes=tuple(
            m if m.id != 1 else MemNodeConfig(1, wrong, m.curve_public)
            for m in c.config.memnodes)).save(tmp_path / "cluster.toml")

        def put():
            with Client.connect(tmp_path / "cluster.toml") as kv:
                kv.put(b"k", b"v")

        error = _outcome(put)
        assert isinstance(error, NodeTimeout), error
        assert f"MN 1 at {wrong}" in str(error), error
