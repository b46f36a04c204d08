"""Client ids and the lifetime of a client: ids closed cleanly are reused (and their blocks
adopted), claiming an id is atomic, drawn ids step around explicit ones, and a client opened
before a fork() is refused in the child. In-process tests on the local backend; the process
versions are in ``test_clients_processes``."""

from __future__ import annotations

import struct

import pytest

from fusee.client import Client
from fusee.driver import run
from fusee.errors import NeedsRecovery
from fusee.layout import CLEAN, META_STATE, unpack_u64
from fusee.master import Master
from fusee.memory_map import MemoryMap
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.recovery import recover_client
from fusee.verbs import EpochChanged, Read
from storekit import config
from transports.local import LocalMemory, LocalTransport
from test_recovery import _audit, crash_after


def _cluster(r: int = 3):
    cfg = config(r=r)
    mem = LocalMemory(cfg)
    return cfg, lambda: LocalTransport(cfg, memory=mem)


def owned_blocks(cfg, transport) -> list[int]:
    """Per MN, the data blocks its allocation table says some client id owns."""
    m = MemoryMap.of(cfg.layout)
    bufs = transport.execute([Read(n.id, m.table, 8 * m.num_blocks) for n in cfg.memnodes])
    return [sum(1 for w in struct.unpack(f"<{m.num_blocks}Q", b) if w) for b in bufs]


def finish(gen, transport, results):
    """Drive an operation whose batch got ``results`` to its end (``run`` starts one)."""
    try:
        batch = gen.send(results)
        while True:
            batch = gen.send(transport.execute(batch))
    except StopIteration as stop:
        return stop.value


def state(cfg, transport, cid: int) -> int:
    meta = MemoryMap.of(cfg.layout).client_meta(cid)
    (raw,) = transport.execute([Read(cfg.memnodes[0].id, meta + META_STATE, 8)])
    return unpack_u64(raw)


def test_closed_ids_are_reused_with_their_blocks():
    """More open/close cycles than the region has blocks (54 per MN): each one takes over the
    id the previous one closed and carries on in its blocks (before: a fresh id and a new
    block group each time, then OutOfMemory after 54)."""
    cfg, tr = _cluster()
    ids, acked = set(), {}
    for i in range(80):
        with Client(tr()) as kv:
            if i % 2:
                kv.put(b"k%d" % (i % 5), b"v%d" % i)
                acked[b"k%d" % (i % 5)] = b"v%d" % i
            ids.add(kv.client_id)
        if i == 0:
            first = owned_blocks(cfg, tr())
    assert ids == {0}
    assert owned_blocks(cfg, tr()) == first
    with Client(tr()) as kv:
        assert {k: kv.get(k) for k in acked} == acked
        _audit(cfg, tr(), [kv.core])


def test_drawn_ids_step_around_explicit_ones():
    """Before: the counter drew id 1 for the third client although an explicit client held
    it, whose open then raised NeedsRecovery."""
    cfg, tr = _cluster()
    explicit = Client(tr(), client_id=1)
    drawn = [Client(tr()) for _ in range(3)]
    assert sorted(kv.client_id for kv in drawn) == [0, 2, 3]
    with pytest.raises(NeedsRecovery):
        Client(tr(), client_id=2)
    for kv in drawn + [explicit]:
        kv.close()
    assert sorted(Client(tr()).client_id for _ in range(4)) == [0, 1, 2, 3]


def test_of_two_clients_opening_one_id_at_once_one_wins():
    """Both read the id's state before either marks it (before: both saw it CLEAN and both
    opened it, sharing its log and blocks)."""
    cfg, tr = _cluster()
    a, b = ClientCore(cfg, 5), ClientCore(cfg, 5)
    ga, gb = a.open(), b.open()
    ta, tb = tr(), tr()
    batch_a, batch_b = next(ga), next(gb)
    res_a, res_b = ta.execute(batch_a), tb.execute(batch_b)
    finish(ga, ta, res_a)
    with pytest.raises(NeedsRecovery):
        finish(gb, tb, res_b)
    assert state(cfg, tr(), 5) == a.claim


def test_an_open_that_starts_over_knows_its_own_claim():
    """A failover (EpochChanged) right after the claim went through: the open starts over
    and finds the id claimed by itself, not by another client."""
    cfg, tr = _cluster()
    core, t = ClientCore(cfg, 3), tr()
    gen = core.open()
    t.execute(next(gen))
    batch = gen.throw(EpochChanged(Membership(epoch=1)))
    finish(gen, t, t.execute(batch))
    assert state(cfg, tr(), 3) == core.claim
    run(core.close(), t)
    assert state(cfg, tr(), 3) == CLEAN


def test_recovering_a_clean_id_leaves_a_new_claim_alone():
    """A recovery that found the id CLEAN used to mark it CLEAN again at its end, over the
    claim of a client that opened the id meanwhile: a third client could then open it too."""
    cfg, tr = _cluster()
    Client(tr(), client_id=4).close()
    rec, t = recover_client(cfg, 4), tr()
    batch = next(rec)
    res = t.execute(batch)
    holder = Client(tr(), client_id=4)
    finish(rec, t, res)
    with pytest.raises(NeedsRecovery):
        Client(tr(), client_id=4)
    holder.close()


def test_the_master_takes_in_the_ids_the_memory_nodes_know():
    """Seeding the master's counter also takes in the ids' STATE words: CLEAN ones below the
    counter are recycled, those in use recovered first; ids the master tracks keep its own
    (newer) view."""
    m = Master((0, 1, 2), 1.0, 1.0, 0.5, now=0.0)
    m.grant(2, 7, now=0.0)                       # asked for by number, before any draw
    m.seed_ids(6, clean=[0, 3], in_use=[1, 2, 40])
    assert m.free_ids == [0, 3] and set(m.repairs) == {1, 40} and 2 in m.clients
    m.seed_ids(9, clean=[4])                     # once
    assert m.free_ids == [0, 3] and m.draw_id() == 6


@pytest.mark.parametrize("phase", ["open", "close"])
def test_a_client_crashed_at_any_batch_of_open_or_close_leaves_its_id_reusable(phase):
    """Every round trip of ``open`` (of an id whose blocks it adopts) and of ``close`` (with
    frees still deferred): the id is left CLEAN (the crash came before the claim, or after
    the close) and the next draw takes it, or in use, and then the draw steps around it
    until a recovery makes it CLEAN. Either way the id is drawn again in the end, adopting
    its blocks (no new ones), and the audit is clean."""
    boundary = 0
    while True:
        cfg, tr = _cluster()
        with Client(tr()) as kv:
            for i in range(6):
                kv.put(b"k%d" % (i % 3), b"v%d" % i)
        blocks = owned_blocks(cfg, tr())
        victim = ClientCore(cfg, 0)
        if phase == "open":
            op = victim.open()
        else:
            run(victim.open(), tr())
            run(victim.update(b"k0", b"last"), tr())        # owes the free of the old object
            op = victim.close()
        if crash_after(op, tr(), boundary) < boundary:
            break
        boundary += 1
        if state(cfg, tr(), 0) != CLEAN:
            with Client(tr()) as other:
                assert other.client_id == 1
            Client(tr(), client_id=0, recover=True).close()
        with Client(tr()) as kv:
            assert kv.client_id == 0
            assert kv.get(b"k0") in (b"v3", b"last") and kv.get(b"k2") == b"v5"
            _audit(cfg, tr(), [kv.core])
        # at most one group more: the client that stepped around the id in use
        assert all(now <= before + 1 for now, before in zip(owned_blocks(cfg, tr()), blocks))
    assert boundary >= 2
