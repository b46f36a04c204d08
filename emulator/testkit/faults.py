"""The faults a test places in a simulation (``fusee.emulator.testkit.simulator``), all
deterministically:
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
- ``crash_in_pause(node, after)``: MN ``node`` crashes in the next rebuild's pause (a
  rebuild is ``fusee.emulator.testkit.simulator``'s), once
  ``after`` of the pause's verbs have executed (``CrashingTransport``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from fusee.emulator.testkit.scheduler import Scheduler, SimClient, SimulationError
from fusee.emulator.testkit.trace import ClientCrashed
from fusee.verbs import Request, TransportError
from fusee.transports.base import raise_for_failures
from fusee.transports.local import LocalMemory, LocalTransport


class Faults(Scheduler):
    """The scheduler with the faults placed in it: see the module docstring."""

    def __init__(self, memory: LocalMemory, seed: int, **options) -> None:
        super().__init__(memory, seed, **options)
        self.fault_rng = random.Random(f"faults {seed}")
        self.faults: list[tuple[int, str]] = []       # (step, what) for every fault that fired
        self._crash_points: dict[tuple[str, int, int], Callable | None] = {}
        self._interrupts: dict[tuple[str, int, str, int | None], BaseException] = {}
        self._pause_crash: tuple[int, int] | None = None    # (MN, after how many verbs)

    def crash_client_at(self, name: str, op: int, verb: int,
                        then: Callable[[Faults], None] | None = None) -> None:
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


class CrashingTransport(LocalTransport):
    """The memory as a rebuild's pause sees it, where MN ``node`` crashes once ``after`` verbs
    have executed: the verbs of a batch before that point take effect, the rest meet a dead
    MN (its own fail; the others' are executed, as a real MN's would be)."""

    def __init__(self, sim: Faults, node: int, after: int):
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
