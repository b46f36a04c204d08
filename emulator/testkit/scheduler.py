"""The deterministic scheduler under the simulator (``fusee.emulator.testkit.simulator``):
many clients' sans-IO operations interleaved verb by verb.

Every client is a sequence of operation generators (fusee.driver's protocol: yield a batch of
requests, receive the list of completions, return a result), all clients share one in-process
``LocalMemory``, and a scheduler seeded with ``random.Random(seed)`` decides everything: which
client moves next, and which of the verbs of its current batch executes next. A batch's verbs
execute one at a time, interleaved with other clients' verbs; verbs for different memory nodes
in any order, verbs for one node in posting order, as on an RC queue pair (and every transport
here): that is the worst a network may do to a batch. A verb that fails flushes the later verbs
for its node in that batch. When the last verb of a batch is done, the completions go back into
the generator: one round trip for that client. A crashed MN never answers, a slow one
(``slow``) answers too late: the network as the faults (``fusee.emulator.testkit.faults``)
leave it. Nothing here depends on wall-clock time or on hash randomization, so a seed that
fails replays exactly.

Every operation is recorded in a ``History`` (fusee.emulator.testkit.history) for the
linearizability checker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Iterator

from fusee.emulator.testkit.free_bits import FreeBits
from fusee.emulator.testkit.history import History, Op
from fusee.emulator.testkit.trace import Event, VerbDone
from fusee.driver import Operation
from fusee.membership import Membership
from fusee.verbs import (AllocBlock, AwaitMembership, Backoff, EpochChanged, Faa, FreeBlock,
                         NodeTimeout, TransportError, validate)
from fusee.transports.base import TransportStats, raise_for_failures
from fusee.transports.local import LocalMemory


class SimulationError(Exception):
    """The run went wrong in a way that is a bug (an unexpected exception, a malformed request,
    no progress). The message names the seed and step, so the run can be replayed."""


@dataclass(frozen=True)
class Call:
    """One operation a client will invoke: recorded as ``kind(key, value)``; ``start`` builds
    the generator at invocation time (so it sees the client's state at that moment)."""
    kind: str
    key: bytes | None
    value: bytes | None
    start: Callable[..., Operation]     # called with no arguments (its own are bound)


@dataclass
class SimClient:
    """A simulated client: its remaining calls and where it is in the current one."""
    name: str
    calls: Iterator[Call]
    stats: TransportStats = field(default_factory=TransportStats)
    ops: list[Op] = field(default_factory=list)     # every op it invoked, in order
    op: Op | None = None                            # the op in flight
    gen: Operation | None = None
    batch: list = field(default_factory=list)
    results: list = field(default_factory=list)
    pending: dict[int, list[int]] = field(default_factory=dict)  # node -> positions to run
    failed: dict[int, Exception] = field(default_factory=dict)   # node -> its verb's failure
    crashed: bool = False
    done: bool = False
    epoch: int = 0                                  # the last membership it was given
    waiting: bool = False                           # for the next epoch (AwaitMembership)
    late: bool = False                              # its batch awaits a slow MN's replies
    #: a background actor (not in the history): called with its generator's return value,
    #: or the TransportError that ended it
    ended: Callable[[object], None] | None = None
    acked: bool = False                             # its batch completed in a pause

    @property
    def runnable(self) -> bool:
        return not (self.crashed or self.done)


class Scheduler:
    """Runs clients over ``memory`` under the scheduler seeded with ``seed``; the faults and
    the master's actions are its subclasses' (``Faults``, ``Simulator``).

    ``expected_errors`` are the exceptions that are an operation's outcome (KeyExists...): they
    are recorded in the history. Any other exception escaping an operation is a bug and stops
    the run with a SimulationError. ``stickiness`` is the probability that the scheduler keeps
    running the client it ran last (drawn from the seed when None): low values interleave
    finely, high values let operations run mostly alone, and both find different bugs.
    ``lockstep`` runs the clients in turn instead, one step each: the schedule of equally
    fast clients started together (what a timing model of identical clients produces), in
    which clients that race once race the same way again.
    """


    def __init__(self, memory: LocalMemory, seed: int, *,
                 expected_errors: tuple[type[BaseException], ...] = (),
                 max_steps: int = 1_000_000, stickiness: float | None = None,
                 lockstep: bool = False, late_replies: bool = True):
        self.memory = memory
        self.seed = seed
        self.rng = random.Random(seed)
        self.expected_errors = expected_errors
        self.max_steps = max_steps
        self.stickiness = self.rng.random() * 0.9 if stickiness is None else stickiness
        self.lockstep = lockstep
        self.history = History()
        self.trace: list[Event] = []    # every verb and client crash, for windows (trace.py)
        self.clients: dict[str, SimClient] = {}
        self.step = 0
        self._timers: dict[int, list[Callable[[Scheduler], None]]] = {}
        self._last: SimClient | None = None
        self.membership = Membership()
        self.slow: set[int] = set()                     # MNs whose replies come too late
        self.late_replies = late_replies
        self.free_bits = FreeBits(memory.map)   # every free checked as it lands

    # -- setup -----------------------------------------------------------------------------
    def add_client(self, name: str, calls: Iterable[Call]) -> SimClient:
        """Add a client (also allowed while running, e.g. a recovery actor after a crash)."""
        if name in self.clients:
            raise ValueError(f"client {name!r} already exists")
        c = self.clients[name] = SimClient(name, iter(calls))
        c.epoch = self.membership.epoch     # its operations start in the current epoch
        return c

    def at_step(self, step: int, fn: Callable[[Scheduler], None]) -> None:
        """Call ``fn(sim)`` just before step ``step`` (if the run gets that far)."""
        self._timers.setdefault(step, []).append(fn)

    def cancel_timers(self) -> None:
        """Forget every ``at_step`` not fired yet (a run that ended before them)."""
        self._timers.clear()

    # -- running ---------------------------------------------------------------------------
    def run(self) -> History:
        """Drive every client until all are done or crashed; returns the history.

        A run that stops with an error closes the operations still in flight at once, as
        fusee.driver.run does. Left to the garbage collector, an operation waiting inside
        its handler of a thrown error keeps that error, whose traceback holds this
        scheduler's frames and so the operation itself: a cycle, which the collector closes
        generator by generator in any order, one while another closes it ("ValueError:
        generator already executing", an unraisable exception in whatever test runs then)."""
        try:
            return self._schedule()
        except BaseException:
            self._close_in_flight()
            raise

    def _close_in_flight(self) -> None:
        for c in self.clients.values():
            gen, c.gen = c.gen, None
            if gen is not None:
                gen.close()

    def _schedule(self) -> History:
        rng = self.rng
        while True:
            for fn in self._timers.pop(self.step, ()):
                fn(self)
            self._before_step()
            live = [c for c in self.clients.values() if self._movable(c)]
            if not live and self._time_passes():
                if self.step >= self.max_steps:
                    raise SimulationError(f"seed {self.seed}: no end after {self.step} steps "
                                          "(every client waits for the clock)")
                self.step += 1
                continue
            if not live:
                if not any(c.runnable for c in self.clients.values()):
                    return self.history
                if not self._timers:
                    raise SimulationError(f"seed {self.seed}: every client waits for a "
                                          f"membership epoch that no failover brings")
                self.step = min(self._timers)       # the time the master takes to notice
                continue
            if self.step >= self.max_steps:
                raise SimulationError(f"seed {self.seed}: no end after {self.step} steps "
                                      f"(livelock?); still running: {[c.name for c in live]}")
            last = self._last
            if self.lockstep:
                c = live[self.step % len(live)]
            elif last is not None and last in live and rng.random() < self.stickiness:
                c = last
            else:
                c = live[rng.randrange(len(live))]
            self._last = c
            self._move(c)
            self.step += 1

    # hooks for a subclass that keeps a clock (fusee.emulator.testkit.lease_simulation): the
    # base has none
    def _before_step(self) -> None:
        """What happens at each step besides a client's move."""

    def _movable(self, c: SimClient) -> bool:
        return c.runnable and not c.waiting and not c.late

    def _time_passes(self) -> bool:
        """No client can move, but something waits for time to pass: step on."""
        return False

    def _move(self, c: SimClient) -> None:
        """One scheduling step of client ``c``: invoke its next op, or execute one verb."""
        if c.gen is None:
            call = next(c.calls, None)
            if call is None:
                c.done = True
                return
            c.op = (self.history.invoke(c.name, call.kind, call.key, call.value)
                    if c.ended is None else Op(-1, c.name, call.kind, None, None, self.step))
            c.ops.append(c.op)
            if self._maybe_crash(c):
                return
            try:
                c.gen = call.start()
            except self.expected_errors as e:      # argument checks before any verb
                self.history.fail(c.op, e)
                c.op = None
                return
            self._resume(c, c.gen.send, None)
            return
        if c.pending:
            nodes = list(c.pending)
            node = nodes[self.rng.randrange(len(nodes))] if len(nodes) > 1 else nodes[0]
            self._verb(c, node)
            if self._maybe_crash(c) or c.pending:
                return
        if c.batch:                                # done (here, or by a pause)
            if not c.acked and self.late_replies and self._overdue(c):
                c.late = True                      # until its MNs answer, or a pause
                return
            if not c.acked:
                self._lost_completions(c)
            results = c.results
            try:
                raise_for_failures(results)
            except TransportError as e:
                self._resume(c, c.gen.throw, e)
                return
        else:
            results = []                           # the op yielded an empty batch: a pause
        self._resume(c, c.gen.send, results)

    def _overdue(self, c: SimClient) -> bool:
        """Whether ``c``'s batch awaits a late reply: it touched a slow MN and no crashed
        one (whose replies never come: the batch fails as it is)."""
        nodes = {getattr(req, "node", None) for req in c.batch}
        return bool(nodes & self.slow) and not nodes & self.memory.crashed

    def _lost_completions(self, c: SimClient) -> None:
        """The completions of ``c``'s batch that a dead MN never delivered: timeouts."""
        for i, req in enumerate(c.batch):
            node = getattr(req, "node", None)
            if node in self.memory.crashed or node in self.slow:
                c.results[i] = NodeTimeout(f"MN {req.node} did not answer", req.node)

    def _verb(self, c: SimClient, node: int) -> None:
        """Execute the next verb of ``c``'s batch for ``node``."""
        queue = c.pending[node]
        i = queue.pop(0)
        if not queue:
            del c.pending[node]
        if node in c.failed:                   # flushed behind an earlier failure
            c.results[i] = c.failed[node]
        else:
            req = c.batch[i]
            if type(req) is Faa and node not in self.memory.crashed and \
                    self.free_bits.is_free(req):
                region = self.memory.regions[node]
                word = int.from_bytes(region.read(req.addr, 8, region.rkey), "little")
                self.free_bits.check(req, word, f"seed {self.seed}, step {self.step}: "
                                                f"{c.name} in {c.op}")
            c.results[i] = result = self._execute(req)
            if isinstance(result, TransportError):
                c.failed[node] = result
            assert c.op is not None, "a verb executes for an operation in flight"
            self.trace.append(VerbDone(self.step, c.name, c.op, self.membership, c.batch[i],
                                       result, node in self.slow))
        c.op.verbs += 1

    def _resume(self, c: SimClient, how, arg) -> None:
        """Feed the generator; take its next batch, or record its result."""
        if c.ended is not None:
            self._resume_actor(c, how, arg)
            return
        op = c.op
        assert op is not None, "a client resumed with no operation"
        try:
            batch = how(arg)
        except StopIteration as stop:
            self.history.ok(op, stop.value)
        except self.expected_errors as e:
            self.history.fail(op, e)
        except Exception as e:
            raise SimulationError(f"seed {self.seed}, step {self.step}: {op} raised "
                                  f"{type(e).__name__}: {e}") from e
        else:
            self._post(c, batch)
            return
        c.gen = c.op = None

    def _resume_actor(self, c: SimClient, how, arg) -> None:
        """``_resume`` for a background actor: its end, or a failed verb, goes to ``ended``."""
        try:
            batch = how(arg)
        except StopIteration as stop:
            outcome = stop.value
        except TransportError as e:
            outcome = e
        else:
            self._post(c, batch)
            return
        c.gen = c.op = None
        assert c.ended is not None, "a background actor has its ended callback"
        c.ended(outcome)

    def _post(self, c: SimClient, batch) -> None:
        batch = list(batch)
        if c.epoch < self.membership.epoch and batch:
            c.epoch = self.membership.epoch     # not posted: the epoch changed under it
            self._resume(c, c.gen.throw, EpochChanged(self.membership))
            return
        if batch and type(batch[0]) is Backoff:     # a step of time passes: no verb
            c.batch, c.results, c.failed, c.pending = batch, [None], {}, {}
            return
        if batch and type(batch[0]) is AwaitMembership:
            if len(batch) != 1:
                raise SimulationError(f"seed {self.seed}, step {self.step}: {c.op} posted "
                                      f"AwaitMembership with other requests")
            c.batch, c.results, c.failed, c.pending = [], [], {}, {}
            c.waiting = True                    # until fail_over (checked above otherwise)
            return
        try:
            for req in batch:
                validate(req)
                if req.node not in self.memory.regions:
                    raise ValueError(f"no memory node {req.node!r} in this cluster")
        except (TypeError, ValueError) as e:
            raise SimulationError(f"seed {self.seed}, step {self.step}: {c.op} posted a bad "
                                  f"request: {e}") from e
        if batch and self._maybe_interrupt(c, "post", c.op.round_trips):
            return
        c.batch, c.results, c.failed = batch, [None] * len(batch), {}
        c.acked = False
        c.pending = {}
        for i, req in enumerate(batch):
            c.pending.setdefault(req.node, []).append(i)
        if batch:
            c.op.round_trips += 1
            _count(c.stats, batch)

    def _execute(self, req):
        """Execute one request on the shared memory; a failure becomes its completion."""
        mem = self.memory
        node = req.node
        if node in mem.crashed:
            return NodeTimeout(f"MN {node} did not answer", node)
        try:
            t = type(req)
            if t is AllocBlock or t is FreeBlock:
                return mem.tables[node].serve(req)
            region = mem.regions[node]
            return region.execute(req, region.rkey)
        except TransportError as e:
            return e

    # hooks for the faults placed at points of an operation (fusee.emulator.testkit.faults):
    # the scheduler alone places none
    def _maybe_interrupt(self, c: SimClient, where: str, n: int) -> bool:
        """Whether an exception placed here (``where``: "verb" or "post", at ``n``) ended
        ``c``'s operation."""
        return False

    def _maybe_crash(self, c: SimClient) -> bool:
        """Whether ``c`` crashed here (or an exception placed here ended its operation)."""
        return False

    @property
    def stats(self) -> TransportStats:
        """Counters summed over every client."""
        total = TransportStats()
        for c in self.clients.values():
            for k, v in c.stats.as_dict().items():
                setattr(total, k, getattr(total, k) + v)
        return total


def _count(s: TransportStats, batch: list) -> None:
    """The counters a real transport keeps for one round trip (fusee.transports.base)."""
    s.round_trips += 1
    s.verbs += len(batch)
    for req in batch:
        s.count(req)
