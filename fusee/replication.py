"""SNAPSHOT: client-centric replication of one index slot over r MNs.

A writer READs the primary (``v_old``; the operations get it from their bucket read), CASes
every backup ``v_old -> v_new`` in one batch, and decides from the backups' values alone:

- Rule 1: every backup holds ``v_new``: I win.
- Rule 2: more than half of the backups hold ``v_new``: I win.
- Rule 3: nobody has a majority: re-READ the primary; if it changed, the round is over and I
  lost; otherwise the smallest proposal on the backups wins.

Each backup word leaves ``v_old`` exactly once per round (to its first proposer's value) and
only the winner touches it again, so every writer of a round sees the same values and reaches
the same decision. The winner fixes the backups holding other proposals, commits its log
entry, then CASes the primary ``v_old -> v_new``: the linearization point. Losers wait until
the primary changes. Proposals must be distinct: object pointers are; DELETE proposes a
fresh tombstone of its own (``layout.free_value``).

If the primary turns out FROZEN (its subtable is being split), nobody's write happened: every
writer of the round starts over on the new subtable.

Every batch of a round goes through the operation's core (``OpCore.rt``, which adds what the
client owes: deferred frees, ABORTED marks), as every other batch of an operation does: the
steps on the fast path are plain functions, the requests of a step and the reading of what
they found (``proposal_requests`` / ``tally``, ``primary_request`` / ``primary_lost``), so
that going through the core adds no generator to an operation (the requests are built in
``fusee.snapshot``, compiled: this module stays Python for the mutation tests); the waits of
contention (``resolve``'s rule 3, ``await_change``) are generators of the core's round trips.

Design: docs/design.md#snapshot-replication.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from fusee.errors import Stalled
# (SlotTarget is the index's: a class of this module, left as Python, had an interpreted
# ``__init__`` on every insert)
from fusee.index import SlotTarget as SlotTarget
from fusee.layout import FROZEN, unpack_u64
# the verbs of a round, compiled (``fusee.snapshot``); imported here too, where SNAPSHOT is
from fusee.snapshot import CasRound as CasRound
from fusee.snapshot import cas_went_out as cas_went_out
from fusee.snapshot import primary_lost as primary_lost
from fusee.snapshot import primary_request as primary_request
from fusee.snapshot import proposal_requests as proposal_requests
from fusee.snapshot import unfreeze_requests as unfreeze_requests
from fusee.verbs import Backoff, Cas, Op, Read, Request
from fusee.verdicts import LOSE, RESTART, RULE3, WIN, Decision, Verdict

if TYPE_CHECKING:
    from fusee.op_core import OpCore

#: polls of a wait made back to back; after them each poll first lets BACKOFF seconds pass
FAST_POLLS, BACKOFF = 100, 0.0002


def backoff(polls: int) -> Op[None]:
    """Generator: the pause owed before poll number ``polls`` of a wait (none for the first
    FAST_POLLS: a live client usually finishes its round in a few round trips)."""
    if polls >= FAST_POLLS:
        yield [Backoff(BACKOFF)]


def decide(current: list[int], mine: int) -> Decision:
    """Rules 1 and 2 from the backups' current values: WIN, LOSE (someone else has a
    majority), or RULE3 (no majority: the primary must be re-read)."""
    n, votes = len(current), current.count(mine)
    if votes == n or 2 * votes > n:     # (before building a Counter: the common case)
        return WIN
    counts = Counter(current)
    if any(2 * c > n for v, c in counts.items() if v != mine):
        return LOSE
    return RULE3


def tally(found: Sequence[int], v_old: int, v_new: int) -> tuple[list[int], Decision]:
    """Step 3 from the values the proposal's CASes found (``proposal_requests``, in its
    order): (the backups' current values, what rules 1 and 2 say: ``decide``). A CAS that
    found ``v_old`` put our value there. (One call: on the fast path every backup took ours.)"""
    n = len(found)
    if found.count(v_old) == n:
        return [v_new] * n, WIN
    current = _current(found, v_old, v_new)
    return current, decide(current, v_new)


def _current(found: Sequence[int], v_old: int, v_new: int) -> list[int]:
    """The backups' values after our proposal's CASes found ``found``. (Not in ``tally``:
    a comprehension there makes cells of its arguments on every round.)"""
    return [v_new if old == v_old else old for old in found]


def resolve(core: OpCore, t: SlotTarget, v_old: int, v_new: int, current: list[int]
            ) -> Op[Verdict]:
    """Generator, step 3: WIN, LOSE or RESTART (the slot froze) for this round; rule 3
    re-reads the primary."""
    verdict = decide(current, v_new)
    if verdict != RULE3:
        return verdict
    (raw,) = yield from core.rt([Read(t.primary, t.addr, 8)])
    now = unpack_u64(raw)
    if now != v_old:
        return RESTART if now == v_old | FROZEN else LOSE
    return WIN if min(current) == v_new else LOSE


def fix_requests(t: SlotTarget, current: list[int], v_new: int) -> list[Cas]:
    """The winner's CASes turning other proposals on the backups into its own. A FROZEN
    backup is left alone: a split froze the primary first, so the round is over, and the
    split needs the frozen value on every replica (``fusee.resize``)."""
    if current.count(v_new) == len(current):        # (the common case: no list to build)
        return []
    return _fixes(t, current, v_new)


def _fixes(t: SlotTarget, current: list[int], v_new: int) -> list[Cas]:
    """``fix_requests`` when some backup holds another value (a comprehension there would
    make cells of its arguments on every round)."""
    return [Cas(n, t.addr, v, v_new) for n, v in zip(t.backups, current)
            if v != v_new and not v & FROZEN]


def await_change(core: OpCore, t: SlotTarget, v_old: int, current: list[int],
                 extra: Iterable[Request] = ()) -> Op[Verdict]:
    """Generator for losers: poll until the round is over; ``current`` are the backups'
    values after our proposal, ``extra`` requests ride on the first poll. Returns LOSE
    (someone finished the round) or RESTART (it froze). After ``core.patience`` polls the
    winner is presumed crashed: Stalled.

    The primary alone cannot tell: once the winner has CASed it, the old object is freed and
    its memory reused, maybe for the same key, so the primary may hold ``v_old`` again (ABA)
    in a later round, and keep it once the writers stop. The first backup tells: during the
    round it only leaves ``current[0]`` for the winner's value (one of ``current``), or for the
    old value FROZEN when the round ends in a split (the primary says that); any other value
    belongs to a later round, which began after the primary had left ``v_old``."""
    assert t.backups, "a round without backups has no losers"
    first: list[Request] = list(extra)
    polls = 0
    while True:
        res = yield from core.rt([Read(t.primary, t.addr, 8), Read(t.backups[0], t.addr, 8),
                                  *first])
        first = []
        now, backup = unpack_u64(res[0]), unpack_u64(res[1])
        if now != v_old:
            return RESTART if now == v_old | FROZEN else LOSE
        if backup not in current and not backup & FROZEN:
            return LOSE
        polls += 1
        if polls == core.patience:
            raise Stalled(f"slot {t.sid}:{t.pos}: the winner of its SNAPSHOT round did not "
                          f"finish in {polls} polls (crashed? it waits for recovery)")
        yield from backoff(polls)
