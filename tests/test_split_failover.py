"""Splits that never stop, memory-node failover and client crashes together, in the
deterministic simulator.

The layout has one subtable of 6 buckets (42 slots), so the clients' fresh inserts split the
index over and over while the rest of their operations (60%) hit a few hot keys. MNs die at
a random verb and are failed over at a random later step (``fusee.failover``); some runs also
crash a client at a random step and recover it while the others go on (``test_failover.Run``
does that, the final gets and the audit). After each run:

- the history is linearizable, the final gets of every key included: no acknowledged write
  was lost;
- the leak audit accounts for every object, every round and split is settled;
- the index is consistent (``emulator.index_check``): every directory entry names a live
  subtable whose headers agree with it, no key is in two slots, no object is named twice.
"""

from __future__ import annotations

import random

import pytest

from emulator.index_check import check_index
from emulator.simulator import Call, Simulator, kv_workload, store_calls
from fusee.config import KiB, LayoutConfig
from fusee.driver import run
from fusee.operations import ClientCore
from test_failover import ERRORS, PATIENCE, Run, _check, _config
from transports.local import LocalTransport, LocalMemory

#: one subtable of 6 buckets: every few dozen inserts split a subtable
ENDLESS = LayoutConfig(region_size=4096 * KiB, block_size=64 * KiB, max_clients=16,
                       client_meta_size=4 * KiB, index_size=256 * KiB, initial_subtables=1,
                       buckets_per_subtable=6)
HOT = [b"hot%d" % i for i in range(4)]
MIX = {"get": 3, "insert": 1, "update": 3, "delete": 1, "put": 2}


class EndlessSplits(Run):
    """A ``Run`` whose clients split the index all along: each operation is a fresh insert
    (40%) or an operation on the hot keys (60%)."""

    def __init__(self, seed: int, nodes: int = 3, r: int = 3, clients: int = 4, ops: int = 80,
                 crash_client: bool = False, steps: int | None = None, victims: int = 1,
                 delay: int = 400):
        self.config = cfg = _config(nodes, r, ENDLESS)
        self.memory = mem = LocalMemory(cfg)
        self.sim = sim = Simulator(mem, seed, expected_errors=ERRORS, max_steps=2_000_000)
        rng = random.Random(f"workload {seed}")
        self.cores = [ClientCore(cfg, c, patience=PATIENCE) for c in range(clients)]
        self.keys = list(HOT)
        for c, core in enumerate(self.cores):
            work = []
            for kind, key, value in kv_workload(rng, f"c{c}", HOT, ops, MIX):
                if rng.random() < 0.4:
                    key = b"c%d-%d" % (c, len(work))
                    kind, value = "insert", key
                    self.keys.append(key)
                work.append((kind, key, value))
            calls = [Call("open", None, None, core.open)] + list(store_calls(core, work))
            calls.append(Call("close", None, None, core.close))
            sim.add_client(f"c{c}", calls)
        self.crashed = None
        self.recovery = None
        if steps is not None:
            self.schedule_faults(nodes, steps, victims, delay, crash_client)

    def subtables(self) -> int:
        """How many subtables the directory names now."""
        return len({e & 0xFFFFFFFF for e in self.reader.dir.entries})


def _endless(seed: int, **kw) -> EndlessSplits:
    r = _check(seed, cls=EndlessSplits, **kw)
    transport = LocalTransport(r.config, memory=r.memory)
    problems = run(check_index(r.config, r.sim.membership), transport)
    assert not problems, f"seed {seed} {kw}: faults {r.sim.faults}\n" + "\n".join(problems)
    assert r.subtables() >= 4, "the index hardly split"
    return r


@pytest.mark.parametrize("seed", range(12))
def test_an_mn_dies_while_the_index_splits_all_along(seed):
    _endless(seed, crash_client=seed % 2 == 1)


@pytest.mark.parametrize("seed", range(4))
def test_two_mns_of_five_die_while_the_index_splits_all_along(seed):
    _endless(seed, nodes=5, victims=2, crash_client=seed % 2 == 0)


@pytest.mark.soak
@pytest.mark.parametrize("shape", [dict(), dict(crash_client=True), dict(nodes=4, r=2),
                                   dict(nodes=5, victims=2, crash_client=True)],
                         ids=["mn", "mn+client", "4mn-r2", "2of5+client"])
def test_endless_splits_soak(shape):
    for seed in range(100, 300):
        _endless(seed, **shape)
