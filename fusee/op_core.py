"""What an operation may use of its client: the interface between ``fusee.operations.ClientCore``
(one client's state and its round machinery) and the operation modules (``fusee.search``,
``fusee.insert``, ``fusee.update``) and the split (``fusee.resize``).

The operations are free functions of a core typed as ``OpCore``, so mypy holds them to this
list: anything else of the client (its deferred frees, unsure frees, open state, claim) stays
the core's own business. ``ClientCore`` implements it as its base class. A base class, not a
Protocol: compiled, reading an attribute of a Protocol-typed object or calling its method is
a Python attribute lookup and call, of a base class a struct field and a native call (issue
12: dozens per write). Its methods here only say what each one does; ``ClientCore``'s do it.

Design: docs/design.md#the-four-operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusee.allocation import Allocator
    from fusee.cache import IndexCache
    from fusee.index import Directory, IndexGeometry
    from fusee.log import NewObject, ObjectLog
    from fusee.membership import Membership
    from fusee.replication import SlotTarget
    from fusee.verbs import Faa, Op, Read, Request, T, TransportError, Write
    from fusee.verdicts import Fresh, Verdict

    #: the body of a write (``OpCore.with_objects``): (core, new object, key, opcode, value
    #: it writes, then_insert) -> the write's generator, FRESH to start over with a new one
    Body = Callable[["OpCore", NewObject, bytes, int, bytes, bool], Op[T | Fresh]]
    #: a round trip that carries what the client owed (``OpCore.owing``): its batch (the
    #: operation's requests, then ABORTED marks, then frees), how many requests are the
    #: operation's, where the frees start, the objects freed, the objects of ours to reuse
    #: once the frees are through, the objects marked ABORTED, the frees. (A tuple: compiled,
    #: a struct of its own in the generator that holds it, no object made.)
    Owed = tuple[list[Request], int, int, list[int], Sequence[int], Sequence[NewObject],
                 list[Faa]]

class OpCore:
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
    #: operations started and not ended (a write counts itself in: ``with_objects``,
    #: ``fusee.update``; and out: ``write_ended``)
    in_flight: int

    # -- round trips and epochs --------------------------------------------------------------
    def rt(self, reqs: Sequence[Request]) -> Op[list[Any]]:
        """One round trip for ``reqs`` (the core adds what it owes: frees, ABORTED marks):
        every batch of verbs an operation posts, its SNAPSHOT rounds' too, goes through it."""
        raise NotImplementedError

    def owes(self) -> bool:
        """Whether ``rt`` would add something to the next round trip. When not, an
        operation may yield its batch itself: the same round trip, with no generator level
        (the common case of a write's rounds)."""
        raise NotImplementedError

    def owing(self, reqs: Sequence[Request]) -> Owed:
        """What ``rt`` posts when the client ``owes``, for an operation that posts it itself
        (a generator level less): the batch ``owed[0]``; then ``owed_done`` with its
        completions (and ``take_back`` of the frees it returns, if any), or ``owed_failed``
        with its error."""
        raise NotImplementedError

    def owed_done(self, owed: Owed, res: list[Any]) -> tuple[list[Any], list[Faa]]:
        """Settle what ``owed`` carried: the completions of the operation's own requests, and
        the frees to ``take_back`` at once (none, unless a free was delivered twice)."""
        raise NotImplementedError

    def owed_failed(self, owed: Owed, e: TransportError) -> None:
        """Settle what ``owed`` carried when its round trip failed with ``e``."""
        raise NotImplementedError

    def take_back(self, frees: list[Faa]) -> Op[None]:
        """Undo ``frees``, whose FAAs found their bit set already (each carried into the
        next object's bit)."""
        raise NotImplementedError

    def retry(self) -> None:
        """Count an operation's attempt that starts over."""
        raise NotImplementedError

    def retrying(self, step: Callable[[], Op[T]]) -> Op[T]:
        """Run ``step()`` until it completes in one epoch."""
        raise NotImplementedError

    def new_epoch(self, error: TransportError) -> Op[None]:
        """Adopt the epoch after the one ``error`` ended."""
        raise NotImplementedError

    def epoch_ended(self, error: TransportError, obj: NewObject) -> Op[list[Write]]:
        """Adopt the next epoch; ``obj``'s first writes again, for the live replicas."""
        raise NotImplementedError

    def fate(self, epoch: int, t: SlotTarget, v_old: int, v_new: int,
             decided: Verdict | None, cased: bool) -> Op[Verdict]:
        """The verdict of the round this client had open at ``t`` when ``epoch`` ended."""
        raise NotImplementedError

    def waited(self, n: int, what: str) -> Op[int]:
        """Count a re-read spent waiting on another client (Stalled past ``patience``)."""
        raise NotImplementedError

    def split_seen(self, sid: int, waits: int) -> Op[int]:
        """Subtable ``sid`` is being split: wait, re-read the directory."""
        raise NotImplementedError

    def refresh(self) -> Op[None]:
        """Re-read the directory."""
        raise NotImplementedError

    # -- the index and objects -----------------------------------------------------------------
    def target(self, sid: int, pos: int) -> SlotTarget:
        raise NotImplementedError

    def object_read(self, v: int, near: int | None = None) -> Read:
        """The read of the object slot value ``v`` names."""
        raise NotImplementedError

    def with_objects(self, opcode: int, key: bytes, value: bytes, body: Body[T],
                     then_insert: bool = False, units: int = 0) -> Op[T]:
        """Run ``body(core, obj, key, opcode, value, then_insert)`` with a new object until
        it returns anything but FRESH (``units``: the object's size class, if known)."""
        raise NotImplementedError

    def write_ended(self, whole: bool) -> None:
        """A write ended, ``whole``: by its result or one of its own outcomes (KeyExists,
        KeyNotFound, Stalled), else half way (the client is not settled)."""
        raise NotImplementedError

    def write_object(self, opcode: int, key: bytes, value: bytes, units: int
                     ) -> NewObject | None:
        """A write's new object, or None where memory must be made first (``made_object``)."""
        raise NotImplementedError

    def made_object(self, opcode: int, key: bytes, value: bytes, units: int
                    ) -> Op[NewObject]:
        """``write_object``, memory made for it first."""
        raise NotImplementedError

    def abandoned(self, obj: NewObject) -> Op[None]:
        """``abandon(obj)``, in one epoch (an object that ends in Stalled or FRESH)."""
        raise NotImplementedError

    def abandon(self, obj: NewObject) -> Op[None]:
        """Mark an object never proposed ABORTED now, and reuse it."""
        raise NotImplementedError

    def abandon_later(self, obj: NewObject) -> None:
        """Mark an object never proposed ABORTED with the next batch, then reuse it."""
        raise NotImplementedError

    def free_value(self) -> int:
        """A fresh tombstone / void value of this client."""
        raise NotImplementedError

    def defer_free(self, v: int, then_release: int | None = None) -> None:
        """Free ``v``'s object with the next batch."""
        raise NotImplementedError
