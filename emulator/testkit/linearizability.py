"""Linearizability checker for a key-value store seen as a map of independent registers.

Linearizability is compositional (Herlihy & Wing's locality; "P-compositionality" in Horn &
Kroening), so each key is checked on its own. Per key the search is Wing & Gong's, with Lowe's
memoization: walk the time-ordered list of call/return entries, tentatively linearize any op
whose call comes before the first pending return, and backtrack on reaching a return that is not
linearized yet; a (set of linearized ops, register state) pair seen once is never explored
again, which keeps histories of hundreds of ops per key cheap.

The model of one key: absent (None) or a value (bytes).

    get        -> the current value, or None
    insert(v)  -> ok if absent (becomes v), else error KeyExists
    update(v)  -> ok if present (becomes v), else error KeyNotFound
    delete     -> ok if present (becomes absent), else error KeyNotFound
    put(v)     -> ok (becomes v): insert-or-update

Failed operations with a definite error are observations too. An operation that never returned
(its client crashed) has an unknown outcome: it may take effect at any point after its
invocation, or never. It is always applicable and its return is placed at infinity, so the
search may linearize it anywhere; "never" is the same as "last", since nothing observes it then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable

from fusee.emulator.testkit.history import ERROR, OK, History, Op

#: error class names the model understands, per operation kind
EXISTS, MISSING = "KeyExists", "KeyNotFound"
KINDS = ("get", "insert", "update", "delete", "put")
_ERRORS = {"get": (), "insert": (EXISTS,), "update": (MISSING,), "delete": (MISSING,), "put": ()}
_ABSENT = None
_INF = float("inf")


class HistoryError(ValueError):
    """The history cannot be checked against the model (unknown kind, unexpected error...)."""


def _apply(state, op: Op, known: bool):
    """(legal, next state) of ``op`` on ``state``; ``known`` False = outcome unknown."""
    kind = op.kind
    if kind == "get":
        return (not known or op.result == state), state
    present = state is not _ABSENT
    if not known:                              # whatever happened, the model's own effect
        if kind == "insert":
            return True, state if present else op.value
        if kind == "update":
            return True, op.value if present else state
        if kind == "delete":
            return True, _ABSENT
        return True, op.value                  # put
    if op.status == ERROR:                     # a definite failure: the key's state must match
        return (present if op.error == EXISTS else not present), state
    if kind == "insert":
        return not present, op.value
    if kind == "update":
        return present, op.value
    if kind == "delete":
        return present, _ABSENT
    return True, op.value                      # put


def _validate(op: Op, indefinite: frozenset) -> bool:
    """Whether ``op``'s outcome is known; raise HistoryError if the model cannot explain it."""
    if op.kind not in KINDS:
        raise HistoryError(f"unknown operation kind {op.kind!r}: {op}")
    if op.kind in ("insert", "update", "put") and not isinstance(op.value, (bytes, bytearray)):
        raise HistoryError(f"{op.kind} needs a bytes value: {op}")
    if op.status == OK:
        return True
    if op.status == ERROR:
        if op.error in _ERRORS[op.kind]:
            return True
        if op.error in indefinite:
            return False
        raise HistoryError(f"{op.kind} failed with {op.error}, which the model cannot explain: "
                           f"{op}")
    return False                                 # crashed or still pending: unknown outcome


@dataclass
class KeyResult:
    key: bytes
    ops: list[Op]
    ok: bool
    explored: int                      # (linearized set, state) pairs visited
    longest: list[Op] = field(default_factory=list)   # a longest linearizable prefix found

    def explain(self) -> str:
        if self.ok:
            return f"key {self.key!r}: linearizable ({len(self.ops)} ops)"
        done = {op.id for op in self.longest}
        lines = [f"key {self.key!r}: NOT linearizable ({len(self.ops)} ops). Longest "
                 f"linearizable prefix has {len(self.longest)} ops:"]
        lines += [f"  {op}" for op in self.longest]
        lines.append("  ...and none of these can come next:")
        lines += [f"  {op}" for op in self.ops if op.id not in done]
        return "\n".join(lines)


def check_key(key: bytes, ops: list[Op], indefinite: Iterable[str] = ()) -> KeyResult:
    """Is the history ``ops`` of one key linearizable with respect to the register model?"""
    indefinite = frozenset(indefinite)
    n = len(ops)
    known = [_validate(op, indefinite) for op in ops]
    # Entries 1..2n: calls and returns in time order; entry 0 is the list head.
    timeline = sorted([(op.invoke, 0, i) for i, op in enumerate(ops)] +
                      [(op.ret if known[i] else _INF, 1, i) for i, op in enumerate(ops)])
    size = 2 * n + 1
    is_call = [False] * size
    opi = [0] * size
    match = [0] * size                 # call entry -> its return entry
    nxt = list(range(1, size + 1))
    prv = list(range(-1, size - 1))
    nxt[-1] = 0                         # the last entry's next: 0 = end of list
    call_of: dict[int, int] = {}
    for e, (_, ret, i) in enumerate(timeline, start=1):
        opi[e] = i
        if ret:
            match[call_of[i]] = e
        else:
            is_call[e] = True
            call_of[i] = e

    def lift(e):
        r = match[e]
        nxt[prv[e]] = nxt[e]
        if nxt[e]:
            prv[nxt[e]] = prv[e]
        nxt[prv[r]] = nxt[r]
        if nxt[r]:
            prv[nxt[r]] = prv[r]

    def unlift(e):
        r = match[e]
        if nxt[r]:
            prv[nxt[r]] = r
        nxt[prv[r]] = r
        if nxt[e]:
            prv[nxt[e]] = e
        nxt[prv[e]] = e

    remaining = sum(known)             # definite ops still to linearize
    state, linearized = _ABSENT, 0
    stack: list[tuple[int, object]] = []
    seen: set = set()
    longest: list[int] = []
    e = nxt[0]
    while remaining:
        if e and is_call[e]:
            i = opi[e]
            legal, new_state = _apply(state, ops[i], known[i])
            if legal:
                config = (linearized | (1 << i), new_state)
                if config not in seen:
                    seen.add(config)
                    stack.append((e, state))
                    state, linearized = new_state, config[0]
                    remaining -= known[i]
                    lift(e)
                    if len(stack) > len(longest):
                        longest = [opi[c] for c, _ in stack]
                    e = nxt[0]
                    continue
            e = nxt[e]
        else:                           # a pending op must return here: undo the last choice
            if not stack:
                return KeyResult(key, ops, False, len(seen), [ops[i] for i in longest])
            e, state = stack.pop()
            i = opi[e]
            linearized &= ~(1 << i)
            remaining += known[i]
            unlift(e)
            e = nxt[e]
    return KeyResult(key, ops, True, len(seen))


@dataclass
class Report:
    """The verdict on a whole history."""
    keys: int
    ops: int
    failures: list[KeyResult]

    @property
    def ok(self) -> bool:
        return not self.failures

    def explain(self) -> str:
        if self.ok:
            return f"linearizable: {self.ops} ops on {self.keys} keys"
        return "\n\n".join(f.explain() for f in self.failures)


def check(history: History | Iterable[Op], indefinite: Iterable[str] = ()) -> Report:
    """Check every key of ``history``; ops without a key (client setup) are ignored.

    ``indefinite`` names errors that leave an op's outcome unknown (e.g. a transport error
    that may or may not have hit memory); any other error the model does not know is a
    HistoryError.
    """
    ops = history.ops if isinstance(history, History) else list(history)
    keys: dict[bytes, list[Op]] = {}
    for op in ops:
        if op.key is not None:
            keys.setdefault(op.key, []).append(op)
    failures = [r for r in (check_key(k, v, indefinite) for k, v in keys.items()) if not r.ok]
    return Report(len(keys), sum(map(len, keys.values())), failures)
