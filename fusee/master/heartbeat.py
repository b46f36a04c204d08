"""The master's heartbeat thread: it pings every live MN with the MNs' own ``ping`` control
request through ``fusee.transports.channel.Channels``, all at once, every quarter of the MN
lease, and each pong renews its node's lease; it pings the dead ones too, and one that answers
"rejoin" (``fusee memnode --rejoin``) is queued for a rebuild (``fusee.rejoin``).

The master's three threads share one ``Master`` under one lock (``fusee/master/shared.py``), so
the code of each thread is a subclass of that shared state, in a module of its own;
``MasterServer`` (``fusee/master/server.py``) is made of the three.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import zmq

from fusee.emulator import wire
from fusee.master.shared import SharedState
from fusee.rejoin import REJOIN
from fusee.transports.channel import Channels


class Heartbeat(SharedState):
    """The heartbeat thread's loop (``MasterServer.serve`` starts it)."""

    def heartbeat_loop(self) -> None:
        """Ping every live MN at once each quarter of the MN lease; each pong renews its
        node's lease as it arrives, so a dead MN's silence never delays the others'."""
        interval = self.config.mn_lease / 4
        timeout = min(self.config.timeout, self.config.mn_lease / 2)
        channels = Channels(self.config)
        plain: set[int] = set()     # dead MNs told that a plain restart is not used
        try:
            while not self.stopping.is_set():
                with self.lock:
                    alive, dead = self.logic.alive(), self.logic.rejoin_candidates()
                sent = time.monotonic()
                for node, answer in _pongs(channels, alive + dead, timeout):
                    if node in alive:
                        with self.lock:
                            self.logic.mn_seen(node, sent)
                    elif answer == REJOIN:
                        self._rejoin(node, sent)
                        plain.discard(node)
                    elif node not in plain:
                        plain.add(node)
                        self.log(f"master: memory node {node} answers but is dead and was "
                                 f"not started with --rejoin: it is not used (restart it "
                                 f"with --rejoin to rebuild it)", flush=True)
                self.stopping.wait(max(0.0, sent + interval - time.monotonic()))
        finally:
            channels.close()

    def _rejoin(self, node: int, sent: float) -> None:
        with self.lock:
            queued = self.logic.rejoin(node, sent)
        if queued:
            self.work_due.set()
            # the clients pause only for the rebuild's last phase (fusee.rebuild), not now
            self.log(f"master: memory node {node} asks to rejoin: its rebuild is queued",
                     flush=True)


def _pongs(channels: Channels, nodes: list[int], timeout: float) -> Iterator[tuple[int, str]]:
    """Ping ``nodes`` at once; yield (node, its answer: "pong", or REJOIN from an MN started
    with --rejoin) for each that answers within ``timeout``, as it answers."""
    seq = channels.next_seq()
    posted = channels.post({m: wire.encode_control(seq, "ping", {}) for m in nodes})
    waiting = {channels.socks[m]: m for m, failure in posted.items() if failure is None}
    poller = zmq.Poller()
    for sock in waiting:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while waiting and (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(left * 1000) + 1):
            try:
                rseq, results, error = wire.decode_reply(sock.recv(zmq.NOBLOCK))
            except (zmq.Again, wire.MalformedMessage):
                continue
            if rseq != seq:
                continue                        # a late pong of an earlier round
            poller.unregister(sock)
            node = waiting.pop(sock)
            if not error and results in (["pong"], [REJOIN]):
                yield node, results[0]
