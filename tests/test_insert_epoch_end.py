"""An insert whose epoch ends around its commit CAS, as a rebuild publishes (``fusee.insert``).

Seed 518 of the rebuild cycles, made deterministic and varied: a slot whose subtable has one
live replica (its other MN dead) takes an insert's TENTATIVE claim there (the r = 1 path);
the insert commits and CASes the claim to its value; the dead MN's rebuild copies the slot
(claim or value) and publishes; then the insert's epoch ends and it settles. Where its CAS
landed (before the publish, the reply lost as the MN died) it has taken effect, and must say
so; where the publish refused it, the committed claim is finished. And the same window for a
slot that had a backup (the SNAPSHOT path, settled by ``ClientCore.fate``).
"""

from __future__ import annotations

import pytest
from test_failover import _config

from fusee.audit import audit
from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.driver import run
from fusee.errors import EpochChanged, KeyExists, NodeTimeout
from fusee.failover import failover
from fusee.hashing import key_hash
from fusee.layout import TENTATIVE, unpack_u64
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.rebuild import rebuild
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import AwaitMembership, Cas

KEY, VALUE = b"settled", b"at the end of an epoch"


def _drive(op, first, t, membership: Membership):
    """Drive ``op`` (its next batch ``first``) to its end on ``t``; an AwaitMembership is
    answered with ``membership`` (as a Client's driver does once the master published it).
    Returns the result or raises what the operation raised."""
    batch = first
    while True:
        try:
            if batch and type(batch[0]) is AwaitMembership:
                batch = op.throw(EpochChanged(membership))
                continue
            try:
                results = t.execute(batch)
            except NodeTimeout as e:
                batch = op.throw(e)
            else:
                batch = op.send(results)
        except StopIteration as stop:
            return stop.value


def _to_commit_cas(op, t):
    """Step ``op`` until its next batch holds the CAS that commits an insert's claim on the
    primary: returns (that batch, the CAS)."""
    batch = next(op)
    while True:
        cas = [c for c in batch if isinstance(c, Cas) and c.expected & TENTATIVE
               and c.desired == c.expected & ~TENTATIVE]
        if cas:
            return batch, cas[0]
        batch = op.send(t.execute(batch))


def _slot(mem: LocalMemory, node: int, addr: int) -> int:
    return unpack_u64(bytes(mem.regions[node].mem[addr:addr + 8]))


def _a_replica_dead(r: int = 2):
    """3 MNs, replication ``r``: KEY's subtable has lost its last replica (failed over:
    epoch 1); with r = 2 its primary is left alone. Returns (config, memory, membership,
    client, the subtable's primary, the dead replica)."""
    cfg = _config(3, r)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a = ClientCore(cfg, 0)
    run(a.open(), t)
    sid, _ = a.dir.lookup(key_hash(KEY))
    primary, *_, dead = a.dir.nodes(sid)
    mem.crash(dead)
    m1 = run(failover(cfg, Membership(), dead), t)
    a.place(m1)
    return cfg, mem, m1, a, primary, dead


def _rebuilt(cfg, mem: LocalMemory, m: Membership, node: int):
    """MN ``node`` comes back empty and is rebuilt: (a transport that knows its new access
    key, the membership the rebuild published)."""
    mem.restart(node)
    t = LocalTransport(cfg, memory=mem)
    return t, run(rebuild(cfg, m, node), t)


def _landed_then_primary_died(cfg, mem: LocalMemory, m: Membership, batch, primary: int,
                              dead: int):
    """``batch`` (the commit CAS) executes, MN ``dead`` is rebuilt, then ``primary`` dies
    before it answers: (transport, the membership after its failover)."""
    LocalTransport(cfg, memory=mem).execute(batch)
    t, m2 = _rebuilt(cfg, mem, m, dead)
    mem.crash(primary)
    return t, run(failover(cfg, m2, primary), t)


def _check_store(cfg, mem, m, cores, expected: bytes) -> None:
    t = LocalTransport(cfg, memory=mem)
    b = ClientCore(cfg, 7, membership=m)
    run(b.open(), t)
    assert run(b.search(KEY), t) == expected
    with pytest.raises(KeyExists):
        run(b.insert(KEY, b"again"), t)
    report = run(audit(cfg, [*cores, b], m, excuse=lost_frees(mem, m)), t)
    assert report.ok, report.explain()


@pytest.mark.parametrize("rival", [False, True])
def test_an_r1_insert_whose_commit_cas_landed_as_a_rebuild_published_took_effect(rival):
    """The CAS landed on the primary, the rebuild copied the committed value onto the MN it
    rebuilt, and the primary died before it answered (seed 518). The insert used to take
    its claim back (that CAS failed: the slot held its value), start over with a new object
    and end in KeyExists against itself, giving back the object the slot names. It
    succeeds. ``rival``: another client inserts the key before the insert settles; it finds
    the key there (KeyExists), and the insert still succeeds (it took effect first)."""
    cfg, mem, m1, a, primary, backup = _a_replica_dead()
    t = LocalTransport(cfg, memory=mem)
    op = a.insert(KEY, VALUE)
    batch, cas = _to_commit_cas(op, t)
    t, m3 = _landed_then_primary_died(cfg, mem, m1, batch, primary, backup)
    cores = [a]
    if rival:
        c = ClientCore(cfg, 3, membership=m3)
        run(c.open(), t)
        with pytest.raises(KeyExists):
            run(c.insert(KEY, b"a rival's"), t)
        cores.append(c)
    first = op.throw(NodeTimeout(f"MN {primary} did not answer", primary))
    assert _drive(op, first, t, m3) is None
    assert _slot(mem, backup, cas.addr) == cas.desired
    _check_store(cfg, mem, m3, cores, VALUE)


def test_an_r1_put_whose_commit_cas_landed_as_a_rebuild_published_took_effect_once():
    """The same window under a put of an absent key: the insert used to end in KeyExists
    against itself, and the put then updated its own insert, freeing the object it had
    already given back (two owners of its memory). The put takes effect once."""
    cfg, mem, m1, a, primary, backup = _a_replica_dead()
    t = LocalTransport(cfg, memory=mem)
    op = a.put(KEY, VALUE)
    batch, cas = _to_commit_cas(op, t)
    t, m3 = _landed_then_primary_died(cfg, mem, m1, batch, primary, backup)
    first = op.throw(NodeTimeout(f"MN {primary} did not answer", primary))
    assert _drive(op, first, t, m3) is None
    assert _slot(mem, backup, cas.addr) == cas.desired      # its first object, not another
    _check_store(cfg, mem, m3, [a], VALUE)


@pytest.mark.parametrize("primary_dies", [False, True])
def test_an_r1_insert_whose_commit_cas_the_publish_refused_is_finished(primary_dies):
    """The rebuild published before the CAS was posted (EpochChanged: it never ran), with
    the claim copied onto the rebuilt MN: the committed claim is finished on both replicas,
    backups first. ``primary_dies``: the primary dies once the rebuilt MN has the value,
    before the primary's CAS: in the next epoch the CAS meets the insert's own value there,
    and the insert has taken effect."""
    cfg, mem, m1, a, primary, backup = _a_replica_dead()
    t = LocalTransport(cfg, memory=mem)
    op = a.insert(KEY, VALUE)
    _, cas = _to_commit_cas(op, t)
    t, m2 = _rebuilt(cfg, mem, m1, backup)
    assert _slot(mem, backup, cas.addr) == cas.expected     # the claim, copied
    batch = op.throw(EpochChanged(m2))
    m = m2
    if primary_dies:
        assert [(c.node, c.expected, c.desired) for c in batch if isinstance(c, Cas)] == \
            [(backup, cas.expected, cas.desired)], batch         # the backup first
        t.execute(batch)
        mem.crash(primary)
        m = run(failover(cfg, m2, primary), t)
        batch = op.throw(NodeTimeout(f"MN {primary} did not answer", primary))
    assert _drive(op, batch, t, m) is None
    assert all(_slot(mem, n, cas.addr) == cas.desired for n in m.live((primary, backup)))
    _check_store(cfg, mem, m, [a], VALUE)


def test_an_insert_with_a_backup_whose_commit_cas_landed_as_a_rebuild_published():
    """The same window on a slot that kept a backup (3 MNs, r = 3, one dead: the SNAPSHOT
    path): the primary CAS landed, the rebuild copied the value, the primary died before it
    answered. ``ClientCore.fate`` finds no live primary of the round and goes by the
    insert's own verdict (committed: it won)."""
    cfg, mem, m1, a, primary, third = _a_replica_dead(3)
    t = LocalTransport(cfg, memory=mem)
    op = a.insert(KEY, VALUE)
    batch = next(op)
    while not any(isinstance(c, Cas) and c.node == primary for c in batch):
        batch = op.send(t.execute(batch))
    (cas,) = batch
    t, m3 = _landed_then_primary_died(cfg, mem, m1, batch, primary, third)
    first = op.throw(NodeTimeout(f"MN {primary} did not answer", primary))
    assert _drive(op, first, t, m3) is None
    assert all(_slot(mem, n, cas.addr) == cas.desired for n in m3.live(range(3)))
    _check_store(cfg, mem, m3, [a], VALUE)
