"""A crashed writer's committed round that a failover closed without seeing it, recovered:
the scripted window of seed 40 of ``test_recovery_mn_crash`` (3 MNs r = 2).

A's UPDATE or DELETE wins its round on the key's one backup and commits; A crashes before
its primary CAS. The backup dies: its failover, the primary alive, sees no open round (the
proposal died with the backup) and records nothing, so the primary keeps the old value. In
the next epoch the subtable has no backup and B replaces the old value itself: B owes its
free (deferred to B's next batch). A's recovery finds A's entry COMMITTED, the old object's
free not delivered and the slot moved on, which it took for A's CAS having taken effect: it
delivered the free, B delivered it again, and the FAA carried into the next object's bit (a
live object read as free). Now it asks the slot's writers who replaced the old value
(``fusee.slot_history.moved_on_by_us``): B did, so A's operation never took effect and
nothing is freed.

The other side of the same walk: A's CAS did take effect before the backup died and later
writers replaced A's value; then the free of the old value is A's to deliver (held instead,
it would leak)."""

from __future__ import annotations

import pytest

from test_failover import _config
from test_insert_epoch_end import _rebuilt

from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.audit import audit
from fusee.driver import run
from fusee.failover import failover
from fusee.hashing import key_hash
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.recovery import UNPROVEN, recover_client
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import Cas, Read

KEY = b"k0"
WRITES = {"update": lambda a: a.update(KEY, b"A's"), "delete": lambda a: a.delete(KEY)}


class Cluster:
    """3 MNs, r = 2 (or ``r``); B has inserted KEY (``old``: its slot value); A is open."""

    def __init__(self, r: int = 2) -> None:
        self.cfg = cfg = _config(3, r)
        self.mem = LocalMemory(cfg)
        self.t = LocalTransport(cfg, memory=self.mem)
        self.a, self.b = ClientCore(cfg, 0), ClientCore(cfg, 1)
        for core in (self.a, self.b):
            run(core.open(), self.t)
        run(self.b.insert(KEY, b"B's first"), self.t)
        self.old = self._value(self.b)
        self.nodes = self.a.dir.nodes(self.a.dir.lookup(key_hash(KEY))[0])
        self.primary, self.backup = self.nodes[:2]

    def _value(self, core: ClientCore) -> int:
        entry = core.cache.get(KEY)
        assert entry is not None
        return entry.value

    def backup_dies(self) -> Membership:
        """The backup crashes and is failed over; B adopts the new membership."""
        self.mem.crash(self.backup)
        m = run(failover(self.cfg, Membership(), self.backup), self.t)
        self.b.place(m)
        return m

    def freed(self, value: int) -> bool:
        free = self.b.alloc.free_request(value)
        (word,) = self.t.execute([Read(free.node, free.addr, 8)])
        return bool(int.from_bytes(word, "little") & free.delta)

    def finish(self, m: Membership, expect: bytes | None, live: list[ClientCore],
               leaked: int = 0) -> None:
        """The live clients close (their frees go out), a reader checks KEY, the audit
        passes with ``leaked`` leaks (none, unless the test says which)."""
        for core in live:
            run(core.close(), self.t)
        reader = ClientCore(self.cfg, 7, membership=m)
        run(reader.open(), self.t)
        assert run(reader.search(KEY), self.t) == expect
        report = run(audit(self.cfg, [*live, reader], m, excuse=lost_frees(self.mem, m)), self.t)
        leaks, report.leaked = report.leaked, []
        assert len(leaks) == leaked and report.ok and not report.stranded, report.explain()


@pytest.mark.parametrize("kind", WRITES)
def test_a_round_the_failover_closed_unseen_frees_nothing_the_replacer_owes(kind):
    c = Cluster()
    op = WRITES[kind](c.a)
    batch = next(op)
    while not any(isinstance(r, Cas) and r.node == c.primary for r in batch):
        batch = op.send(c.t.execute(batch))     # won on the backup, committed
    op.close()                                  # A crashes: its primary CAS never posted
    m = c.backup_dies()
    assert not m.settled[m.epoch] and not m.dropped     # the round died unseen
    run(c.b.update(KEY, b"B's second"), c.t)    # over ``old``, no backup: B owes its free
    assert not c.freed(c.old)                   # (with B's next batch)
    report = run(recover_client(c.cfg, 0, membership=m), c.t)
    assert report.frees_delivered == 0 and not c.freed(c.old), report.outcomes
    assert report.outcomes.get(UNPROVEN, 0) == 0, report.outcomes
    c.finish(m, b"B's second", [c.b])           # B's free of ``old``: delivered once


@pytest.mark.parametrize("replacers", [1, 2])
def test_a_round_that_took_effect_before_the_failover_delivers_its_free(replacers):
    """A's UPDATE takes effect (primary CAS) and A crashes before its free of ``old`` goes
    out; the backup dies, and B (then A's replacer's replacer) updates the key. The walk
    reaches A's value: the free of ``old`` is A's, delivered by the recovery."""
    c = Cluster()
    run(c.a.update(KEY, b"A's"), c.t)           # the free rides A's next batch: none comes
    assert not c.freed(c.old)
    m = c.backup_dies()
    for i in range(replacers):
        run(c.b.update(KEY, b"B's %d" % i), c.t)
    report = run(recover_client(c.cfg, 0, membership=m), c.t)
    assert report.frees_delivered == 1 and c.freed(c.old), report.outcomes
    assert report.outcomes.get(UNPROVEN, 0) == 0, report.outcomes
    c.finish(m, b"B's %d" % (replacers - 1), [c.b])


def test_two_live_replicas_in_every_epoch_prove_the_cas():
    """3 MNs r = 3: one backup of KEY's subtable dies and is rebuilt, then the other dies.
    No replica but the primary was alive in every epoch (``Membership.always_live``), yet
    every epoch left the subtable two live ones (``Membership.backed``): every round had a
    backup and every failover saw it. A's update takes effect and A crashes before its free
    of ``old``; B deletes the key (its tombstone names no object: no walk back passes it).
    The slot moved off ``old`` by A's CAS: the free is A's, and A's update took effect
    (UNPROVEN on cfccaa5; held, ``old`` leaked, with the walk alone)."""
    c = Cluster(r=3)
    _, first, second = c.nodes
    c.mem.crash(first)
    m = run(failover(c.cfg, Membership(), first), c.t)
    c.t, m = _rebuilt(c.cfg, c.mem, m, first)
    c.mem.crash(second)
    m = run(failover(c.cfg, m, second), c.t)
    assert len(m.always_live(range(3))) == 1 and m.backed(range(3))
    for core in (c.a, c.b):
        core.place(m)
    run(c.a.update(KEY, b"A's"), c.t)           # A crashes before its free of ``old``
    run(c.b.delete(KEY), c.t)                   # B owes the free of A's object
    report = run(recover_client(c.cfg, 0, membership=m), c.t)
    assert report.frees_delivered == 1 and c.freed(c.old), report.outcomes
    assert report.outcomes == {"had taken effect": 1}, report.outcomes
    c.finish(m, None, [c.b])
