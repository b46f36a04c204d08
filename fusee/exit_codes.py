"""What the `fusee` command exits with, and the one line it prints, for each kind of failure.

A script driving the CLI must tell "the key is not there" from "the cluster is down" from "I
typed it wrong" without parsing messages, so every failure maps to one documented code:

    0  done
    1  the key was not found (get, update, delete) or already exists (insert)
    2  usage, configuration or input error: fix the command, the config or the value
    3  the cluster is unavailable: a memory node or the master did not answer, or refused us
    4  the stored data is damaged or was lost
    5  internal error: a bug (run again with --debug and report the traceback)

An exception class may carry its own ``exit_code`` (the library's error tree does); for a class
that does not, the table below decides. The hint after the message says what to do.
"""

from __future__ import annotations

OK, NOT_FOUND, USAGE, UNAVAILABLE, DATA_ERROR, INTERNAL = 0, 1, 2, 3, 4, 5


def _classes():
    """(exception class, exit code, hint) in the order they are tried (subclasses first)."""
    from fusee.config import ConfigError
    from fusee.errors import (
        ClientLimit,
        CorruptObject,
        KeyExists,
        KeyNotFound,
        KeyTooLarge,
        StoreFormatError,
        ValueTooLarge,
    )
    from fusee.master import DataLost, LeaseExpired
    from fusee.verbs import NodeTimeout, RemoteAccessError, TransportError
    from fusee.transports.master_link import MasterError
    return (
        (KeyNotFound, NOT_FOUND, ""),
        (KeyExists, NOT_FOUND, "use `fusee put` to overwrite"),
        (KeyTooLarge, USAGE, ""),
        (ValueTooLarge, USAGE, ""),
        (ConfigError, USAGE, ""),
        (FileExistsError, USAGE, ""),
        (FileNotFoundError, USAGE, ""),
        (PermissionError, USAGE, ""),
        (UnicodeError, USAGE, ""),
        (ClientLimit, UNAVAILABLE, "close idle clients, or raise layout.max_clients"),
        (DataLost, DATA_ERROR, ""),
        (CorruptObject, DATA_ERROR, ""),
        (StoreFormatError, DATA_ERROR,
         "is the config the one the memory nodes were started with?"),
        (RemoteAccessError, UNAVAILABLE, ""),
        (NodeTimeout, UNAVAILABLE, ("is that memory node running, and is its endpoint in the "
                                    "config right? (`fusee status` shows what each node says)")),
        (TransportError, UNAVAILABLE, ""),
        (LeaseExpired, UNAVAILABLE, "the master took this client's id back; retry"),
        (MasterError, UNAVAILABLE, "is the master running at the config's `master` endpoint?"),
        (ConnectionError, UNAVAILABLE, ""),
    )


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, hint) for ``exc``; INTERNAL for anything not known to be the user's or the
    cluster's doing."""
    code = getattr(exc, "exit_code", None)
    hint = ""
    for cls, default, text in _classes():
        if isinstance(exc, cls):
            hint = text
            if code is None:
                code = default
            break
    if code is None:
        return INTERNAL, "internal error: run again with --debug and report the traceback"
    assert type(code) is int and 0 <= code <= 255, code
    return code, hint


def describe(exc: BaseException) -> str:
    """The one line printed for ``exc``: its message (its class name if it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
