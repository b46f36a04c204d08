"""The shared-memory backend: one-sided verbs that the client executes itself.

On one host a memory node's registered region is a POSIX shared-memory segment. This backend
learns each region over the MN's control channel ("info"), maps the segment, and executes
READ/WRITE/CAS/FAA in the client's own process (memory copies and lock-prefixed hardware
atomics, ``fusee.emulator._atomic``), so the MN's CPU does nothing: that is what one-sided RDMA
means. Like a NIC, the client checks access key, bounds and alignment on every verb
(``fusee.emulator.nic_checks``; ``_atomic.run`` runs a batch that passes them all), executes
each node's requests in posting order, and on a node's first failure flushes the rest of that
node's requests.

Block allocation is the MN CPU's only work: a node's part of a batch that holds AllocBlock or
FreeBlock goes to that MN as one verbs message (so its order is kept), and the other nodes'
parts execute locally while that message is in flight.

A segment stays mapped after its MN dies, so death is watched separately: the transport holds
a pidfd per MN (a zombie counts as dead) and polls them all with one non-blocking poll(2) at
most every ``liveness_interval`` seconds, which keeps the per-batch cost to one clock read.
From the poll that sees a death on, every request to that MN fails with NodeTimeout. An MN
known dead when connecting (``dead``, from the master's membership) or silent then is dead
from the start: it is never mapped and keeps a placeholder region (length 0).
"""

from __future__ import annotations

import errno
import os
import select
import time

from fusee.emulator import _atomic, wire
from fusee.emulator.memory import SharedSegment
from fusee.emulator.nic_checks import check_atomic, check_range, malformed, wrong_key
from fusee.config import ClusterConfig
from fusee.errors import ConfigError
from fusee.verbs import (MAX_BATCH, AllocBlock, Batch, Cas, Faa, FreeBlock, NodeTimeout, Read,
                         TransportError, Write)
from fusee.transports.base import RegionInfo, Transport, TransportStats, raise_for_failures
from fusee.transports.channel import Channels, dead_on_connect, place_replies

_monotonic = time.monotonic
_cas, _faa, _run = _atomic.cas, _atomic.faa, _atomic.run
_KINDS = (Read, Write, Cas, Faa)            # the order _atomic.run expects

#: default seconds between two liveness polls: a dead MN is noticed this fast, and the poll
#: (about 0.5 us) is paid at most this often
LIVENESS_INTERVAL = 0.001


#: what to do when a region cannot be mapped for want of address space: the client maps every
#: MN's region whole (populated by default, as a NIC translates all of a registered region:
#: emulator/memory.py)
_NO_ROOM = (": this process may not map that much (ulimit -v); raise its limit, or use the zmq "
            "transport, which maps nothing")


class ShmTransport(Transport):
    """``populate``: map each region with all its pages at once, as a NIC has a registered
    region (no page fault on a first touch: right for a client that runs a while, the
    default), or, False, each page on its first touch (connecting on 3 regions of 128 MiB:
    ~3 ms instead of ~20-30; right for a client that does a few operations and exits, as
    a ``fusee get`` does)."""

    name = "shm"

    def __init__(self, config: ClusterConfig, timeout: float | None = None,
                 liveness_interval: float = LIVENESS_INTERVAL, dead=(), populate: bool = True):
        #: what the C execute reads of this transport on every batch, by position rather
        #: than by name: [_next_check, _table, regions, stats.counts], kept by the properties
        #: below, which are the only way to set those attributes (``stats.counts`` is set
        #: only by TransportStats.__init__)
        self._fast: list = [0.0, (), {}, None]
        super().__init__(config, timeout)
        if not hasattr(os, "pidfd_open"):
            raise RuntimeError("the shm transport needs Linux >= 5.3 (os.pidfd_open)")
        if not 0 < liveness_interval <= self.timeout:
            raise ValueError("liveness_interval must be in (0, timeout]")
        self.liveness_interval = liveness_interval
        self.populate = populate
        self.channels = Channels(config)
        self._segments: dict[int, SharedSegment] = {}
        self._pidfds: dict[int, int] = {}          # fd -> node
        self._poller = select.poll()
        #: node -> (mmap, address of offset 0, length, rkey of the registered region)
        self._nodes: dict[int, tuple] = {}
        self._dead: set[int] = set()
        self._silent: set[int] = set()
        # the common case of ``execute`` in one C call (the checks and ``_atomic.run``); the
        # rest, this class's ``execute``, which makes them again
        # (the transport held weakly and the method unbound: no cycle through ``self``)
        self.execute = _atomic.shm_executor(  # type: ignore[method-assign]
            self, type(self)._execute, MAX_BATCH, _KINDS, self._fast)
        try:
            self._attach(set(dead))
        except BaseException:
            self.close()
            raise

    @property
    def _next_check(self) -> float:
        """time.monotonic() from which the next batch polls the MNs' liveness first."""
        return self._fast[0]

    @_next_check.setter
    def _next_check(self, at: float) -> None:
        self._fast[0] = float(at)

    @property
    def _table(self) -> tuple:
        """What ``_atomic.run`` needs of the nodes (``_fast_table``)."""
        return self._fast[1]

    @_table.setter
    def _table(self, table: tuple) -> None:
        self._fast[1] = table

    @property
    def regions(self) -> dict[int, RegionInfo]:
        return self._fast[2]

    @regions.setter
    def regions(self, regions: dict[int, RegionInfo]) -> None:
        self._fast[2] = regions

    @property
    def stats(self) -> TransportStats:
        return self._stats

    @stats.setter
    def stats(self, stats: TransportStats) -> None:
        self._stats = stats
        self._fast[3] = stats.counts

    def _attach(self, dead: set[int]) -> None:
        """Learn and map every MN's region, all MNs at once; ``dead`` ones are not asked."""
        live = [m.id for m in self.config.memnodes if m.id not in dead]
        infos = self._learn(live)
        self._dead = dead_on_connect(self.config, dead, infos)
        self._silent = self._dead - dead            # on connecting: named apart in errors
        self._map({n: i for n, i in infos.items() if n not in self._dead})
        for node in self._dead:
            self.regions[node] = RegionInfo(node=node, length=0, rkey=0)
        self._table = self._fast_table()

    def revive(self, nodes) -> None:
        """MNs ``nodes`` are alive again (rebuilt: ``fusee.rebuild``): map the new regions
        of those this transport had for dead, or mapped from an earlier process (its death
        not polled yet). One that does not answer stays as it was."""
        now = self.channels.call_all(sorted(nodes), "info", self.timeout)
        back = [n for n, i in now.items() if isinstance(i, dict) and (
            n in self._dead or self.regions[n].shm_name != i["shm_name"])]
        if not back:
            return
        for fd, node in list(self._pidfds.items()):     # the earlier processes' pidfds
            if node in back:
                self._poller.unregister(fd)
                del self._pidfds[fd]
                os.close(fd)
        infos = {n: i for n, i in self._learn(back).items() if isinstance(i, dict)}
        self._map(infos)
        self._dead -= infos.keys()
        self._table = self._fast_table()

    def _learn(self, nodes: list[int]) -> dict:
        """node -> its region's info, or the TransportError it failed with; a pidfd is
        watched for each that answered."""
        infos = self.channels.call_all(nodes, "info", self.timeout)
        for node, info in infos.items():
            if isinstance(info, dict):
                fd = os.pidfd_open(info["pid"])
                self._pidfds[fd] = node
                self._poller.register(fd, select.POLLIN)
        # The pid might have been reused between "info" and pidfd_open; a second answer from
        # the same live MN proves the pidfd is that MN's (its pid cannot be reused while alive).
        agains = self.channels.call_all([n for n, i in infos.items() if isinstance(i, dict)],
                                        "info", self.timeout)
        for node, again in agains.items():
            info = infos[node]
            if isinstance(again, dict) and (again["pid"], again["shm_name"]) != (
                    info["pid"], info["shm_name"]):
                raise TransportError(f"MN {node} changed while connecting", node)
        infos.update({n: a for n, a in agains.items() if not isinstance(a, dict)})
        return infos

    def _map(self, infos: dict) -> None:
        """Map the region of each node of ``infos`` (node -> info)."""
        for node, info in infos.items():
            try:
                seg = SharedSegment(info["shm_name"], populate=self.populate)
            except OSError as e:
                if e.errno != errno.ENOMEM:
                    raise
                # (not a TransportError: no failover or retry brings the room)
                raise ConfigError(f"MN {node}: cannot map its region ({info['length'] >> 20} "
                                  f"MiB): {e.strerror}{_NO_ROOM}") from None
            old = self._segments.pop(node, None)
            if old is not None:             # an earlier process's, dead
                old.close()
            self._segments[node] = seg
            if seg.size < info["length"]:
                raise TransportError(f"MN {node}: segment {seg.name} is smaller than its region",
                                     node)
            self._nodes[node] = (seg.mmap, _atomic.address(seg.mmap), info["length"],
                                 info["rkey"])
            self.regions[node] = RegionInfo(node=node, length=info["length"], rkey=info["rkey"],
                                            shm_name=info["shm_name"])

    def _check_liveness(self, now: float) -> None:
        self._fast[0] = now + self.liveness_interval    # (_next_check's: no call of its setter)
        for fd, _ in self._poller.poll(0):
            # the death first: an exception (Ctrl-C) in what follows must not make it
            # forgotten (the segment stays mapped: verbs to it would succeed into the void)
            self._dead.add(self._pidfds[fd])
            self._table = self._fast_table()
            self._poller.unregister(fd)
            del self._pidfds[fd]
            os.close(fd)

    def _fast_table(self) -> tuple:
        """What ``_atomic.run`` needs of the nodes: per node id, None (dead or not mapped)
        or (address of offset 0, length, rkey, the RegionInfo that rkey is of): a request
        runs only while ``regions[node]`` still is that RegionInfo (frozen: its rkey the
        same) or one with the same rkey."""
        table: list[tuple | None] = []
        for n in range(max(self._nodes, default=-1) + 1):
            if n in self._dead or n not in self._nodes:
                table.append(None)
                continue
            _, base, length, rkey = self._nodes[n]
            region = self.regions.get(n)
            table.append((base, length, rkey) if region is None or region.rkey != rkey
                         else (base, length, rkey, region))
        return tuple(table)

    def execute(self, batch: Batch) -> list:
        """See Transport.execute: verbs run here, control requests on their MN."""
        if not batch:
            return []
        if len(batch) > MAX_BATCH:
            raise ValueError(f"a batch of {len(batch)} requests exceeds MAX_BATCH={MAX_BATCH}")
        now = _monotonic()
        if now >= self._next_check:
            self._check_liveness(now)
        # the fast path, in C: a batch of verbs that all pass a NIC's checks
        done = _run(batch, self._table, self.regions, _KINDS, self.stats.counts)
        if done is not None:
            return done
        # The general path. Check every request before any runs; find the control requests.
        nodes = self._nodes
        remote = None
        for req in batch:
            if type(req) not in _OPS:
                if type(req) is not AllocBlock and type(req) is not FreeBlock:
                    raise TypeError(f"not a verb: {req!r}")
                if remote is None:
                    remote = set()
                remote.add(req.node)
            if req.node not in nodes and req.node not in self._dead:
                raise ValueError(f"no memory node {req.node!r} in this cluster")
        skip = sent = None          # node -> its requests' completion, without running them
        if remote:
            skip, sent = self._post(batch, remote)
        regions, dead = self.regions, self._dead
        s = self.stats
        s.round_trips += 1
        s.verbs += len(batch)
        results = []
        for req in batch:
            node = req.node
            if skip and node in skip:
                results.append(skip[node])
                s.count(req)
                continue
            st = nodes.get(node)
            try:
                if dead and node in dead or st is None or regions[node].rkey != st[3]:
                    raise self._refusal(node, req)
                results.append(_OPS[type(req)](st, req, s))
                continue
            except TransportError as e:
                results.append(e)
            except (TypeError, ValueError, OverflowError) as e:
                results.append(malformed(node, e))
            if skip is None:
                skip = {}
            skip[node] = results[-1]           # flush this node's later requests
        if sent is not None:
            self._collect(batch, sent, results)
        if skip:
            raise_for_failures(results)
        return results

    # Transport's hook; this backend overrides execute itself, to count and run in one pass.
    _execute = execute

    def _refusal(self, node: int, req) -> TransportError:
        """Why a request to ``node`` cannot run at all (it is counted, as if it ran)."""
        self.stats.count(req)
        if node in self._silent:
            return self.channels.taken_for_dead(node)
        if node in self._dead:
            return NodeTimeout(f"MN {node} is dead (its process exited)", node)
        return wrong_key(node)

    def _post(self, batch, remote: set) -> tuple[dict, tuple]:
        """Send each ``remote`` node its whole part of the batch as one verbs message (so the
        MN keeps its order); -> (node -> placeholder, what Channels.collect needs)."""
        seq = self.channels.next_seq()
        payloads = {}
        for node in remote:
            if node not in self._dead:
                part = [req for req in batch if req.node == node]
                payloads[node] = wire.encode_verbs(seq, self.regions[node].rkey, part)
        return dict.fromkeys(remote), (seq, self.channels.post(payloads), remote)

    def _collect(self, batch, sent: tuple, results: list) -> None:
        """Wait for the MNs' replies to ``_post`` and fill their slots of ``results``."""
        seq, posted, remote = sent
        replies = self.channels.collect(posted, seq, self.timeout)
        groups: dict[int, list[int]] = {}
        for i, req in enumerate(batch):
            if req.node in remote:
                groups.setdefault(req.node, []).append(i)
        for node in groups:
            if replies.get(node) is None:           # known dead: nothing was sent
                replies[node] = NodeTimeout(f"MN {node} is dead (its process exited)", node)
        if place_replies(results, groups, replies):
            self.overdue = self.channels.overdue(batch, seq, groups, replies, results)

    def close(self) -> None:
        self.regions = {}
        self._nodes = {}              # nothing can reach the mappings any more
        self._table = ()
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        for fd in self._pidfds:
            self._poller.unregister(fd)     # a closed fd would poll as an event
            os.close(fd)
        self._pidfds.clear()
        self.channels.close()


# One function per verb: check the request as a NIC would, count it, run it, return its
# completion. ``st`` is the node's (mmap, address of offset 0, length, rkey).

def _read(st, req, s):
    node, addr, length = req
    s.reads += 1
    s.bytes_in += length
    check_range(node, addr, length, st[2])
    return st[0][addr:addr + length]


def _write(st, req, s):
    node, addr, data = req
    s.writes += 1
    length = len(data)
    s.bytes_out += length
    check_range(node, addr, length, st[2])
    st[0][addr:addr + length] = data


def _cas_op(st, req, s):
    node, addr, expected, desired = req
    s.atomics += 1
    check_atomic(node, addr, st[2], expected, desired)
    return _cas(st[1] + addr, expected, desired)


def _faa_op(st, req, s):
    node, addr, delta = req
    s.atomics += 1
    check_atomic(node, addr, st[2])
    return _faa(st[1] + addr, delta)


_OPS = {Read: _read, Write: _write, Cas: _cas_op, Faa: _faa_op}


__all__ = ["ShmTransport", "LIVENESS_INTERVAL"]
