"""The simulator catches a free delivered to a bit already set the moment it happens
(``fusee.emulator.testkit.free_bits``): the FAA would carry into the next object's bit, a
live object that then reads as freed. Before the check, a run went on and the audit found
the damage (if at all) at the end, with no trace of who freed twice."""

from __future__ import annotations

import logging

import pytest

from fusee.emulator.testkit.simulator import Call, Simulator, store_calls
from fusee.driver import run
from fusee.failover import failover
from fusee.layout import BLOCK_HEADER, slot_node
from fusee.membership import Membership
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import Faa, NodeTimeout, Read

from test_failover import _config
from test_insert_epoch_end import _rebuilt


def _published(cfg, memory):
    """A client that inserted a key; returns it and the key's slot value (its object)."""
    core = ClientCore(cfg, 0)
    t = LocalTransport(cfg, memory=memory)
    run(core.open(), t)
    run(core.insert(b"k", b"v"), t)
    entry = core.cache.get(b"k")
    assert entry is not None
    return core, entry.value


def _free(core: ClientCore, value: int):
    """Generator: one round trip that frees ``value``'s object."""
    yield [core.alloc.free_request(value)]


def test_a_free_of_an_object_already_freed_stops_the_run_at_that_verb():
    cfg = _config(nodes=3, r=2)
    memory = LocalMemory(cfg)
    core, value = _published(cfg, memory)
    sim = Simulator(memory, 0)
    sim.add_client("c0", [Call("free", None, None, lambda: _free(core, value)),
                          Call("free", None, None, lambda: _free(core, value))])
    with pytest.raises(AssertionError, match=r"c0 in .*free.*a free of a freed object"):
        sim.run()


def test_frees_of_distinct_objects_and_reclaims_pass():
    """Frees of two objects, the owner's reclaim (an FAA of minus the bits), a free again
    after the reuse: nothing met a set bit."""
    cfg = _config(nodes=3, r=2)
    memory = LocalMemory(cfg)
    core, first = _published(cfg, memory)
    t = LocalTransport(cfg, memory=memory)
    run(core.update(b"k", b"w"), t)             # frees the first object with the next batch
    sim = Simulator(memory, 0)
    sim.add_client("c0", list(store_calls(core, [("update", b"k", b"x"),
                                                   ("update", b"k", b"y")]))
                   + [Call("reclaim", None, None, core.alloc.reclaim)]
                   + list(store_calls(core, [("update", b"k", b"z")])))
    sim.run()
    assert core.alloc.stats["reclaimed"] >= 2, core.alloc.stats


def test_only_single_bits_below_the_top_of_a_bitmap_word_are_frees():
    """A reclaim of bit 63 alone is an FAA of 1 << 63 (minus it, modulo 2**64): the same verb
    as a free of that bit, so it is not checked; nor is any FAA outside the bitmaps."""
    cfg = _config(nodes=3, r=2)
    memory = LocalMemory(cfg)
    bits = Simulator(memory, 0).free_bits
    word = memory.map.data + BLOCK_HEADER + 8
    assert bits.is_free(Faa(0, word, 1 << 5))
    assert not bits.is_free(Faa(0, word, 1 << 63))
    assert not bits.is_free(Faa(0, word, 3))
    assert not bits.is_free(Faa(0, word, -(1 << 5) & (2**64 - 1)))
    assert not bits.is_free(Faa(0, memory.map.data, 1))                     # a block header
    assert not bits.is_free(Faa(0, memory.map.data - 4096, 1))              # metadata


def test_a_clients_free_that_finds_its_bit_set_takes_its_add_back(caplog):
    """B updates A's key and owes the free of A's object (deferred to B's next batch);
    someone frees that object first (as a recovery that took B's write for its crashed
    client's did, seed 40). B's free finds the bit set: its add carried into the next
    object's bit. B takes it back with the next round trip and logs it: the word ends as
    the first free left it (on cfccaa5 the next bit stays set: that object reads as
    freed)."""
    cfg = _config(nodes=3, r=2)
    memory = LocalMemory(cfg)
    a, old = _published(cfg, memory)
    t = LocalTransport(cfg, memory=memory)
    b = ClientCore(cfg, 1)
    run(b.open(), t)
    run(b.update(b"k", b"B's"), t)              # the free of ``old`` rides B's next batch
    free = b.alloc.free_request(old)
    t.execute([free])                           # freed first, by another hand

    def word() -> int:
        (raw,) = t.execute([Read(free.node, free.addr, 8)])
        return int.from_bytes(raw, "little")
    once = word()
    assert once & free.delta
    with caplog.at_level(logging.ERROR, logger="fusee.owed_round_trip"):
        assert run(b.search(b"k"), t) == b"B's"
    assert word() == once, (hex(word()), hex(once))
    assert "a free of an object freed already" in caplog.text


def test_an_unsure_free_is_not_sent_again_to_a_home_rebuilt_since():
    """Seed 714 of the settling-crash sweep (5 MNs r = 2), found by the simulator's check:
    the free B owes goes to the object's home Y (its first MN X dead) and lands, but its
    reply is lost: an unsure free. X is rebuilt from Y (the bitmap with the bit copied) and
    is the home again; then Y dies. A dead MN's bitmap died with it, so B sent the free to
    the next home, X, whose copy had the bit already: it carried into the next object's
    bit. Now an unsure free goes to a new home only if that home was not rebuilt since the
    free went out; else it stays unsure, for recovery to tell from the bit."""
    cfg = _config(nodes=3, r=2)
    memory = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=memory)
    a, value = _published(cfg, memory)
    b = ClientCore(cfg, 1)
    run(b.open(), t)
    run(b.update(b"k", b"B's"), t)              # B owes the free of A's object
    first, second = b.alloc.copies_of[slot_node(value)]
    memory.crash(first)
    m = run(failover(cfg, Membership(), first), t)
    b.place(m)
    rt = b.rt([])
    batch = next(rt)
    free = b.alloc.free_request(value)
    assert batch == [free] and free.node == second
    results = t.execute(batch)                  # it lands; the reply is lost
    with pytest.raises(NodeTimeout):
        rt.throw(NodeTimeout(f"MN {second} did not answer", second,
                             [NodeTimeout("lost", second)] * len(results)))
    t, m = _rebuilt(cfg, memory, m, first)      # the bitmap copied, bit and all
    memory.crash(second)
    m = run(failover(cfg, m, second), t)
    b.place(m)
    home = b.alloc.free_request(value)
    assert home.node == first

    def word() -> int:
        (raw,) = t.execute([Read(home.node, home.addr, 8)])
        return int.from_bytes(raw, "little")
    once = word()
    assert once & home.delta
    assert run(b.search(b"k"), t) == b"B's"
    assert word() == once and not b.settled, (hex(word()), hex(once))
