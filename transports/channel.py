"""ZeroMQ request channels from one client to every memory node, with deadlines.

Each MN gets one DEALER socket. ``exchange`` sends one message to each of several MNs at once
and waits, within one deadline, for all of their replies: that is how a batch spanning MNs costs
one round trip. Replies carry the request's sequence number, so a reply that arrives after its
request timed out is recognised and dropped, never mistaken for the next one.

A batch that failed only because some MNs did not answer in time can still be completed by
their late replies (``Channels.overdue``, ``Transport.late``): a stalled MN process executes
what it was sent once it runs again, and its reply says exactly what each verb did. Awaiting
that reply is how a client rides through a stall shorter than the master's failure detector
without sending anything twice (``fusee.client``'s guard decides how long).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import zmq

from fusee.emulator import _atomic, wire
from fusee.config import ClusterConfig
from fusee.errors import WrongMemoryNode
from fusee.verbs import NodeTimeout, NotAuthorized, RemoteAccessError, TransportError
from fusee.transports.base import raise_for_failures
from fusee.transports.security import HANDSHAKE_FAILED, refusal, secure_client

_monotonic = time.monotonic
#: ``wire.decode_reply``'s fast path: a reply whose verbs all completed, read in one C call
_unpack = _atomic.unpack
#: a socket's own send (pyzmq's Cython one): ``zmq.Socket.send`` wraps it in a Python method
#: for the routing ids and groups of draft sockets, which a DEALER never has
_send: Callable[..., Any] = zmq.backend.Socket.send
#: messages shorter than this are copied into ZeroMQ (cheaper than tracking a zero-copy one)
_COPY_BELOW = 65536


class Overdue(NamedTuple):
    """A batch that failed for want of some MNs' replies, which may still come: ``groups``
    (node -> the positions of its requests) are the MNs sent request ``seq`` that did not
    answer in time; ``results`` the batch's completions, with their NodeTimeouts."""
    channels: Channels
    batch: object
    seq: int
    groups: dict[int, list[int]]
    results: list

    def complete(self, timeout: float) -> list | None:
        """Wait up to ``timeout`` seconds for the replies still awaited, placing each into
        ``results`` as it comes: the batch's completions once all are in (raising the
        batch's failure if one remains, as ``execute`` would have), else None."""
        deadline = _monotonic() + timeout
        for node in list(self.groups):
            reply = self.channels._await(node, self.seq, deadline, timeout)
            if isinstance(reply, NodeTimeout):
                return None
            place_replies(self.results, {node: self.groups.pop(node)}, {node: reply})
        return raise_for_failures(self.results)


class Channels:
    def __init__(self, config: ClusterConfig, identity: bytes | None = None):
        """``identity``: the sockets' routing identity (``fusee.fencing.identity``), by which
        an MN refuses a client the master fenced; None: ZeroMQ's own."""
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.socks: dict[int, zmq.Socket] = {}
        self.rcvtimeo: dict[int, int] = {}             # the RCVTIMEO each socket has now
        self.monitors: dict[int, zmq.Socket] = {}      # CURVE handshake failures, per node
        self.seq = 0
        self.unanswered: dict[int, int] = {}    # node -> the last request it did not answer
        self.endpoints = {m.id: m.endpoint for m in config.memnodes}
        for m in config.memnodes:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if identity is not None:
                s.setsockopt(zmq.ROUTING_ID, identity)
            self.public = secure_client(s, config, m)       # our key, the same for all
            if config.security.curve:
                self.monitors[m.id] = s.get_monitor_socket(HANDSHAKE_FAILED)
            s.connect(m.endpoint)
            self.socks[m.id] = s
            self.rcvtimeo[m.id] = -1

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def exchange(self, payloads: dict[int, bytes], seq: int, timeout: float) -> dict:
        """Send ``payloads[node]`` to each node; return node -> (results, error) or NodeTimeout
        for each node that did not answer within ``timeout`` seconds."""
        return self.collect(self.post(payloads), seq, timeout)

    def roundtrip(self, node: int, payload: bytes, seq: int, timeout: float):
        """``exchange`` with one node: -> (results, error) or NodeTimeout."""
        deadline = _monotonic() + timeout
        try:
            _send(self.socks[node], payload, zmq.NOBLOCK, len(payload) < _COPY_BELOW)
        except zmq.Again:
            return NodeTimeout(f"MN {node}: cannot send (not connected)", node)
        return self._await(node, seq, deadline, timeout)

    def post(self, payloads: dict[int, bytes]) -> dict:
        """Send without waiting; returns what ``collect`` needs (a node that cannot be sent
        to already maps to its NodeTimeout)."""
        sent: dict = {}
        for node, payload in payloads.items():
            try:
                _send(self.socks[node], payload, zmq.NOBLOCK, len(payload) < _COPY_BELOW)
                sent[node] = None
            except zmq.Again:
                sent[node] = NodeTimeout(f"MN {node}: cannot send (not connected)", node)
        return sent

    def collect(self, sent: dict, seq: int, timeout: float) -> dict:
        """Wait, within ``timeout`` seconds, for the replies to what ``post`` sent.

        The replies are awaited one node after the other, which takes as long as the slowest
        node, with a blocking receive bounded by the deadline (pyzmq calls cost microseconds
        each, so no poll before a receive). Last sent, first awaited: the MNs tend to answer
        in the order they were sent to, so by the time the last one's reply is in, the
        others' usually are too, and the client thread sleeps and wakes once per batch
        rather than once per MN (each wake is a context switch, on the cores the MNs need).
        The replies keep the order of ``sent``."""
        deadline = _monotonic() + timeout
        replies = sent.copy()
        for node in reversed(sent):
            if sent[node] is None:
                replies[node] = self._await(node, seq, deadline, timeout)
        return replies

    def _await(self, node: int, seq: int, deadline: float, timeout: float):
        sock = self.socks[node]
        while True:
            left = deadline - _monotonic()
            ms = int(left * 1000) + 1 if left > 0 else 0     # at most 1 ms past the deadline
            if ms != self.rcvtimeo[node]:
                sock.setsockopt(zmq.RCVTIMEO, ms)
                self.rcvtimeo[node] = ms
            try:
                data = sock.recv()
            except zmq.Again:
                self.unanswered[node] = seq
                return self._refused(node) or NodeTimeout(
                    f"MN {node} at {self.endpoints[node]}: no reply within {timeout:g} s (is "
                    "it running, and is that its endpoint?)", node)
            done = _unpack(data)                # (``wire.decode_reply``'s fast path)
            if done is None:
                try:
                    done = wire.decode_reply(data)
                except wire.MalformedMessage:
                    continue
            rseq, results, error = done
            if rseq == seq or (rseq == -1 and error):     # -1: the MN could not read ours
                return results, error
            # else a late reply to a request that timed out before: dropped

    def overdue(self, batch: object, seq: int, groups: dict[int, list[int]], replies: dict,
                results: list) -> Overdue | None:
        """What batch ``batch`` (request ``seq``, placed into ``results``) may still get: the
        late replies of the nodes that did not answer it in time (None if none is awaited)."""
        late = {node: idx for node, idx in groups.items()
                if self.unanswered.get(node) == seq and type(replies.get(node)) is NodeTimeout}
        return Overdue(self, batch, seq, late, results) if late else None

    def _refused(self, node: int) -> NotAuthorized | None:
        """Why a CURVE node stayed silent, if it was because it refused our key."""
        monitor = self.monitors.get(node)
        if monitor is None:
            return None
        assert self.public is not None, "a monitor watches a CURVE handshake"
        return refusal(monitor, self.public, f"MN {node}", self.endpoints[node], node)

    def _first_replies(self, payloads: dict[int, bytes], seq: int, timeout: float) -> dict:
        """``exchange`` that also watches each CURVE node's handshake: a node that refuses
        our key fails at once (NotAuthorized) instead of at the deadline. For the first
        requests to the nodes (``call_all``): the verbs' round trips skip the extra poll."""
        sent = self.post(payloads)
        deadline = _monotonic() + timeout
        replies = {node: failure for node, failure in sent.items() if failure is not None}
        poller = zmq.Poller()
        whose = {}
        for node in sent.keys() - replies.keys():
            for sock in (self.socks[node], self.monitors[node]):
                poller.register(sock, zmq.POLLIN)
                whose[sock] = node
        while whose and (left := deadline - _monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000) + 1):
                node = whose.get(sock)
                if node is None or node in replies:
                    continue
                if sock is self.socks[node]:
                    replies[node] = self._await(node, seq, deadline, timeout)
                elif (refused := self._refused(node)) is not None:
                    replies[node] = refused
                else:
                    continue
                for s in (self.socks[node], self.monitors[node]):
                    poller.unregister(s)
                    del whose[s]
        for node in sent.keys() - replies.keys():
            replies[node] = self._await(node, seq, deadline, timeout)   # past it: times out
        return replies

    def taken_for_dead(self, node: int) -> NodeTimeout:
        """The error of a request to an MN that did not answer when the transport connected."""
        return NodeTimeout(f"MN {node} at {self.endpoints[node]} is taken for dead: it did not "
                           "answer when this transport connected (is it running, and is that "
                           "its endpoint?)", node)

    def call(self, node: int, name: str, timeout: float, **args):
        """A control request to one MN; returns its reply value or raises."""
        seq = self.next_seq()
        reply = self.roundtrip(node, wire.encode_control(seq, name, args), seq, timeout)
        if isinstance(reply, TransportError):
            raise reply
        results, error = reply
        if error:
            raise wire.error_of(error, node)
        return results[0]

    def call_all(self, nodes, name: str, timeout: float, **args) -> dict:
        """The same control request to several MNs at once, within one deadline; returns
        node -> its reply value, or the TransportError it failed with."""
        seq = self.next_seq()
        payload = wire.encode_control(seq, name, args)
        payloads = dict.fromkeys(nodes, payload)
        out = {}
        replies = (self._first_replies(payloads, seq, timeout) if self.monitors else
                   self.exchange(payloads, seq, timeout))
        for node, reply in replies.items():
            if isinstance(reply, TransportError):
                out[node] = reply
            else:
                results, error = reply
                out[node] = wire.error_of(error, node) if error else results[0]
        return out

    def close(self) -> None:
        for node, s in self.socks.items():
            if node in self.monitors:
                s.disable_monitor()
                self.monitors[node].close(0)
            s.close(0)
        self.socks.clear()
        self.monitors.clear()


def dead_on_connect(config: ClusterConfig, dead, replies: dict) -> set[int]:
    """The MNs to treat as dead on connecting: ``dead`` (known to be) and those whose reply
    (``Channels.call_all``) is a NodeTimeout. Any other failure is raised, and so is a
    NodeTimeout when as many MNs are down as there are replicas: nothing could be served."""
    dead = set(dead)
    unknown = dead - {m.id for m in config.memnodes}
    if unknown:
        raise ValueError(f"no memory node {sorted(unknown)} in this cluster")
    for node, reply in sorted(replies.items()):
        if isinstance(reply, NodeTimeout):
            dead.add(node)
        elif type(reply) is RemoteAccessError:      # (not NotAuthorized: a key, not a place)
            raise not_a_memnode(config, node, reply)
        elif isinstance(reply, Exception):
            raise reply
    if len(dead) >= config.replicas:
        raise NodeTimeout(f"memory nodes {sorted(dead)} are down: {config.replicas} replicas "
                          "cannot survive that", min(dead))
    return dead


def not_a_memnode(config: ClusterConfig, node: int, refusal: RemoteAccessError
                  ) -> WrongMemoryNode:
    """What to say when something at MN ``node``'s endpoint refused "info", which every memory
    node serves: another service listens there (a master, another program's socket), so the
    config names the wrong place (docs/design.md#cluster-identity), not an internal fault."""
    endpoint = config.node(node).endpoint
    return WrongMemoryNode(f"memory node {node} at {endpoint} does not answer as a fusee memory "
                           f"node ({refusal}): is the endpoint in the config right?", node,
                           endpoint, "a fusee memory node", str(refusal))


def place_replies(results: list, groups: dict[int, list[int]], replies: dict) -> bool:
    """Put each node's completions at its requests' positions in ``results`` (``groups``: node
    -> positions in posting order). The failed request and those flushed after it get the
    node's error; a node whose reply is a TransportError gets it everywhere. True if any failed."""
    failed = False
    for node, idx in groups.items():
        reply = replies[node]
        if isinstance(reply, TransportError):
            failed = True
            for i in idx:
                results[i] = reply
            continue
        done, error = reply
        if len(done) == len(idx):           # every request done: the common case
            for i, completion in zip(idx, done):
                results[i] = completion
            continue
        for k, i in enumerate(idx):
            if k < len(done):
                results[i] = done[k]
            else:
                failed = True
                results[i] = wire.error_of(error, node) if error else NodeTimeout(
                    f"MN {node}: reply lacks completion {k}", node)
    return failed
