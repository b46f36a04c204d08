"""The master's side of rebuilding memory nodes (``fusee.rebuild``), sans-IO: which dead MNs
asked to rejoin, when a rebuild may run, and what each MN's state is for ``status``.

A dead MN (failed over) that answers the master's heartbeat with "rejoin" (``fusee memnode
--rejoin``: a restarted MN, or a replacement with the same id) is queued here. Once no
failover is pending and no repair runs, its rebuild runs (``fusee.rebuild``): first the
online copy (phase COPYING) while the clients keep going (once each has heard of it in a
renewal: ``heard``, ``Master.unheard``), then the pause (phase PAUSING):
the clients pause for the next epoch, exactly as for a failover (``Master.pause``), and once
every leased client has acked, the rest is copied and ``done`` publishes its membership: the
MN is alive again, with a lease of its own.
The queue is not persisted: a master restarted meanwhile hears the MN ask again, and until a
rebuild publishes, the MN is dead in the membership and nobody reads it.

An MN that stops answering while it waits is dropped from the queue (it is still dead, and
the clients stop pausing for it). So is one whose rebuild failed: the clients resume at once
(in a new epoch if its pause had begun closing rounds: ``Master.rebuild_failed``), and its
next ask is heard after a backoff (never, after a RebuildError: it cannot succeed).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from dataclasses import dataclass, field

from fusee.index import replica_nodes

ALIVE, DEAD, FAILING, JOINING, REBUILDING = "alive", "dead", "failing", "joining", "rebuilding"
#: the phases of a running rebuild: the clients work meanwhile, or they pause
COPYING, PAUSING = "copying online", "pausing"
#: what an MN started with --rejoin answers to the master's ping (else "pong")
REJOIN = "rejoin"
PONG = "pong"


def ping_answer(rejoin: bool, incarnation: int) -> list[Any]:
    """An MN's answer to the master's ping: REJOIN or PONG, and its incarnation
    (``fusee.cluster_identity.new_incarnation``)."""
    return [REJOIN if rejoin else PONG, incarnation]


def read_ping_answer(value: object) -> tuple[str, int] | None:
    """(answer, incarnation) of a ping's reply value (incarnation 0: a bare "pong" or
    "rejoin", which says nothing of a restart); None for anything else."""
    if value in (PONG, REJOIN):
        return str(value), 0
    if (isinstance(value, list) and len(value) == 2 and value[0] in (PONG, REJOIN)
            and type(value[1]) is int and value[1] >= 0):
        return value[0], value[1]
    return None


@dataclass
class Rejoins:
    joining: dict[int, float] = field(default_factory=dict)    # MN -> deadline of its asking
    running: int | None = None
    progress: tuple[int, int] = (0, 0)                         # bytes copied, to copy
    phase: str = COPYING                                       # of the running rebuild
    attempts: dict[int, int] = field(default_factory=dict)     # failed rebuilds, per MN
    retry_at: dict[int, float] = field(default_factory=dict)   # no ask heard before then
    errors: dict[int, str] = field(default_factory=dict)       # the last failure, per MN
    #: the clients a renewal has told that the running rebuild runs (``Master.unheard``)
    heard: set[int] = field(default_factory=set)
    #: the incarnation each MN asked with last, and the running rebuild's as it began: the
    #: one the master expects of it once rebuilt (``Master.incarnations``)
    asked_as: dict[int, int] = field(default_factory=dict)
    rebuilding_as: int = 0

    def ask(self, node: int, sent_at: float, lease: float, incarnation: int = 0) -> bool:
        """Dead MN ``node`` asked to rejoin, as ``incarnation``, in answer to a ping sent at
        ``sent_at``; True when that queues it."""
        if sent_at < self.retry_at.get(node, 0.0):
            return False
        new = node not in self.joining
        self.joining[node] = max(self.joining.get(node, 0.0), sent_at + lease)
        self.asked_as[node] = incarnation
        return new

    def next(self, now: float, ready: bool) -> int | None:
        """The MN to rebuild now (marked running until ``done`` / ``failed``), if ``ready``
        (every client paused, no failover pending, no repair running). Drops the MNs that
        stopped asking."""
        for node, deadline in list(self.joining.items()):
            if now > deadline and node != self.running:
                del self.joining[node]
                self.asked_as.pop(node, None)
        if not ready or self.running is not None or not self.joining:
            return None
        self.running = min(self.joining)
        self.rebuilding_as = self.asked_as.get(self.running, 0)
        self.progress, self.phase = (0, 0), COPYING
        self.heard = set()
        return self.running

    @property
    def pausing(self) -> bool:
        """A rebuild waits for the clients to pause, or runs while they do."""
        return self.running is not None and self.phase == PAUSING

    def pause_for(self, node: int) -> None:
        """The online copy of ``node`` is done: the clients pause for the rest."""
        assert self.running == node, (node, self.running)
        self.progress, self.phase = (0, 0), PAUSING

    def done(self, node: int) -> None:
        assert self.running == node, (node, self.running)
        del self.joining[node]
        self.running = None
        for record in (self.attempts, self.retry_at, self.errors, self.asked_as):
            record.pop(node, None)

    def failed(self, node: int, now: float, error: str, backoff: float) -> None:
        """The rebuild of ``node`` failed: it leaves the queue (the clients resume) until
        ``backoff`` seconds from ``now`` have passed (``math.inf``: for good)."""
        assert self.running == node, (node, self.running)
        self.running = None
        del self.joining[node]
        self.asked_as.pop(node, None)
        self.attempts[node] = self.attempts.get(node, 0) + 1
        self.errors[node] = error
        self.retry_at[node] = now + backoff


def node_states(n: int, r: int, dead: Collection[int], failing: Collection[int],
                rejoins: Rejoins) -> dict[str, dict[str, Any]]:
    """Each MN's state and what it replicates, for ``Master.status`` (string keys): ``state``
    is alive, dead, failing (dead, failover pending), joining (asked to rejoin, the clients
    pausing) or rebuilding (``progress``: [bytes copied, bytes to copy]); ``replica_of``:
    the placement groups it holds a copy of (group p: the subtables whose id is p mod n and
    the block groups whose first MN is p; group 0 also has the directory and the client
    metadata); ``primary_of``: those it is the first live replica of; ``rebuild_error``: why
    its last rebuild failed, while it is not alive. A rebuilding MN has a ``phase``: copying
    online (the clients work) or pausing (they wait for the rest), with the phase's
    ``progress``."""
    out: dict[str, dict[str, Any]] = {}
    down = set(dead) | set(failing)
    for m in range(n):
        state = (REBUILDING if m == rejoins.running else JOINING if m in rejoins.joining
                 else FAILING if m in failing else DEAD if m in dead else ALIVE)
        groups = [p for p in range(n) if m in replica_nodes(p, n, r)]
        entry = {"state": state, "replica_of": groups,
                 "primary_of": [p for p in groups if m not in down and
                                next(x for x in replica_nodes(p, n, r) if x not in down) == m]}
        if state == REBUILDING:
            entry["phase"] = rejoins.phase
            entry["progress"] = list(rejoins.progress)
        if state != ALIVE and m in rejoins.errors:
            entry["rebuild_error"] = rejoins.errors[m]
        out[str(m)] = entry
    return out
