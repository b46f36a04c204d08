"""Deterministic simulation: many clients' sans-IO operations interleaved verb by verb, with
faults and the master's actions placed among them.

The FoundationDB / TigerBeetle way of testing a concurrent system, in layers, each a module:
- ``scheduler.py``: the clients, their operations and the seeded scheduler that interleaves
  their verbs (and the network: a crashed MN never answers, a slow one too late);
- ``faults.py``: the faults a test places (a client crash or an exception thrown into an
  operation at a given verb, an MN crash or stall, an MN crash inside a rebuild's pause);
- this module: the master's stop-the-world actions (a failover, a rebuild's pause) and the
  rebuild's online copy as a background actor, i.e. the ``Simulator`` the tests run;
- ``workloads.py``: the operation mixes the tests run.
Nothing here depends on wall-clock time or on hash randomization, so a seed that fails replays
exactly. Every operation is recorded in a ``History`` (fusee.emulator.testkit.history) for the
linearizability checker.

The master's actions:
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

from collections.abc import Callable

from fusee.emulator.testkit.faults import CrashingTransport, Faults
from fusee.emulator.testkit.scheduler import Call, SimClient, SimulationError
from fusee.emulator.testkit.workloads import class_filling_sizes, kv_workload, store_calls
from fusee.driver import run
from fusee.failover import failover
from fusee.rebuild import Rebuild
from fusee.verbs import EpochChanged, TransportError
from fusee.transports.local import LocalMemory, LocalTransport

__all__ = ["Call", "SimClient", "SimulationError", "Simulator", "class_filling_sizes",
           "kv_workload", "store_calls"]


class Simulator(Faults):
    """Runs clients over ``memory`` under the scheduler seeded with ``seed``
    (``Scheduler``), with the faults placed in it (``Faults``) and the master's actions."""

    def __init__(self, memory: LocalMemory, seed: int, **options) -> None:
        super().__init__(memory, seed, **options)
        self.failovers: list = []                       # what each failover returned
        self.rebuilds: list = []        # (Rebuild, what ended it: a Membership or an error)
        #: the MN a rebuild copies to while one runs, as the master's grants would say (a
        #: client's ``Allocator.news`` may read it)
        self.rebuilding: int | None = None

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
        self.rebuilding = node
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
                transport = CrashingTransport(self, node, after)
                self._pause_crash = None
            try:
                outcome = run(job.finish(), transport)
            except TransportError as e:
                outcome = e
        self.rebuilds.append((job, outcome))
        self.rebuilding = None
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
