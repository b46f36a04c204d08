"""The verbs of a SNAPSHOT round (``fusee.replication``): the requests of its steps and the
state of an open round's primary CAS. Compiled with the fast path (setup.py), unlike
``fusee.replication``: these run on every write, and a call from compiled code into a Python
module costs a whole interpreted call (issue 12). The rules that decide a round (``decide``,
``tally``, ``resolve``, the winner's fix-ups, the loser's wait) stay in
``fusee.replication``, in Python, where the mutation tests (``tests/test_mutants.py``) break
them by name; ``fusee.replication`` imports these too, so SNAPSHOT reads as one module.

Design: docs/design.md#snapshot-replication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from fusee.errors import EpochChanged, TransportError
from fusee.layout import FROZEN
from fusee.verbs import Cas
from fusee.verdicts import LOSE, RESTART, Verdict

if TYPE_CHECKING:
    from fusee.index import SlotTarget

#: Final: compiled, every CAS made here calls the class from a C static, not through a
#: lookup of the module's dict
_CAS: Final = Cas


def proposal_requests(t: SlotTarget, v_old: int, v_new: int) -> list[Cas]:
    """Step 2's batch: the CAS of every backup ``v_old -> v_new``. An operation posts it
    through its core's round trip (``OpCore.rt``), with what else it sends in that batch
    after these, and reads what the CASes found with ``tally``."""
    # proposals are distinct: a CAS that finds v_old could not tell ours from no change
    assert v_new != v_old, f"slot {t.sid}:{t.pos}: a proposal of the value it replaces"
    # (Any: compiled, the ints are boxed once here, not again for every Cas made of them)
    addr: Any = t.addr
    old: Any = v_old
    new: Any = v_new
    cases = []
    for n in t.backups:         # (a comprehension would make cells of t, v_old and v_new)
        cases.append(_CAS(n, addr, old, new))
    return cases


class CasRound(Protocol):
    """An operation's open round, as settling it after its epoch's end needs to know."""
    cased: bool     # its primary CAS is the batch in flight (``primary_request`` to its reply)


def primary_request(t: SlotTarget, expected: int, v_new: int, r: CasRound | None = None
                    ) -> Cas:
    """Step 4's request: the CAS of the primary ``expected -> v_new``, the linearization
    point when it finds ``expected``; ``primary_lost`` reads what else it found. ``r``: the
    open round, cased from now on (``cas_went_out``)."""
    assert v_new != expected, f"slot {t.sid}:{t.pos}: a primary CAS to the value it expects"
    if r is not None:
        r.cased = True
    return _CAS(t.primary, t.addr, expected, v_new)


def cas_went_out(r: CasRound, error: TransportError) -> bool:
    """Whether ``r``'s primary CAS may have taken effect, its reply unseen, when ``error``
    ended the round's epoch: ``Membership.fate`` takes a third value on a primary for WIN
    only then. ``cased`` is true only while the CAS's batch is the operation's batch in
    flight (``primary_request`` sets it, ``primary_lost`` clears it, and a CAS that took ends
    the operation), so ``error`` came at that batch; EpochChanged there means the driver
    refused it: it never went out (``fusee.errors.EpochChanged``). Counting a refused CAS as
    gone out acknowledged a write that no slot names (found by a sweep: another writer took
    the slot in the next epoch; ``tests/test_cas_never_posted.py``)."""
    return r.cased and not isinstance(error, EpochChanged)


def primary_lost(found: int, r: CasRound | None = None) -> Verdict:
    """The primary CAS (``primary_request``) found ``found``, not the value it expected (which
    would be the linearization point: WIN): RESTART if the slot froze for a split, else LOSE
    (another writer's value is there); ``r``'s CAS, failed, no longer counts as cased."""
    if r is not None:
        r.cased = False
    return RESTART if found & FROZEN else LOSE


def unfreeze_requests(t: SlotTarget, v_old: int, v_new: int) -> list[Cas]:
    """A round that the primary's FROZEN bit ended (a split) after ``v_new`` went onto the
    backups: the CASes that replace it there by the frozen old value. Nothing copies a backup
    (the split copies the primary), but a failover would, should the primary die before the
    split is done: it takes agreeing backups for a decided round."""
    return [_CAS(n, t.addr, v_new, v_old | FROZEN) for n in t.backups]
