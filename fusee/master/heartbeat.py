"""The master's heartbeat thread: it pings every live MN with the MNs' own ``ping`` control
request through ``fusee.transports.channel.Channels``, all at once, every quarter of the MN
lease, and each pong renews its node's lease; it pings the dead ones too, and one that answers
"rejoin" (``fusee memnode --rejoin``) is queued for a rebuild (``fusee.rejoin``). Every answer
carries the MN's incarnation: a live MN that answers with another than the master knows was
restarted at its endpoint and lost its memory, so it is dead at once (``Master.mn_seen``).

A pong proves its MN was alive after the ping it answers was sent, whenever the master gets to
read it, so it renews the lease from that ping (``Pings``): a pong read after its round's
deadline, or in a later round, counts as one read in time. On a loaded host the master's own
thread runs late: it used to drop what had come in meanwhile, and an MN that was merely
answered last (MN 2 of 3, pinged last) missed its lease and was failed over while it ran.

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
from fusee.rejoin import REJOIN, read_ping_answer
from fusee.transports.channel import Channels


class Heartbeat(SharedState):
    """The heartbeat thread's loop (``MasterServer.serve`` starts it)."""

    def heartbeat_loop(self) -> None:
        """Ping every live MN at once each quarter of the MN lease; each pong renews its
        node's lease as it arrives, so a dead MN's silence never delays the others'."""
        interval = self.config.mn_lease / 4
        timeout = min(self.config.timeout, self.config.mn_lease / 2)
        channels = Channels(self.config)
        pings = Pings(channels, self.config.mn_lease)
        plain: set[int] = set()     # dead MNs told that a plain restart is not used
        try:
            while not self.stopping.is_set():
                with self.lock:
                    alive, dead = self.logic.alive(), self.logic.rejoin_candidates()
                started = time.monotonic()
                for node, answer, incarnation, sent in pings.round(alive + dead, timeout):
                    if node in alive:
                        self._seen(node, sent, incarnation)
                    elif answer == REJOIN:
                        self._rejoin(node, sent, incarnation)
                        plain.discard(node)
                    elif node not in plain:
                        plain.add(node)
                        self.log(f"master: memory node {node} answers but is dead and was "
                                 f"not started with --rejoin: it is not used (restart it "
                                 f"with --rejoin to rebuild it)", flush=True)
                self.stopping.wait(max(0.0, started + interval - time.monotonic()))
        finally:
            channels.close()

    def _rejoin(self, node: int, sent: float, incarnation: int) -> None:
        with self.lock:
            queued = self.logic.rejoin(node, sent, incarnation)
        if queued:
            self.work_due.set()
            # the clients pause only for the rebuild's last phase (fusee.rebuild), not now
            self.log(f"master: memory node {node} asks to rejoin: its rebuild is queued",
                     flush=True)


class Pings:
    """Ping rounds over ``channels``, each pong credited with when the ping it answers was
    sent, for as long as that can still renew a lease (``lease`` seconds)."""

    def __init__(self, channels: Channels, lease: float) -> None:
        self.channels, self.lease = channels, lease
        self.sent: dict[int, float] = {}            # seq of a recent round -> when it went out

    def round(self, nodes: list[int], timeout: float) -> Iterator[tuple[int, str, int, float]]:
        """Ping ``nodes`` at once; yield (node, its answer: "pong", or REJOIN from an MN
        started with --rejoin, its incarnation (0: not told), when the ping it answers was
        sent) for each pong in by ``timeout``, this round's or a late one of an earlier
        round, as it is read. Once the deadline has passed, what has come in is still read."""
        channels = self.channels
        seq = channels.next_seq()
        now = time.monotonic()
        self.sent = {s: t for s, t in self.sent.items() if t + self.lease > now}
        self.sent[seq] = now
        posted = channels.post({m: wire.encode_control(seq, "ping", {}) for m in nodes})
        waiting = {m for m, failure in posted.items() if failure is None}
        whose = {channels.socks[m]: m for m in nodes}
        poller = zmq.Poller()
        for sock in whose:
            poller.register(sock, zmq.POLLIN)
        deadline = now + timeout
        while True:
            left = deadline - time.monotonic()
            ready = poller.poll(int(left * 1000) + 1 if left > 0 else 0)
            for sock, _ in ready:
                node = whose[sock]
                for rseq, answer in _replies(sock):
                    if rseq == seq:
                        waiting.discard(node)
                    if answer is not None and rseq in self.sent:
                        yield node, answer[0], answer[1], self.sent[rseq]
            if not waiting or (left <= 0 and not ready):
                return


def _replies(sock: zmq.Socket[bytes]) -> Iterator[tuple[int, tuple[str, int] | None]]:
    """Every reply waiting on ``sock``: (its seq, ("pong" or REJOIN, incarnation), else
    None)."""
    while True:
        try:
            rseq, results, error = wire.decode_reply(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            return
        except wire.MalformedMessage:
            continue
        yield rseq, (read_ping_answer(results[0]) if not error and len(results) == 1
                     else None)
