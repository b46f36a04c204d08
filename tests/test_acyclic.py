"""fusee.acyclic: a client's long-lived objects off the garbage collector's lists, and only
objects that cannot sit in a reference cycle (emulator/_atomic.c's ``untracked``)."""

from __future__ import annotations

import dataclasses
import gc
import random

from fusee.cache import IndexCache
# the extension every install builds: a missing build fails here, it is not skipped
from fusee.emulator._atomic import untracked
from fusee.replication import SlotTarget


class Slots:
    __slots__ = ("a", "b", "c")


class Plain:
    pass


@dataclasses.dataclass
class Fields:
    a: object = None
    b: object = None


def stays_tracked(obj: object) -> tuple[bool, set[int]]:
    """The rule ``untracked`` keeps, in Python: whether ``obj`` stays on the collector's
    lists, and the ids of the plain tuples it holds that leave them (referents in the order
    the type's traverse visits them, as ``gc.get_referents`` lists them)."""
    gone: set[int] = set()
    if not gc.is_tracked(obj):
        return False, gone

    def tracked(o: object) -> bool:
        return gc.is_tracked(o) and id(o) not in gone

    for r in gc.get_referents(obj):
        if r is type(obj) or not tracked(r):
            continue
        if type(r) is tuple and not any(map(tracked, r)):
            gone.add(id(r))
            continue
        return True, gone
    return False, gone


def _field(rng: random.Random, others: list[object]) -> object:
    """A field value: atomic, a container (tracked or not, holding containers or not), or
    one closing a cycle through an object made before (damaged: untracking it would leak)."""
    k = rng.randrange(14)
    if k == 0:
        return rng.getrandbits(rng.choice((8, 64, 200)))
    if k == 1:
        return rng.randbytes(rng.randrange(20))
    if k == 2:
        return None
    if k == 3:
        return tuple(rng.getrandbits(64) for _ in range(rng.randrange(4)))
    if k == 4:
        return (tuple(range(rng.randrange(3))), rng.random())
    if k == 5:
        return [1, 2]
    if k == 6:
        return {}
    if k == 7:
        return {"x": [1]}
    if k == 8:
        return rng.choice(others) if others else "s"
    if k == 9:
        return (rng.choice(others),) if others else ()
    if k == 10:
        return frozenset({1, 2})
    if k == 11:
        return Slots
    if k == 12:
        return gc.get_referents((1,))      # a list of whatever
    return "text"


def _make(rng: random.Random, others: list[object]) -> object:
    kind = rng.randrange(7)
    if kind == 0:
        o: object = Slots()
        for name in ("a", "b", "c")[:rng.randrange(4)]:
            setattr(o, name, _field(rng, others))
    elif kind == 1:
        o = Plain()
        for i in range(rng.randrange(3)):
            setattr(o, f"f{i}", _field(rng, others))
        if rng.random() < 0.3:
            _ = vars(o)              # a materialized instance dict
    elif kind == 2:
        o = Fields(_field(rng, others), _field(rng, others))
    elif kind == 3:
        o = tuple(_field(rng, others) for _ in range(rng.randrange(4)))
    elif kind == 4:
        o = [_field(rng, others) for _ in range(rng.randrange(3))]
    elif kind == 5:
        o = _field(rng, others)
    else:
        o = SlotTarget(rng.randrange(64), rng.randrange(64), (0, 1, 2), 4096)
        field = _field(rng, others)
        try:
            o.nodes = field
        except TypeError:       # compiled (a class of fusee.index): its fields are typed
            pass
    if rng.random() < 0.2 and isinstance(o, (Slots, Fields)):
        o.a = o                            # a cycle through itself
    return o


def test_untracked_keeps_its_rule_on_random_and_damaged_objects():
    rng = random.Random(12)
    others: list[object] = []
    for _ in range(5000):
        obj = _make(rng, others)
        refs = gc.get_referents(obj)
        stays, gone = stays_tracked(obj)
        expected = {id(r): gc.is_tracked(r) and id(r) not in gone for r in refs}
        assert untracked(obj) is obj
        assert gc.is_tracked(obj) == stays, obj
        assert {id(r): gc.is_tracked(r) for r in refs} == expected, obj
        others.append(obj)
        if len(others) > 50:
            others.pop(rng.randrange(len(others)))


def test_a_clients_cache_entries_and_slot_targets_are_untracked():
    """The objects a client keeps by the ten thousand are off the collector's lists, and a
    cache entry stays so once a SEARCH gives it its requests (``hit_reads``)."""
    cache = IndexCache(capacity=8)
    cache.store(b"k", 1, 2, 3)
    cache.store(b"k", 1, 5, 6)          # (an entry replaced: the new one)
    cache.store(b"j", 1, 2, 3)
    e = cache.get(b"k")
    assert e is not None and not any(map(gc.is_tracked, cache.entries.values()))
    e.hit_reads = (object(), [1, 2], (3, 4))    # type: ignore[assignment]
    gc.collect()
    assert not gc.is_tracked(e) and e.hit_reads[1] == [1, 2]
    t = SlotTarget(1, 2, (0, 1, 2), 4096)
    assert not gc.is_tracked(t) and t.backups == (1, 2)
