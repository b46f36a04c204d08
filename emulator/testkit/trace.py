"""What a simulated run did, verb by verb: the evidence a seed-pinned regression checks.

A regression test pinned to a simulator seed reproduces its bug for one schedule only. A new
verb on a write path, a batch split in two, a mark: every schedule shifts, and the seed
passes while no longer reaching the interleaving it guards. So each such test states its
*window* (``Window``): a predicate over the run's trace, e.g. "a live client's insert
committed its claim in an epoch whose end took its primary, rebuilt before the insert
ended". ``Window.require`` fails the test with "seed N no longer reaches its window: find
another" where the run no longer gets there, instead of a silent pass, and ``find_seeds``
re-finds seeds that do.

The simulator appends an event to ``Simulator.trace`` for every verb it executes
(``VerbDone``: on which membership, whether its MN was slow) and every client crash
(``ClientCrashed``); ``Trace`` reads the index and log semantics off them (a CAS on a slot,
on the slot's primary or a backup, took effect or not; a commit record's state), so that a
window says what happened in the store's terms, not in step numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from fusee.index import IndexGeometry, replica_nodes
from fusee.layout import REF_MASK, SLOTS_PER_BUCKET, TENTATIVE
from fusee.membership import Membership
from fusee.verbs import Cas, Request, Write

if TYPE_CHECKING:
    from fusee.emulator.testkit.history import Op
    from fusee.emulator.testkit.simulator import Simulator

BUCKET_BYTES = 64
COMMIT_RECORD_BYTES = 24        # fusee.layout.commit_record: what one record WRITE carries
COMMITTED = 1                   # a record's state (fusee.layout: 0 pending, 1 committed...)


class VerbDone(NamedTuple):
    """A verb executed by the simulator (its effect is in memory, whatever its client saw)."""
    step: int
    client: str
    op: Op
    membership: Membership      # the membership of the moment it executed
    req: Request
    result: object              # its completion as the MN produced it (an exception: failed)
    late: bool                  # its MN was slow: the reply came too late to its client


class ClientCrashed(NamedTuple):
    step: int
    client: str
    op: Op | None               # the operation it was in, if any
    membership: Membership


Event = VerbDone | ClientCrashed


class SlotCas(NamedTuple):
    """A CAS on an index slot, in the store's terms."""
    step: int
    epoch: int
    node: int
    slot: tuple[int, int]       # (subtable, position)
    replicas: tuple[int, ...]   # the subtable's live replicas in that epoch, primary first
    took: bool                  # it swapped
    late: bool                  # its reply came too late (a slow MN)
    expected: int
    desired: int

    @property
    def primary(self) -> bool:
        """On the subtable's primary (its first live replica) of that epoch."""
        return self.node == self.replicas[0]

    @property
    def tentative(self) -> bool:
        """An r = 1 insert's claim turned into its committed value."""
        return bool(self.expected & TENTATIVE) and not self.desired & TENTATIVE


class OpTrace(NamedTuple):
    """One operation's verbs (in execution order) and how it ended."""
    client: str
    op: Op
    verbs: tuple[VerbDone, ...]
    cases: tuple[SlotCas, ...]
    commits: tuple[int, ...]    # the epochs in which it wrote a COMMITTED record, each once
    crashed: bool               # its client died in it (not an interrupt: a crash)

    @property
    def epochs(self) -> tuple[int, ...]:
        """The epochs its verbs executed in, in order, each once."""
        return tuple(dict.fromkeys(v.membership.epoch for v in self.verbs))


class Trace:
    """A finished run's events, read with the cluster's layout."""

    def __init__(self, sim: Simulator):
        cfg = sim.memory.config
        self.sim = sim
        self.n, self.r = len(cfg.memnodes), cfg.replication
        self.geo = IndexGeometry.of(cfg.layout)
        self.final = sim.membership

    def slot(self, req: Request) -> tuple[int, int] | None:
        """The index slot (subtable, position) a verb addresses, if it addresses one."""
        geo = self.geo
        off = req.addr - geo.subtables
        if not 0 <= off < geo.max_subtables * geo.subtable_bytes:
            return None
        sid, within = divmod(off, geo.subtable_bytes)
        bucket, byte = divmod(within, BUCKET_BYTES)
        if byte < 8:
            return None                 # a bucket header
        return sid, bucket * SLOTS_PER_BUCKET + (byte - 8) // 8

    def live_replicas(self, sid: int, m: Membership) -> tuple[int, ...]:
        return m.live(replica_nodes(sid, self.n, self.r))

    def slot_cas(self, v: VerbDone) -> SlotCas | None:
        req = v.req
        if type(req) is not Cas:
            return None
        where = self.slot(req)
        if where is None:
            return None
        took = v.result == req.expected
        return SlotCas(v.step, v.membership.epoch, req.node, where,
                       self.live_replicas(where[0], v.membership), took, v.late,
                       req.expected, req.desired)

    def ops(self) -> Iterator[OpTrace]:
        """Every client operation that executed a verb (background actors' excluded)."""
        verbs: dict[int, list[VerbDone]] = {}
        ops: dict[int, Op] = {}
        crashed: set[int] = set()
        for e in self.sim.trace:
            if isinstance(e, ClientCrashed):
                if e.op is not None:
                    crashed.add(id(e.op))
            elif e.op.id >= 0:
                verbs.setdefault(id(e.op), []).append(e)
                ops[id(e.op)] = e.op
        for key, vs in verbs.items():
            cases = tuple(c for c in map(self.slot_cas, vs) if c is not None)
            commits = tuple(dict.fromkeys(v.membership.epoch for v in vs
                                          if (commit_record(v.req) or (None,))[0] == COMMITTED))
            yield OpTrace(vs[0].client, ops[key], tuple(vs), cases, commits, key in crashed)

    def rebuilds(self, node: int) -> list[int]:
        """The epochs that rebuilds of MN ``node`` published, in order."""
        return [end.epoch for job, end in self.sim.rebuilds
                if job.node == node and isinstance(end, Membership)]

    def rebuilt_between(self, node: int, after: int, until: int) -> bool:
        """Was MN ``node`` rebuilt by an epoch in (``after``, ``until``]?"""
        return any(after < e <= until for e in self.rebuilds(node))


def commit_record(req: Request) -> tuple[int, tuple[int, int] | None] | None:
    """(state, the slot it names or None) of the commit record a WRITE carries, if any."""
    if type(req) is not Write or len(req.data) != COMMIT_RECORD_BYTES:
        return None
    word = int.from_bytes(req.data[:8], "little")
    ref = word & REF_MASK
    return word >> 56, None if ref == REF_MASK else (ref >> 32, ref & 0xFFFFFFFF)


@dataclass(frozen=True)
class Window:
    """What a regression's run must do to reach the interleaving its bug needed: ``reached``
    returns a short description of the witness (an operation, an epoch), or None."""
    what: str
    reached: Callable[[Trace], str | None]

    def witness(self, sim: Simulator) -> str | None:
        return self.reached(Trace(sim))

    def require(self, sim: Simulator, find: str) -> str:
        """The witness; the test fails loudly where the schedule no longer gets there
        (``find``: the command that finds other seeds)."""
        found = self.witness(sim)
        assert found is not None, (f"seed {sim.seed} no longer reaches its window: find "
                                   f"another ({find}); the window: {self.what}")
        return found


def window(what: str) -> Callable[[Callable[[Trace], Iterable[str]]], Window]:
    """Decorator: the window ``what`` whose witnesses a function of a trace generates (the
    first found is the witness)."""
    def make(witnesses: Callable[[Trace], Iterable[str]]) -> Window:
        return Window(what, lambda t: next(iter(witnesses(t)), None))
    return make
