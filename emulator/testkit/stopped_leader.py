"""``python -m fusee.emulator.testkit.stopped_leader`` is ``fusee master`` but for one thing: it
SIGSTOPs itself at the worst moment for a leader, right after its leadership check passed
(``fusee.master.election.LeaderGuard``) and before the batch it checked goes out, the first
batch of a rebuild's last phase (``fusee.rebuild.Rebuild.finish``) that writes to the MN it
rebuilds. For tests of a leader deposed while it is stopped (tests/test_master_fence_processes.py):
a SIGSTOP sent from outside lands in that window only by chance, this one every time. Whoever
started it sends the SIGCONT. Once that batch is done it says (on stderr) how it went. With
``ONCE`` set, only the first master of the cluster to get there stops: its successor may be
another of these.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from fusee.master import command, election
from fusee.master.worker import Worker
from fusee.verbs import Batch, Write

#: the MN whose rebuild reached its last phase, until the stop (at most one entry)
_armed: list[int] = []
#: an environment variable naming a file that the first master to stop creates
ONCE = "FUSEE_STOPPED_LEADER_ONCE"


def _first() -> bool:
    """This master is the first to get to the stop (or ``ONCE`` is not set)."""
    path = os.environ.get(ONCE)
    if path is None:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class _StopBeforeTheCopy:
    """The transport under the leader's guard: it stops this process before executing the
    first batch that writes to the armed MN, so the guard's check has passed already."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def execute(self, batch: Batch) -> list[Any]:
        if _armed and any(type(v) is Write and v.node == _armed[0] for v in batch):
            _armed.clear()
            if _first():
                return self._stopped_then_executed(batch)
        return self.transport.execute(batch)

    def _stopped_then_executed(self, batch: Batch) -> list[Any]:
        # directed at this thread, which stops before it returns (the whole process with it);
        # sent to the process, another thread could take it while this one sends the batch
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        try:
            result: list[Any] = self.transport.execute(batch)
        except Exception as e:
            _say(f"the batch checked before the stop failed: {type(e).__name__}: {e}")
            raise
        _say("the batch checked before the stop went through")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _say(what: str) -> None:
    """Into the master's log, for the test to read."""
    print(f"stopped_leader: {what}", file=sys.stderr, flush=True)


def _install() -> None:
    guard, closing = election.LeaderGuard.__init__, Worker._closing

    def guarded(self: election.LeaderGuard, transport: Any, leading: Any) -> None:
        guard(self, _StopBeforeTheCopy(transport), leading)  # type: ignore[arg-type]

    def closing_then_armed(self: Worker, node: int) -> None:
        closing(self, node)             # saved: the last phase (Rebuild.finish) comes next
        _armed[:] = [node]

    election.LeaderGuard.__init__ = guarded             # type: ignore[method-assign]
    Worker._closing = closing_then_armed                # type: ignore[method-assign]


if __name__ == "__main__":
    _install()
    sys.exit(command.main())
