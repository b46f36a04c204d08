"""ZeroMQ request channels from one client to every memory node, with deadlines.

Each MN gets one DEALER socket. ``exchange`` sends one message to each of several MNs at once
and waits, within one deadline, for all of their replies: that is how a batch spanning MNs costs
one round trip. Replies carry the request's sequence number, so a reply that arrives after its
request timed out is recognised and dropped, never mistaken for the next one.
"""

from __future__ import annotations

import time

import zmq

from emulator import wire
from fusee.config import ClusterConfig
from fusee.verbs import NodeTimeout, TransportError


class Channels:
    def __init__(self, config: ClusterConfig):
        self.ctx = zmq.Context.instance()
        self.socks: dict[int, zmq.Socket] = {}
        self.poller = zmq.Poller()
        self.seq = 0
        for m in config.memnodes:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(m.endpoint)
            self.socks[m.id] = s
            self.poller.register(s, zmq.POLLIN)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def exchange(self, payloads: dict[int, bytes], seq: int, timeout: float) -> dict:
        """Send ``payloads[node]`` to each node; return node -> (results, error) or NodeTimeout
        for each node that did not answer within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        replies: dict = {}
        for node, payload in payloads.items():
            try:
                self.socks[node].send(payload, zmq.NOBLOCK, copy=len(payload) < 65536)
            except zmq.Again:
                replies[node] = NodeTimeout(f"MN {node}: cannot send (not connected)", node)
        pending = {n for n in payloads if n not in replies}
        if len(pending) == 1:                           # the common case, without a Poller
            (node,) = pending
            sock = self.socks[node]
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(left * 1000):
                    replies[node] = NodeTimeout(
                        f"MN {node}: no reply within {timeout:g} s", node)
                    return replies
                got = self._recv(sock, node, seq)
                if got is not None:
                    replies[node] = got
                    return replies
        while pending:
            left = deadline - time.monotonic()
            events = dict(self.poller.poll(max(left, 0) * 1000)) if left > 0 else {}
            if not events:
                for node in pending:
                    replies[node] = NodeTimeout(
                        f"MN {node}: no reply within {timeout:g} s", node)
                break
            for node, sock in self.socks.items():
                if sock in events:
                    got = self._recv(sock, node, seq)
                    if got is not None and node in pending:
                        replies[node] = got
                        pending.discard(node)
        return replies

    @staticmethod
    def _recv(sock, node: int, seq: int):
        """One reply for ``seq``, or None for a stale or foreign one (dropped)."""
        try:
            data = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        try:
            rseq, results, error = wire.decode_reply(data)
        except wire.MalformedMessage:
            return None
        if rseq != seq:
            if rseq == -1 and error:             # the MN could not even read our request
                return results, error
            return None
        return results, error

    def call(self, node: int, name: str, timeout: float, **args):
        """A control request to one MN; returns its reply value or raises."""
        seq = self.next_seq()
        reply = self.exchange({node: wire.encode_control(seq, name, args)}, seq, timeout)[node]
        if isinstance(reply, TransportError):
            raise reply
        results, error = reply
        if error:
            raise wire.error_of(error, node)
        return results[0]

    def close(self) -> None:
        for s in self.socks.values():
            s.close(0)
        self.socks.clear()
