"""An insert that lost a round which the epoch's end then rolled back (``fusee.insert``).

Found by the sweep of splits + rebuild cycles + a slow MN (seed 351 on 6 MNs r = 2, an
insert Stalled: "a lost round is not settled"): an insert lost the round on the last free
slot of its buckets to a writer that then crashed (its claim on the backup, the primary
still empty). A failover (of another MN) closed every open round: it put the backup back to
the primary's value, so the slot was empty again and no writer's round was open there. The
insert remembered the slot as lost "until the primary moves off the value it lost", and
waited for a change that nobody would make, until it ran out of patience. A round lost in
an epoch that ended is closed: in the next epoch the slot is free to claim again.

Deterministic: 3 MNs, r = 2; the key's two buckets filled but for one slot; writer W
proposes its claim there and crashes; the insert loses to it and starts waiting; the third
MN dies and is failed over; the insert, told the new epoch, must take the slot.
"""

from __future__ import annotations

from test_failover import _config

from fusee.audit import audit
from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.driver import run
from fusee.errors import EpochChanged
from fusee.failover import failover
from fusee.hashing import key_hash
from fusee.index import View
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.recovery import recover_client
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import Backoff, Cas, Read


def _view_of(core: ClientCore, key: bytes) -> tuple[int, int, frozenset[int]]:
    """What decides the slots an insert of ``key`` may take: its subtable and buckets."""
    h = key_hash(key)
    sid, _ = core.dir.lookup(h)
    return sid, h.high, frozenset(h.mains(core.dir._mains))


def _keys_sharing_the_buckets_of(core: ClientCore, n: int) -> list[bytes]:
    """``n`` keys whose inserts all choose among the same slots."""
    groups: dict[tuple[int, frozenset[int]], list[bytes]] = {}
    i = 0
    while True:
        key = b"k%05d" % i
        i += 1
        sid, _, mains = _view_of(core, key)
        group = groups.setdefault((sid, mains), [])
        group.append(key)
        if len(group) == n:
            return group


def _free_slots(core: ClientCore, t, key: bytes) -> int:
    h = key_hash(key)
    sid, _ = core.dir.lookup(h)
    reads, firsts = core.dir.bucket_reads(sid, h, core.dir.nodes(sid)[0])
    view = View(t.execute(reads), firsts, sid)
    taken: list[int] = []
    while (pos := view.free_slot(taken)) is not None:
        taken.append(pos)
    return len(taken)


def _step_until(op, batch, t, done) -> list:
    """Execute ``op``'s batches until ``done(batch)`` held for one just executed: the next."""
    while True:
        results = t.execute(batch)
        hit = done(batch)
        batch = op.send(results)
        if hit:
            return batch


def test_an_insert_that_lost_a_round_the_epochs_end_rolled_back_takes_the_slot():
    cfg = _config(3, 2)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    filler, w, loser = (ClientCore(cfg, c, patience=40) for c in range(3))
    for core in (filler, w, loser):
        run(core.open(), t)
    keys = _keys_sharing_the_buckets_of(filler, 40)
    key_w, key_l, *fill = keys
    sid, _ = filler.dir.lookup(key_hash(key_w))
    primary, backup = filler.dir.nodes(sid)
    (third,) = set(range(3)) - {primary, backup}
    for key in fill:
        if _free_slots(filler, t, key_w) == 1:
            break
        run(filler.insert(key, b"filler"), t)
    assert _free_slots(filler, t, key_w) == 1

    # W proposes its claim on the backup, then crashes before its primary CAS
    op_w = w.insert(key_w, b"W")
    _step_until(op_w, next(op_w), t,
                lambda b: any(isinstance(c, Cas) and c.node == backup for c in b))
    op_w.close()

    # the insert loses that round, then waits for the slot to move on
    op = loser.insert(key_l, b"ours")
    batch = _step_until(op, next(op), t,
                        lambda b: any(isinstance(c, Cas) and c.node == backup for c in b))
    assert loser.counters["lost"] == 1
    for _ in range(3):
        assert all(isinstance(r, (Read, Backoff)) for r in batch), batch    # waiting
        batch = op.send(t.execute(batch))

    mem.crash(third)
    m1 = run(failover(cfg, Membership(), third), t)
    batch = op.throw(EpochChanged(m1))
    while True:
        try:
            batch = op.send(t.execute(batch))
        except StopIteration as stop:
            assert stop.value is None
            break

    run(recover_client(cfg, w.client_id, membership=m1), t)
    reader = ClientCore(cfg, 7, membership=m1)
    run(reader.open(), t)
    assert run(reader.search(key_l), t) == b"ours"
    assert run(reader.search(key_w), t) is None
    filler.place(m1)                    # (it has been idle since before the failover)
    for core in (filler, loser):
        run(core.close(), t)
    report = run(audit(cfg, [filler, loser, reader], m1, excuse=lost_frees(mem, m1)), t)
    assert report.ok, report.explain()
