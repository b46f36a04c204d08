"""fusee.driver.run_concurrently: K operations in flight, one merged batch per step."""

from __future__ import annotations

import pytest

from fusee.emulator.cluster import LocalCluster
from fusee.driver import observed, run, run_concurrently
from fusee.memory_map import MemoryMap
from fusee.transports.base import TransportStats
from fusee.membership import Membership
from fusee.verbs import (AwaitMembership, Backoff, EpochChanged, Faa, NodeTimeout, Read,
                         RemoteAccessError, TransportError, Write)


@pytest.fixture
def cluster():
    with LocalCluster(memnodes=3, transport="local") as c:
        yield c


def _counted(cluster):
    """A transport of ``cluster`` whose stats count from here, not from its connect (whose
    identity check, fusee.cluster_identity, read the MNs' headers)."""
    t = cluster.transport()
    t.stats = TransportStats()
    return t


def _base(cluster) -> int:
    return MemoryMap.of(cluster.config.layout).data


def counter_op(node, addr, rounds):
    """FAA a word ``rounds`` times, one batch each; returns the old values seen."""
    seen = []
    for _ in range(rounds):
        (old,) = yield [Faa(node, addr, 1)]
        seen.append(old)
    return seen


def write_then_read(node, addr, data):
    yield [Write(node, addr, data)]
    (got,) = yield [Read(node, addr, len(data))]
    return got


def test_results_match_sequential_and_batches_merge(cluster):
    t = _counted(cluster)
    base = _base(cluster)
    ops = [write_then_read(i % 3, base + 64 * i, bytes([i]) * 16) for i in range(6)]
    assert run_concurrently(ops, t) == [bytes([i]) * 16 for i in range(6)]
    assert t.stats.round_trips == 2             # 6 ops x 2 batches, merged into 2 steps
    assert t.stats.verbs == 12


def test_depth_bounds_ops_in_flight_and_source_is_lazy(cluster):
    t = _counted(cluster)
    base = _base(cluster)
    pulled, finished, sizes = [], [], []

    def source():
        for i in range(7):
            pulled.append(i)
            yield counter_op(0, base + 8 * i, 3)

    execute = t.execute

    def spy(batch):                              # the real transport, batch sizes recorded
        sizes.append(len(batch))
        assert len(pulled) - len(finished) <= 2  # never pulled ahead of a free place
        return execute(batch)

    t.execute = spy
    results = {}
    run_concurrently(source(), t, depth=2,
                     on_done=lambda i, r: (finished.append(i), results.__setitem__(i, r)))
    assert results == {i: [0, 1, 2] for i in range(7)}
    assert max(sizes) == 2 and sum(sizes) == 21
    assert t.stats.round_trips == len(sizes) == 12      # 3 pairs x 3 steps + the 7th alone


def test_same_word_from_many_ops_counts_every_increment(cluster):
    t = cluster.transport()
    addr = _base(cluster)
    done = []
    run_concurrently((counter_op(1, addr, 5) for _ in range(4)), t, depth=3,
                     on_done=lambda i, r: done.append(i))
    assert sorted(done) == [0, 1, 2, 3]
    (final,) = t.execute([Read(1, addr, 8)])
    assert int.from_bytes(final, "little") == 20


def test_failure_is_thrown_only_into_the_op_whose_slice_failed(cluster):
    t = cluster.transport()
    base = _base(cluster)
    cluster.memory.crash(2)

    def guarded(node, addr):
        try:
            (got,) = yield [Read(node, addr, 8)]
        except TransportError as e:
            return type(e), e.node, len(e.results)
        (again,) = yield [Read(node, addr, 8)]     # survivors keep going afterwards
        return got == again

    region = cluster.config.layout.region_size
    # node 1: a good read, then one out of range (a NIC flushes what follows a failure on the
    # same queue pair, so a request of node 1 posted after it would fail too)
    ops = [guarded(0, base), guarded(2, base), guarded(1, base), guarded(1, region)]
    out = run_concurrently(ops, t)
    assert out == [True, (NodeTimeout, 2, 1), True, (RemoteAccessError, 1, 1)]


def test_op_exception_closes_the_others(cluster):
    t = cluster.transport()
    base = _base(cluster)
    closed = []

    def long_op():
        try:
            for _ in range(10):
                yield [Read(0, base, 8)]
        finally:
            closed.append(1)

    def bad_op():
        yield [Read(0, base, 8)]
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run_concurrently([long_op(), bad_op(), long_op()], t)
    assert closed == [1, 1]


def test_op_finishing_without_a_batch_and_run_still_works(cluster):
    t = _counted(cluster)

    def instant():
        return "now"
        yield  # pragma: no cover  (makes this a generator)

    assert run_concurrently([instant(), instant()], t) == ["now", "now"]
    assert t.stats.round_trips == 0
    assert run(write_then_read(0, _base(cluster), b"x" * 8), t) == b"x" * 8


# -- the requests that are not verbs: the driver's to interpret, never the executor's ----------

class Recording:
    """An executor that records every batch it is given on its way to ``inner``."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def execute(self, batch):
        self.batches.append(list(batch))
        return self.inner.execute(batch)


class Hearing(Recording):
    """A Recording executor that hears of membership epochs: the next one is ``epoch + 1``."""

    def __init__(self, inner):
        super().__init__(inner)
        self.asked = []

    def await_membership(self, epoch):
        self.asked.append(epoch)
        raise EpochChanged(Membership(epoch=epoch + 1))


def backs_off_then_awaits(node, addr):
    """Backs off, reads, then awaits the next epoch: what it got of each."""
    got = [(yield [Backoff(0.001)])]
    (word,) = yield [Read(node, addr, 8)]
    try:
        yield [AwaitMembership(3)]
    except TransportError as e:
        got.append(e)
    return got, word


def test_only_the_driver_interprets_what_is_not_a_verb(cluster):
    """``run`` sleeps a Backoff and asks ``await_membership`` for the next epoch: the executor
    is given verbs only; without the hook there is no master, and NodeTimeout comes at once."""
    t = cluster.transport()
    bare = Recording(t)
    (backed_off, timeout), word = run(backs_off_then_awaits(0, _base(cluster)), bare)
    assert backed_off == [None] and word == bytes(8)
    assert isinstance(timeout, NodeTimeout) and "no master" in str(timeout)
    assert bare.batches == [[Read(0, _base(cluster), 8)]]
    hearing = Hearing(t)
    (_, changed), _ = run(backs_off_then_awaits(0, _base(cluster)), hearing)
    assert isinstance(changed, EpochChanged) and changed.membership.epoch == 4
    assert hearing.asked == [3] and hearing.batches == [[Read(0, _base(cluster), 8)]]


def test_in_flight_together_the_executor_sees_only_verbs(cluster):
    """``run_concurrently``: an operation backing off lets the others post without it, the
    executor is asked once for the next epoch, and a new epoch reaches every operation in
    flight; no batch the executor gets holds a request that is not a verb."""
    t = cluster.transport()
    base = _base(cluster)
    hearing = Hearing(t)

    def counting_across_epochs(rounds):
        seen, epochs = [], []
        while len(seen) < rounds:
            try:
                (old,) = yield [Faa(2, base, 1)]
            except EpochChanged as e:       # not posted: the operation goes on in the new one
                epochs.append(e.membership.epoch)
            else:
                seen.append(old)
        return seen, epochs

    out = run_concurrently([backs_off_then_awaits(0, base), backs_off_then_awaits(1, base),
                            counting_across_epochs(4)], hearing)
    for got, word in out[:2]:
        assert got[0] == [None] and word == bytes(8)
        assert isinstance(got[1], EpochChanged) and got[1].membership.epoch == 4
    assert hearing.asked == [3]
    assert out[2] == ([0, 1, 2, 3], [4])
    assert all(type(r) in (Read, Faa) for b in hearing.batches for r in b)


def test_a_hook_that_returns_instead_of_raising_is_a_bug(cluster):
    class Mute(Recording):
        def await_membership(self, epoch):
            return None

    def awaits():
        yield [AwaitMembership(0)]

    with pytest.raises(TypeError, match="await_membership returned"):
        run(awaits(), Mute(cluster.transport()))


def test_an_observed_operation_runs_as_itself(cluster):
    """``observed`` shows each step as it goes out and is otherwise the operation itself:
    completions in, errors thrown in, closed when its driver closes it."""
    t = cluster.transport()
    base = _base(cluster)
    cluster.memory.crash(2)
    seen, closed = [], []

    def reads():
        try:
            (a,) = yield [Read(0, base, 8)]
            try:
                yield [Read(2, base, 8)]
            except NodeTimeout as e:
                return a, e.node
        finally:
            closed.append(True)

    assert run(observed(reads(), seen.append), t) == (bytes(8), 2)
    assert seen == [[Read(0, base, 8)], [Read(2, base, 8)]] and closed == [True]
    op = observed(reads(), seen.append)
    next(op)
    op.close()
    assert closed == [True, True]
