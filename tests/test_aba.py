"""Reused memory (ABA): a slot value names an object by address, and the largest size class
brings freed objects back at the same address, so the same slot value names a new object of
the same key (``fusee.reuse``). Each test here drives clients step by step into one such
reuse and checks the operation that met it."""

from __future__ import annotations

from fusee.config import KiB
from fusee.driver import run
from fusee.hashing import key_hash
from fusee.index import View
from fusee.layout import CLASSES, LOG_BYTES, OBJ_HEADER, decode_object, slot_addr, slot_node
from fusee.operations import ClientCore
from fusee.verbs import Cas
from storekit import config
from fusee.transports.local import LocalMemory, LocalTransport

#: 64 KiB blocks: three objects of the largest class each, so freed ones come back soon
LAYOUT = dict(region_size=2048 * KiB, block_size=64 * KiB, max_clients=16,
              index_size=64 * KiB, initial_subtables=1, buckets_per_subtable=6)
KEY = b"k0"


def big(tag: str, units: int = CLASSES[-1], unit: int = 64) -> bytes:
    """A value that fills an object of ``units`` allocation units (the largest by default)."""
    return tag.encode().ljust(units * unit - OBJ_HEADER - LOG_BYTES - len(KEY), b".")


def cluster(r: int, n: int = 3):
    cfg = config(3, r, **LAYOUT)
    mem = LocalMemory(cfg)
    tr = LocalTransport(cfg, memory=mem)
    cores = [ClientCore(cfg, c, patience=200) for c in range(n)]
    for core in cores:
        run(core.open(), tr)
    return cfg, tr, cores


class Stepper:
    """Drives one operation generator a round trip at a time."""

    def __init__(self, gen, tr):
        self.gen, self.tr = gen, tr
        self.batch = gen.send(None)
        self.result = self.error = None
        self.done = False

    def step(self) -> None:
        assert not self.done
        try:
            self.batch = self.gen.send(self.tr.execute(self.batch))
        except StopIteration as stop:
            self.done, self.result = True, stop.value
        except Exception as e:      # the operation's outcome
            self.done, self.error = True, e

    def until(self, cond, limit: int = 1000) -> None:
        """Step until ``cond()`` holds before the next batch goes out."""
        for _ in range(limit):
            if cond():
                return
            self.step()
        raise AssertionError("the operation never got there")

    def finish(self, limit: int = 100_000):
        self.until(lambda: self.done, limit)
        if self.error is not None:
            raise self.error
        return self.result


def primary_value(core: ClientCore, tr) -> int:
    """The value of KEY's committed slot."""
    h = key_hash(KEY)
    sid, _ = core.dir.lookup(h)
    reads, firsts = core.dir.bucket_reads(sid, h, core.dir.nodes(sid)[0])
    ((_, v),) = View(tr.execute(reads), firsts, sid).candidates(h.fp)
    return v


def object_at(core: ClientCore, tr, v: int):
    """The object slot value ``v`` names, decoded (None: it does not decode)."""
    return decode_object(tr.execute([core.object_read(v)])[0])


class Putter:
    """A client putting KEY again and again, a round trip at a time."""

    def __init__(self, core: ClientCore, tr):
        self.core, self.tr = core, tr
        self.puts, self.op = 0, None

    def until(self, cond, limit: int = 10_000) -> None:
        for _ in range(limit):
            if cond():
                return
            if self.op is None or self.op.done:
                self.puts += 1
                self.op = Stepper(self.core.put(KEY, big(f"put.{self.puts}")), self.tr)
            else:
                self.op.step()
        raise AssertionError("the putter never got there")


def test_a_loser_sees_its_round_end_when_the_old_value_comes_back():
    """A loser waits for the primary to leave the round's old value v0. The winner replaces
    it and frees v0's object; its owner writes KEY into that memory again, so the primary
    holds v0 again (at once on 950c900, 256 allocations later with the generation), and
    keeps it once every writer is done. Polling the primary alone, the loser waited for a
    change that had already come and gone, until Stalled."""
    _, tr, (owner, winner, loser) = cluster(r=3)
    run(owner.insert(KEY, big("owner.0")), tr)
    v0 = primary_value(owner, tr)
    w = Stepper(winner.update(KEY, big("winner")), tr)
    w.until(lambda: any(type(q) is Cas for q in w.batch))
    w.step()                                        # the winner's proposals are on the backups
    lose = Stepper(loser.update(KEY, big("loser")), tr)
    lose.until(lambda: loser.counters["lost"] == 1)  # lost; its first poll is yet to go out
    assert w.finish() is None
    run(winner.search(KEY), tr)                     # delivers the free of v0's object
    for i in range(1, 2000):    # the owner reuses that memory for KEY, 256 allocations on
        run(owner.put(KEY, big(f"owner.{i}")), tr)      # (the slot value's generation)
        if primary_value(owner, tr) == v0:
            break
    else:
        raise AssertionError("the owner never reused v0's memory: the premise is gone")
    assert lose.finish() is None                    # overwritten by the winner
    assert run(owner.search(KEY), tr) == big(f"owner.{i}")


def test_a_reader_meeting_reused_memory_twice_looks_again():
    """A SEARCH reads KEY's slot (v0), and before it reads the object, the putter has
    replaced it and taken v0's memory back (its used byte cleared: it does not decode). The
    reader looks again, and the slot holds v0 again: the putter wrote KEY into the same
    memory. Its object read meets that memory being reused once more. Not corruption: the
    reader must look again, not raise CorruptObject."""
    _, tr, (owner, reader) = cluster(r=3, n=2)
    run(owner.insert(KEY, big("put.0")), tr)
    v0 = primary_value(owner, tr)
    putter = Putter(owner, tr)
    search = Stepper(reader.search(KEY), tr)
    for _ in range(2):
        putter.until(lambda: primary_value(owner, tr) == v0)
        search.step()                               # the buckets: v0; the object read is next
        putter.until(lambda: object_at(owner, tr, v0) is None)
        search.step()                               # meets v0's memory being reused
    value = search.finish()
    assert value in {big(f"put.{i}") for i in range(putter.puts + 1)}


def test_an_object_in_reused_memory_gets_a_new_slot_value():
    """The owner's puts of KEY come back to the same memory every few allocations; each
    object there gets another slot value (its generation), so no slot returns to an old value
    that a SNAPSHOT round, a reader or a duplicate check may still hold. On 950c900 the same
    value came back: a writer whose backup CASes straddled the reuse had them land in two
    rounds with the same old value, saw each round in part, and the round wedged."""
    _, tr, (owner,) = cluster(r=3, n=1)
    run(owner.insert(KEY, big("put.0")), tr)
    seen: dict[tuple[int, int], int] = {}       # address -> the last slot value naming it
    for i in range(1, 20):
        run(owner.put(KEY, big(f"put.{i}")), tr)
        v = primary_value(owner, tr)
        addr = (slot_node(v), slot_addr(v, 64))
        assert seen.get(addr) != v, f"put {i} reused {addr} under the same slot value"
        seen[addr] = v
    assert len(seen) < 19, "the memory was never reused: the premise is gone"
