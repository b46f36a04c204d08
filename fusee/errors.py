"""The public errors of the store. Every one derives from ``FuseeError``; the lookup errors are
also ``KeyError`` and the size errors ``ValueError`` so that ordinary Python handlers work.

Wrong argument types raise the built-in ``TypeError`` before any verb is sent; failures of the
network or of a memory node are the transport's own ``fusee.verbs.TransportError``.
"""

from __future__ import annotations


class FuseeError(Exception):
    """Base class of the store's errors."""


class KeyExists(FuseeError, KeyError):
    """``insert`` of a key that is already in the store."""

    def __str__(self) -> str:
        return f"key {self.args[0]!r} already exists" if self.args else "key already exists"


class KeyNotFound(FuseeError, KeyError):
    """``update`` or ``delete`` of a key that is not in the store."""

    def __str__(self) -> str:
        return f"key {self.args[0]!r} not found" if self.args else "key not found"


class KeyTooLarge(FuseeError, ValueError):
    """The key is empty or longer than ``layout.max_key_size``."""


class ValueTooLarge(FuseeError, ValueError):
    """Key + value + object overhead exceed the largest object size class."""


class CorruptObject(FuseeError):
    """An index slot points at an object whose checksum or key does not verify, and the slot
    did not change while we looked twice: the object is damaged, not merely being replaced."""


class IndexFull(FuseeError):
    """The index area of the memory nodes has no room for another subtable split."""


class OutOfMemory(FuseeError):
    """No memory node could hand out another data block."""


class StoreFormatError(FuseeError):
    """The memory nodes do not hold a store formatted for this layout."""


def check_key(key, max_key_size: int) -> bytes:
    """Return ``key`` as bytes or raise TypeError / KeyTooLarge."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"keys are bytes, got {type(key).__name__}")
    key = bytes(key)
    if not key:
        raise KeyTooLarge("the empty key is not allowed")
    if len(key) > max_key_size:
        raise KeyTooLarge(f"key of {len(key)} bytes exceeds max_key_size={max_key_size}")
    return key


def check_value(value) -> bytes:
    """Return ``value`` as bytes or raise TypeError (its size is checked by the allocator)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"values are bytes, got {type(value).__name__}")
    return bytes(value)


class ClientLimit(FuseeError):
    """Every client id of the layout (``layout.max_clients``) has been handed out."""


class Stalled(FuseeError):
    """An operation re-read a slot, a claim or a subtable ``patience`` times without seeing
    another client's write, claim or split finish: that client has probably crashed and
    waits for recovery. The operation's outcome is unknown (it may still take effect when
    the round it joined is finished by recovery); retry it later."""


class NeedsRecovery(FuseeError):
    """This client id was left in use by a client that did not close (it crashed, or it is
    still running): recover it first (``Client(..., recover=True)`` or the master)."""


class RecoveryInProgress(FuseeError):
    """Another recoverer holds this client id's recovery lock."""


class ForkedClient(FuseeError):
    """The client was opened in another process, which then forked: a child shares its id,
    its memory and its sockets with the parent, and using them from both corrupts the store
    (or hangs on the sockets). Open a new client in the child."""
