"""Every error the store raises to its users, in one tree rooted at ``FuseeError``.

    FuseeError
    |-- KeyNotFound, KeyExists (also KeyError)                    exit 1
    |-- WrongType (also TypeError), KeyTooLarge, ValueTooLarge, InvalidArgument,
    |   ConfigError (also ValueError), ClientClosed, ForkedClient,
    |   NeedsRecovery, StoreFormatError, WrongMemoryNode           exit 2
    |-- TransportError                                             exit 3
    |   |-- NodeTimeout, EpochChanged, ControlError, Fenced        exit 3
    |   |   `-- NodeRestarted (also RemoteAccessError)             exit 3
    |   `-- RemoteAccessError                                      exit 5
    |       `-- NotAuthorized                                      exit 2
    |-- LeaseExpired, LeaseLapsed, LeaseError, MasterError (MasterTimeout,
    |   MasterBusy, MasterStandby), TransitionInProgress, ClientLimit, Stalled, RecoveryInProgress,
    |   IndexFull, OutOfMemory                                     exit 3
    |-- CorruptObject, DataLost                                    exit 4
    `-- anything else (BatchError: its failures' highest code)    exit 5

Each class carries the ``exit_code`` a command-line tool exits with when it stops on that
error, so that a script can tell the cases apart:

    0  success
    1  not found: the key is not in the state the operation needs (absent; present, for insert)
    2  usage, configuration or bad input: fix the command, the config or the argument
    3  the cluster is unavailable: a memory node or the master does not answer, the lease ran
       out, no client id or memory is free; retrying later may succeed
    4  data error: an object is corrupt, or data is lost (more nodes died than replicas)
    5  internal error: a bug, report it

The lookup errors are also ``KeyError``, the size, range and config errors ``ValueError``,
a key, value or argument of the wrong type a ``TypeError`` (``WrongType``) and a closed client
a ``RuntimeError``, so ordinary Python handlers keep working. The classes used to live in other
modules, where they can still be imported from: ``fusee.verbs`` (the transport errors),
``fusee.master.logic`` (``LeaseExpired``, ``LeaseError``, ``TransitionInProgress``, ``DataLost``),
``fusee.index`` (``LostData``, now ``DataLost``: both meant "every replica of something is on a
dead memory node"), ``fusee.master.link`` (the master errors), ``fusee.config``
(``ConfigError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusee.membership import Membership

#: exit codes of the command-line tools (see the module doc)
OK, NOT_FOUND, USAGE, UNAVAILABLE, DATA_ERROR, INTERNAL = range(6)


class FuseeError(Exception):
    """Base class of the store's errors; raised as itself for nothing (a subclass says what).
    ``exit_code``: what a command-line tool exits with on it."""
    exit_code = INTERNAL


# -- not found (1) ---------------------------------------------------------------------------

class KeyExists(FuseeError, KeyError):
    """Raised when ``insert`` finds the key already in the store."""
    exit_code = NOT_FOUND

    def __str__(self) -> str:
        return f"key {self.args[0]!r} already exists" if self.args else "key already exists"


class KeyNotFound(FuseeError, KeyError):
    """Raised when ``update`` or ``delete`` finds the key absent."""
    exit_code = NOT_FOUND

    def __str__(self) -> str:
        return f"key {self.args[0]!r} not found" if self.args else "key not found"


# -- usage, configuration, bad input (2) -----------------------------------------------------

class WrongType(FuseeError, TypeError):
    """Raised when a key or value is not bytes (before any verb is sent)."""
    exit_code = USAGE


class KeyTooLarge(FuseeError, ValueError):
    """Raised when a key is empty or longer than ``layout.max_key_size`` (before any verb)."""
    exit_code = USAGE


class ValueTooLarge(FuseeError, ValueError):
    """Raised when key + value + object overhead exceed the largest object size class (before
    any verb); the message says how large a value may be with that key."""
    exit_code = USAGE


class InvalidArgument(FuseeError, ValueError):
    """Raised when an argument of the API is out of its range (a depth, a client id, a
    patience; before any verb): the message says the range."""
    exit_code = USAGE


class ConfigError(FuseeError, ValueError):
    """Raised when the cluster configuration is missing, malformed or inconsistent."""
    exit_code = USAGE


class ClientClosed(FuseeError, RuntimeError):
    """Raised when an operation is asked of a client after its ``close()``."""
    exit_code = USAGE


class ForkedClient(FuseeError):
    """Raised when a client opened in another process, which then forked, is used in the
    child: a child shares its id, its memory and its sockets with the parent, and using them
    from both corrupts the store (or hangs on the sockets). Open a new client in the child."""
    exit_code = USAGE


class NeedsRecovery(FuseeError):
    """Raised when opening a client id that was left in use by a client that did not close
    (it crashed, or it is still running): recover it first (``Client(..., recover=True)`` or
    the master)."""
    exit_code = USAGE


class StoreFormatError(FuseeError):
    """Raised when the memory nodes do not hold a store formatted for this layout."""
    exit_code = USAGE


class WrongMemoryNode(FuseeError):
    """Raised when a memory node's region header says it is not the config's: another
    cluster's (its cluster id), another layout's, or another id's (``fusee.cluster_identity``),
    before anything is written to it. ``node``, ``endpoint``, ``expected`` and ``found`` say
    which and why; the message says what to do."""
    exit_code = USAGE

    def __init__(self, message: str, node: int, endpoint: str, expected: str,
                 found: str) -> None:
        super().__init__(message)
        self.node, self.endpoint, self.expected, self.found = node, endpoint, expected, found

    def __reduce__(self) -> tuple[Any, ...]:      # (pickled across processes, as any error)
        return type(self), (str(self), self.node, self.endpoint, self.expected, self.found)


# -- the network and the memory nodes --------------------------------------------------------

class TransportError(FuseeError):
    """Raised when a batch did not complete. ``node`` names the memory node at fault;
    ``results`` holds the completions in batch order, with the exception itself in place of
    every request that did not complete (so an operation can go on with what the live nodes
    returned)."""
    exit_code = UNAVAILABLE

    def __init__(self, message: str, node: int | None = None,
                 results: list[Any] | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.results = results


class RemoteAccessError(TransportError):
    """Raised when a memory node refused a request: out-of-range address, wrong key, unaligned
    atomic, or a malformed request. The node keeps serving everyone else."""
    exit_code = INTERNAL


class NotAuthorized(RemoteAccessError):
    """Raised when a memory node or the master refused this client's CURVE key (the handshake
    failed): authorize the client's public key on the servers, or configure the right
    server key."""
    exit_code = USAGE


class NodeTimeout(TransportError):
    """Raised when a memory node sent no completion within the deadline: it is unreachable
    or dead."""


class NodeRestarted(NodeTimeout, RemoteAccessError):
    """Raised when a memory node refused this client's access key: the process at its endpoint
    registered its memory anew (the key is drawn at each start), so it restarted since the
    client connected and its memory is gone. It is as dead as a silent one: an operation
    awaits the failover the master runs for it (``Master.mn_seen``), never gives up."""
    exit_code = UNAVAILABLE


def batch_failure(results: list[Any]) -> TransportError | None:
    """The error a batch whose completions are ``results`` fails with, carrying them all; None
    if every request completed. A dead node outranks a refused request: it tells the caller
    more (the operation awaits the next epoch rather than give up). The one ranking of
    failures: a transport raises it for a whole batch, a driver running operations in flight
    together for each one's slice (``fusee.driver``)."""
    failure = None
    for r in results:
        if isinstance(r, TransportError):
            if failure is None or (isinstance(r, NodeTimeout) and
                                   not isinstance(failure, NodeTimeout)):
                failure = r
    return None if failure is None else type(failure)(str(failure), failure.node, results)


class EpochChanged(TransportError):
    """Raised (into an operation, by its driver) when the batch was not posted because the
    cluster moved to ``membership`` (a ``fusee.membership.Membership``) since the operation
    began. The operation adopts it and settles whatever round the old epoch left open before
    it goes on; a user sees it only from a bare transport."""

    def __init__(self, membership: Membership, message: str | None = None) -> None:
        super().__init__(message or f"membership epoch {membership.epoch} began")
        self.membership = membership


class Fenced(TransportError):
    """Raised when a memory node refused this client's request because the master ended its
    lease and fenced it (``fusee.fencing``): the client may write nothing more, and the
    master recovers its operations. Open a new client."""


class ControlError(TransportError):
    """Raised when a control request was refused (no free block, wrong owner, unknown
    request)."""


# -- the master, leases, capacity (3) --------------------------------------------------------

class LeaseExpired(FuseeError):
    """Raised by every operation once this client's lease ran out: it may no longer write, and
    the master will recover its operations. Open a new client."""
    exit_code = UNAVAILABLE


class LeaseLapsed(FuseeError):
    """Raised by an operation when this client's lease is not valid now and no renewal came
    within the membership wait (the master is unreachable): it posted no verb. The client is
    not dead: retry once a master answers."""
    exit_code = UNAVAILABLE


class LeaseError(FuseeError):
    """Raised when the master refuses a renewal or release for an id it does not (or no
    longer) lease to the caller."""
    exit_code = UNAVAILABLE


class TransitionInProgress(FuseeError):
    """Raised when registering while a memory node's failover has not published the next
    epoch yet: register again shortly."""
    exit_code = UNAVAILABLE


class MasterError(FuseeError):
    """Raised when the master refused a request."""
    exit_code = UNAVAILABLE


class MasterTimeout(MasterError):
    """Raised when the master did not reply within the deadline; the message names its
    endpoint."""


class MasterBusy(MasterError):
    """Raised when registering during a failover: the master registers no client until it is
    done."""


class MasterStandby(MasterError):
    """Raised when every configured master stands by (another leads, or none yet); a single
    standby's refusal only moves the client on to the next master of the list."""


class ClientLimit(FuseeError):
    """Raised when every client id of the layout (``layout.max_clients``) is handed out."""
    exit_code = UNAVAILABLE


class Stalled(FuseeError):
    """Raised when an operation re-read a slot, a claim or a subtable ``patience`` times
    without seeing another client's write, claim or split finish: that client has probably
    crashed and waits for recovery. The operation's outcome is unknown (it may still take
    effect when the round it joined is finished by recovery); retry it later."""
    exit_code = UNAVAILABLE


class RecoveryInProgress(FuseeError):
    """Raised when another recoverer holds this client id's recovery lock."""
    exit_code = UNAVAILABLE


class IndexFull(FuseeError):
    """Raised when the index area of the memory nodes has no room for another subtable
    split."""
    exit_code = UNAVAILABLE


class OutOfMemory(FuseeError):
    """Raised when no memory node could hand out another data block."""
    exit_code = UNAVAILABLE


# -- data errors (4) -------------------------------------------------------------------------

class CorruptObject(FuseeError):
    """Raised when an index slot points at an object whose checksum or key does not verify,
    and the slot did not change while we looked twice: the object is damaged, not merely
    being replaced."""
    exit_code = DATA_ERROR


class DataLost(FuseeError):
    """Raised when every replica of something (an index subtable, an object, a client's
    metadata) is on a dead memory node: more memory nodes died than the replication
    tolerates (r - 1), and the master fails over no more."""
    exit_code = DATA_ERROR


#: an argument of the public API: bytes (a key, a value) or an int (a depth, a client id)
#: as the docstrings say, unchecked by its annotation. Compiled (setup.py), a parameter
#: annotated ``bytes`` or ``int`` would refuse another type with mypyc's plain TypeError,
#: before the API's own check says WrongType, and ``bytes`` would refuse a bytearray it takes.
Arg = Any
