"""The timing model: real operations on real memory images, in simulated time.

Like the deterministic simulator (``fusee.emulator.testkit.simulator``), it drives the sans-IO
operation generators that the client runs over one in-process ``LocalMemory``; unlike it, the order
in
which verbs execute comes from a clock, not from a seeded scheduler. Every batch an operation
yields is posted once its client has spent its CPU time on the step (``Profile``), travels
half a round trip, queues at each memory node's NIC (one FIFO station for its messages and
bytes, one more for its atomic unit), executes on the memory image when the NIC gets to it,
and comes back half a round trip later; the operation sees its completions when the last
part of the batch is back. The Clover-style baseline's RPCs queue likewise at the metadata
server's cores and run on the real ``MetadataServer``.

Because the verbs execute for real at the instant the NIC serves them, everything the
protocol does under contention happens as it would: two clients' CAS on one slot, the loser's
retry, SNAPSHOT's rules 2 and 3 when backups disagree, cache misses after another client's
update. The model only decides *when* each verb runs. What it does not model: the clients'
NICs (each client machine's link is assumed never to be the bottleneck), PCIe, and the MN's
memory bandwidth behind its NIC.

A memory node may crash at a given time (``crash_node``): its verbs then fail after the
profile's timeout, and the master's failover runs ``detect_us`` after the crash, stop-the-world
as in the simulator (every verb already at a NIC executes first), costing one profile round
trip per round trip it takes; the next epoch then reaches every client.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fusee.emulator.timing.profile import Profile
from fusee.driver import Operation, run
from fusee.failover import failover
from fusee.membership import Membership
from fusee.verbs import (
    AllocBlock,
    AwaitMembership,
    Backoff,
    Cas,
    EpochChanged,
    Faa,
    FreeBlock,
    NodeTimeout,
    Read,
    TransportError,
    Write,
)
from fusee.transports.base import TransportStats, raise_for_failures
from fusee.transports.local import LocalMemory, LocalTransport

#: event kinds (ordered only by time, then by posting sequence)
_ARRIVE, _EXEC, _RESUME, _CALL = range(4)


class Station:
    """A FIFO queue in front of ``servers`` identical servers (a NIC's pipe, its atomic unit,
    the metadata server's cores, shared client cores). Requests are offered in the order of
    their arrival times, which the event loop guarantees."""

    __slots__ = ("busy", "free", "name")

    def __init__(self, name: str, servers: int):
        assert servers >= 1
        self.name = name
        self.free = [0.0] * servers       # a heap: when each server is next free
        self.busy = 0.0                   # total service time given

    def serve(self, arrive: float, cost: float) -> tuple[float, float]:
        """Reserve a server for ``cost`` from ``arrive`` on: (start, end)."""
        t = self.free[0]
        start = max(t, arrive)
        end = start + cost
        heapq.heapreplace(self.free, end)
        self.busy += cost
        return start, end

    def utilization(self, elapsed: float) -> float:
        return self.busy / (elapsed * len(self.free)) if elapsed > 0 else 0.0


@dataclass
class Completed:
    """One finished operation: when it began and ended (us), and its outcome."""
    kind: str
    start: float
    end: float
    refused: bool = False              # KeyExists / KeyNotFound: done, but refused
    missed: bool = False               # a SEARCH that found nothing


@dataclass
class ModelClient:
    """One simulated client: its source of operations and where it is in the current one."""
    name: str
    calls: Iterator[tuple[str, Callable[[], Operation]]]
    on_done: Callable[[Completed], None]
    stats: TransportStats = field(default_factory=TransportStats)
    kind: str = ""
    gen: Operation | None = None
    started: float = 0.0
    ready: float = 0.0                 # when its own core is free (no shared cores)
    epoch: int = 0
    waiting: bool = False              # for the next membership epoch
    # the batch in flight
    batch: list = field(default_factory=list)
    results: list = field(default_factory=list)
    parts: int = 0                     # parts of the batch not executed yet
    back: float = 0.0                  # when the last part's completion is back


class _Part:
    """The requests of one batch for one destination (a memory node, or the metadata
    server): they travel, queue and execute together, in posting order."""

    __slots__ = ("back", "client", "executed", "node", "positions")

    def __init__(self, client: ModelClient, node, positions: list[int]):
        self.client, self.node, self.positions = client, node, positions
        self.back = 0.0                 # when its completions are back at the client
        self.executed = False


class TimingModel:
    """Runs clients over ``memory`` on ``profile``; ``server``: the Clover baseline's
    metadata server (``fusee.bench.clover_server.MetadataServer``), if any."""

    def __init__(self, profile: Profile, memory: LocalMemory, server=None):
        self.p = profile
        self.memory = memory
        self.server = server
        self.now = 0.0
        self._events: list = []
        self._seq = 0
        self.clients: list[ModelClient] = []
        nodes = sorted(memory.regions)
        self.pipes = {n: Station(f"MN {n} NIC", 1) for n in nodes}
        self.atomic_units = {n: Station(f"MN {n} NIC atomics", 1) for n in nodes}
        self.ms = Station("metadata server CPU", profile.ms_cores) if server else None
        self.cores = (Station("client CPU", profile.client_cores)
                      if profile.client_cores else None)
        self.client_busy = 0.0
        self.half = profile.rtt_us / 2
        self.membership = Membership()
        self.failovers: list[tuple[float, Membership]] = []
        self._unexecuted: set[_Part] = set()
        self._waiting: list[ModelClient] = []

    # -- setup -----------------------------------------------------------------------------
    def add_client(self, name: str, calls, on_done: Callable[[Completed], None]) -> ModelClient:
        c = ModelClient(name, iter(calls), on_done)
        c.epoch = self.membership.epoch
        c.ready = self.now
        self.clients.append(c)
        self._at(self.now, _RESUME, c)
        return c

    def call_at(self, t: float, fn: Callable[[TimingModel], None]) -> None:
        """Call ``fn(model)`` at simulated time ``t`` (us)."""
        self._at(t, _CALL, fn)

    def crash_node(self, node: int, at: float) -> None:
        """MN ``node`` stops at ``at``; the master's failover follows ``detect_us`` later."""
        def crash(model):
            model.memory.crash(node)
            model.call_at(model.now + model.p.detect_us, lambda m: m._fail_over(node))
        self.call_at(at, crash)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, until: float = float("inf")) -> None:
        """Process events up to simulated time ``until`` (us), or until nothing is left."""
        events = self._events
        while events and events[0][0] <= until:
            t, _, kind, obj = heapq.heappop(events)
            self.now = t
            if kind == _RESUME:
                self._resume(obj)
            elif kind == _ARRIVE:
                self._arrive(obj)
            elif kind == _EXEC:
                self._execute(obj)
            else:
                obj(self)
        if until != float("inf"):
            self.now = max(self.now, until)

    def _at(self, t: float, kind: int, obj) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, obj))

    # -- a client's step -----------------------------------------------------------------------
    def _resume(self, c: ModelClient) -> None:
        """The client's batch is back (or it is idle): feed the operation, take its next batch
        and post it after the CPU time of the step."""
        if c.gen is None:
            call = next(c.calls, None)
            if call is None:
                return                          # this client is done
            c.kind, start = call
            c.started = self.now
            c.gen = start()
            arg: list[Any] | TransportError | None
            how, arg = c.gen.send, None
        else:
            how, arg = c.gen.send, c.results
            if c.batch:
                try:
                    raise_for_failures(c.results)
                except TransportError as e:
                    how, arg = c.gen.throw, e
        self._step(c, how, arg)

    def _step(self, c: ModelClient, how, arg) -> None:
        try:
            batch = how(arg)
        except StopIteration as stop:
            self._finish(c, refused=False, missed=stop.value is None and c.kind == "search")
            return
        except KeyError:                        # KeyExists / KeyNotFound
            self._finish(c, refused=True, missed=False)
            return
        batch = list(batch)
        verbs = len(batch)
        cost = self.p.step_us(c.kind) + self.p.client_cpu_per_verb_us * verbs
        self.client_busy += cost
        if self.cores is not None:
            _, post = self.cores.serve(self.now, cost)
        else:
            post = max(self.now, c.ready) + cost
            c.ready = post
        self._post(c, batch, post)

    def _finish(self, c: ModelClient, refused: bool, missed: bool) -> None:
        cost = self.p.step_us(c.kind)
        self.client_busy += cost
        if self.cores is not None:
            _, end = self.cores.serve(self.now, cost)
        else:
            end = c.ready = max(self.now, c.ready) + cost
        c.on_done(Completed(c.kind, c.started, end, refused, missed))
        c.gen = None
        c.batch = []
        self._at(end, _RESUME, c)

    def _post(self, c: ModelClient, batch: list, t: float) -> None:
        c.batch, c.results = batch, [None] * len(batch)
        if not batch:
            self._at(t, _RESUME, c)
            return
        first = type(batch[0])
        if first is Backoff:
            c.results = [None]
            self._at(t + batch[0].seconds * 1e6, _RESUME, c)
            return
        if first is AwaitMembership:
            c.batch, c.results = [], []
            if batch[0].epoch < self.membership.epoch:      # already published
                c.epoch = self.membership.epoch
                self._step(c, c.gen.throw, EpochChanged(self.membership))
                return
            c.waiting = True
            self._waiting.append(c)
            return
        if c.epoch < self.membership.epoch:     # not posted: the epoch changed under it
            c.epoch = self.membership.epoch
            c.batch = []
            self._step(c, c.gen.throw, EpochChanged(self.membership))
            return
        c.stats.round_trips += 1
        c.stats.verbs += len(batch)
        by_node: dict = {}
        for i, req in enumerate(batch):
            node = getattr(req, "node", None)       # an Rpc has none: the metadata server
            by_node.setdefault(node, []).append(i)
            if node is not None:
                c.stats.count(req)
        c.parts = len(by_node)
        c.back = t
        arrive = t + self.half
        for node, positions in by_node.items():
            self._at(arrive, _ARRIVE, _Part(c, node, positions))

    # -- the far side ----------------------------------------------------------------------------
    def _arrive(self, part: _Part) -> None:
        """The part reaches its NIC (or the metadata server): queue it, and execute it when
        its first request is served."""
        c, node, now = part.client, part.node, self.now
        batch = c.batch
        if node is None:
            ends = [self.ms.serve(now, self.p.ms_rpc_us) for _ in part.positions]
        elif node in self.memory.crashed:
            for i in part.positions:            # no answer: the client's wait runs out
                c.results[i] = NodeTimeout(f"MN {node} did not answer", node)
            self._part_done(part, now - self.half + self.p.verb_timeout_us)
            return
        else:
            pipe, atomics, p = self.pipes[node], self.atomic_units[node], self.p
            ends = []
            for i in part.positions:
                req = batch[i]
                t = type(req)
                if t is Read:
                    cost = p.message_us + req.length * p.us_per_byte
                elif t is Write:
                    cost = p.message_us + len(req.data) * p.us_per_byte
                else:                           # atomics; AllocBlock / FreeBlock are RPCs
                    cost = p.message_us         # to the MN's CPU, off the fast path
                start, end = pipe.serve(now, cost)
                if t is Cas or t is Faa:
                    start, end = atomics.serve(end, p.atomic_us)
                ends.append((start, end))
        part.back = max(e for _, e in ends) + self.half
        first = ends[0][0]
        if first <= now:
            self._execute(part)
        else:
            self._unexecuted.add(part)
            self._at(first, _EXEC, part)

    def _execute(self, part: _Part) -> None:
        if part.executed:                       # already run by a failover's pause
            return
        self._unexecuted.discard(part)
        c, node = part.client, part.node
        if node is None:
            calls = [c.batch[i] for i in part.positions]
            replies = self.server.answer([list(r) for r in calls], self.now / 1e6)
            for i, r in zip(part.positions, replies):
                c.results[i] = r
        else:
            mem = self.memory
            failed: TransportError | None = None
            for i in part.positions:
                req = c.batch[i]
                if failed is not None:
                    c.results[i] = failed
                    continue
                if node in mem.crashed:
                    c.results[i] = failed = NodeTimeout(f"MN {node} did not answer", node)
                    continue
                try:
                    t = type(req)
                    if t is AllocBlock or t is FreeBlock:
                        c.results[i] = mem.tables[node].serve(req)
                    else:
                        region = mem.regions[node]
                        c.results[i] = region.execute(req, region.rkey)
                except TransportError as e:
                    c.results[i] = failed = e
        self._part_done(part, part.back)

    def _part_done(self, part: _Part, back: float) -> None:
        c = part.client
        part.executed = True
        c.back = max(c.back, back)
        c.parts -= 1
        if c.parts == 0:
            self._at(max(c.back, self.now), _RESUME, c)

    # -- memory-node failure -------------------------------------------------------------------
    def _fail_over(self, node: int) -> None:
        """The master's failover, stop-the-world: what already reached a NIC executes first."""
        for part in sorted(self._unexecuted, key=lambda p: (p.client.name, p.node)):
            self._execute(part)
        transport = LocalTransport(self.memory.config, memory=self.memory)
        self.membership = run(failover(self.memory.config, self.membership, node), transport)
        took = transport.stats.round_trips * self.p.failover_round_trip_us
        self.failovers.append((self.now, self.membership))
        self.call_at(self.now + took, lambda m: m._publish())

    def _publish(self) -> None:
        waiting, self._waiting = self._waiting, []
        for c in waiting:
            c.waiting = False
            c.epoch = self.membership.epoch
            self._step(c, c.gen.throw, EpochChanged(self.membership))

    # -- what saturates -------------------------------------------------------------------------
    def utilization(self, elapsed: float) -> dict[str, float]:
        """Busy share of every resource over ``elapsed`` us, busiest first."""
        stations = [*self.pipes.values(), *self.atomic_units.values()]
        if self.ms is not None:
            stations.append(self.ms)
        out = {s.name: s.utilization(elapsed) for s in stations}
        n = len(self.clients) or 1
        servers = self.p.client_cores or n
        out["client CPU"] = self.client_busy / (elapsed * min(servers, n)) if elapsed else 0.0
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
