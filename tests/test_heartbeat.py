"""The master's heartbeat credits every pong with the ping it answers, however late it is read.

Seen as a flaky audit of tests/test_interrupt.py on a loaded host: the master failed over MN 2
of 3 (the MN pinged last) while it ran, having dropped the pongs its own late-running thread
read after each round's deadline (tests/test_audit.py has what that did to the audit).
"""

from __future__ import annotations

import threading
import time

from fusee.config import ClusterConfig, LayoutConfig, MemNodeConfig
from fusee.emulator.memnode import MemoryNode, serve
from fusee.master.server import MasterServer
from fusee.master.store import FileStore
from storekit import TINY

#: how long the MN takes to answer a ping: past the heartbeat round's deadline (the config's
#: timeout), before the next round (a quarter of the MN lease)
PONG_DELAY = 0.15


def test_a_pong_read_after_its_rounds_deadline_renews_the_mn_lease(tmp_path):
    """A real MN, in this process, whose pongs come after each heartbeat round's deadline, as
    a master thread that runs late reads them, but long before its lease runs out: it stays
    alive for three leases. Before: each such pong was dropped as "a late pong of an earlier
    round", and the MN was declared dead after one lease."""
    endpoint = f"ipc://{tmp_path}/mn0"
    config = ClusterConfig(memnodes=(MemNodeConfig(0, endpoint),), layout=LayoutConfig(**TINY),
                           master=f"ipc://{tmp_path}/m", mn_lease=1.0, client_lease=1.0,
                           timeout=0.05, name="heartbeat")
    assert config.timeout < PONG_DELAY < config.mn_lease / 4
    node = MemoryNode(config, 0)
    node.register_control("ping", lambda args: time.sleep(PONG_DELAY) or "pong")
    stopping = threading.Event()
    mn = threading.Thread(target=serve, args=(node, endpoint, stopping.is_set), daemon=True)
    mn.start()
    server = MasterServer(config, FileStore(tmp_path / "master.json"))
    heartbeat = threading.Thread(target=server.heartbeat_loop, daemon=True)
    heartbeat.start()
    try:
        end = time.monotonic() + 3 * config.mn_lease
        while time.monotonic() < end and not server.logic.failing:
            server.tick()
            time.sleep(0.02)
        assert not server.logic.failing and server.logic.alive() == [0], server.logic.status(
            time.monotonic())
    finally:
        server.stopping.set()
        stopping.set()
        heartbeat.join(10)
        mn.join(10)
        server.store.close()
        node.close()
