"""A dead memory node rebuilt (``fusee.rebuild``), in the deterministic simulator.

r = 3 on 3 MNs: MN ``v`` crashes at a random step and is failed over; at a random later step
it restarts empty and is rebuilt while the writers are paused between two of their verbs;
then, at a random step after that, BOTH other MNs crash at once and are failed over: from
then on ``v`` holds the only copy of everything, so every acknowledged write must be readable
from it. Some runs crash a client at a random step too (recovered as the master would).
After each run: the history is linearizable with the final gets of every key in it (no
acknowledged write lost), the leak audit passes under the final membership, and so does the
index check. Plus: an MN dying in the middle of a rebuild makes it fail, and it succeeds
after that MN's failover; a rebuild of a live MN is refused.
"""

from __future__ import annotations

import pytest
from test_failover import Run, _config
from test_failover import _check as check_run

from fusee.emulator.testkit.index_check import check_index
from fusee.driver import run
from fusee.failover import failover
from fusee.membership import Membership
from fusee.verbs import AllocBlock
from fusee.operations import ClientCore
from fusee.rebuild import RebuildError, rebuild
from fusee.verbs import NodeTimeout
from fusee.transports.local import LocalMemory, LocalTransport


class RebuildRun(Run):
    """``Run`` with these faults: see the module docstring."""

    epochs = 3          # MN v's failover, its rebuild, the other two's failover

    def schedule_faults(self, nodes, steps, victims, delay, crash_client):
        sim, faults = self.sim, self.sim.fault_rng
        self.rebuilt = v = faults.randrange(nodes)
        self.others = [m for m in range(nodes) if m != v]
        crash_at = faults.randrange(steps // 3)
        failover_at = crash_at + faults.randrange(1, delay)
        rebuild_at = failover_at + faults.randrange(1, steps // 3)
        self.second = rebuild_at + faults.randrange(1, steps // 2)
        sim.at_step(crash_at, lambda s: s.crash_node(v))
        sim.at_step(failover_at, lambda s: s.fail_over(v))
        sim.at_step(rebuild_at, lambda s: s.rebuild(v))
        for m in self.others:
            sim.at_step(self.second, lambda s, m=m: s.crash_node(m))
        sim.at_step(self.second + faults.randrange(1, delay),
                    lambda s: s.fail_over(self.others))
        self.victims = self.others      # what ``go`` fails over if the run ends first
        if crash_client:
            sim.at_step(faults.randrange(steps), lambda s: self._crash(s, "c0"))

    def go(self):
        """The faults the run ended before, in their order; then ``Run.go``'s checks."""
        sim, v = self.sim, self.rebuilt
        sim.run()
        if sim.membership.epoch == 0:
            if v not in self.memory.crashed:
                sim.crash_node(v)
            sim.fail_over(v)
        if sim.membership.epoch == 1:
            sim.rebuild(v)
        if sim.membership.epoch == 2:
            for m in set(self.others) - self.memory.crashed:
                sim.crash_node(m)
            sim.fail_over(self.others)
        sim.run = lambda: sim.history           # (run already)
        return super().go()


def _check(seed: int, cls=None, **kw) -> RebuildRun:
    r = check_run(seed, cls or RebuildRun, **kw)
    problems = run(check_index(r.config, r.sim.membership),
                   LocalTransport(r.config, memory=r.memory))
    assert not problems, f"seed {seed} {kw}: faults {r.sim.faults}\n{problems}"
    return r


@pytest.mark.parametrize("seed", range(12))
def test_a_rebuilt_mn_alone_serves_every_acknowledged_write(seed):
    _check(seed)


@pytest.mark.parametrize("seed", range(8))
def test_a_rebuild_with_a_client_crash(seed):
    _check(seed, crash_client=seed % 2 == 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3,
                                  18,       # the first subtable's header is zero: copied too
                                  23])      # frees lost with the old bitmap: stranded
def test_a_rebuild_while_the_index_splits(seed):
    r = _check(seed, splits=True, crash_client=seed % 2 == 1)
    assert len({e & 0xFFFFFFFF for e in r.reader.dir.entries}) > 1     # it did split


def _loaded(keys: int = 40):
    """A 3-MN cluster with ``keys`` keys whose MN 0 crashed and was failed over, then
    restarted empty: (config, memory, membership, client)."""
    cfg = _config()
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a = ClientCore(cfg, 0)
    run(a.open(), t)
    for i in range(keys):
        run(a.insert(b"k%d" % i, b"v%d" % i * 50), t)
    mem.crash(0)
    m = run(failover(cfg, Membership(), 0), t)
    a.place(m)
    run(a.update(b"k1", b"while MN 0 was dead"), t)
    mem.restart(0)
    return cfg, mem, m, a


def test_an_mn_dying_mid_rebuild_fails_it_and_it_succeeds_after_that_failover():
    cfg, mem, m, _ = _loaded()
    t = LocalTransport(cfg, memory=mem)
    gen = rebuild(cfg, m, 0)
    batch = next(gen)
    for _ in range(3):              # a few round trips in, MN 2 dies
        batch = gen.send(t.execute(batch))
    mem.crash(2)
    with pytest.raises(NodeTimeout):
        gen.send(t.execute(batch))
    m2 = run(failover(cfg, m, 2), t)
    m3 = run(rebuild(cfg, m2, 0), LocalTransport(cfg, memory=mem))
    assert m3.dead == {2} and m3.epoch == 3
    mem.crash(1)                    # MN 0 alone now
    m4 = run(failover(cfg, m3, 1), LocalTransport(cfg, memory=mem))
    b = ClientCore(cfg, 5, membership=m4)
    t = LocalTransport(cfg, memory=mem)
    run(b.open(), t)
    assert run(b.search(b"k1"), t) == b"while MN 0 was dead"
    assert all(run(b.search(b"k%d" % i), t) == b"v%d" % i * 50 for i in range(2, 40))


def test_only_a_dead_mn_is_rebuilt():
    cfg = _config()
    with pytest.raises(RebuildError, match="not dead"):
        run(rebuild(cfg, Membership(), 1), LocalTransport(cfg))


@pytest.mark.parametrize("saw_it_dead", [True, False])
def test_blocks_of_a_failed_growth_on_an_mn_that_died_and_was_rebuilt_are_not_given_back(
        saw_it_dead):
    """A growth that fails half way keeps the blocks it got to give back later (orphans).
    One on an MN that died went with its region unless its group header reached a live copy
    (the rebuild copies it then): the rebuilt MN refuses it as not ours, and the client
    forgets it instead of failing, whether it saw the MN dead or only rebuilt."""
    cfg = _config()
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    a = ClientCore(cfg, 0)
    run(a.open(), t)
    grow = a.alloc.grow()
    batch = next(grow)                          # the block tables are read first
    while not any(isinstance(v, AllocBlock) for v in batch):
        batch = grow.send(t.execute(batch))
    (first,) = batch                            # the group's first block...
    got = t.execute([first])
    mem.crash(first.node)                       # ...whose MN dies before the others answer
    grow.send(got)
    with pytest.raises(NodeTimeout):
        grow.throw(NodeTimeout(f"MN {first.node} did not answer", first.node))
    assert [n for n, _ in a.alloc.orphans] == [first.node]
    m1 = run(failover(cfg, Membership(), first.node), t)
    if saw_it_dead:
        a.place(m1)
    mem.restart(first.node)
    t = LocalTransport(cfg, memory=mem)
    a.place(run(rebuild(cfg, m1, first.node), t))
    run(a.alloc.grow(), t)
    run(a.insert(b"after", b"the rebuild"), t)
    assert run(a.search(b"after"), t) == b"the rebuild"


@pytest.mark.parametrize("seed,nodes", [(102, 3),   # an insert, after a NodeTimeout
                                        (110, 3),   # the same after an EpochChanged
                                        (111, 4)])  # an update reading its round's fate
def test_an_operation_settling_one_epoch_rides_out_the_next(seed, nodes):
    """Rebuild cycles with r=2 (``test_rebuild_soak``): an MN crashes just after a rebuild
    published, while an operation settles the round it had open at the end of the epoch
    before: an insert taking back its claim on a group left with one replica, an update
    reading its round's fate. It used to fail with that NodeTimeout / EpochChanged instead of
    handling the next epoch too."""
    from test_rebuild_soak import CycleRun
    _check(seed, cls=CycleRun, nodes=nodes, r=2, crash_client=seed % 3 == 0)


@pytest.mark.parametrize("seed,nodes", [(108, 3), (100, 4), (103, 4)])
def test_a_claim_taken_back_after_a_rebuild_leaves_no_copy_on_the_rebuilt_mn(seed, nodes):
    """Rebuild cycles with r=2: an insert claims a slot of a group left with one replica, a
    rebuild copies the claim onto the MN it rebuilds, the insert's epoch ends and it takes
    the claim back. It used to do so on the replica it had claimed on only: the rebuilt copy
    named the object after its memory was reused, and a later insert of a key with that
    fingerprint stalled on it (Stalled)."""
    from test_rebuild_soak import CycleRun
    _check(seed, cls=CycleRun, nodes=nodes, r=2, crash_client=seed % 3 == 0)


def test_a_failed_growth_gives_back_the_header_copy_a_rebuild_made():
    """Rebuild cycles on 3 MNs, r=2, seed 133: a client grows while MN 0 is dead (so on MN 2
    alone), MN 0's rebuild copies the new group, then the growth's batch fails. The client
    gave its block back on MN 2 only; the one on MN 0 stayed with it, outside any group
    (the audit's 'unsettled')."""
    from test_rebuild_soak import CycleRun
    _check(133, cls=CycleRun, nodes=3, r=2)
