"""An exception thrown into a live client's operation at EVERY verb boundary, then the
client's real close path (``fusee.settle.closing``), in the deterministic simulator.

The crash sweep (tests/test_crash_sweep.py) kills the client; here it lives on, as a client
does after Ctrl-C in a ``with`` block: KeyboardInterrupt or GeneratorExit (its driver drops
the operation) is thrown into one of its operations, either after any one of its verbs (the
rest of that batch never runs, the completions of what ran are never seen) or as it posts any
one of its batches. The client then runs its next operation as ``fusee.client.Client`` does
(settled first: ``fusee.settle.settled``), and closes. Three clients on hot keys, r = 3 over
3 MNs, a tiny index and blocks (``LAYOUT``); the victim c0 runs three operations of one kind.
When everyone is done, another client writes every key (a round left open would stall it)
and reads it back. Then:

- the history is linearizable (the interrupted operation's outcome is unknown);
- the leak audit finds every round and split settled, every object named or free;
- the writes after it all succeeded.

``sweep(kind, seeds)`` returns how many interrupts it threw; the normal suite sweeps one
schedule per kind, the soak test 30 more (``SOAK_SEEDS``). ``sweep_settles`` interrupts the
settle itself (a second Ctrl-C) at each of its verbs.
"""

from __future__ import annotations

import random

import pytest

from fusee.emulator.testkit.linearizability import check
from fusee.emulator.testkit.simulator import Call, Simulator, kv_workload, store_calls
from fusee.audit import audit
from fusee.driver import run
from fusee.errors import KeyExists, KeyNotFound
from fusee.operations import ClientCore
from fusee.settle import closing, settled
from fusee.config import KiB, MiB
from storekit import TINY, config
from fusee.transports.local import LocalMemory, LocalTransport

#: one subtable of 6 buckets and 16 KiB blocks (storekit.TINY): splits and memory reuse come
#: early; a directory of 16 entries (the first split rewrites them all, verb by verb)
LAYOUT = {**TINY, "region_size": 2 * MiB, "index_size": 8 * KiB}
HOT = [b"k0", b"k1", b"k2"]
OTHERS = {"get": 3, "insert": 2, "update": 2, "delete": 1, "put": 2}
PATIENCE = 5_000
#: keys that leave the one subtable of TINY (6 buckets) a few inserts short of a split
FILL = 38
#: kind -> c0's three operations (a get after writes carries their deferred frees)
VICTIM = {
    "insert": [("insert", b"k0"), ("insert", b"k1"), ("insert", b"k0")],
    "update": [("update", b"k0"), ("update", b"k1"), ("update", b"k0")],
    "delete": [("delete", b"k0"), ("delete", b"k1"), ("delete", b"k2")],
    "put": [("put", b"k0"), ("put", b"k1"), ("put", b"k0")],
    "mixed": [("update", b"k0"), ("get", b"k1"), ("delete", b"k0")],
    "split": [("insert", b"s0"), ("insert", b"s1"), ("insert", b"s2")],
}


class Settling:
    """c0's store methods as ``fusee.client.Client`` runs them: each operation starts on a
    settled core (recovering the id first, after an operation was cut short)."""

    def __init__(self, core: ClientCore):
        self.core = core

    def _on_settled(self, name: str, *args):
        self.core = yield from settled(self.core, self.core.client_id)
        return (yield from getattr(self.core, name)(*args))

    def search(self, key):
        return self._on_settled("search", key)

    def insert(self, key, value):
        return self._on_settled("insert", key, value)

    def update(self, key, value):
        return self._on_settled("update", key, value)

    def delete(self, key):
        return self._on_settled("delete", key)

    def put(self, key, value):
        return self._on_settled("put", key, value)

    def close(self):
        self.core = yield from closing(self.core, self.core.client_id)


class Scenario:
    """One seeded run; ``interrupts``: (c0's operation, "verb" or "posting", n, the error)
    each."""

    def __init__(self, kind: str, seed: int, interrupts=()):
        self.config = cfg = config(nodes=3, r=3, **LAYOUT)
        self.memory = mem = LocalMemory(cfg)
        preload = [] if kind == "insert" else [("insert", k, b"pre") for k in HOT]
        if kind == "split":
            preload += [("insert", b"f%03d" % i, b"pre") for i in range(FILL)]
        self.sim = Simulator(mem, seed, expected_errors=(KeyExists, KeyNotFound),
                             max_steps=400_000)
        setup = ClientCore(cfg, 3)              # alone, before the others start
        self.sim.add_client("setup", [Call("open", None, None, setup.open),
                                      *store_calls(setup, preload),
                                      Call("close", None, None, setup.close)])
        self.sim.run()
        wrng = random.Random(f"workload {kind} {seed}")
        c0 = [(op, k, None if op in ("get", "delete") else b"c0.%d" % i)
              for i, (op, k) in enumerate(VICTIM[kind])]
        self.ops = {"c0": c0, "c1": kv_workload(wrng, "c1", HOT, 4, OTHERS),
                    "c2": kv_workload(wrng, "c2", HOT, 4, OTHERS)}
        self.cores = [ClientCore(cfg, c, patience=PATIENCE) for c in range(3)]
        self.victim = Settling(self.cores[0])
        for c, core in enumerate(self.cores):
            store = self.victim if c == 0 else core
            self.sim.add_client(f"c{c}", [Call("open", None, None, core.open),
                                          *store_calls(store, self.ops[f"c{c}"]),
                                          Call("close", None, None, store.close)])
        self.interrupts = len(interrupts)
        for op, where, n, error in interrupts:
            self.sim.interrupt_client_at("c0", op, error, **{where: n})

    def run(self):
        """Run to the end, then another client writes and reads every key; returns (history
        report, audit report)."""
        self.sim.run()
        keys = sorted({k for ops in self.ops.values() for _, k, _ in ops})
        after = ClientCore(self.config, 9, patience=PATIENCE)
        self.sim.add_client("after", [
            Call("open", None, None, after.open),
            *store_calls(after, [(op, k, v) for k in keys
                                 for op, v in (("put", b"after"), ("get", None))]),
            Call("close", None, None, after.close)])
        self.sim.run()
        live = [self.victim.core, *self.cores[1:], after]
        report = run(audit(self.config, live), LocalTransport(self.config, memory=self.memory))
        return check(self.sim.history), report


def checked(s: Scenario, at: str) -> bool:
    """Run ``s`` and check it; returns False if the schedule never reached an interrupt."""
    history, report = s.run()
    if sum("thrown into" in what for _, what in s.sim.faults) < s.interrupts:
        return False
    assert history.ok, f"{at}:\n{history.explain()}"
    assert report.ok, f"{at}:\n{report.explain()}"
    after = [o for o in s.sim.clients["after"].ops if o.kind == "put"]
    assert all(o.status == "ok" for o in after), at
    return True


def interrupt_points(kind: str, seed: int) -> list[tuple[int, str, int]]:
    """Every boundary of c0's three store operations in the clean run: after each of its
    verbs, and as it posts each of its batches."""
    clean = Scenario(kind, seed)
    assert checked(clean, f"clean {kind} seed {seed}")
    if kind == "split" and not clean.cores[0].counters["splits"]:
        return []                       # another client split first: not this scenario
    ops = clean.sim.clients["c0"].ops
    return [(i, where, n) for i in (1, 2, 3)
            for where, count in (("verb", ops[i].verbs), ("posting", ops[i].round_trips - 1))
            for n in range(where == "verb", count + 1)]


def sweep(kind: str, seeds) -> int:
    """Interrupt at every point of every seed (KeyboardInterrupt on even seeds,
    GeneratorExit on odd ones); returns how many interrupts were thrown."""
    thrown = 0
    for seed in seeds:
        error = KeyboardInterrupt if seed % 2 == 0 else GeneratorExit
        for op, where, n in interrupt_points(kind, seed):
            thrown += checked(Scenario(kind, seed, [(op, where, n, error())]),
                              f"{kind} seed {seed}: {error.__name__} at {where} {n} of "
                              f"c0's op {op}")
    return thrown


def sweep_settles(kind: str, seed: int) -> int:
    """Interrupt c0's first operation half way through its verbs, then its second (which
    settles the first before it starts) after each of its verbs: the settle cut short is
    run again by the next call, as the same recovery owner. Returns the interrupts thrown."""
    clean = Scenario(kind, seed)
    assert checked(clean, f"clean {kind} seed {seed}")
    first = (1, "verb", clean.sim.clients["c0"].ops[1].verbs // 2, KeyboardInterrupt())
    once = Scenario(kind, seed, [first])
    assert checked(once, f"{kind} seed {seed}: the first interrupt")
    thrown = 0
    for k in range(1, once.sim.clients["c0"].ops[2].verbs + 1):
        first = (*first[:3], KeyboardInterrupt())
        thrown += checked(Scenario(kind, seed, [first, (2, "verb", k, KeyboardInterrupt())]),
                          f"{kind} seed {seed}: the settle cut short after verb {k}")
    return thrown


#: the soak test's schedules per kind (the normal suite sweeps schedule 0 of each)
SOAK_SEEDS = range(1, 31)


@pytest.mark.parametrize("kind, seeds", [
    *(pytest.param(kind, range(1), id=kind) for kind in VICTIM),
    *(pytest.param(kind, SOAK_SEEDS, id=f"{kind}-soak",
                   marks=(pytest.mark.soak, pytest.mark.timeout(4 * 3600))) for kind in VICTIM)])
def test_interrupt_at_every_verb_boundary(kind, seeds):
    assert sweep(kind, seeds) >= 20 * len(seeds)


@pytest.mark.parametrize("kind", [
    "insert", *(pytest.param(kind, marks=pytest.mark.soak) for kind in VICTIM if kind != "insert")])
def test_an_interrupted_settle_is_run_again(kind):
    assert sweep_settles(kind, 0) >= 20
