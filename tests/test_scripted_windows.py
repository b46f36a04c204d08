"""Windows of seed-pinned regressions as scripted interleavings: no seed, so no schedule to
drift (``regression_windows`` has the seeded forms and their windows).

Each test drives the operations by hand, batch by batch, on the in-process memory, placing
the crash, failover and rebuild exactly where the bug's analysis puts them, as
``test_insert_epoch_end`` does for seed 518.
"""

from __future__ import annotations

from test_failover import _config
from test_insert_epoch_end import _drive, _rebuilt

from fusee.audit import audit
from fusee.driver import run
from fusee.errors import EpochChanged, NodeTimeout
from fusee.failover import failover
from fusee.hashing import key_hash
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import AwaitMembership, Cas

KEY = b"k0"


def test_a_won_round_judged_after_its_primary_was_rebuilt():
    """Seed 526 of the rebuild cycles (3 MNs r = 3): A's put of an absent key wins its slot
    on both backups and commits; its primary dies before the primary CAS goes out. The
    failover keeps A's committed claim, B updates the key over it (acknowledged), and the
    dead MN is rebuilt with B's value. A, learning the new epoch, must not judge its round
    by that rebuilt primary (it holds neither A's value nor the old one: a LOSE, after which
    A inserted again and updated the key back, its one put taking effect twice around B's
    update). It goes by its own WIN, which the failover kept: B's value stays."""
    cfg = _config(3, 3)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a, b = ClientCore(cfg, 0), ClientCore(cfg, 1)
    run(a.open(), t)
    run(b.open(), t)
    sid, _ = a.dir.lookup(key_hash(KEY))
    primary = a.dir.nodes(sid)[0]
    op = a.put(KEY, b"A's")
    batch = next(op)
    while not any(isinstance(c, Cas) and c.node == primary for c in batch):
        batch = op.send(t.execute(batch))       # up to the primary CAS, not posted
    mem.crash(primary)
    m1 = run(failover(cfg, Membership(), primary), t)
    b.place(m1)
    run(b.update(KEY, b"B's"), t)                # acknowledged
    t, m2 = _rebuilt(cfg, mem, m1, primary)
    batch = op.throw(NodeTimeout(f"MN {primary} did not answer", primary))
    if batch and type(batch[0]) is not AwaitMembership:
        batch = op.throw(EpochChanged(m2))      # posted in an epoch that ended
    assert _drive(op, batch, t, m2) is None
    b.place(m2)
    for core in (a, b):
        run(core.close(), t)                    # frees in flight delivered
    reader = ClientCore(cfg, 7, membership=m2)
    run(reader.open(), t)
    assert run(reader.search(KEY), t) == b"B's"
    report = run(audit(cfg, [a, b, reader], m2), t)
    assert report.ok, report.explain()
