"""What the `fusee` command exits with, and the one line it prints, for each kind of failure.

A script driving the CLI must tell "the key is not there" from "the cluster is down" from "I
typed it wrong" without parsing messages, so every failure maps to one documented code:

    0  done
    1  the key was not found (get, update, delete) or already exists (insert)
    2  usage, configuration or input error: fix the command, the config or the value
    3  the cluster is unavailable: a memory node or the master did not answer, or refused us
    4  the stored data is damaged or was lost
    5  internal error: a bug (run again with --debug and report the traceback)

Every fusee error carries its own ``exit_code`` (``fusee.errors``); for an exception from
elsewhere, the table below decides. The hint after the message says what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusee.errors import FuseeError

# the codes themselves live with the error tree, each class carrying its own
from fusee.errors import DATA_ERROR, INTERNAL, NOT_FOUND, OK, UNAVAILABLE, USAGE

__all__ = ["DATA_ERROR", "INTERNAL", "NOT_FOUND", "OK", "UNAVAILABLE", "USAGE", "classify",
           "describe"]

#: exceptions that are not fusee's (raised by the operating system or the codec) but are the
#: user's or the cluster's doing, and the code each exits with
_FOREIGN = ((FileExistsError, USAGE), (FileNotFoundError, USAGE), (PermissionError, USAGE),
            (UnicodeError, USAGE), (ConnectionError, UNAVAILABLE))


def _hints() -> tuple[tuple[type[FuseeError], str], ...]:
    """(fusee error class, what to do) in the order they are tried (subclasses first)."""
    from fusee.errors import (ClientLimit, KeyExists, LeaseExpired, MasterError, NodeTimeout,
                              StoreFormatError)
    return (
        (KeyExists, "use `fusee put` to overwrite"),
        (ClientLimit, "close idle clients, or raise layout.max_clients"),
        (StoreFormatError, "is the config the one the memory nodes were started with?"),
        (NodeTimeout, ("is that memory node running, and is its endpoint in the config right? "
                       "(`fusee status` shows what each node says)")),
        (LeaseExpired, "the master took this client's id back; retry"),
        (MasterError, "is the master running at the config's `master` endpoint?"),
    )


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, hint) for ``exc``: a fusee error's own ``exit_code``, a foreign one's from
    the table above; INTERNAL for anything not known to be the user's or the cluster's doing."""
    code = getattr(exc, "exit_code", None)
    if code is None:
        code = next((c for cls, c in _FOREIGN if isinstance(exc, cls)), None)
    if code is None:
        return INTERNAL, "internal error: run again with --debug and report the traceback"
    hint = next((text for cls, text in _hints() if isinstance(exc, cls)), "")
    assert type(code) is int and 0 <= code <= 255, code
    return code, hint


def describe(exc: BaseException) -> str:
    """The one line printed for ``exc``: its message (its class name if it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
