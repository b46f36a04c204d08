"""The vocabulary between the sans-IO core and any transport.

Operations in the core are generators that yield *batches* (lists) of the verbs below and
receive, for each batch, a list of completions in the same order. One batch is one network
round trip, however many memory nodes it touches. This module imports nothing of I/O, so the
core, the transports and the simulator can all share it.

Addresses are byte offsets inside the registered region of memory node ``node``; a transport
adds whatever base address its hardware needs. Atomic operands are unsigned 64-bit
little-endian words at 8-byte aligned addresses.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, NamedTuple, TypeVar

# the transport errors belong to the store's one tree (fusee.errors); imported from here too
from fusee.errors import ControlError as ControlError
from fusee.errors import EpochChanged as EpochChanged
from fusee.errors import NodeTimeout as NodeTimeout
from fusee.errors import NotAuthorized as NotAuthorized
from fusee.errors import RemoteAccessError as RemoteAccessError
from fusee.errors import TransportError as TransportError

WORD = 8
MASK64 = (1 << 64) - 1
#: most requests in one batch: a send queue's depth on a NIC; a memory node refuses longer ones
MAX_BATCH = 4096
T = TypeVar("T")


class Read(NamedTuple):
    """READ ``length`` bytes at ``addr``; completes with ``bytes``."""
    node: int
    addr: int
    length: int


class Write(NamedTuple):
    """WRITE ``data`` at ``addr``; completes with ``None``."""
    node: int
    addr: int
    data: bytes


class Cas(NamedTuple):
    """8-byte compare-and-swap; completes with the word's old value (swapped iff
    old == expected)."""
    node: int
    addr: int
    expected: int
    desired: int


class Faa(NamedTuple):
    """8-byte fetch-and-add modulo 2**64; completes with the word's old value."""
    node: int
    addr: int
    delta: int


class AllocBlock(NamedTuple):
    """Control request served by the MN's CPU: hand a free data block to ``owner``.

    Completes with the block's address. This is the only work a memory node's CPU does for
    clients (docs/design.md#two-level-allocation), off the fast path. ``at=addr`` asks for that
    very block, refused if it is taken: the copies of a block group sit at the same address on
    every replica, so an object's pointer finds any of them (``fusee.membership``).
    """
    node: int
    owner: int
    at: int = 0


class FreeBlock(NamedTuple):
    """Control request: return block ``addr`` owned by ``owner`` to the MN; completes with None."""
    node: int
    owner: int
    addr: int


class AwaitMembership(NamedTuple):
    """Not a verb: an operation that cannot go on under membership epoch ``epoch`` (a memory
    node stopped answering) asks whoever drives it for the next epoch. The driver answers by
    throwing EpochChanged into it once the master's failover has published one, or the
    original NodeTimeout when no failover will come (no master, or none in time). It is
    always alone in its batch."""
    epoch: int


class Backoff(NamedTuple):
    """Not a verb: an operation that has been waiting on another client for a while lets
    ``seconds`` pass before it looks again, so that its polling leaves the CPU to the others
    (the master among them, on a small machine). Always alone in its batch; completes with
    None. A driver that has other operations to run may run them instead."""
    seconds: float


def _build_verbs_in_c() -> None:
    """Build the four verbs in C where the extension is compiled: a namedtuple's own
    ``__new__`` is a Python lambda, a tenth of an update's client CPU. ``verb_new`` is their
    ``__new__`` (what ``_make``, ``_replace`` and unpickling call); ``verb_constructor`` then
    makes a call of the class itself one C function, not type_call, slot_tp_new and that
    staticmethod (~700 instructions a verb, issue 12). The verbs stay the same classes
    (fields, ``_replace``, equality, pickling); without the extension they are built the
    namedtuple's way."""
    try:
        from fusee.emulator._atomic import verb_constructor, verb_new
    except ImportError:
        return
    for verb in (Read, Write, Cas, Faa):
        verb.__new__ = staticmethod(verb_new)  # type: ignore[method-assign,assignment]  # the point
        verb_constructor(verb)  # last: it is the call through the class


_build_verbs_in_c()

Verb = Read | Write | Cas | Faa
Control = AllocBlock | FreeBlock
Request = Read | Write | Cas | Faa | AllocBlock | FreeBlock
Batch = Sequence[Request]
R = TypeVar("R", bound=Request)
#: what an operation yields: a batch of requests, or one of the two that are not verbs, alone
Step = Sequence[Request | AwaitMembership | Backoff]
#: an operation (sans-IO): yields Steps, is sent each one's completions (a list; None to
#: start it), returns a T
Op = Generator[Step, Any, T]


#: what ends the membership epoch an operation runs in, as far as it can tell
EPOCH_ENDS = (NodeTimeout, EpochChanged)


def chunks(reqs: Sequence[R], size: int = MAX_BATCH // 2) -> list[list[R]]:
    """``reqs`` in order, cut into batches that may be posted (half of MAX_BATCH by default,
    leaving room for requests that ride along, like deferred frees)."""
    return [list(reqs[i:i + size]) for i in range(0, len(reqs), size)]


def validate(req: Request) -> None:
    """Reject a malformed request before anything is sent (TypeError / ValueError)."""
    t = type(req)
    if t not in _FIELDS:
        raise TypeError(f"not a verb: {req!r}")
    for name, kind in _FIELDS[t]:
        value = getattr(req, name)
        if kind is int:
            if type(value) is not int:
                raise TypeError(f"{t.__name__}.{name} must be int, got {type(value).__name__}")
            if value < 0 and not (t is Faa and name == "delta"):
                raise ValueError(f"{t.__name__}.{name} must be >= 0, got {value}")
        elif not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{t.__name__}.{name} must be bytes, got {type(value).__name__}")
    if isinstance(req, Cas) and (req.expected > MASK64 or req.desired > MASK64):
        raise ValueError("CAS operands must fit in 64 bits")
    if isinstance(req, Faa) and not -(1 << 63) <= req.delta <= MASK64:
        raise ValueError("FAA delta must fit in 64 bits")


_FIELDS = {
    Read: (("node", int), ("addr", int), ("length", int)),
    Write: (("node", int), ("addr", int), ("data", bytes)),
    Cas: (("node", int), ("addr", int), ("expected", int), ("desired", int)),
    Faa: (("node", int), ("addr", int), ("delta", int)),
    AllocBlock: (("node", int), ("owner", int), ("at", int)),
    FreeBlock: (("node", int), ("owner", int), ("addr", int)),
}
