"""Client ids and the lifetime of a client: ids closed cleanly are reused (and their blocks
adopted), claiming an id is atomic, drawn ids step around explicit ones, and a client opened
before a fork() is refused in the child. In-process tests on the local backend; the process
versions are in ``test_clients_processes``."""

from __future__ import annotations

import random
import struct

import pytest

from fusee.emulator.testkit.linearizability import check
from fusee.emulator.testkit.simulator import Call, Simulator, kv_workload, store_calls

from fusee.client import Client
from fusee.driver import run
from fusee.errors import KeyExists, KeyNotFound, NeedsRecovery
from fusee.layout import CLEAN, META_STATE, unpack_u64
from fusee.master.logic import Master
from fusee.memory_map import MemoryMap
from fusee.membership import Membership
from fusee.client_ids import client_states, open_client
from fusee.operations import ClientCore
from fusee.audit import audit
from fusee.recovery import recover_client
from fusee.verbs import EpochChanged, Read
from storekit import config
from fusee.transports.local import LocalMemory, LocalTransport
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


# -- short-lived clients in the simulator ----------------------------------------------------
MIX = {"get": 2, "put": 3, "insert": 1, "update": 1, "delete": 1}


def sessions(cfg, name: str, rng: random.Random, keys: list[bytes], n: int, opened: list,
             closed: set):
    """The calls of a simulated process that opens ``n`` short-lived clients in turn, each on
    a drawn id (``open_client``: draws of others race with it verb by verb) doing 0 to 3
    operations before it closes; each core goes to ``opened``, and to ``closed`` once it
    closed."""
    for i in range(n):
        box: list = []

        def opening(box=box):
            core = yield from open_client(cfg)
            box.append(core)
            opened.append((name, core))
            return core.client_id
        yield Call("open", None, None, opening)
        core = box[0]
        yield from store_calls(core, kv_workload(rng, f"{name}.{i}", keys, rng.randrange(4), MIX))

        def closing(core=core):
            yield from core.close()
            closed.add(core)
        yield Call("close", None, None, closing)


def short_lived_simulation(seed: int, processes: int = 4, n: int = 6, crashes: int = 0):
    """``processes`` simulated processes of ``n`` short-lived clients each, interleaved verb by
    verb, ``crashes`` of them crashed at a random verb (in open, an operation or close); then
    every id left in use is recovered. Returns (linearizability report, audit report, ids
    drawn, ids held at once at most)."""
    cfg = config(r=2)
    mem = LocalMemory(cfg)
    sim = Simulator(mem, seed, expected_errors=(KeyExists, KeyNotFound))
    rng = random.Random(seed)
    keys = [b"key%d" % k for k in range(4)]
    opened: list = []
    closed: set = set()
    for p in range(processes):
        sim.add_client(f"p{p}", sessions(cfg, f"p{p}", rng, keys, n, opened, closed))

    def recover(sim: Simulator, name: str) -> None:
        """Recover the id of the client ``name`` had open (others may wait on its round); a
        crash inside ``open`` left nothing to wait on, and its id for the scan below."""
        if sim.clients[name].op.kind != "open":
            cid = [core for who, core in opened if who == name][-1].client_id
            sim.add_client(f"recover-{name}", [Call("recover", None, None,
                                                    lambda: recover_client(cfg, cid))])

    for p in sim.fault_rng.sample(range(processes), crashes):
        sim.crash_client_at(f"p{p}", sim.fault_rng.randrange(n * 3),
                            sim.fault_rng.randrange(1, 40),
                            then=lambda sim, name=f"p{p}": recover(sim, name))
    history = sim.run()
    t = LocalTransport(cfg, memory=mem)
    ids = list(range(cfg.layout.max_clients))
    for cid, (word, _) in zip(ids, run(client_states(cfg, Membership(), ids), t)):
        if word != CLEAN:                       # every client is done or crashed
            run(recover_client(cfg, cid), t)
    last = {core.client_id: core for _, core in opened}      # each id's last holder
    report = run(audit(cfg, [core for core in last.values() if core in closed]), t)
    return check(history), report, {core.client_id for _, core in opened}


def check_short_lived(seed: int, processes: int, n: int, crashes: int) -> None:
    lin, report, ids = short_lived_simulation(seed, processes, n, crashes)
    assert lin.ok, lin.explain()
    assert report.ok, report.explain()
    # processes * n clients on about as many ids as there are processes
    assert len(ids) <= 2 * processes, sorted(ids)


@pytest.mark.parametrize("crashes", [0, 2])
@pytest.mark.parametrize("seed", range(8))
def test_short_lived_clients_in_the_simulator(seed, crashes):
    check_short_lived(seed, 4, 6, crashes)


@pytest.mark.soak
@pytest.mark.parametrize("crashes", [0, 1, 3])
@pytest.mark.parametrize("seed", range(8, 208))
def test_short_lived_clients_in_the_simulator_soak(seed, crashes):
    check_short_lived(seed, 6, 12, crashes)
