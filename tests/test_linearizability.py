"""The linearizability checker on hand-written histories, and against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from fusee.emulator.testkit.history import CRASHED, ERROR, OK, History, Op
from fusee.emulator.testkit.linearizability import HistoryError, check, check_key

K = b"k"


def op(kind, invoke, ret, value=None, result=None, error=None, key=K, client="c"):
    """An op on ``key`` over [invoke, ret]; ret None = crashed (never returned)."""
    o = Op(0, client, kind, key, value, invoke, ret)
    o.status = CRASHED if ret is None else (ERROR if error else OK)
    o.result, o.error = result, error
    return o


def hist(*ops):
    for i, o in enumerate(ops):
        o.id = i
    return list(ops)


def linearizable(*ops, indefinite=()):
    return check(hist(*ops), indefinite).ok


# -- hand-written histories --------------------------------------------------------------

def test_sequential_history_of_every_kind():
    assert linearizable(
        op("get", 1, 2, result=None),
        op("update", 3, 4, b"x", error="KeyNotFound"),
        op("delete", 5, 6, error="KeyNotFound"),
        op("insert", 7, 8, b"a"),
        op("insert", 9, 10, b"b", error="KeyExists"),
        op("get", 11, 12, result=b"a"),
        op("update", 13, 14, b"c"),
        op("put", 15, 16, b"d"),
        op("get", 17, 18, result=b"d"),
        op("delete", 19, 20),
        op("get", 21, 22, result=None),
        op("put", 23, 24, b"e"),
        op("get", 25, 26, result=b"e"))


def test_sequential_history_with_a_wrong_read_is_caught():
    report = check(hist(op("put", 1, 2, b"a"), op("put", 3, 4, b"b"), op("get", 5, 6, result=b"a")))
    assert not report.ok
    assert "NOT linearizable" in report.explain()


def test_concurrent_writes_may_be_seen_in_either_order():
    for first, second in ((b"a", b"b"), (b"b", b"a")):
        assert linearizable(op("put", 1, 10, b"a"), op("put", 2, 9, b"b"),
                            op("get", 11, 12, result=first), op("put", 13, 14, second),
                            op("get", 15, 16, result=second))


def test_stale_read_after_a_completed_write():
    assert not linearizable(op("put", 1, 2, b"a"), op("put", 3, 4, b"b"),
                            op("get", 5, 8, result=b"a"))
    # ...but the same read overlapping the second write is fine.
    assert linearizable(op("put", 1, 2, b"a"), op("put", 3, 6, b"b"),
                        op("get", 5, 8, result=b"a"))


def test_new_old_inversion_between_two_readers():
    write = op("put", 1, 20, b"new")
    assert not linearizable(op("put", 0, 0.5, b"old"), write,
                            op("get", 2, 3, result=b"new"), op("get", 4, 5, result=b"old"))
    # Overlapping reads may see old then new...
    assert linearizable(op("put", 0, 0.5, b"old"), op("put", 1, 20, b"new"),
                        op("get", 2, 4, result=b"old"), op("get", 3, 5, result=b"new"))


def test_two_successful_inserts_of_one_key():
    assert not linearizable(op("insert", 1, 5, b"a"), op("insert", 2, 6, b"b"))
    # ...unless a delete can come between them.
    assert linearizable(op("insert", 1, 5, b"a"), op("delete", 2, 7), op("insert", 3, 8, b"b"))


def test_definite_errors_are_observations():
    assert not linearizable(op("insert", 1, 2, b"a", error="KeyExists"))
    assert not linearizable(op("insert", 1, 2, b"a"), op("update", 3, 4, b"b",
                                                        error="KeyNotFound"))
    assert not linearizable(op("delete", 1, 2))
    # A failed update concurrent with an insert: it may come first.
    assert linearizable(op("insert", 1, 4, b"a"), op("update", 2, 3, b"b", error="KeyNotFound"),
                        op("get", 5, 6, result=b"a"))


def test_failed_ops_change_nothing():
    assert linearizable(op("insert", 1, 2, b"a"), op("insert", 3, 4, b"b", error="KeyExists"),
                        op("get", 5, 6, result=b"a"))
    assert not linearizable(op("insert", 1, 2, b"a"), op("insert", 3, 4, b"b", error="KeyExists"),
                            op("get", 5, 6, result=b"b"))


def test_crashed_op_may_take_effect_late_or_never():
    # Observed long after the crash...
    assert linearizable(op("put", 1, 2, b"a"), op("put", 3, None, b"b"),
                        op("get", 10, 11, result=b"a"), op("get", 20, 21, result=b"b"))
    # ...or never observed at all.
    assert linearizable(op("put", 1, 2, b"a"), op("delete", 3, None),
                        op("get", 10, 11, result=b"a"))
    # But not before it was invoked,
    assert not linearizable(op("get", 1, 2, result=b"b"), op("put", 3, None, b"b"))
    # and once seen it cannot be undone.
    assert not linearizable(op("put", 1, 2, b"a"), op("put", 3, None, b"b"),
                            op("get", 10, 11, result=b"b"), op("get", 20, 21, result=b"a"))


def test_crashed_insert_follows_the_model():
    # A crashed insert on a present key cannot have replaced the value.
    assert not linearizable(op("put", 1, 2, b"a"), op("insert", 3, None, b"b"),
                            op("get", 10, 11, result=b"b"))
    assert linearizable(op("insert", 3, None, b"b"), op("get", 10, 11, result=b"b"))


def test_indefinite_errors_and_unexplained_errors():
    h = hist(op("put", 1, 2, b"a", error="NodeTimeout"), op("get", 3, 4, result=b"a"))
    assert check(h, indefinite={"NodeTimeout"}).ok
    with pytest.raises(HistoryError, match="NodeTimeout"):
        check(h)
    with pytest.raises(HistoryError, match="unknown operation kind"):
        check(hist(op("cas", 1, 2, b"a")))
    with pytest.raises(HistoryError, match="bytes value"):
        check(hist(op("put", 1, 2, None)))


def test_keys_are_checked_independently():
    report = check(hist(op("put", 1, 2, b"a", key=b"x"), op("put", 3, 4, b"b", key=b"y"),
                        op("get", 5, 6, result=b"a", key=b"x"),
                        op("get", 7, 8, result=b"a", key=b"y")))
    assert (report.keys, report.ops) == (2, 4)
    assert [f.key for f in report.failures] == [b"y"]


def test_ops_without_a_key_are_ignored():
    report = check(hist(op("open", 1, 2, key=None), op("put", 3, 4, b"a")))
    assert (report.keys, report.ops, report.ok) == (1, 1, True)


def test_history_records_events_in_time_order():
    h = History()
    a = h.invoke("c0", "put", K, b"a")
    b = h.invoke("c1", "get", K)
    h.ok(b, None)
    h.ok(a, None)
    c = h.invoke("c1", "delete", K)
    h.crash(c)
    assert [(kind, o.id) for _, kind, o in h.events()] == [
        ("invoke", 0), ("invoke", 1), ("return", 1), ("return", 0), ("invoke", 2)]
    assert check(h).ok
    with pytest.raises(ValueError, match="already finished"):
        h.ok(a, None)


# -- many ops on one key ----------------------------------------------------------------

def _concurrent_register_run(seed, clients, n):
    """A linearizable history by construction: ops take effect at a random instant inside
    their interval, on a real register."""
    rng = random.Random(seed)
    t, state, ops = 0.0, None, []
    busy = {c: None for c in range(clients)}
    while len(ops) < n or any(busy.values()):
        c = rng.randrange(clients)
        t += 1
        cur = busy[c]
        if cur is None:
            if len(ops) >= n:
                continue
            kind = rng.choice(["get", "insert", "update", "delete", "put"])
            cur = busy[c] = op(kind, t, None, f"v{len(ops)}".encode()
                               if kind in ("insert", "update", "put") else None, client=str(c))
            cur.status, cur.effect = "pending", False
            ops.append(cur)
        elif not cur.effect:                     # the linearization point
            cur.effect = True
            k, present = cur.kind, state is not None
            if k == "get":
                cur.result = state
            elif (k == "insert" and present) or (k in ("update", "delete") and not present):
                cur.error = "KeyExists" if k == "insert" else "KeyNotFound"
            else:
                state = None if k == "delete" else cur.value
        else:
            cur.ret, cur.status = t, ERROR if cur.error else OK
            busy[c] = None
    return hist(*ops)


def test_hundreds_of_ops_on_one_key_check_quickly():
    ops = _concurrent_register_run(7, clients=8, n=400)
    r = check_key(K, ops)
    assert r.ok
    # The memo bounds the search by (linearized set, state) pairs, not by orderings.
    assert r.explored < 50 * len(ops)
    # A read that misses the last completed write is found among them.
    stale = next(o.value for o in ops if o.value is not None)
    ops += [op("put", 10_000, 10_001, b"final"), op("get", 10_002, 10_003, result=stale)]
    assert not check_key(K, hist(*ops)).ok


# -- against brute force -----------------------------------------------------------------

def _brute_force(ops):
    """Try every order consistent with real time; crashed ops may also be left out."""
    known = [o for o in ops if o.status != CRASHED]
    crashed = [o for o in ops if o.status == CRASHED]
    for k in range(len(crashed) + 1):
        for chosen in itertools.combinations(crashed, k):
            seq_ops = known + list(chosen)
            for order in itertools.permutations(seq_ops):
                if _respects_real_time(order) and _legal(order):
                    return True
    return False


def _respects_real_time(order):
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            if b.ret is not None and b.ret < a.invoke:
                return False
    return True


def _legal(order):
    state = None
    for o in order:
        k, present, crashed = o.kind, state is not None, o.status == CRASHED
        if k == "get":
            if not crashed and o.result != state:
                return False
            continue
        fails = (k == "insert" and present) or (k in ("update", "delete") and not present)
        if not crashed and bool(o.error) != fails:
            return False
        if not fails:
            state = None if k == "delete" else o.value
    return True


def _random_history(rng):
    n = rng.randint(1, 6)
    values = [b"a", b"b", b"c"]
    ops = []
    for _ in range(n):
        kind = rng.choice(["get", "insert", "update", "delete", "put"])
        a = rng.randint(0, 20)
        ret = None if rng.random() < 0.15 else a + rng.randint(1, 10) + 0.5
        o = op(kind, a + rng.random() / 10, ret,
               rng.choice(values) if kind in ("insert", "update", "put") else None)
        if ret is not None:
            if kind == "get":
                o.result = rng.choice(values + [None])
            elif kind != "put" and rng.random() < 0.3:
                o.status, o.error = ERROR, "KeyExists" if kind == "insert" else "KeyNotFound"
        ops.append(o)
    return hist(*ops)


def test_agrees_with_brute_force_on_random_small_histories():
    rng = random.Random(2024)
    verdicts = {True: 0, False: 0}
    for _ in range(1500):
        ops = _random_history(rng)
        expected = _brute_force(ops)
        assert check_key(K, ops).ok == expected, "\n".join(map(str, ops))
        verdicts[expected] += 1
    assert min(verdicts.values()) > 100        # both verdicts were exercised
