"""Deterministic simulation: many clients' sans-IO operations interleaved verb by verb.

The FoundationDB / TigerBeetle way of testing a concurrent system: every client is a sequence of
operation generators (fusee.driver's protocol: yield a batch of requests, receive the list of
completions, return a result), all clients share one in-process ``LocalMemory``, and a scheduler
seeded with ``random.Random(seed)`` decides everything: which client moves next, and which of the
verbs of its current batch executes next. A batch's verbs execute one at a time, interleaved
with other clients' verbs; verbs for different memory nodes in any order, verbs for one node in
posting order, as on an RC queue pair (and every transport here): that is the worst a network
may do to a batch. A verb that fails flushes the later verbs for its node in that batch. When
the last verb of a batch is done, the completions go back into the generator: one round trip
for that client. Nothing here depends on wall-clock time or on hash randomization, so a seed
that fails replays exactly.

Every operation is recorded in a ``History`` (fusee.emulator.testkit.history) for the
linearizability checker.

Faults, all placed deterministically:
- ``crash_client_at(name, op, verb)``: the client dies after executing ``verb`` verbs of its
  ``op``-th operation (0 = just invoked, nothing sent; the op's total = all sent, the result
  not yet seen). It is never driven again; its in-flight operation is recorded as crashed
  (unknown outcome); ``then(sim)`` may start a recovery actor. A run with the same seed is
  identical up to the crash, so a sweep runs the seed once clean, reads ``ops[i].verbs`` of
  each client, and reruns it once per (op, verb) boundary.
- ``interrupt_client_at(name, op, error, verb=k)``: ``error`` (KeyboardInterrupt, say, or
  GeneratorExit: its driver drops it) is thrown into the client's ``op``-th operation as a
  Ctrl-C between two round trips would: once it has executed ``k`` verbs of it (the rest of
  the batch never runs, the completions of what ran are never seen), or, with
  ``posting=n`` instead, as it posts its batch number ``n`` (0: its first; nothing of it
  runs). The operation must end by that very exception (its outcome is unknown); the client
  lives on and goes on with its next call (its close, say).
- ``crash_client(name)`` / ``crash_node(node)`` now, or ``at_step(step, fn)`` for anything at a
  given step; draw random fault points from ``fault_rng`` (seeded from the seed, but separate,
  so placing faults does not change the schedule). A crashed memory node fails every verb
  still to come AND every verb of a batch in flight that it had already executed (the client
  never saw those completions).
- ``slow_node(node)`` / ``resume_node(node)``: MN ``node`` stays alive and executes every
  verb, but the replies it sends meanwhile come too late (a stalled MN process, a lost
  reply). No failover comes for it: it is alive. A client whose batch is done but for late
  replies waits for them as ``fusee.client``'s guard does (``late_replies``, the default):
  once every MN of the batch answers in time again, the operation gets its completions as
  from a slow round trip; a pause (a failover, a rebuild's end) comes first, and the batch
  fails with NodeTimeout for its requests there, although they took effect. With
  ``late_replies=False`` every such batch fails at once (a backend that cannot await a late
  reply: the worst case for what an operation sends again).
- ``rebuild(node)``: MN ``node`` (crashed, failed over) restarts empty and the master's
  rebuild (``fusee.rebuild``) makes it a replica again: its online copy runs as a
  background actor, scheduled verb by verb among the clients (and failing as they do when
  an MN dies); once it is done, the pause and the rest run stop-the-world like a failover.
- ``fail_over(node)``: the master's failover after MN ``node`` crashed (``fusee.failover``),
  stop-the-world as the master's pause makes it: every batch in flight completes first, the
  failover runs, and each client's next batch gets the new membership thrown in
  (EpochChanged). A client whose operation asks for the next epoch (``AwaitMembership``) waits
  until then; if every client waits and no fault is scheduled, the run fast-forwards to the
  next timer (the master's detection delay), and fails if there is none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Iterator, Sequence

from fusee.emulator.testkit.history import History, Op
from fusee.emulator.testkit.trace import ClientCrashed, Event, VerbDone
from fusee.config import LayoutConfig
from fusee.driver import Operation, run
from fusee.failover import failover
from fusee.layout import CLASSES, object_bytes
from fusee.membership import Membership
from fusee.rebuild import Rebuild
from fusee.verbs import (AllocBlock, AwaitMembership, Backoff, EpochChanged, FreeBlock,
                         NodeTimeout, Request, TransportError, validate)
from fusee.transports.base import TransportStats, raise_for_failures
from fusee.transports.local import LocalMemory, LocalTransport


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


class Simulator:
    """Runs clients over ``memory`` under the scheduler seeded with ``seed``.

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
        self.fault_rng = random.Random(f"faults {seed}")
        self.expected_errors = expected_errors
        self.max_steps = max_steps
        self.stickiness = self.rng.random() * 0.9 if stickiness is None else stickiness
        self.lockstep = lockstep
        self.history = History()
        self.trace: list[Event] = []    # every verb and client crash, for windows (trace.py)
        self.clients: dict[str, SimClient] = {}
        self.step = 0
        self.faults: list[tuple[int, str]] = []       # (step, what) for every fault that fired
        self._timers: dict[int, list[Callable[[Simulator], None]]] = {}
        self._crash_points: dict[tuple[str, int, int], Callable | None] = {}
        self._interrupts: dict[tuple[str, int, str, int | None], BaseException] = {}
        self._last: SimClient | None = None
        self.membership = Membership()
        self.failovers: list = []                       # what each failover returned
        self.slow: set[int] = set()                     # MNs whose replies come too late
        self.late_replies = late_replies
        self.rebuilds: list = []        # (Rebuild, what ended it: a Membership or an error)
        self._pause_crash: tuple[int, int] | None = None    # (MN, after how many verbs)

    # -- setup -----------------------------------------------------------------------------
    def add_client(self, name: str, calls: Iterable[Call]) -> SimClient:
        """Add a client (also allowed while running, e.g. a recovery actor after a crash)."""
        if name in self.clients:
            raise ValueError(f"client {name!r} already exists")
        c = self.clients[name] = SimClient(name, iter(calls))
        c.epoch = self.membership.epoch     # its operations start in the current epoch
        return c

    def at_step(self, step: int, fn: Callable[[Simulator], None]) -> None:
        """Call ``fn(sim)`` just before step ``step`` (if the run gets that far)."""
        self._timers.setdefault(step, []).append(fn)

    def cancel_timers(self) -> None:
        """Forget every ``at_step`` not fired yet (a run that ended before them)."""
        self._timers.clear()

    def crash_client_at(self, name: str, op: int, verb: int,
                        then: Callable[[Simulator], None] | None = None) -> None:
        """Crash ``name`` once it has executed ``verb`` verbs of its ``op``-th operation."""
        self._crash_points[(name, op, verb)] = then

    def interrupt_client_at(self, name: str, op: int, error: BaseException, *,
                            verb: int | None = None, posting: int | None = None) -> None:
        """Throw ``error`` into ``name``'s ``op``-th operation after its ``verb``-th verb, or
        as it posts its round trip number ``posting``: see the module docstring."""
        assert (verb is None) != (posting is None), "either verb or posting"
        where = ("verb", verb) if posting is None else ("post", posting)
        self._interrupts[(name, op, *where)] = error

    def crash_client(self, name: str) -> None:
        c = self.clients[name]
        if not c.runnable:
            return
        c.crashed = True
        self.trace.append(ClientCrashed(self.step, name, c.op, self.membership))
        if c.op is not None:
            self.history.crash(c.op)
            if c.gen is not None:
                c.gen.close()
        self.faults.append((self.step, f"client {name} crashed during {c.op}"))

    def crash_node(self, node: int) -> None:
        self.memory.crash(node)
        self.faults.append((self.step, f"MN {node} crashed"))

    def slow_node(self, node: int) -> None:
        self.slow.add(node)
        self.faults.append((self.step, f"MN {node} slow: its replies come too late"))

    def resume_node(self, node: int) -> None:
        self.slow.discard(node)
        self.faults.append((self.step, f"MN {node} answers in time again"))
        for c in self.clients.values():
            if c.late and not self._overdue(c):
                c.late = False                  # its late replies are in: it moves on

    def crash_in_pause(self, node: int, after: int) -> None:
        """MN ``node`` crashes in the next rebuild's pause after ``after`` of its verbs."""
        assert after >= 0
        self._pause_crash = (node, after)

    def fail_over(self, nodes) -> None:
        """The master's failover for crashed MNs ``nodes`` (an id or a collection), with
        every client paused."""
        self._pause()
        self._publish_failover(nodes)

    def _pause(self) -> None:
        """Every client pauses, as the master makes them before a failover or a rebuild:
        each batch in flight completes, and the client has its completions (it acks that
        none is in flight), so an MN that crashes later cannot turn one into a timeout: a
        client told that a verb it had done failed would do it again (a free: twice)."""
        for c in self.clients.values():
            while c.runnable and c.pending:
                self._verb(c, next(iter(c.pending)))
            if c.runnable and c.batch:
                self._lost_completions(c)
                c.acked = True
            c.late = False                      # it gives up on its late replies

    def _publish_failover(self, nodes) -> None:
        """Run the failover of ``nodes`` now and hand its membership to the waiting clients."""
        before = self.membership
        self.membership = run(failover(self.memory.config, before, nodes),
                              LocalTransport(self.memory.config, memory=self.memory))
        self.failovers.append(self.membership)
        m = self.membership
        self.faults.append((self.step, f"failover of MN {nodes}: epoch {m.epoch}, "
                                       f"{len(m.settled[m.epoch])} slots settled"))
        self._wake_waiting()

    def _wake_waiting(self) -> None:
        """The clients waiting for the next membership get it."""
        for c in self.clients.values():
            if c.waiting and c.runnable:
                c.waiting = False
                c.epoch = self.membership.epoch
                self._resume(c, c.gen.throw, EpochChanged(self.membership))

    def rebuild(self, node: int, then: Callable[[Simulator], None] | None = None) -> None:
        """MN ``node``, crashed and failed over, comes back empty and the master rebuilds it
        (``fusee.rebuild``): the online copy as a background actor ``rebuild N`` (one more
        each attempt), then, stop-the-world like a failover, the pause and the rest: every
        client paused, its next batch gets the new membership thrown in. ``then(sim)`` once
        the rebuild has ended, published or failed (``rebuilds`` says which)."""
        if node in self.memory.crashed:
            self.memory.restart(node)
        job = Rebuild(self.memory.config, self.membership, node)
        self.faults.append((self.step, f"rebuild of MN {node}: copying online"))
        name = f"rebuild {node} #{sum(1 for x, _ in self.rebuilds if x.node == node)}"
        actor = self.add_client(name, [Call("rebuild", None, None, job.copy_online)])
        actor.ended = lambda outcome: self._finish_rebuild(job, outcome, then)

    def _finish_rebuild(self, job: Rebuild, outcome, then) -> None:
        """The online copy of ``job`` ended with ``outcome``: pause and finish it."""
        if self.membership is not job.membership and not isinstance(outcome, TransportError):
            outcome = EpochChanged(self.membership)     # the master would have abandoned it
        if not isinstance(outcome, TransportError):
            self._pause()
            transport = LocalTransport(self.memory.config, memory=self.memory)
            if self._pause_crash is not None:
                node, after = self._pause_crash
                transport = _CrashingTransport(self, node, after)
                self._pause_crash = None
            try:
                outcome = run(job.finish(), transport)
            except TransportError as e:
                outcome = e
        self.rebuilds.append((job, outcome))
        if isinstance(outcome, TransportError):
            self.faults.append((self.step, f"rebuild of MN {job.node} failed: {outcome!r}"))
            closed = job.closed()
            if closed is not None:      # the pause closed rounds: never resume the old epoch
                self.membership = closed
                self.faults.append((self.step, f"rebuild's pause failed after closing rounds: "
                                               f"epoch {closed.epoch}, "
                                               f"{len(closed.settled[closed.epoch])} slots "
                                               "settled"))
                self._wake_waiting()
        else:
            self.membership = outcome
            self.faults.append((self.step, f"rebuild of MN {job.node}: epoch {outcome.epoch}"))
            self._wake_waiting()
        if then is not None:
            then(self)

    # -- running ---------------------------------------------------------------------------
    def run(self) -> History:
        """Drive every client until all are done or crashed; returns the history."""
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
            c.results[i] = result = self._execute(c.batch[i])
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

    def _maybe_interrupt(self, c: SimClient, where: str, n: int) -> bool:
        if not self._interrupts or c.gen is None:
            return False
        error = self._interrupts.pop((c.name, len(c.ops) - 1, where, n), None)
        if error is None:
            return False
        op, gen = c.op, c.gen
        assert op is not None, "an interrupt hits an operation in flight"
        c.gen = c.op = None
        c.batch, c.results, c.failed, c.pending = [], [], {}, {}
        self.history.crash(op)
        self.faults.append((self.step, f"{error!r} thrown into {op} of client {c.name}"))
        try:
            if isinstance(error, GeneratorExit):
                gen.close()
            else:
                gen.throw(error)
        except type(error):
            return True
        except BaseException as e:
            raise SimulationError(f"seed {self.seed}, step {self.step}: {op} ended with "
                                  f"{e!r} when {error!r} was thrown in") from e
        if not isinstance(error, GeneratorExit):
            raise SimulationError(f"seed {self.seed}, step {self.step}: {op} went on "
                                  f"after {error!r}")
        return True

    def _maybe_crash(self, c: SimClient) -> bool:
        if self._maybe_interrupt(c, "verb", c.op.verbs):
            return True
        if not self._crash_points:
            return False
        key = (c.name, len(c.ops) - 1, c.op.verbs)
        if key not in self._crash_points:
            return False
        then = self._crash_points.pop(key)
        self.crash_client(c.name)
        if then is not None:
            then(self)
        return True

    @property
    def stats(self) -> TransportStats:
        """Counters summed over every client."""
        total = TransportStats()
        for c in self.clients.values():
            for k, v in c.stats.as_dict().items():
                setattr(total, k, getattr(total, k) + v)
        return total


class _CrashingTransport(LocalTransport):
    """The memory as a rebuild's pause sees it, where MN ``node`` crashes once ``after`` verbs
    have executed: the verbs of a batch before that point take effect, the rest meet a dead
    MN (its own fail; the others' are executed, as a real MN's would be)."""

    def __init__(self, sim: Simulator, node: int, after: int):
        super().__init__(sim.memory.config, memory=sim.memory)
        self.sim, self.node = sim, node
        self.left: int | None = after       # verbs before the crash; None: it happened

    def _execute(self, batch: Sequence[Request]) -> list:
        if self.left is None or self.left >= len(batch):
            if self.left is not None:
                self.left -= len(batch)
            return super()._execute(batch)
        before, after = batch[:self.left], batch[self.left:]
        self.left = None
        self.sim.crash_node(self.node)
        self.sim.faults[-1] = (self.sim.step, f"MN {self.node} crashed in a rebuild's pause")
        done: list = []
        for part in (before, after):
            try:
                done += super()._execute(part) if part else []
            except TransportError as e:
                assert e.results is not None, "a local batch fails with its results"
                done += e.results
        raise_for_failures(done)
        return done


def _count(s: TransportStats, batch: list) -> None:
    """The counters a real transport keeps for one round trip (fusee.transports.base)."""
    s.round_trips += 1
    s.verbs += len(batch)
    for req in batch:
        s.count(req)


# -- workloads -----------------------------------------------------------------------------

def kv_workload(rng: random.Random, client: str, keys: list[bytes], n: int,
                mix: dict[str, float], sizes: Sequence[int] = ()
                ) -> list[tuple[str, bytes, bytes | None]]:
    """``n`` random (kind, key, value) operations over ``keys`` with the given kind weights.
    Every written value is unique (client name + sequence number), which makes the checker's
    job sharper: a read names exactly which write it saw. With ``sizes``, each value is
    padded to a length drawn from them (``class_filling_sizes``)."""
    kinds, weights = zip(*mix.items())
    ops = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        value = None if kind in ("get", "delete") else f"{client}.{i}".encode()
        key = rng.choice(keys)
        if value is not None and sizes:
            value = value.ljust(rng.choice(sizes), b".")
        ops.append((kind, key, value))
    return ops


def class_filling_sizes(layout: LayoutConfig, key_len: int) -> list[int]:
    """Value lengths whose objects (with a key of ``key_len`` bytes) exactly fill each size
    class (``fusee.layout.CLASSES``): the largest included, whose few objects per block make
    a freed object come back at the same address soon, under the same slot value when it is
    for the same key (ABA, ``fusee.reuse``)."""
    return [c * layout.object_unit - object_bytes(key_len, 0) for c in CLASSES
            if c * layout.object_unit >= object_bytes(key_len, 0)]


def store_calls(store, ops: Iterable[tuple[str, bytes, bytes | None]]) -> Iterator[Call]:
    """Calls on anything with the sans-IO store methods search/insert/update/delete/put,
    each returning an operation generator (fusee.operations.ClientCore)."""
    for kind, key, value in ops:
        if kind == "get":
            yield Call(kind, key, None, lambda k=key: store.search(k))
        elif kind == "delete":
            yield Call(kind, key, None, lambda k=key: store.delete(k))
        else:
            yield Call(kind, key, value,
                       lambda m=getattr(store, kind), k=key, v=value: m(k, v))  # noqa: B008 (binds the method now)
