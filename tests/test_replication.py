"""SNAPSHOT: the decision rules, and concurrent writers of one slot under seeded schedules."""

from __future__ import annotations

import struct

import pytest

from fusee.errors import KeyExists, KeyNotFound
from fusee.hashing import key_hash
from fusee.layout import FROZEN, committed_object, decode_object, slot_addr, slot_units
from fusee.audit import audit
from fusee.driver import run
from fusee.operations import ClientCore
from fusee.replication import SlotTarget, decide, resolve, tally
from fusee.transports.local import LocalTransport
from fusee.verdicts import LOSE, RESTART, RULE3, WIN
from fusee.verbs import Cas
from storekit import TINY, clients, config, simulate

A, B, C = 0x100, 0x200, 0x300


@pytest.mark.parametrize("current, verdict", [
    ([], WIN),                          # r = 1: nothing to agree on
    ([A, A], WIN),                      # rule 1
    ([A, A, A, B], WIN),                # rule 2: a majority of 4 backups
    ([A, A, B, C], RULE3),              # half is not a majority
    ([A, B], RULE3),
    ([B, B], LOSE), ([B, B, B, A], LOSE),
    ([B, C], RULE3),
])
def test_rules_one_and_two(current, verdict):
    assert decide(current, A) == verdict


def _resolve(current, mine, primary_now, v_old=0x10):
    t = SlotTarget(0, 0, (0, 1, 2), 4096)
    gen = resolve(ClientCore(config(), 0), t, v_old, mine, current)
    try:
        batch = gen.send(None)
        assert len(batch) == 1 and batch[0].node == 0          # re-read of the primary
        gen.send([struct.pack("<Q", primary_now)])
    except StopIteration as stop:
        return stop.value
    raise AssertionError("resolve did not finish")


def test_rule_three():
    assert _resolve([A, B], A, primary_now=0x10) == WIN       # smallest proposal wins
    assert _resolve([A, B], B, primary_now=0x10) == LOSE
    assert _resolve([A, B], A, primary_now=A + 1) == LOSE     # the round is already over
    assert _resolve([A, B], A, primary_now=0x10 | FROZEN) == RESTART


def _lockstep(transport, *gens):
    """Run generators batch by batch in turn (each batch whole): a deterministic race.
    Returns each one's result or exception, and every batch posted."""
    out, batches = [None] * len(gens), []
    live = {i: (g, None) for i, g in enumerate(gens)}
    while live:
        for i in list(live):
            g, res = live[i]
            try:
                batch = g.send(res)
            except StopIteration as stop:
                out[i] = stop.value
                del live[i]
                continue
            except Exception as e:          # noqa: BLE001 - the op's outcome
                out[i] = e
                del live[i]
                continue
            batches.append((i, batch))
            live[i] = (g, transport.execute(batch))
    return out, batches


def _same_buckets(n=2):
    """Keys with the same two candidate buckets (TINY has one subtable, four mains)."""
    first = key_hash(b"a0").mains(4)
    keys = [k for k in (b"a%d" % i for i in range(200)) if key_hash(k).mains(4) == first]
    return keys[:n]


def _holders(kv, key):
    """Primary slots of the key's subtable whose object has this key."""
    core, mem = kv.core, kv.transport.memory
    sid, _ = core.dir.lookup(key_hash(key))
    reg = mem.regions[core.dir.nodes(sid)[0]].mem
    found = []
    for pos in range(core.geo.slots):
        v = struct.unpack_from("<Q", reg, core.geo.slot_addr(sid, pos))[0]
        if committed_object(v):
            a = slot_addr(v, core.unit)
            obj = decode_object(bytes(mem.regions[v >> 40 & 0x3F].mem[a:a + slot_units(v) * 64]))
            if obj.key == key:
                found.append(pos)
    return found


@pytest.mark.parametrize("r", [1, 3])
def test_losing_insert_of_a_new_key_takes_another_slot(r):
    _, (a, b) = clients(config(r=r, **TINY), 2)
    k1, k2 = _same_buckets()
    out, _ = _lockstep(a.transport, a.core.insert(k1, b"1"), b.core.insert(k2, b"2"))
    assert out == [None, None]
    assert b.core.counters["lost"] == 1
    assert a.get(k1) == b"1" and a.get(k2) == b"2"


@pytest.mark.parametrize("r", [1, 3])
def test_same_key_racing_inserts_leave_one_slot(r):
    _, (a, b, c) = clients(config(r=r, **TINY), 3)
    out, _ = _lockstep(a.transport, a.core.insert(b"k", b"1"), b.core.insert(b"k", b"2"),
                       c.core.insert(b"k", b"3"))
    assert sum(o is None for o in out) == 1
    assert all(o is None or isinstance(o, KeyExists) for o in out)
    assert len(_holders(a, b"k")) == 1
    assert a.get(b"k") == [b"1", b"2", b"3"][out.index(None)]


def test_racing_deletes_propose_distinct_values():
    _, (a, b, c) = clients(config(r=3, **TINY), 3)
    a.insert(b"k", b"v")
    out, batches = _lockstep(a.transport, b.core.delete(b"k"), c.core.delete(b"k"))
    proposals: dict[int, set] = {0: set(), 1: set()}
    for i, batch in batches:
        proposals[i] |= {r.desired for r in batch if type(r) is Cas}
    assert proposals[0] and proposals[1] and not proposals[0] & proposals[1]
    assert sorted(map(type, out), key=str) == sorted([type(None), KeyNotFound], key=str)
    assert a.get(b"k") is None


MIXES = {
    "update": {"get": 3, "update": 4, "put": 2, "delete": 1, "insert": 1},
    "insert": {"get": 2, "insert": 5, "delete": 3},
    "all": {"get": 3, "insert": 2, "update": 2, "delete": 2, "put": 2},
}


@pytest.mark.parametrize("nodes, r, mix", [
    (3, 3, "all"), (3, 3, "insert"), (3, 1, "all"), (2, 2, "update"), (5, 3, "insert"),
    (5, 5, "update"), (4, 4, "insert"),
])
def test_hot_keys_are_linearizable(nodes, r, mix):
    cfg = config(nodes=nodes, r=r, **TINY)
    ops = lost = 0
    for seed in range(25):
        sim, cores, report = simulate(cfg, seed, 5, [b"k0", b"k1"], 30, MIXES[mix])
        assert report.ok, f"seed {seed}:\n{report.explain()}"
        ops += report.ops
        lost += sum(c.counters["lost"] for c in cores)
    assert ops == 25 * 5 * 30 and lost > 0          # the schedules did contend


def test_a_seed_replays_exactly():
    """The store draws no randomness of its own, so a failing seed replays."""
    cfg = config(r=3, **TINY)
    runs = [simulate(cfg, 11, 4, [b"k0", b"k1"], 30, MIXES["all"]) for _ in range(2)]
    assert runs[0][0].history.format() == runs[1][0].history.format()
    assert runs[0][0].step == runs[1][0].step


def test_long_run_with_memory_reuse_and_splits():
    cfg = config(r=3, **TINY)
    keys = [b"k%d" % i for i in range(80)]
    sim, cores, report = simulate(cfg, 5, 3, keys, 1500, MIXES["all"])
    assert report.ok, report.explain()
    assert sum(c.alloc.stats["reclaimed"] for c in cores) > 0
    assert sum(c.counters["splits"] for c in cores) > 0


@pytest.mark.soak
@pytest.mark.parametrize("nodes, r", [(3, 3), (3, 1), (5, 5)])
def test_hot_keys_soak(nodes, r):
    cfg = config(nodes=nodes, r=r, **TINY)
    for seed in range(2000):
        for mix in MIXES:
            _, _, report = simulate(cfg, seed, 6, [b"k0", b"k1", b"k2"], 40, MIXES[mix])
            assert report.ok, f"seed {seed} {mix}:\n{report.explain()}"


@pytest.mark.parametrize("found, verdict", [
    ([0x10, 0x10], WIN),                # every CAS found v_old: rule 1
    ([], WIN),                          # r = 1: nothing to agree on
    ([0x10, 0x10, 0x10, B], WIN),       # rule 2
    ([A, 0x10], WIN),                   # our own proposal met again (recovery's redo)
    ([0x10, B], RULE3), ([B, B], LOSE), ([B, C], RULE3),
])
def test_tally_reads_the_proposal_as_the_rules_do(found, verdict):
    """``tally``: a CAS that found v_old put our value there; then rules 1 and 2."""
    current, decision = tally(found, 0x10, A)
    assert current == [A if v == 0x10 else v for v in found]
    assert decision == verdict == decide(current, A)


@pytest.mark.parametrize("op", ["update", "delete", "insert"])
def test_every_batch_of_a_round_carries_what_the_client_owes(op):
    """A SNAPSHOT round posts through the core's round trip like every other step (one way
    to yield, ``OpCore.rt``): a free owed by another operation of the client that ended
    meanwhile (a pipeline's) rides with the round's next batch, whichever step it is: its
    proposal and its primary CAS too (they yielded their batches themselves, and the free
    waited for a later batch, or for the next operation). The operations' outcomes and the
    store's audit are as ever."""
    cfg = config(r=3)
    mem, (kv,) = clients(cfg, 1)
    core, t = kv.core, kv.transport
    for i in range(12):
        kv.insert(b"other-%d" % i, b"o")
    if op != "insert":
        kv.insert(b"k", b"v")
    gen = {"update": lambda: core.update(b"k", b"w"), "delete": lambda: core.delete(b"k"),
           "insert": lambda: core.insert(b"k", b"w")}[op]()
    batch, steps, carried = next(gen), [], []
    while True:
        res = t.execute(batch)
        other = b"other-%d" % len(steps)
        run(core.update(other, b"p"), t)        # ends owing the free of its old object
        assert len(core.deferred) == 1
        owed = core.alloc.free_request(core.deferred[0])
        try:
            batch = gen.send(res)
        except StopIteration:
            break
        steps.append([type(r).__name__ for r in batch])
        carried.append(owed in batch)
    assert len(steps) == 3 and all(carried), list(zip(steps, carried))
    assert kv.get(b"k") == (None if op == "delete" else b"w")
    run(core.close(), t)
    report = run(audit(cfg, [core]), LocalTransport(cfg, memory=mem))
    assert report.ok, report.explain()
