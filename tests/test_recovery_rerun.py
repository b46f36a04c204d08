"""A recovery run again over what its first attempt did before it was cut short (an MN died
under it, or the master running it did): the scripted window of seeds 109 and 3446 of
``test_failover``'s two MNs of five (regression ``recovery-withdrawal-cut-short``).

A's insert wins its round on both backups and commits its log entry; A crashes before its
primary CAS. Recovery withdraws the claim (nobody observed it): the backups, then the primary,
to a void. Cut short right after, it runs again from the start: the entry read COMMITTED and
its slot moved on (to the void, or another client's insert of the key since), which it took
for an insert that took effect, its object freed by whoever replaced it. Nobody did: the
object stayed held, named by no slot (a leak, not a lost write: the insert was never
acknowledged). Now the entry is marked ABORTED before the claim leaves any replica, as a
live client's own withdrawal is (``insert._withdraw``)."""

from __future__ import annotations

import pytest

from test_failover import _config

from fusee.audit import audit
from fusee.driver import run
from fusee.hashing import key_hash
from fusee.layout import is_free
from fusee.operations import ClientCore
from fusee.recovery import recover_client
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import Cas

KEY = b"k0"


@pytest.mark.parametrize("then_b_inserts", [False, True])
def test_a_recovery_run_again_after_withdrawing_a_committed_insert_leaks_nothing(
        then_b_inserts):
    cfg = _config(3, 3)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a, b = ClientCore(cfg, 0), ClientCore(cfg, 1)
    for core in (a, b):
        run(core.open(), t)
    primary = a.dir.nodes(a.dir.lookup(key_hash(KEY))[0])[0]
    op = a.insert(KEY, b"A's")
    batch = next(op)
    while not any(isinstance(r, Cas) and r.node == primary for r in batch):
        batch = op.send(t.execute(batch))       # won on both backups, committed
    op.close()                                  # A crashes: its primary CAS never posted
    first = recover_client(cfg, 0)
    batch = next(first)
    while True:
        done = t.execute(batch)
        if any(isinstance(r, Cas) and r.node == primary and r.expected == 0 and r.desired
               and is_free(r.desired) for r in batch):
            break                               # the claim withdrawn, the primary too
        batch = first.send(done)
    first.close()                               # cut short: run again from the start
    if then_b_inserts:
        run(b.insert(KEY, b"B's"), t)
    report = run(recover_client(cfg, 0), t)
    run(b.close(), t)
    reader = ClientCore(cfg, 7)
    run(reader.open(), t)
    assert run(reader.search(KEY), t) == (b"B's" if then_b_inserts else None)
    audited = run(audit(cfg, [reader]), t)
    assert audited.ok and not audited.stranded, audited.explain()
    assert report.outcomes == {"aborted": 1}, report.outcomes
