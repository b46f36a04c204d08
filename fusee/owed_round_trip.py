"""The round trip that carries what a client owes: every batch an operation posts goes out with
the frees it deferred (a replaced object is freed with the next round trip, not with one of its
own) and the ABORTED marks of objects it never proposed, and settles them once through.

Why a module of its own: it is the one place where a free can be lost or delivered twice (a
free bit set twice carries into the next object's bit: a live object freed), so its rules
(``owed_failed``: unsure frees; ``take_back``) read apart from the operations and their epochs
(``fusee.operations.ClientCore``, which inherits it). A base class rather than free functions
of the core: compiled, its methods stay native calls and its state struct fields (issue 12).

Design: docs/design.md#the-four-operations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fusee.layout import ABORTED, NO_SLOT
from fusee.log import NewObject
from fusee.op_core import OpCore
from fusee.verbs import MASK64, EpochChanged, Faa, NodeTimeout, Op, Request, TransportError, Write

if TYPE_CHECKING:
    from fusee.op_core import Owed

log = logging.getLogger(__name__)


class OwedRoundTrip(OpCore):
    """What a client owes the memory nodes, and the round trip that delivers it (``rt``)."""
    deferred: list[int]         # objects to free with the next batch
    releases: list[int]         # objects of ours to reuse once ``deferred`` is sent
    #: frees sent that got no answer, with the MN they went to (None: unknown) and the epoch
    #: they went out in
    unsure: list[tuple[int, int | None, int]]
    #: objects of ours never proposed, to mark ABORTED with the next batch and then reuse
    aborts: list[NewObject]

    def rt(self, reqs: Sequence[Request]) -> Op[list[Any]]:
        """Generator: one round trip for ``reqs`` plus the deferred frees and ABORTED marks."""
        if not self.deferred and not self.aborts:
            completions: list[Any] = yield reqs
            return completions
        owed = self.owing(reqs)
        try:
            res: list[Any] = yield owed[0]
        except TransportError as e:
            self.owed_failed(owed, e)
            raise
        res, twice = self.owed_done(owed, res)
        if twice:
            yield from self.take_back(twice)
        return res

    def owing(self, reqs: Sequence[Request]) -> Owed:
        """The batch of a round trip for ``reqs`` with the deferred frees and ABORTED marks
        after them (``rt``'s, for an operation that posts it itself: no generator level),
        which the client no longer owes: ``owed_done`` or ``owed_failed`` settles them."""
        ptrs, self.deferred = self.deferred, []
        # (what is owed of none stays: an empty tuple in its place, no list made and freed)
        released: Sequence[int] = ()
        if self.releases:
            released, self.releases = self.releases, []
        aborts: Sequence[NewObject] = ()
        batch = [*reqs]
        if self.aborts:
            aborts, self.aborts = self.aborts, []
            batch += self._aborted_marks(aborts)
        ahead = len(batch)
        # (no comprehension of ``self`` here: its cell would be made on every round trip;
        # nor ``map`` of a bound method: compiled, a loop calls it natively)
        frees = []
        for p in ptrs:
            frees.append(self.alloc.free_request(p))
        batch += frees
        return batch, len(reqs), ahead, ptrs, released, aborts, frees

    def owed_failed(self, owed: Owed, e: TransportError) -> None:
        """``owed``'s round trip failed with ``e`` (which the operation raises on): marks go
        out again with the next batch (a newer record of the same outcome), and so do frees
        that surely did not happen (refused or flushed, or none was posted: a new epoch). A
        free whose MN did not answer may have happened: a slow MN executes what it answers
        too late, and may live on. Sent again there, its bit would be set twice and carry
        into the next object's bit (a live object freed). So it is ``unsure``: sent to the
        next home if that MN is dead, its bitmap with it (``place``), else left to recovery
        (the client is not ``settled``: ``fusee.settle``), which tells from the bit, the
        used byte and the crc whether it happened."""
        _, _, ahead, ptrs, released, aborts, _ = owed
        self.aborts[:0] = aborts
        done = e.results
        if isinstance(e, EpochChanged):
            self.deferred += ptrs
        elif done is None:
            for p in ptrs:
                self.unsure.append((p, None, self.membership.epoch))
        else:
            for p, r in zip(ptrs, done[ahead:]):
                if isinstance(r, NodeTimeout):
                    self.unsure.append((p, r.node, self.membership.epoch))
                elif isinstance(r, TransportError):
                    self.deferred.append(p)
        if self.unsure or self._any_deferred(ptrs):
            self.releases += released   # reused once the frees are settled
        else:
            self._release(released)

    def owed_done(self, owed: Owed, res: list[Any]) -> tuple[list[Any], list[Faa]]:
        """``owed``'s round trip is through with completions ``res``: reuse what its frees
        and marks owed. Returns the completions of the operation's own requests, and the
        frees that found their bit set already (to ``take_back`` at once)."""
        _, asked, ahead, _, released, aborts, frees = owed
        if self.unsure:
            self.releases += released
        elif released:
            self._release(released)
        for obj in aborts:      # marked ABORTED: recovery never redoes them
            self.alloc.release(obj.ptr)
        twice = []
        for f in frees:             # (a comprehension: a function made; no slice of ``res``)
            if res[ahead] & f.delta:
                twice.append(f)
            ahead += 1
        return res[:asked], twice

    def owes(self) -> bool:
        """See ``OpCore.owes``: frees deferred or ABORTED marks, which ``rt`` adds."""
        return bool(self.deferred or self.aborts)

    def _any_deferred(self, ptrs: list[int]) -> bool:
        """Some free of ``ptrs`` is deferred (to go out again)."""
        return any(p in self.deferred for p in ptrs)

    def _aborted_marks(self, aborts: Sequence[NewObject]) -> list[Write]:
        """The ABORTED marks of ``aborts``' log entries (objects never proposed)."""
        return [w for obj in aborts for w in self.log.record(obj, ABORTED, NO_SLOT, 0)]

    def take_back(self, frees: list[Faa]) -> Op[None]:
        """Generator: take back ``frees``, whose FAAs found their bit already set: each
        object was freed already (a free delivered twice is a bug), and the add carried into
        the next object's bit, a live object that would read as freed and be reused.
        Subtracting the bit takes exactly that add back (FAAs commute), whatever came
        between; only a reclaim by the neighbour's owner in that round trip can take it."""
        for f in frees:
            log.error("client %d: a free of an object freed already (MN %d, bitmap word %#x, "
                      "bit %d): taken back", self.client_id, f.node, f.addr,
                      f.delta.bit_length() - 1)
        yield [f._replace(delta=-f.delta & MASK64) for f in frees]

    def _release(self, released: Sequence[int]) -> None:
        """The frees sent are delivered: reuse the objects whose log entries owed them."""
        for p in released:
            self.alloc.release(p)

