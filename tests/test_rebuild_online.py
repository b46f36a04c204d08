"""The rebuild's online copy (``fusee.rebuild``, phase A) interleaved verb by verb with
clients that come and go, in the deterministic simulator.

r = 3 on 3 MNs. MN ``v`` is dead (failed over) from the start. A loader writes a few keys
and closes (its id CLEAN: its groups are the ones the online copy takes); processes then
open short-lived clients one after the other on drawn ids (a CLEAN id is taken over with its
blocks, ``fusee.holdings.adopt``), each doing a few operations before it closes. At a random
step ``v`` restarts empty and its rebuild starts: its online copy runs as one more actor
among the clients, so ids are claimed, written, closed and recovered while it reads; then
the pause and the rest. After it published, both other MNs crash at once and are failed
over: from then on ``v`` holds the only copy, so a group the online copy took as unchanged
but was written meanwhile shows up as a lost acknowledged write. Some runs crash a client
at a random verb (its id recovered by an actor, as another client or the master would).

The checks: clients completed operations while the online copy ran; the history with a
reader's final get of every key is linearizable; the leak audit (every id left in use
recovered first) and the index check pass under the final membership.
"""

from __future__ import annotations

import random

import pytest
from fusee.emulator.testkit.history import PENDING
from fusee.emulator.testkit.index_check import check_index
from fusee.emulator.testkit.linearizability import check
from fusee.emulator.testkit.lost_frees import lost_frees
from fusee.emulator.testkit.simulator import Call, Simulator, kv_workload, store_calls
from fusee.transports.local import LocalMemory, LocalTransport
from test_failover import ERRORS, MIX, _config, across_epochs

from fusee.audit import audit
from fusee.client_ids import client_states, open_client
from fusee.driver import run
from fusee.failover import failover
from fusee.layout import BLOCK_MARK, CLEAN, META_INCARNATION
from fusee.membership import Membership
from fusee.rebuild import Rebuild
from fusee.recovery import recover_client
from fusee.verbs import Read, Write

KEYS = [b"k%d" % i for i in range(6)]


class SessionRebuild:
    """One seeded run: see the module docstring."""

    def __init__(self, seed: int, processes: int = 3, sessions: int = 5,
                 crash_client: bool = False, ops: tuple[int, int] = (1, 4),
                 rebuild_at: tuple[int, int] = (20, 400), spare: bool = False):
        self.config = cfg = _config()
        self.spare = spare          # clients hear of the rebuild (``Allocator.follow``)
        self.memory = mem = LocalMemory(cfg)
        self.sim = sim = Simulator(mem, seed, expected_errors=ERRORS, max_steps=400_000)
        faults = sim.fault_rng
        self.v = v = faults.randrange(3)
        self.others = [m for m in range(3) if m != v]
        mem.crash(v)
        sim.membership = run(failover(cfg, Membership(), v), LocalTransport(cfg, memory=mem))
        rng = random.Random(f"workload {seed}")
        self.opened: list = []                  # (process, core) in opening order
        self.closed: set = set()
        loader = [("put", k, b"loaded %d" % i) for i, k in enumerate(KEYS)]
        sim.add_client("loader", self._session("loader", loader))
        for p in range(processes):
            work = [kv_workload(rng, f"p{p}.{i}", KEYS, rng.randrange(*ops), MIX)
                    for i in range(sessions)]
            sim.add_client(f"p{p}", self._process(f"p{p}", work))
        self.during: list[int] = []             # ops completed at the rebuild's start, end
        sim.at_step(faults.randrange(*rebuild_at), self._rebuild)
        if crash_client:
            name = f"p{faults.randrange(processes)}"
            sim.crash_client_at(name, faults.randrange(sessions * 3), faults.randrange(1, 30),
                                then=lambda s: self._recover(s, name))

    # -- the clients ----------------------------------------------------------------------
    def _process(self, name: str, work):
        """The calls of process ``name``: one short-lived client for each list of ops."""
        for ops in work:
            yield from self._session(name, ops)

    def _session(self, name: str, ops):
        """The calls of one short-lived client of process ``name``: open, ``ops``, close."""
        box: list = []

        def opening():
            core = yield from self._draw()
            if self.spare:
                core.alloc.news = lambda: self.sim.rebuilding
            box.append(core)
            self.opened.append((name, core))
            return core.client_id
        yield Call("open", None, None, opening)
        core = box[0]
        yield from store_calls(core, ops)

        def closing():
            yield from core.close()
            self.closed.add(core)
        yield Call("close", None, None, closing)

    def _draw(self):
        """Generator: a client on a drawn id, under the membership of the moment; a draw
        that an epoch's end interrupts (before anything is claimed) is drawn again."""
        return across_epochs(self.sim, lambda m: open_client(self.config, membership=m,
                                                             patience=5_000))

    def _recover(self, sim: Simulator, name: str) -> None:
        """Recover the id ``name`` held (if its crash left one claimed), as the master
        would: again after each epoch's end that interrupts it."""
        if sim.clients[name].op.kind == "open":
            return                  # (a claim made but not known: the final sweep has it)
        cid = [core for who, core in self.opened if who == name][-1].client_id
        sim.add_client(f"recover {name}", [Call("recover", None, None, lambda: across_epochs(
            sim, lambda m: recover_client(self.config, cid, clock=lambda: 0.0,
                                          membership=m)))])

    # -- the faults -----------------------------------------------------------------------
    def _done_ops(self) -> int:
        return sum(op.status != PENDING for op in self.sim.history.ops)

    def _rebuild(self, sim: Simulator) -> None:
        self.during = [self._done_ops()]
        sim.rebuild(self.v, then=self._rebuilt)

    def _rebuilt(self, sim: Simulator) -> None:
        assert self.v not in sim.membership.dead, sim.rebuilds    # no other MN died
        self.during.append(self._done_ops())
        at = sim.step + sim.fault_rng.randrange(1, 300)
        for m in self.others:
            sim.at_step(at, lambda s, m=m: s.crash_node(m))
        sim.at_step(at + sim.fault_rng.randrange(1, 100), lambda s: s.fail_over(self.others))

    def go(self):
        """Run; the faults the run ended before; recover what is left in use; read every
        key; returns (linearizability, audit report, index problems)."""
        sim, cfg = self.sim, self.config
        sim.run()
        sim.cancel_timers()
        if self.v in sim.membership.dead:
            self._rebuild(sim)
            sim.run()
        for m in set(self.others) - self.memory.crashed:
            sim.crash_node(m)
        if set(self.others) - sim.membership.dead:
            sim.fail_over(self.others)
        m = sim.membership
        assert m.dead == set(self.others), sim.faults
        t = LocalTransport(cfg, memory=self.memory)
        ids = list(range(cfg.layout.max_clients))
        for cid, (word, _) in zip(ids, run(client_states(cfg, m, ids), t)):
            if word != CLEAN:
                run(recover_client(cfg, cid, membership=m), t)
        reader = run(open_client(cfg, membership=m), t)
        final = Simulator(self.memory, 0, expected_errors=ERRORS)
        final.history = sim.history
        final.membership = m
        final.add_client("reader", store_calls(reader, [("get", k, None) for k in KEYS]))
        final.run()
        run(reader.close(), t)
        last = {core.client_id: core for _, core in self.opened + [("reader", reader)]}
        holders = [c for c in last.values() if c in self.closed | {reader}]
        report = run(audit(cfg, [c for c in holders if run(_still_holds(c, reader), t)], m,
                           excuse=lost_frees(self.memory, m)), t)
        return check(sim.history), report, run(check_index(cfg, m), t)


def _still_holds(core, now):
    """Generator: is ``core`` the last to have held its id (read with ``now``, a core of the
    current membership)? Not when an open that never returned (a crash) or a recovery took
    the id since: each moves its incarnation word, and what the id holds is then what that
    left (free for its next holder), not what ``core``'s free lists say."""
    meta = core.map.client_meta(core.client_id) + META_INCARNATION
    (word,) = yield [Read(now.meta_nodes[0], meta, 8)]
    return int.from_bytes(word, "little") == core.free_seq >> 28


def _check(seed: int, **kw) -> SessionRebuild:
    r = SessionRebuild(seed, **kw)
    lin, report, problems = r.go()
    where = f"seed {seed} {kw}: faults {r.sim.faults}"
    assert lin.ok, f"{where}\n{lin.explain()}"
    assert report.ok, f"{where}\n{report.explain()}"
    assert not problems, f"{where}\n{problems}"
    return r


#: seeds of a wider run that found the audit calling an object its owner took back (used 0
#: on the home copy only) misplaced once that home died: stranded (``fusee.audit``). Seeds 7
#: and 21 (CorruptObject) pass since only a group's home bitmap holds bits, seed 10 since
#: open_client's next core starts in the epoch its first one reached.
SEEN = [73, 121, 217]


@pytest.mark.parametrize("seed", [*range(30), *SEEN])
def test_clients_come_and_go_during_the_online_copy(seed):
    r = _check(seed, crash_client=seed % 2 == 1)
    (job, _), = r.sim.rebuilds
    if job.online_bytes:        # (else no id was closed when it began: it only read)
        start, end = r.during
        assert end > start, "no client operation completed while the rebuild copied online"


@pytest.mark.parametrize("seed,crash_client", [(71, False), (121, False), (121, True),
                                               (217, True), (247, True)])
def test_an_object_reclaimed_before_its_home_died_is_free_not_misplaced(seed, crash_client):
    """Seeds of the session run beyond its 30 (and 160 with a client crash, which passed on
    main before the merge of wip-chase): a session's adopt reclaimed an object whose home MN
    died later; the reclaim writes its used 0 on the home only, so the copies left say held.
    The audit took that object, stranded (named by no slot, home dead), for one held yet in
    its owner's free lists (misplaced)."""
    _check(seed, crash_client=crash_client)


def test_the_online_copy_takes_the_groups_of_closed_ids():
    """Seed 0: the online copy took three groups, of a closed id and of two ids sessions
    held, but not the fourth, whose write mark said a write was under way as it read the
    header (its session closed just after), while clients completed operations; the pause
    took the rest."""
    r = _check(0)
    (job, _), = r.sim.rebuilds
    assert job.online_bytes == 3 * r.config.layout.block_size
    held = {cid for cid, words in job.owners.items() if words[0] != CLEAN}
    assert held == {0, 1} and {g.owner_word - 1 for g in job.copied.values()} == {0, 1, 2}
    start, end = r.during
    assert end > start


UPDATED = b"written after the copy read it"


def _loaded(close: bool):
    """A client inserts 20 keys (and closes its id, with ``close``), then MN 0 dies, is
    failed over and restarts empty: (config, memory, client, membership)."""
    cfg = _config()
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    loader = run(open_client(cfg), t)
    for i in range(20):
        run(loader.insert(b"k%d" % i, b"v%d" % i * 40), t)
    if close:
        run(loader.close(), t)
    mem.crash(0)
    m1 = run(failover(cfg, Membership(), 0), t)
    loader.place(m1)
    mem.restart(0)
    return cfg, mem, loader, m1


def _served_by_mn0_alone(cfg, mem, membership) -> None:
    """MNs 1 and 2 die and are failed over: MN 0 alone serves every key, k3 updated."""
    t = LocalTransport(cfg, memory=mem)
    for m in (1, 2):
        mem.crash(m)
    m3 = run(failover(cfg, membership, [1, 2]), t)
    reader = run(open_client(cfg, membership=m3), t)
    assert run(reader.search(b"k3"), t) == UPDATED
    assert all(run(reader.search(b"k%d" % i), t) == b"v%d" % i * 40 for i in range(20) if i != 3)


@pytest.mark.parametrize("recover", [False, True])
def test_an_id_written_after_the_online_copy_read_its_groups_is_copied_again(recover):
    """Between the online copy's read of a closed id's blocks and the pause, a client takes
    the id over, updates a key into those blocks and closes it (CLEAN again, as when the
    copy began: only the incarnation tells), or crashes and is recovered; the pause copies
    the blocks again, so the rebuilt MN alone still serves the update."""
    cfg, mem, loader, m1 = _loaded(close=True)
    t = LocalTransport(cfg, memory=mem)
    job = Rebuild(cfg, m1, 0)
    gen = job.copy_online()
    batch = next(gen)
    while not any(isinstance(v, Read) and v.length == cfg.layout.block_size for v in batch):
        batch = gen.send(t.execute(batch))
    stale = t.execute(batch)                # the copy has read the blocks
    late = run(open_client(cfg, membership=m1), t)
    assert late.client_id == loader.client_id       # the closed id, taken over
    run(late.update(b"k3", UPDATED), t)
    if recover:
        run(recover_client(cfg, late.client_id, membership=m1), t)
    else:
        run(late.close(), t)
    with pytest.raises(StopIteration):
        gen.send(stale)
        while True:
            gen.send(t.execute(next(gen)))
    assert job.online_bytes > 0
    _served_by_mn0_alone(cfg, mem, run(job.finish(), t))


@pytest.mark.parametrize("seed", range(14))
def test_writers_stay_open_through_the_online_copy(seed):
    """Each process holds one client for the whole run (a long-lived cluster's case): the
    online copy takes their groups too, while they write into them (every write marked, as
    one MN is dead), and the pause copies again those whose write mark moved. A client
    crashes at a random verb in odd seeds: a batch cut between a write and its closing mark
    leaves the mark odd, and the group is copied again."""
    r = _check(seed, sessions=1, ops=(25, 40), crash_client=seed % 2 == 1,
               rebuild_at=(100, 600))
    (job, _), = r.sim.rebuilds
    held = {cid for cid, words in job.owners.items() if words[0] != CLEAN}
    assert any(g.owner_word - 1 in held for g in job.copied.values()), \
        "no group of an open id was copied online"
    start, end = r.during
    assert end > start, "no client operation completed while the rebuild copied online"


@pytest.mark.parametrize("seed", range(16))
def test_writers_told_of_the_rebuild_spare_its_groups(seed):
    """As above, but the clients hear of the rebuild as it starts (as from the master's
    grants, ``Allocator.follow``): each carves new objects from fresh groups until it ends
    and reuses no freed object meanwhile, with its operations in flight, a client crash in
    odd seeds and both other MNs' crash after the publish. Nothing is lost or leaked, and
    writes of the time went to groups got since, copied in the pause."""
    r = _check(seed, sessions=1, ops=(25, 40), crash_client=seed % 2 == 1,
               rebuild_at=(100, 600), spare=True)
    (job, _), = r.sim.rebuilds
    start, end = r.during
    assert end > start, "no client operation completed while the rebuild copied online"
    fresh = {g for _, core in r.opened for g in core.alloc.fresh}
    assert fresh, "no client carved from a group got during the rebuild"


def _mark_at(mm, batch) -> int | None:
    """The position of the first write mark in ``batch`` (``Allocator.marks``), or None;
    ``mm``: the MemoryMap."""
    return next((i for i, v in enumerate(batch) if isinstance(v, Write) and mm.data <= v.addr
                 and (v.addr - mm.data) % mm.layout.block_size == BLOCK_MARK), None)


@pytest.mark.parametrize("cut", [False, True])
def test_a_group_an_open_client_writes_during_the_online_copy_is_copied_again(cut):
    """A client holds its id through the whole rebuild. The online copy takes its groups
    (its id is not CLEAN); the client then updates a key into one of them, after the copy
    read it: the write mark moved, so the pause copies that group again, and the rebuilt
    MN alone still serves the update. With ``cut``, the update's batch stops (a Ctrl-C, a
    crash) right after the object reached the home: its opening mark landed before the
    copy read the header, its closing one never does; the odd mark tells the copy a write
    was under way, and the rebuilt MN's copy of every group is still its home's, byte for
    byte."""
    cfg, mem, writer, m1 = _loaded(close=False)
    t = LocalTransport(cfg, memory=mem)
    update = writer.update(b"k3", UPDATED)
    batch = next(update)
    while _mark_at(writer.map, batch) is None:
        batch = update.send(t.execute(batch))
    before = _mark_at(writer.map, batch) + 1
    if cut:                         # up to the opening mark, before the copy begins
        t.execute(batch[:before])
    job = Rebuild(cfg, m1, 0)
    gen = job.copy_online()
    step: list | None = next(gen)
    while not any(isinstance(v, Read) and v.length == cfg.layout.block_size for v in step):
        try:
            step = gen.send(t.execute(step))
        except StopIteration:               # (it copies nothing online)
            step = None
            break
    stale = step and t.execute(step)        # the copy has read the blocks
    if cut:                                 # the object reaches the home, and no more
        t.execute(batch[before:before + 1])
        update.close()
    else:
        with pytest.raises(StopIteration):
            while True:
                batch = update.send(t.execute(batch))
    if step is not None:
        with pytest.raises(StopIteration):
            step = gen.send(stale)
            while True:
                step = gen.send(t.execute(step))
    held = {cid for cid, words in job.owners.items() if words[0] != CLEAN}
    assert writer.client_id in held
    if not cut:
        assert job.online_bytes > 0, "the open id's groups were not copied online"
    m2 = run(job.finish(), t)
    assert job.pause_groups >= 1
    size, start = cfg.layout.block_size, writer.alloc.first_object
    for g in writer.alloc.groups:
        if 0 in g.nodes:
            home = m1.live(g.nodes)[0]
            ours, theirs = t.execute([Read(0, g.addrs[0], size), Read(home, g.addrs[0], size)])
            assert ours[start:] == theirs[start:], f"group at {g.addrs[0]:#x} differs"
    if not cut:
        _served_by_mn0_alone(cfg, mem, m2)


def _rebuild_under_an_updating_writer(spare: bool):
    """A writer holds 300 keys of 900 bytes (in several groups, updated at random until it
    reuses freed objects in most of them), MN 0 dies, is failed over and restarts empty; the
    online copy runs whole, then the writer updates 60 keys at random, told of the rebuild
    (``spare``) or not, and the pause copies what changed. Returns (config, memory, writer,
    the Rebuild, the membership it published, the value of each key)."""
    cfg = _config()
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    rng = random.Random(5)
    writer = run(open_client(cfg), t)
    values = {b"w%03d" % i: b"%03d" % i * 300 for i in range(300)}
    for key, value in values.items():
        run(writer.insert(key, value), t)

    def updates(count: int, tag: bytes) -> None:
        nonlocal t
        for i in range(count):
            key = rng.choice(sorted(values))
            values[key] = (tag + b"%03d" % i) * 150
            run(writer.update(key, values[key]), t)
    updates(200, b"up")
    mem.crash(0)
    m1 = run(failover(cfg, Membership(), 0), t)
    writer.place(m1)
    mem.restart(0)
    t = LocalTransport(cfg, memory=mem)         # (MN 0's new access key)
    job = Rebuild(cfg, m1, 0)
    if spare:
        writer.alloc.follow(0)
    run(job.copy_online(), t)
    updates(60, b"dc")
    m2 = run(job.finish(), t)
    return cfg, mem, writer, job, m2, values


def test_a_writer_told_of_the_rebuild_writes_fresh_groups_only():
    """An updating writer reuses freed objects all over its groups; told that a rebuild
    copies, it carves new objects from fresh groups only until the rebuild ends, so the
    pause copies again those and at most the group of its reserved object, not the groups
    it held (which it writes into when not told). Either way the rebuilt MN is exact: with
    the others dead, it alone serves the last value of every key."""
    cfg, mem, writer, job, m2, values = _rebuild_under_an_updating_writer(spare=True)
    held = len(writer.alloc.groups) - len(writer.alloc.fresh)
    assert held >= 4 and writer.alloc.fresh, (held, writer.alloc.fresh)
    assert job.pause_groups <= len(writer.alloc.fresh) + 1 < held, job.pause_groups
    _, _, untold, untold_job, _, _ = _rebuild_under_an_updating_writer(spare=False)
    assert untold_job.pause_groups >= held - 1 and not untold.alloc.fresh
    t = LocalTransport(cfg, memory=mem)
    for m in (1, 2):
        mem.crash(m)
    m3 = run(failover(cfg, m2, [1, 2]), t)
    reader = run(open_client(cfg, membership=m3), t)
    assert all(run(reader.search(k), t) == v for k, v in values.items())
