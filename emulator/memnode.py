"""A memory node: registers a region of shared memory and serves it like an RDMA NIC.

The process owns one POSIX shared-memory segment (the registered region) and answers, on one
ZeroMQ ROUTER endpoint, two kinds of message (fusee.emulator.wire): batches of one-sided verbs,
which it executes in order against the region exactly as a NIC would (bounds, key and alignment
checked; hardware atomics), and control requests (region info, block allocation, ping, and
whatever a backend registers, such as RDMA queue-pair setup). It never interprets a key or a
value. Malformed input gets an error reply; nothing a client sends can stop it. SIGTERM or
SIGINT stops it cleanly and removes its segment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from functools import partial

import zmq

from fusee.emulator import _atomic, wire
from fusee.emulator.blocks import BlockTable, format_region
from fusee.emulator.memory import MemoryRegion, SharedSegment, new_rkey
from fusee.emulator.nic_checks import check_key
from fusee.cluster_identity import cluster_word, new_incarnation
from fusee.config import ClusterConfig, ConfigError
from fusee.errors import Fenced, NodeRestarted, StoreFormatError
from fusee.fencing import MASTER_PREFIX, MAX_LEADERSHIP, key_of, master_key, refusal, refused
from fusee.memory_map import MemoryMap
from fusee.rejoin import ping_answer
from fusee.verbs import MAX_BATCH, AllocBlock, ControlError, FreeBlock, RemoteAccessError
from fusee.emulator.serving import (BindError, EndpointInUse, bind, claim_endpoint,
                              stop_condition, write_ready)
from fusee.logsetup import LogLevelError, add_log_level_option, setup_logging
from fusee.metrics import (MEMNODE_TALLY, MemnodeCollector, MetricsUnavailable,
                           metrics_address, serve_metrics)
from fusee.transports.security import check_endpoint, secure_server

log = logging.getLogger(__name__)

_serve = _atomic.serve

#: messages larger than the region plus this much framing are refused by ZeroMQ itself
MESSAGE_SLACK = 1 << 20
#: ``serve`` checks ``stop()`` once per this many requests (and whenever it waited 200 ms)
STOP_CHECK_EVERY = 64


class MemoryNode:
    """The state of one MN: its region, its block table, and its control handlers."""

    def __init__(self, config: ClusterConfig, node_id: int, segment_name: str | None = None,
                 rejoin: bool = False):
        """``rejoin``: this MN takes a dead one's place; it answers the master's ping with
        REJOIN until the end, and the master rebuilds it (``fusee.rebuild``). Either answer
        carries this start's incarnation, which tells the master of a restart."""
        self.config, self.id = config, node_id
        self.map = MemoryMap.of(config.layout)
        name = segment_name or f"fusee-{config.name}-mn{node_id}-{os.getpid()}"
        self.segment = SharedSegment(name, config.layout.region_size, create=True)
        self.region = MemoryRegion(self.segment.mmap, new_rkey(), node_id)
        self._base = _atomic.address(self.segment.mmap)      # for the verbs' fast path
        self.incarnation = new_incarnation()
        format_region(self.region, self.map, node_id, cluster_word(config), self.incarnation)
        self.blocks = BlockTable(self.region, self.map)
        # what fusee.metrics reports, in MEMNODE_TALLY's order: a list, the cheapest counter
        # to bump on the request loop
        self.tally = [0] * len(MEMNODE_TALLY)
        self.controls: dict[str, Callable[[dict], object]] = {
            "info": self._info,
            "ping": lambda args: ping_answer(rejoin, self.incarnation),
            "fence": self._fence,
        }
        #: the clients whose requests are refused: the master ended their leases
        #: (``fusee.fencing``; a few dozen bytes per expired client)
        self.fenced: set[bytes] = set()
        #: every master leadership below this is refused: a newer master leads
        #: (``fusee.fencing``; 0: none fenced)
        self.masters_below = 0
        #: what else a fence must cut off before the node acks it: the RDMA queue pairs of
        #: whoever it now refuses (``fusee.emulator.rdma_nic``), whose verbs this node's CPU
        #: never sees
        self.fence_hooks: list[Callable[[], object]] = []

    def register_control(self, name: str, handler: Callable[[dict], object]) -> None:
        """Add a control request (e.g. RDMA queue-pair setup); handler(args) -> reply value."""
        self.controls[name] = handler

    def _info(self, args: dict) -> dict:
        return {"node": self.id, "length": self.region.length, "rkey": self.region.rkey,
                "shm_name": self.segment.name, "fingerprint": self.map.fingerprint,
                "pid": os.getpid(), "blocks": self.map.num_blocks,
                "blocks_used": self.blocks.used(), "block_size": self.config.layout.block_size}

    def _fence(self, args: dict) -> str:
        """The master recovers a client whose lease it ended (``key``: its fence key), or a
        new master leads (``masters_below``: its leadership): refuse it, or every older
        leadership, from now on. A lower watermark than the one in place changes nothing."""
        key, below = args.get("key"), args.get("masters_below")
        if (key is None) == (below is None):
            raise ControlError("give either key (a client's fence key) or masters_below (the "
                               "leadership of the master that leads now)", self.id)
        if key is not None:
            if type(key) is not bytes:
                raise ControlError(f"a fence key is bytes, not {type(key).__name__}", self.id)
            self.fenced.add(key)
            log.info("memnode %d: fenced %r", self.id, key)
        else:
            if type(below) is not int or not 0 <= below <= MAX_LEADERSHIP:
                raise ControlError(f"masters_below is a leadership (an int from 0 to "
                                   f"{MAX_LEADERSHIP}), not {below!r}", self.id)
            if below > self.masters_below:
                self.masters_below = below
                # the key of the leadership just below, as well: ``serve`` looks at a
                # request's identity only once ``fenced`` holds something
                self.fenced.add(master_key(below - 1))
                log.info("memnode %d: fenced every master leadership below %d", self.id, below)
        for hook in self.fence_hooks:
            hook()
        return "fenced"

    def refuses(self, key: bytes | None) -> bool:
        """Whether this node refuses the holder of fence key ``key`` (None: none)."""
        return key is not None and refused(key, self.fenced, self.masters_below)

    def refuse(self, data: bytes | zmq.Frame, key: bytes) -> bytes:
        """The reply to a request from a fenced client or master: Fenced, whatever it asked."""
        try:
            seq = wire.decode_request(data)[1]
        except wire.MalformedMessage:
            seq = -1
        return wire.encode_reply(seq, [], [0, wire.ERR_FENCED, refusal(self.id, key)])

    # -- request handling: bytes in, bytes out (no I/O here, so it can be fuzzed directly) ----
    def handle(self, data: bytes | zmq.Frame) -> bytes:
        region = self.region
        served = _serve(data, self._base, region.length, region.rkey, MAX_BATCH)
        if served is not None:                  # the common case, whole, in C
            self.tally[1] += served[0]           # verbs
            return served[1]
        try:
            kind, seq, key, body = wire.decode_request(data)
        except wire.MalformedMessage as e:
            return wire.encode_reply(-1, [], [0, wire.ERR_MALFORMED, str(e)])
        if kind == wire.VERBS:
            self.tally[1] += len(body)                   # verbs
            return self._verbs(seq, key, body)
        return self._control(seq, key, body)

    def _verbs(self, seq: int, rkey: int, ops: list) -> bytes:
        if len(ops) > MAX_BATCH:
            return wire.encode_reply(seq, [], [0, wire.ERR_MALFORMED,
                                               f"MN {self.id}: a batch of {len(ops)} requests "
                                               f"exceeds MAX_BATCH={MAX_BATCH}"])
        # What _atomic.serve did not take: ALLOC/FREE, a wrong key, a verb that fails. Verb
        # by verb, in order, until the first that fails, whose refusal the reply words.
        # ALLOC/FREE need the region's key too: a request sent to this MN's dead predecessor
        # at the endpoint (ZeroMQ delivers what it queued for it once a socket reconnects),
        # or by a client stalled since, was fenced by no one here (tests/test_stall_processes)
        region, blocks = self.region, self.blocks
        results = []
        for i, op in enumerate(ops):
            try:
                req = wire.parse_op(op)
                if type(req) is AllocBlock or type(req) is FreeBlock:
                    check_key(self.id, rkey, region.rkey)
                    results.append(blocks.serve(req))
                else:
                    results.append(region.execute(req, rkey))
            except wire.MalformedMessage as e:
                return wire.encode_reply(seq, results, [i, wire.ERR_MALFORMED, str(e)])
            except NodeRestarted as e:      # (a RemoteAccessError the client takes as a death)
                return wire.encode_reply(seq, results, [i, wire.ERR_WRONG_KEY, str(e)])
            except RemoteAccessError as e:
                return wire.encode_reply(seq, results, [i, wire.ERR_ACCESS, str(e)])
            except ControlError as e:
                return wire.encode_reply(seq, results, [i, wire.ERR_CONTROL, str(e)])
        return wire.encode_reply(seq, results)

    def _control(self, seq: int, name: str, args: dict) -> bytes:
        handler = self.controls.get(name)
        if handler is None:
            return wire.encode_reply(seq, [], [0, wire.ERR_CONTROL, f"unknown control {name!r}"])
        try:
            return wire.encode_reply(seq, [handler(args)])
        except Fenced as e:
            return wire.encode_reply(seq, [], [0, wire.ERR_FENCED, str(e)])
        except (ControlError, ValueError, TypeError, KeyError) as e:
            return wire.encode_reply(seq, [], [0, wire.ERR_CONTROL, f"{name}: {e}"])

    def close(self) -> None:
        self.region.release()
        self.segment.close()


def serve(node: MemoryNode, endpoint: str, stop: Callable[[], bool],
          on_bound: Callable[[str], None] = lambda ep: None) -> None:
    """Serve ``endpoint`` until ``stop()`` is true (checked at least every 200 ms)."""
    check_endpoint(node.config, endpoint, f"memnode {node.id}")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    auth = secure_server(ctx, sock, node.config, node.id)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, node.config.layout.region_size + MESSAGE_SLACK)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    # A blocking receive with a timeout, rather than poll + non-blocking receive: each pyzmq
    # call costs microseconds, and an empty non-blocking receive raises an exception.
    # (recv_multipart/send_multipart cost microseconds more than two plain calls.)
    sock.setsockopt(zmq.RCVTIMEO, 200)
    # the socket's own (Cython) send: zmq.Socket.send wraps it in a Python method (for draft
    # sockets' routing ids and groups) that cost more than the send, twice per request
    send = partial(zmq.backend.Socket.send, sock)
    recv, handle, tally = sock.recv, node.handle, node.tally
    fenced, refuses = node.fenced, node.refuses
    more = zmq.SNDMORE | zmq.NOBLOCK
    # ``stop()`` (a Python call, a clock read) after every STOP_CHECK_EVERY requests and after
    # each 200 ms without one, not per request: a busy node still stops within milliseconds
    unchecked = 0
    # ``handle``'s fast path (one C call), without the Python call to ``handle``
    serve_verbs, base, size, rkey = _serve, node._base, node.region.length, node.region.rkey
    try:
        on_bound(bind(sock, endpoint))
        while unchecked % STOP_CHECK_EVERY or not stop():
            try:
                ident = recv()                # a ROUTER delivers [identity, message...]
            except zmq.Again:
                unchecked = 0
                continue                      # 200 ms without a request: check stop()
            unchecked += 1
            data = recv(copy=False)
            if data.more:                     # not from a DEALER speaking our protocol
                while recv(copy=False).more:
                    pass
                continue
            try:
                # (a client's request costs one set lookup more once anyone is fenced)
                if fenced and (key_of(ident) in fenced or
                               ident.startswith(MASTER_PREFIX) and refuses(key_of(ident))):
                    reply = node.refuse(data, key_of(ident))
                elif (done := serve_verbs(data, base, size, rkey, MAX_BATCH)) is not None:
                    tally[1] += done[0]       # verbs
                    reply = done[1]
                else:
                    reply = handle(data)
            except Exception:                 # a bug must not take the node down for everyone
                log.exception("memnode %d: internal error", node.id)
                reply = wire.encode_reply(-1, [], [0, wire.ERR_MALFORMED, "internal error"])
            send(ident, more)
            send(reply, zmq.NOBLOCK, len(reply) < 65536)
            tally[0] += 1                     # MEMNODE_TALLY: requests, verbs, bytes in, out
            tally[2] += len(data)
            tally[3] += len(reply)
    finally:
        sock.close(0)
        if auth is not None:
            auth.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fusee memnode", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="cluster config (TOML)")
    p.add_argument("--id", type=int, required=True, help="this memory node's id")
    p.add_argument("--endpoint", help="bind here instead of the config's endpoint")
    p.add_argument("--ready-file", help="write {endpoint, shm_name, pid} here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument("--rdma", action="store_true", help="also serve the region over RDMA (pyverbs)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port "
                   "(0: any free one; default: the config's metrics_port, else none)")
    add_log_level_option(p)
    p.add_argument("--rejoin", action="store_true",
                   help="take the place of this id's dead MN (a restart, or a replacement "
                        "host): the master rebuilds its data from the live replicas")
    args = p.parse_args(argv)

    try:
        setup_logging(args.log_level)
        config = ClusterConfig.load(args.config)
        if not 0 <= args.id < len(config.memnodes):
            p.error(f"no memory node {args.id} in {args.config}")
        endpoint = args.endpoint or config.node(args.id).endpoint
        claim_endpoint(endpoint)            # before the region: a duplicate takes nothing
    except (ConfigError, EndpointInUse, LogLevelError) as e:
        print(f"fusee memnode: error: {e}", file=sys.stderr)
        return 2
    stop = stop_condition(args.parent_pid)
    try:        # a layout with no room for its parts is the config's error: one line, exit 2
        node = MemoryNode(config, args.id, rejoin=args.rejoin)
    except (ConfigError, StoreFormatError) as e:
        print(f"fusee memnode: error: {e}", file=sys.stderr)
        return 2
    metrics_port = config.node(args.id).metrics_port if args.metrics_port is None \
        else args.metrics_port
    try:
        if metrics_port is not None:
            metrics_port = serve_metrics(metrics_port, metrics_address(endpoint),
                                         MemnodeCollector(node))
        if args.rdma:
            from fusee.emulator import rdma_nic
            rdma_nic.install(node)

        def bound(endpoint: str) -> None:
            log.info("memnode %d serving %s region %s (%d bytes)%s", node.id, endpoint,
                     node.segment.name, node.region.length,
                     "; rejoining: the master rebuilds it" if args.rejoin else "")
            write_ready(args.ready_file, endpoint=endpoint, shm_name=node.segment.name,
                        metrics_port=metrics_port)

        serve(node, endpoint, stop, bound)
    except (BindError, ConfigError, MetricsUnavailable) as e:
        print(f"fusee memnode: error: {e}", file=sys.stderr)
        return 2
    finally:
        node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
