"""What an operation may use of its client: the interface between ``fusee.operations.ClientCore``
(one client's state and its round machinery) and the operation modules (``fusee.search``,
``fusee.insert``, ``fusee.update``) and the split (``fusee.resize``).

The operations are free functions of a core typed as ``OpCore``, so mypy holds them to this
list: anything else of the client (its deferred frees, unsure frees, open state, claim) stays
the core's own business. ``ClientCore`` satisfies it structurally; a test may drive an
operation with any object that does.

Design: docs/design.md#the-four-operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fusee.allocation import Allocator
    from fusee.cache import IndexCache
    from fusee.index import Directory, IndexGeometry
    from fusee.log import NewObject, ObjectLog
    from fusee.membership import Membership
    from fusee.replication import SlotTarget
    from fusee.verbs import Op, Read, Request, T, TransportError, Write
    from fusee.verdicts import Fresh, Verdict

    #: the body of a write (``OpCore.with_objects``): (core, new object, key, opcode, value
    #: it writes, then_insert) -> the write's generator, FRESH to start over with a new one
    Body = Callable[["OpCore", NewObject, bytes, int, bytes, bool], Op[T | Fresh]]

class OpCore(Protocol):
    # -- the client's view of the cluster (read; the core adopts a new epoch's) ------------
    client_id: int
    membership: Membership
    dir: Directory              # the directory: subtables, their replicas, bucket reads
    geo: IndexGeometry
    unit: int                   # the object allocation unit, in bytes
    cache: IndexCache
    log: ObjectLog              # the records an operation writes into its object's log entry
    alloc: Allocator
    counters: dict[str, int]    # retries, lost rounds, splits, epochs, backup reads
    patience: int               # re-reads of another client's write before Stalled

    # -- round trips and epochs --------------------------------------------------------------
    def rt(self, reqs: Sequence[Request]) -> Op[list[Any]]:
        """One round trip for ``reqs`` (the core adds what it owes: frees, ABORTED marks):
        every batch of verbs an operation posts, its SNAPSHOT rounds' too, goes through it."""
        ...

    def owes(self) -> bool:
        """Whether ``rt`` would add something to the next round trip. When not, an
        operation may yield its batch itself: the same round trip, with no generator level
        (the common case of a write's rounds)."""
        ...

    def retry(self) -> None:
        """Count an operation's attempt that starts over."""
        ...

    def retrying(self, step: Callable[[], Op[T]]) -> Op[T]:
        """Run ``step()`` until it completes in one epoch."""
        ...

    def new_epoch(self, error: TransportError) -> Op[None]:
        """Adopt the epoch after the one ``error`` ended."""
        ...

    def epoch_ended(self, error: TransportError, obj: NewObject) -> Op[list[Write]]:
        """Adopt the next epoch; ``obj``'s first writes again, for the live replicas."""
        ...

    def fate(self, epoch: int, t: SlotTarget, v_old: int, v_new: int,
             decided: Verdict | None, cased: bool) -> Op[Verdict]:
        """The verdict of the round this client had open at ``t`` when ``epoch`` ended."""
        ...

    def waited(self, n: int, what: str) -> Op[int]:
        """Count a re-read spent waiting on another client (Stalled past ``patience``)."""
        ...

    def split_seen(self, sid: int, waits: int) -> Op[int]:
        """Subtable ``sid`` is being split: wait, re-read the directory."""
        ...

    def refresh(self) -> Op[None]:
        """Re-read the directory."""
        ...

    # -- the index and objects -----------------------------------------------------------------
    def target(self, sid: int, pos: int) -> SlotTarget:
        ...

    def object_read(self, v: int, near: int | None = None) -> Read:
        """The read of the object slot value ``v`` names."""
        ...

    def with_objects(self, opcode: int, key: bytes, value: bytes, body: Body[T],
                     then_insert: bool = False, units: int = 0) -> Op[T]:
        """Run ``body(core, obj, key, opcode, value, then_insert)`` with a new object until
        it returns anything but FRESH (``units``: the object's size class, if known)."""
        ...

    def abandon(self, obj: NewObject) -> Op[None]:
        """Mark an object never proposed ABORTED now, and reuse it."""
        ...

    def abandon_later(self, obj: NewObject) -> None:
        """Mark an object never proposed ABORTED with the next batch, then reuse it."""
        ...

    def free_value(self) -> int:
        """A fresh tombstone / void value of this client."""
        ...

    def defer_free(self, v: int, then_release: int | None = None) -> None:
        """Free ``v``'s object with the next batch."""
        ...
