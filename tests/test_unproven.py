"""Which committed entries of a crashed client recovery counts UNPROVEN (committed with no
backup, slot moved on: whether the primary CAS took effect is unknown, so the object stays
held) and which it knows took effect. The run that needed the membership's history for it is
seed 169 of ``test_rebuild_cycles`` (a backup dead when the round ran, rebuilt since)."""

from __future__ import annotations

from fusee.audit import audit
from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.driver import run
from fusee.failover import failover
from fusee.hashing import key_hash
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.recovery import UNPROVEN, recover_client
from fusee.transports.local import LocalMemory, LocalTransport

from test_failover import _config


def test_a_committed_update_without_backup_whose_object_was_freed_since_took_effect():
    """3 MNs r = 2. The key's backup dies and is failed over; A updates the key with no
    backup (commit, then the primary CAS), B updates it again and frees A's object; A
    crashes. A's entry is committed with no backup and its slot has moved on, but its object's
    free bit is set: only a writer that replaced it in the slot frees it, so A's CAS took
    effect. Not UNPROVEN (it used to be: the count of objects that may leak, which a test's
    leak check allows, grew with every such entry)."""
    cfg = _config(nodes=3, r=2)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    b = ClientCore(cfg, 1)
    run(b.open(), t)
    key = b"key"
    run(b.insert(key, b"B's first"), t)
    sid, _ = b.dir.lookup(key_hash(key))
    (backup,) = b.dir.nodes(sid)[1:]
    mem.crash(backup)
    m = run(failover(cfg, Membership(), [backup]), t)
    b.place(m)
    a = ClientCore(cfg, 0, membership=m)
    run(a.open(), t)
    run(a.update(key, b"A's"), t)
    entry = a.cache.get(key)
    assert entry is not None and not a.target(entry.sid, entry.pos).backups   # no round
    run(b.update(key, b"B's second"), t)
    run(b.close(), t)                                   # B's free of A's object goes out
    report = run(recover_client(cfg, 0, membership=m), t)   # A crashed, its id IN_USE
    assert report.outcomes.get(UNPROVEN, 0) == 0, report.outcomes
    assert report.outcomes.get("had taken effect", 0) == 1, report.outcomes
    reader = ClientCore(cfg, 2, membership=m)
    run(reader.open(), t)
    assert run(reader.search(key), t) == b"B's second"
    audit_report = run(audit(cfg, [b, reader], m, excuse=lost_frees(mem, m)), t)
    assert audit_report.ok, audit_report.explain()
