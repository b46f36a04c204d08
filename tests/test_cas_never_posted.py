"""A writer whose primary CAS was refused before it was posted, as its epoch ended
(``fusee.replication.primary_request``).

Found by the sweep of splits + rebuild cycles + a slow MN (seed 18 on 4 MNs r = 2, an
acknowledged insert lost): an insert won its round on the slot's only backup and committed;
the backup died, and the failover published before the insert posted its primary CAS, so
the driver refused that batch with EpochChanged (it never went out). The failover could not
read the dead backup and settled nothing there; in the new epoch another client wrote the
slot. The insert then read a third value on the primary (a witness) and, counting its CAS
as gone out, took WIN (``Membership.fate``: "our CAS took effect, later writers replaced
it"): it acknowledged an insert that no slot named. The same window under an UPDATE freed
the old object a second time (the rival's replacement had freed it) and leaked its own.
A batch refused with EpochChanged was never posted, so its CAS cannot have taken effect.

Each case is deterministic: 3 MNs, r = 2, the operation stepped by hand up to its primary
CAS; the backup dies and is failed over; a rival writes the slot in the new epoch; the
operation is told EpochChanged at its CAS. The store must then read as the rival left it,
the operation's outcome fit that (linearizable), and the audit find no leak or double free.
"""

from __future__ import annotations

import pytest
from test_failover import _config

from fusee.audit import audit
from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.driver import run
from fusee.errors import EpochChanged, KeyExists
from fusee.failover import failover
from fusee.hashing import key_hash
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import Cas

KEY = b"refused"
FIRST, OURS, RIVALS = b"first value", b"our value", b"the rival's value"


def _a_slot_with_a_backup():
    """3 MNs, r = 2, client 0 open: (config, memory, transport, client, KEY's primary and
    backup)."""
    cfg = _config(3, 2)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a = ClientCore(cfg, 0)
    run(a.open(), t)
    primary, backup = a.dir.nodes(a.dir.lookup(key_hash(KEY))[0])
    return cfg, mem, t, a, primary, backup


def _to_primary_cas(op, t, primary: int) -> None:
    """Step ``op`` until its next batch holds its CAS of the slot's primary (not posted)."""
    batch = next(op)
    while not any(isinstance(c, Cas) and c.node == primary for c in batch):
        batch = op.send(t.execute(batch))


def _drive(op, batch, t):
    """Drive ``op`` from its next ``batch`` to its end on ``t``: its result."""
    while True:
        try:
            batch = op.send(t.execute(batch))
        except StopIteration as stop:
            return stop.value


def _backup_dies(cfg, mem: LocalMemory, t, backup: int) -> Membership:
    mem.crash(backup)
    return run(failover(cfg, Membership(), backup), t)


def _check(cfg, mem, m: Membership, cores, expected: bytes | None) -> None:
    """The store reads ``expected`` for KEY (None: absent), and the audit passes once
    ``cores`` closed (a free is deferred to a client's next batch)."""
    t = LocalTransport(cfg, memory=mem)
    for core in cores:
        run(core.close(), t)
    reader = ClientCore(cfg, 7, membership=m)
    run(reader.open(), t)
    assert run(reader.search(KEY), t) == expected
    report = run(audit(cfg, [*cores, reader], m, excuse=lost_frees(mem, m)), t)
    assert report.ok, report.explain()


def test_an_insert_whose_primary_cas_was_never_posted_did_not_take_effect():
    """The rival inserts KEY in the new epoch: the insert must end in KeyExists (it used to
    return None: two acknowledged inserts of one key, the first named by no slot)."""
    cfg, mem, t, a, primary, backup = _a_slot_with_a_backup()
    op = a.insert(KEY, OURS)
    _to_primary_cas(op, t, primary)
    m1 = _backup_dies(cfg, mem, t, backup)
    rival = ClientCore(cfg, 3, membership=m1)
    run(rival.open(), t)
    run(rival.insert(KEY, RIVALS), t)
    with pytest.raises(KeyExists):
        _drive(op, op.throw(EpochChanged(m1)), t)
    _check(cfg, mem, m1, [a, rival], RIVALS)


@pytest.mark.parametrize("rival_deletes", [False, True])
def test_an_update_whose_primary_cas_was_never_posted_did_not_take_effect(rival_deletes):
    """The rival updates (or deletes) KEY in the new epoch: the update lost its round to it
    (linearized just before it). It used to take WIN: it freed the first object again (the
    rival's replacement had freed it) and left its own object named by no slot."""
    cfg, mem, t, a, primary, backup = _a_slot_with_a_backup()
    run(a.insert(KEY, FIRST), t)
    op = a.update(KEY, OURS)
    _to_primary_cas(op, t, primary)
    m1 = _backup_dies(cfg, mem, t, backup)
    rival = ClientCore(cfg, 3, membership=m1)
    run(rival.open(), t)
    run(rival.delete(KEY) if rival_deletes else rival.update(KEY, RIVALS), t)
    assert _drive(op, op.throw(EpochChanged(m1)), t) is None
    _check(cfg, mem, m1, [a, rival], None if rival_deletes else RIVALS)
